"""Training the hierarchical VAE on natural-image patches (PnP-HVAE §6.2): data split, patches, ELBO with per-group
KL, gradient skipping, EMA, exact resume, and DistributedDataParallel equal to one process."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from jpmap_core.data import CBSD10_NAMES, ImageSet, PatchSampler, bsd_split
from jpmap_core.models import HVAE
from jpmap_core.train import TrainConfig, main, train, train_hvae

TINY = {"arch": "hvae", "widths": [4, 6], "groups": [1, 1], "latent_channels": [2, 2], "enc_blocks": [1, 1],
        "gamma_init": 0.2}  # fmt: skip


def _smooth_images(n: int, seed: int) -> list[torch.Tensor]:
    """Smooth random colour images of a few sizes (>= 32 pixels, so that 8x8 patches fit at scale 1/4)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        h, w = (40, 48) if i % 2 else (48, 36)
        low = torch.rand(1, 3, h // 4, w // 4, generator=g)
        out.append(F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1))
    return out


@pytest.fixture(scope="module")
def tiny_data() -> tuple[ImageSet, ImageSet]:
    train_set = ImageSet(_smooth_images(6, 0), "synthetic smooth images", names=[f"tr{i}" for i in range(6)])
    test_set = ImageSet(_smooth_images(3, 1), "synthetic smooth images", names=[f"te{i}" for i in range(3)])
    return train_set, test_set


def _cfg(**kw) -> TrainConfig:
    base = dict(name="tiny_hvae", dataset="bsd_patches", model=dict(TINY), sigma_dvae=0.0, epochs=2, lr=2e-3,
                batch_size=8, seed=0, n_test=32, patch_size=8, steps_per_epoch=6, warmup_steps=3,
                ema_rate=0.9)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def bsd_root() -> Path:
    from jpmap_core.data import DataNotFoundError, resolve_root

    try:
        bsd_split()
    except DataNotFoundError as e:
        pytest.skip("needs the CBSD68 images: " + " ".join(str(e).split()))
    return resolve_root()


# ---- data ------------------------------------------------------------------------------------------
def test_bsd_split_holds_out_cbsd10_and_the_next_ten_images(bsd_root):
    from jpmap_core.data import _natural_key

    train_names, test_names = bsd_split()
    assert len(train_names) == 48 and len(test_names) == 20 and not set(train_names) & set(test_names)
    assert {f"{s}.png" for s in CBSD10_NAMES} <= set(test_names)
    everything = sorted(train_names + test_names, key=_natural_key)
    others = [n for n in everything if n[:-4] not in CBSD10_NAMES]
    assert set(test_names) - {f"{s}.png" for s in CBSD10_NAMES} == set(others[:10])


def test_patch_sampler_is_seeded_and_a_row_slice_is_that_part_of_the_full_batch(tiny_data):
    s = PatchSampler(tiny_data[0].images, 8)
    g1, g2, g3 = (torch.Generator().manual_seed(3) for _ in range(3))
    full = s.draw(10, g1)
    assert full.shape == (10, 3, 8, 8) and float(full.min()) >= 0 and float(full.max()) <= 1
    assert torch.equal(s.draw(10, g2, slice(4, 7)), full[4:7])
    assert torch.equal(g1.get_state(), g2.get_state())  # the generator advanced as for the whole batch
    assert torch.equal(s.draw(10, g3), full)
    assert not torch.equal(s.draw(10, g3), full)


def test_patch_sampler_uses_the_three_scales_and_the_eight_symmetries():
    ramp = torch.arange(64.0).reshape(1, 1, 8, 8).expand(1, 3, 8, 8) / 64  # one 8x8 asymmetric image
    s = PatchSampler([ramp], 8, scales=(1.0,))
    patches = s.draw(200, torch.Generator().manual_seed(0))
    distinct = {tuple(p[0].flatten().tolist()) for p in patches}
    assert len(distinct) == 8  # 4 rotations x 2 flips
    big = PatchSampler([torch.rand(1, 3, 64, 64)], 8)
    assert [lvl[0].shape[-1] for lvl in big.levels] == [64, 32, 16]
    with pytest.raises(ValueError, match="no image is at least 16x16 at scale"):
        PatchSampler([torch.rand(1, 3, 32, 32)], 16)


