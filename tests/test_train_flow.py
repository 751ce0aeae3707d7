"""Flow training (AIPO's priors): maximum likelihood in bits/dim, exact resume, the CLI and its manifest entry."""

from __future__ import annotations

import json

import pytest
import torch

from jpmap_core.data import ImageSet, missing_dataset
from jpmap_core.pretrained import load_pretrained
from jpmap_core.train import TrainConfig, evaluate_bpd, main, manifest_entry, train, train_flow

MODELS = {
    "realnvp": {"arch": "realnvp", "image_shape": [3, 8, 8], "levels": 2, "steps": 1, "width": 8, "blocks": 0},
    "glow": {"arch": "glow", "image_shape": [3, 8, 8], "levels": 2, "steps": 2, "width": 8, "blocks": 0},
}


def _faces(n: int, seed: int) -> torch.Tensor:
    """Smooth 8-bit 8x8 colour images (a learnable distribution): a random colour, a gradient and a little noise."""
    g = torch.Generator().manual_seed(seed)
    colour = torch.rand(n, 3, 1, 1, generator=g) * 0.6 + 0.2
    ramp = torch.linspace(-0.15, 0.15, 8).view(1, 1, 1, 8) * torch.rand(n, 1, 1, 1, generator=g)
    x = (colour + ramp + 0.02 * torch.randn(n, 3, 8, 8, generator=g)).clamp(0, 1)
    return torch.round(x * 255) / 255


@pytest.fixture(scope="module")
def tiny_data():
    return ImageSet(_faces(96, 0), "synthetic"), ImageSet(_faces(32, 1), "synthetic")


def _cfg(arch: str, **kw) -> TrainConfig:
    base = dict(name="t", dataset="celeba32", model=dict(MODELS[arch]), epochs=2, lr=2e-3, batch_size=32, seed=0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_flow_resume_gives_bitwise_the_weights_of_an_uninterrupted_run(tmp_path, tiny_data, arch):
    straight, _ = train(_cfg(arch, epochs=2), tmp_path / "a", data=tiny_data, progress=False)
    train_flow(_cfg(arch, epochs=1), tmp_path / "b", data=tiny_data, progress=False)  # "interrupted" after epoch 1
    resumed, log = train_flow(_cfg(arch, epochs=2), tmp_path / "b", resume=True, data=tiny_data, progress=False)
    assert [e["epoch"] for e in log] == [1, 2]
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), f"parameter {k} differs after resume"


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_flow_training_lowers_the_bits_per_dim(tmp_path, tiny_data, arch):
    flow, log = train_flow(_cfg(arch, epochs=4, hflip=True), tmp_path, data=tiny_data, progress=False)
    assert {"epoch", "train_bpd", "test_bpd", "seconds", "images_per_second"} <= set(log[0])
    assert log[-1]["train_bpd"] < log[0]["train_bpd"] - 0.2
    assert log[-1]["test_bpd"] < log[0]["test_bpd"]
    assert evaluate_bpd(flow, tiny_data[1].images) == pytest.approx(log[-1]["test_bpd"], rel=1e-6)
    assert not flow.training


def test_flow_manifest_entry_records_bits_per_dim_architecture_and_data(tmp_path, tiny_data):
    cfg = _cfg("glow", epochs=1, n_train=96)
    flow, log = train(cfg, tmp_path, data=tiny_data, progress=False)
    meta = json.loads((tmp_path / "log.json").read_text())["meta"]
    entry = manifest_entry(cfg, flow, log, meta)
    assert entry["model"] == flow.config() and entry["model"]["arch"] == "glow"
    assert entry["final_test_bpd"] == log[-1]["test_bpd"] and entry["data"]["n_train"] == 96
    assert entry["data"]["data_source"] == "synthetic" and "bits per dimension" in entry["recipe"]["criterion"]
    assert entry["command"].startswith("python -m jpmap_core.train --name t --dataset celeba32 --arch glow --levels 2")
    assert "--n-train 96" in entry["command"]


def test_flow_options_are_refused_for_the_dvae_and_dvae_options_for_flows(capsys):
    with pytest.raises(SystemExit):
        main(["--name", "x", "--arch", "realnvp", "--dataset", "celeba32", "--latent-dim", "4"])
    assert "--latent-dim is not an option of --arch realnvp" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--name", "x", "--arch", "mlp", "--levels", "2"])
    assert "options of --arch realnvp|glow" in capsys.readouterr().err


@pytest.fixture(scope="module")
def celeba_root():
    from jpmap_core.data import candidate_roots

    for root in candidate_roots():
        if missing_dataset("celeba64", root) is None:
            return root
    pytest.skip("needs the CelebA 64x64 faces (data/README.md)")


def test_celeba32_is_the_training_faces_at_32x32_on_the_8_bit_grid(celeba_root):
    from jpmap_core.data import load_celeba32

    train_set = load_celeba32("train", celeba_root)
    assert tuple(train_set.images.shape) == (4560, 3, 32, 32)
    x = train_set.images
    assert bool((torch.round(x * 255) == x * 255).all()) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert "32x32" in train_set.source and train_set.info["dataset"] == "celeba32"


def test_cli_trains_a_flow_on_celeba32_and_exports_it(tmp_path, celeba_root):
    rc = main(["--name", "cli_flow", "--dataset", "celeba32", "--arch", "realnvp", "--levels", "2", "--steps", "1",
               "--width", "4", "--blocks", "0", "--epochs", "1", "--n-train", "64", "--n-test", "32", "--batch-size",
               "32", "--data-root", str(celeba_root), "--run-dir", str(tmp_path / "run"), "--export",
               str(tmp_path / "w"), "--no-progress"])  # fmt: skip
    assert rc == 0
    entry = json.loads((tmp_path / "w" / "manifest.json").read_text())["cli_flow"]
    assert entry["model"]["image_shape"] == [3, 32, 32] and entry["recipe"]["lr"] == 1e-3  # the flows' default lr
    assert entry["data"]["n_train"] == 64 and "32x32" in entry["data"]["data_source"]
    flow = load_pretrained("cli_flow", directory=tmp_path / "w")
    assert flow.latent_shape == (3, 32, 32) and entry["final_test_bpd"] > 0
