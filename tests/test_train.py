"""DVAE training (§3.2): it learns, it is deterministic, and an interrupted run resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch

from jpmap_core.models import MLPVAE
from jpmap_core.pretrained import PretrainedError, export_pretrained, load_pretrained
from jpmap_core.train import TrainConfig, evaluate_elbo, main, manifest_entry, train

SMALL = {"arch": "mlp", "hidden": [64, 64], "latent_dim": 4}


def _cfg(**kw) -> TrainConfig:
    base = dict(name="t", model=dict(SMALL), sigma_dvae=15.0, epochs=3, lr=1e-3, batch_size=64, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_short_training_raises_the_test_elbo(tmp_path, mnist_small):
    cfg = _cfg()
    torch.manual_seed(cfg.seed)
    untrained = MLPVAE(hidden=(64, 64), latent_dim=4)
    before = evaluate_elbo(untrained, mnist_small[1].images)
    vae, log = train(cfg, tmp_path, data=mnist_small, progress=False)
    assert len(log) == 3
    assert log[-1]["test_elbo"] > before + 30  # nats per image
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    assert {"epoch", "train_elbo", "test_elbo", "gamma", "seconds"} <= set(log[0])


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, mnist_small):
    full, _ = train(_cfg(epochs=3), tmp_path / "a", data=mnist_small, progress=False)
    train(_cfg(epochs=2), tmp_path / "b", data=mnist_small, progress=False)  # "interrupted" after epoch 2
    resumed, log = train(_cfg(epochs=3), tmp_path / "b", resume=True, data=mnist_small, progress=False)
    assert [e["epoch"] for e in log] == [1, 2, 3]
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), f"parameter {k} differs after resume"


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, mnist_small):
    a, _ = train(_cfg(epochs=1), tmp_path / "a", data=mnist_small, progress=False)
    b, _ = train(_cfg(epochs=1), tmp_path / "b", data=mnist_small, progress=False)
    c, _ = train(_cfg(epochs=1, seed=1), tmp_path / "c", data=mnist_small, progress=False)
    wa, wb, wc = (m.state_dict()["decoder.0.weight"] for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


def test_checkpoints_are_written_atomically_every_epoch(tmp_path, mnist_small):
    train(_cfg(epochs=2), tmp_path, data=mnist_small, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "config.json", "log.json"]
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # loadable without unpickling
    assert ck["epoch"] == 2
    assert len(json.loads((tmp_path / "log.json").read_text())["epochs"]) == 2


def test_resume_refuses_a_different_recipe(tmp_path, mnist_small):
    train(_cfg(epochs=1), tmp_path, data=mnist_small, progress=False)
    with pytest.raises(ValueError, match="sigma_dvae"):
        train(_cfg(epochs=2, sigma_dvae=5.0), tmp_path, resume=True, data=mnist_small, progress=False)


def test_export_then_load_round_trip_and_corruption_is_detected(tmp_path, mnist_small):
    cfg = _cfg(epochs=1)
    vae, log = train(cfg, tmp_path / "run", data=mnist_small, progress=False)
    meta = {"data_source": mnist_small[0].source, "n_train": 512, "n_test": 256}
    entry = export_pretrained(vae, "tiny", manifest_entry(cfg, vae, log, meta), tmp_path / "w")
    for key in ("sha256", "model", "recipe", "data", "epochs", "final_test_elbo", "gamma", "training_seconds",
                "package_version", "command"):  # fmt: skip
        assert key in entry
    loaded = load_pretrained("tiny", directory=tmp_path / "w")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = mnist_small[1].images[:4]
    torch.testing.assert_close(loaded.reconstruct(x), vae.eval().reconstruct(x))

    with pytest.raises(PretrainedError, match="unknown prior 'nope'"):
        load_pretrained("nope", directory=tmp_path / "w")
    f = tmp_path / "w" / "tiny.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(PretrainedError, match="checksum mismatch"):
        load_pretrained("tiny", directory=tmp_path / "w")
    f.unlink()
    with pytest.raises(PretrainedError, match="missing"):
        load_pretrained("tiny", directory=tmp_path / "w")


def test_cli_trains_and_exports(tmp_path, data_dir):
    rc = main(["--name", "cli", "--epochs", "1", "--n-train", "256", "--n-test", "128", "--latent-dim", "4",
               "--sigma-dvae", "15", "--data-root", str(data_dir), "--run-dir", str(tmp_path / "run"),
               "--export", str(tmp_path / "w"), "--no-progress"])  # fmt: skip
    assert rc == 0
    manifest = json.loads((tmp_path / "w" / "manifest.json").read_text())
    assert manifest["cli"]["recipe"]["sigma_dvae"] == 15.0
    assert manifest["cli"]["data"]["n_train"] == 256
    assert "--sigma-dvae 15" in manifest["cli"]["command"]