# ---- training -----------------------------------------------------------------------------------------
def test_hvae_training_raises_the_test_elbo_and_logs_every_group(tmp_path, tiny_data):
    from jpmap_core.train import evaluate_hvae, load_patch_data

    cfg = _cfg(epochs=3, steps_per_epoch=15)
    _, test_patches, meta = load_patch_data(cfg, tiny_data)
    torch.manual_seed(cfg.seed)
    before = evaluate_hvae(HVAE(image_shape=(3, 8, 8), **{k: v for k, v in TINY.items() if k != "arch"}), test_patches)
    model, log = train(cfg, tmp_path, data=tiny_data, progress=False)
    assert isinstance(model, HVAE) and not model.training
    assert [e["epoch"] for e in log] == [1, 2, 3] and log[-1]["step"] == 45
    assert log[-1]["test_elbo"] > before["elbo"] + 10 and log[-1]["test_elbo_per_dim"] > before["elbo_per_dim"]
    for key in ("train_kl", "test_kl"):
        assert len(log[-1][key]) == model.n_groups and all(v >= 0 for v in log[-1][key])
    for key in ("skipped", "skipped_total", "gamma", "seconds", "images_per_s", "lr", "grad_norm_median"):
        assert key in log[0]
    assert meta["train_images"] == tiny_data[0].names and meta["n_test_patches"] == 32
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert {"model", "ema", "optimizer", "generator", "step", "skipped"} <= set(ck)
    for k, v in model.state_dict().items():  # the returned (exported) model is the EMA
        assert torch.equal(v, ck["ema"][k])
    assert any(not torch.equal(ck["ema"][k], ck["model"][k]) for k in ck["model"])


def test_hvae_resume_gives_bitwise_the_weights_of_an_uninterrupted_run(tmp_path, tiny_data):
    train_hvae(_cfg(epochs=2), tmp_path / "a", data=tiny_data, progress=False)
    train_hvae(_cfg(epochs=1), tmp_path / "b", data=tiny_data, progress=False)  # "interrupted" after epoch 1
    _, log = train_hvae(_cfg(epochs=2), tmp_path / "b", resume=True, data=tiny_data, progress=False)
    assert [e["epoch"] for e in log] == [1, 2]
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    for part in ("model", "ema"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part} {k} differs after resume"
    assert torch.equal(a["generator"], b["generator"]) and a["step"] == b["step"] == 12
    with pytest.raises(ValueError, match="ema_rate"):
        train_hvae(_cfg(epochs=3, ema_rate=0.5), tmp_path / "b", resume=True, data=tiny_data, progress=False)


def test_updates_with_a_large_gradient_norm_are_skipped_and_counted(tmp_path, tiny_data):
    model, log = train_hvae(_cfg(epochs=1, skip_threshold=1e-9), tmp_path, data=tiny_data, progress=False)
    assert log[0]["skipped"] == log[0]["skipped_total"] == 6
    torch.manual_seed(0)
    init = HVAE(image_shape=(3, 8, 8), **{k: v for k, v in TINY.items() if k != "arch"})
    for k, v in init.state_dict().items():
        assert torch.equal(v, model.state_dict()[k])  # no update applied, EMA unchanged


def test_fixed_gamma_stays_fixed_and_the_manifest_says_so(tmp_path, tiny_data):
    from jpmap_core.train import load_patch_data, manifest_entry

    cfg = _cfg(epochs=1, model={**TINY, "gamma_init": 10 / 255, "learn_gamma": False})
    model, log = train_hvae(cfg, tmp_path, data=tiny_data, progress=False)
    assert float(model.gamma) == pytest.approx(10 / 255) and log[0]["gamma"] == pytest.approx(10 / 255)
    entry = manifest_entry(cfg, model, log, load_patch_data(cfg, tiny_data)[2])
    assert entry["gamma_kind"] == "fixed" and entry["recipe"]["gamma_learned"] is False
    assert "--fixed-gamma" in entry["command"] and "--optimizer adamax" in entry["command"]


