"""The call cache: keys by value, atomic save/load round trip, damaged entries recomputed."""

from __future__ import annotations

import pytest
import torch

from jpmap_core.cache import CallCache, code_fingerprint, fingerprint
from jpmap_core.operators import BatchBlocks, CompressedSensing, Denoising, Inpainting


def test_fingerprint_is_by_value():
    a = torch.arange(6.0).reshape(2, 3)
    assert fingerprint(a, 1.5, "x") == fingerprint(a.clone(), 1.5, "x")
    assert fingerprint(a) != fingerprint(a.double())  # dtype counts
    assert fingerprint(a) != fingerprint(a.reshape(3, 2))  # shape counts
    b = a.clone()
    b[1, 2] += 1e-6
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint(1) != fingerprint(1.0) and fingerprint(None) != fingerprint("None")
    g = torch.Generator().manual_seed(0)
    cs = CompressedSensing(20, (1, 8, 8), generator=g)
    cs_same = CompressedSensing(20, (1, 8, 8), matrix=cs.matrix.clone())
    assert fingerprint(cs) == fingerprint(cs_same)
    cs.A(torch.rand(2, 1, 8, 8))  # fills private caches: derived data, not part of the key
    assert fingerprint(cs) == fingerprint(cs_same)
    masks = torch.ones(2, 1, 8, 8)
    other = masks.clone()
    other[0, 0, 0, 0] = 0
    assert fingerprint(Inpainting(masks)) != fingerprint(Inpainting(other))
    assert fingerprint(BatchBlocks([cs, Denoising()], [1, 2])) != fingerprint(BatchBlocks([cs, Denoising()], [2, 1]))
    with pytest.raises(TypeError, match="cannot fingerprint"):
        fingerprint(object())


def test_call_cache_round_trip_and_damaged_entries(tmp_path):
    vae = torch.nn.Linear(3, 2)
    cache = CallCache(tmp_path / "c", vae)
    key = cache.key("csgm", torch.ones(2))
    assert cache.load(key) is None
    t = {"x": torch.rand(2, 1, 4, 4), "converged": torch.tensor([1, 0], dtype=torch.uint8)}
    cache.save(key, t, {"seconds": 1.25, "method": ["jpmap_alpha1", "jpmap_alpha5"]})
    tensors, meta = cache.load(key)
    assert torch.equal(tensors["x"], t["x"]) and torch.equal(tensors["converged"], t["converged"])
    assert meta == {"seconds": 1.25, "method": ["jpmap_alpha1", "jpmap_alpha5"]}
    assert not list((tmp_path / "c").glob("*.tmp"))  # written atomically, no leftovers
    with torch.no_grad():
        vae.weight[0, 0] += 1
    assert CallCache(tmp_path / "c", vae).key("csgm", torch.ones(2)) != key  # other weights, other key
    cache.path(key).write_bytes(b"\0" * 10)
    assert cache.load(key) is None
    assert code_fingerprint() == code_fingerprint() and len(code_fingerprint()) == 64


def test_describe_lists_the_finished_calls_and_the_damaged_ones(tmp_path, capsys):
    from jpmap_core.cache import describe, main

    cache = CallCache(tmp_path, torch.nn.Linear(3, 2))
    k1, k2, k3 = (cache.key("call", i) for i in range(3))
    cache.save(k1, {"x": torch.zeros(5, 1, 4, 4)}, {"seconds": 2.0, "method": "csgm"})
    cache.save(k2, {"x": torch.zeros(3, 1, 4, 4)}, {"seconds": 4.25, "method": ["jpmap_alpha1", "jpmap_alpha5"]})
    cache.save(k3, {"x": torch.zeros(2, 1, 4, 4)}, {"seconds": 1.0, "method": "csgm"})
    cache.path(k3).write_bytes(b"\0" * 10)
    rows = {e["key"]: e for e in describe(tmp_path)}
    assert set(rows) == {k1, k2, k3}
    assert rows[k1]["rows"] == 5 and rows[k1]["seconds"] == 2.0 and rows[k1]["method"] == "csgm"
    assert rows[k2]["method"] == ["jpmap_alpha1", "jpmap_alpha5"] and rows[k2]["rows"] == 3
    assert rows[k3].get("unreadable") is True and "seconds" not in rows[k3]
    assert describe(tmp_path / "absent") == []

    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "3 entries, 1 unreadable" in out
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines()[3:]}
    assert lines["csgm"] == ["1", "5", "2"] and lines["jpmap_alpha1+jpmap_alpha5"] == ["1", "3", "4"]
    assert lines["all"] == ["2", "8", "6"]
    with pytest.raises(SystemExit):
        main([str(tmp_path / "absent")])
    assert "is not a folder" in capsys.readouterr().err