def test_cli_trains_and_exports_the_hvae_on_bsd_patches(tmp_path, bsd_root):
    from jpmap_core.pretrained import load_pretrained

    rc = main(["--name", "cli_hvae", "--dataset", "bsd_patches", "--patch-size", "8", "--widths", "4,6",
               "--groups", "1,1", "--latent-channels", "2,2", "--enc-blocks", "1,1", "--epochs", "1",
               "--steps-per-epoch", "3", "--batch-size", "4", "--n-test", "16", "--data-root", str(bsd_root),
               "--run-dir", str(tmp_path / "run"), "--export", str(tmp_path / "w"), "--no-progress"])  # fmt: skip
    assert rc == 0
    e = json.loads((tmp_path / "w" / "manifest.json").read_text())["cli_hvae"]
    assert e["model"]["arch"] == "hvae" and e["model"]["groups"] == [1, 1]
    train_names, test_names = bsd_split(bsd_root)
    assert e["data"]["train_images"] == train_names and e["data"]["test_images"] == test_names
    assert e["data"]["n_train"] == 48 and "bsd_split" in e["data"]["split_rule"]
    assert (
        e["steps"] == 3 and e["recipe"]["optimizer"].startswith("Adamax") and e["recipe"]["exported_weights"] == "EMA"
    )
    assert e["final_test_elbo_per_dim"] == pytest.approx(e["final_test_elbo"] / (3 * 8 * 8))
    assert e["gamma_kind"] == "learned" and len(e["sha256"]) == 64
    assert "--arch hvae" in e["command"] and "--groups 1,1" in e["command"] and "--patch-size 8" in e["command"]
    prior = load_pretrained("cli_hvae", directory=tmp_path / "w")
    assert isinstance(prior, HVAE) and prior.image_shape == (3, 8, 8)


def test_cli_rejects_dvae_options_for_the_hvae(capsys):
    with pytest.raises(SystemExit):
        main(["--name", "x", "--dataset", "bsd_patches", "--latent-dim", "8"])
    with pytest.raises(SystemExit):
        main(["--name", "x", "--dataset", "mnist", "--groups", "1,2"])
    assert "not options of --arch hvae" in capsys.readouterr().err


# ---- DistributedDataParallel ------------------------------------------------------------------------------
def _recording_forward(store: list):
    """HVAE.forward that also keeps the images each call received."""
    forward = HVAE.forward

    def recording(self, x, x_enc=None, eps=None):
        store.append(x.detach().clone())
        return forward(self, x, x_enc, eps)

    return recording


def _ddp_worker(rank: int, world: int, port: int, cfg: TrainConfig, run_dir: str, data) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    seen: list[torch.Tensor] = []
    HVAE.forward = _recording_forward(seen)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        train_hvae(cfg, run_dir, data=data, progress=False)
    finally:
        dist.destroy_process_group()
    torch.save(torch.stack(seen[: cfg.steps_per_epoch]), Path(run_dir).parent / f"batches_rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_the_weights_of_one_process_on_the_full_batch(tmp_path, tiny_data, monkeypatch):
    """DDP (gloo, 2 CPU processes, 4 patches each) = one process on the 8 patches, to float rounding."""
    import torch.multiprocessing as mp

    cfg = _cfg(epochs=1, steps_per_epoch=3)
    seen: list[torch.Tensor] = []
    monkeypatch.setattr(HVAE, "forward", _recording_forward(seen))
    train_hvae(cfg, tmp_path / "one", data=tiny_data, progress=False)
    monkeypatch.undo()
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg, str(tmp_path / "two"), tiny_data), nprocs=2, join=True)
    # each process saw its own half of every batch of the one-process run
    halves = [torch.load(tmp_path / f"batches_rank{r}.pt", weights_only=True) for r in range(2)]
    assert halves[0].shape == (3, 4, 3, 8, 8)
    assert torch.equal(torch.cat(halves, 1), torch.stack(seen[:3]))
    one = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    log1, log2 = json.loads(one["log"])[0], json.loads(two["log"])[0]
    assert log2["train_elbo"] == pytest.approx(log1["train_elbo"], rel=1e-5)
    assert log2["train_kl"] == pytest.approx(log1["train_kl"], rel=1e-4, abs=1e-4)
    for part in ("model", "ema"):
        for k, v in one[part].items():
            torch.testing.assert_close(two[part][k], v, rtol=1e-4, atol=1e-5, msg=f"{part} {k}")
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["checkpoint.pt", "config.json", "log.json"]


def test_the_cli_default_architecture_is_the_models_default():
    from jpmap_core.train import HVAE_CLI_DEFAULTS

    default = HVAE().config()
    assert {k: default[k] for k in HVAE_CLI_DEFAULTS["model"]} == HVAE_CLI_DEFAULTS["model"]


# ---- the face prior: whole 64x64 CelebA faces (celeba64_hvae) ------------------------------------------------
def _faces(n: int, seed: int, size: int = 8) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 2, size // 2, generator=g)
    images = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return ImageSet(images, "synthetic faces", names=[f"{seed}{i:05d}.jpg" for i in range(n)])


def _face_cfg(**kw) -> TrainConfig:
    return _cfg(**{"name": "tiny_face_hvae", "dataset": "celeba64", "hflip": True, **kw})


def test_image_sampler_draws_whole_images_flipped_left_right_and_seeded():
    from jpmap_core.data import ImageSampler

    ramp = torch.arange(16.0).reshape(1, 1, 4, 4).expand(2, 3, 4, 4) + torch.tensor([0.0, 16.0])[:, None, None, None]
    s = ImageSampler(ramp / 32, hflip=True)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    full = s.draw(40, g1)
    assert torch.equal(s.draw(40, g2, slice(5, 9)), full[5:9]) and torch.equal(g1.get_state(), g2.get_state())
    distinct = {tuple(x.flatten().tolist()) for x in full}
    expected = {tuple(v.flatten().tolist()) for im in ramp / 32 for v in (im, im.flip(-1))}
    assert distinct == expected  # both images, each as is and mirrored, nothing else (no rotation, no crop)
    plain = ImageSampler(ramp / 32, hflip=False).draw(40, torch.Generator().manual_seed(0))
    assert {tuple(x.flatten().tolist()) for x in plain} == {tuple(im.flatten().tolist()) for im in ramp / 32}


def test_face_hvae_trains_on_whole_images_and_resumes_bitwise(tmp_path):
    from jpmap_core.train import load_patch_data, manifest_entry

    data = (_faces(12, 0), _faces(5, 1))
    model, log = train_hvae(_face_cfg(epochs=2), tmp_path / "a", data=data, progress=False)
    assert isinstance(model, HVAE) and model.image_shape == (3, 8, 8) and log[-1]["step"] == 12
    train_hvae(_face_cfg(epochs=1), tmp_path / "b", data=data, progress=False)
    train_hvae(_face_cfg(epochs=2), tmp_path / "b", resume=True, data=data, progress=False)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    for part in ("model", "ema"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part} {k} differs after resume"
    with pytest.raises(ValueError, match="hflip"):
        train_hvae(_face_cfg(epochs=3, hflip=False), tmp_path / "b", resume=True, data=data, progress=False)
    meta = load_patch_data(_face_cfg(), data)[2]
    assert meta["n_train"] == 12 and meta["n_test"] == 5 and "partition 2" in meta["split_rule"]
    entry = manifest_entry(_face_cfg(epochs=2), model, log, meta)
    assert entry["recipe"]["hflip"] is True and "--dataset celeba64" in entry["command"]
    assert "--hflip" in entry["command"]
    with pytest.raises(ValueError, match="whole images of the prior's size"):
        load_patch_data(_face_cfg(patch_size=16), data)


@pytest.fixture(scope="module")
def celeba_root() -> Path:
    from jpmap_core.data import DataNotFoundError, load_celeba64, resolve_root

    try:
        load_celeba64("val", limit=1)
    except DataNotFoundError as e:
        pytest.skip("needs the CelebA 64x64 faces: " + " ".join(str(e).split()))
    return resolve_root()


def test_cli_trains_the_face_hvae_on_the_training_partition_only(tmp_path, celeba_root):
    rc = main(["--name", "cli_face_hvae", "--arch", "hvae", "--dataset", "celeba64", "--hflip", "--widths", "4,4,4,4,6",
               "--groups", "0,0,0,1,1", "--latent-channels", "2,2,2,2,2", "--enc-blocks", "1,1,1,1,1", "--epochs", "1",
               "--steps-per-epoch", "2", "--batch-size", "2", "--n-test", "4", "--data-root", str(celeba_root),
               "--run-dir", str(tmp_path / "run"), "--export", str(tmp_path / "w"), "--no-progress"])  # fmt: skip
    assert rc == 0
    e = json.loads((tmp_path / "w" / "manifest.json").read_text())["cli_face_hvae"]
    assert e["model"]["image_shape"] == [3, 64, 64] and e["data"]["dataset"] == "celeba64"
    assert e["data"]["n_train"] == 4560 and "partition 'train'" in e["data"]["data_source"]
    assert "partition 'val'" in e["data"]["test_source"] and len(e["data"]["test_images"]) == 4
    assert "--hflip" in e["command"] and "--patch-size 64" in e["command"]


def test_cli_refuses_face_options_that_do_not_fit(capsys):
    with pytest.raises(SystemExit):
        main(["--name", "x", "--arch", "hvae", "--dataset", "celeba64", "--patch-size", "32"])
    assert "whole 64x64 faces" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--name", "x", "--dataset", "bsd_patches", "--hflip"])
    with pytest.raises(SystemExit):
        main(["--name", "x", "--arch", "hvae", "--dataset", "mnist"])
