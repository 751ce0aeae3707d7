"""The shipped priors: present, checksummed, and as good as their manifest says."""

from __future__ import annotations

import pytest
import torch

from jpmap_core._io import sha256_file
from jpmap_core.metrics import psnr
from jpmap_core.pretrained import available, load_manifest, load_pretrained, pretrained_dir
from jpmap_core.train import evaluate_elbo

SHIPPED = ("mnist_mlp_dvae15", "mnist_mlp_dvae0")


def test_manifest_lists_the_shipped_priors_with_their_recipe():
    manifest = load_manifest()
    for name in SHIPPED:
        assert name in available()
        e = manifest[name]
        assert e["epochs"] == 200 and e["recipe"]["epochs"] == 200, "shipped priors use the paper's 200 epochs"
        assert e["recipe"]["lr"] == 1e-4 and e["recipe"]["batch_size"] == 128
        assert e["data"]["n_train"] == 60000 and "official" in e["data"]["data_source"]
        assert e["model"] == {"arch": "mlp", "image_shape": [1, 28, 28], "latent_dim": 8, "hidden": [500, 500]}
        assert sha256_file(pretrained_dir() / e["file"]) == e["sha256"]
    assert manifest["mnist_mlp_dvae15"]["recipe"]["sigma_dvae"] == 15
    assert manifest["mnist_mlp_dvae0"]["recipe"]["sigma_dvae"] == 0


@pytest.mark.parametrize("name", SHIPPED)
def test_recomputed_test_elbo_matches_the_manifest(name, mnist_test):
    vae = load_pretrained(name)
    elbo = evaluate_elbo(vae, mnist_test.images)  # same fixed-seed estimator as at training time
    assert elbo == pytest.approx(load_manifest()[name]["final_test_elbo"], rel=1e-3)
    assert float(vae.gamma) == pytest.approx(load_manifest()[name]["gamma"], rel=1e-6)


def test_dvae15_reconstructs_mnist_test_digits(mnist_test):
    vae = load_pretrained("mnist_mlp_dvae15")
    x = mnist_test.images[:2000]
    with torch.no_grad():
        p = psnr(vae.reconstruct(x), x)
        noisy = (x + 15 / 255 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
        p_noisy = psnr(vae.decode(vae.encode(noisy)[0]), x)
    assert float(p.mean()) > 18.0  # mu_theta(mu_phi(x)) of an 8-dim VAE: blurry but faithful
    assert float(p_noisy.mean()) > float(p.mean()) - 0.5  # the DVAE encoder is robust to sigma_DVAE noise


SWEEP = {s: f"mnist_mlp_e50_dvae{str(s).replace('.', 'p')}" for s in (0, 2.5, 5, 10, 15, 20, 30, 50)}


def test_sweep_priors_share_one_recipe_but_sigma_dvae():
    """Figs. 1-2 (notebook 05): one prior per sigma_DVAE, all with the same (50-epoch) recipe, so that only the
    denoising criterion differs between members."""
    manifest = load_manifest()
    missing = [n for n in SWEEP.values() if n not in manifest]
    assert not missing, f"sweep priors missing from the manifest: {missing}"
    recipes = []
    for s, name in SWEEP.items():
        e = manifest[name]
        assert e["recipe"]["sigma_dvae"] == s
        assert e["epochs"] == e["recipe"]["epochs"] == 50
        assert e["data"]["n_train"] == 60000 and "official" in e["data"]["data_source"]
        assert sha256_file(pretrained_dir() / e["file"]) == e["sha256"]
        recipes.append({k: v for k, v in e["recipe"].items() if k != "sigma_dvae"})
        recipes[-1]["model"] = e["model"]
    assert all(r == recipes[0] for r in recipes), "sweep members must differ only in sigma_dvae"


@pytest.mark.parametrize("sigma_dvae", list(SWEEP))
def test_sweep_prior_test_elbo_matches_the_manifest(sigma_dvae, mnist_test):
    name = SWEEP[sigma_dvae]
    vae = load_pretrained(name)
    elbo = evaluate_elbo(vae, mnist_test.images)
    assert elbo == pytest.approx(load_manifest()[name]["final_test_elbo"], rel=1e-3)


@pytest.fixture(scope="module")
def celeba_test():
    from jpmap_core.data import DataNotFoundError, load_celeba64

    try:
        return load_celeba64("test")
    except DataNotFoundError as e:  # a clone without the CelebA data: the checksum test still runs
        pytest.skip("needs the CelebA 64x64 test faces: " + " ".join(str(e).split()))


def test_celeba_prior_is_the_conv_vae_of_its_manifest():
    """Fig. 8 (notebook 07): the shipped CelebA prior, its recipe (latent 32 as the paper, sigma_DVAE 15), checksum."""
    e = load_manifest()["celeba64_conv_dvae15"]
    assert e["model"]["arch"] == "conv" and e["model"]["latent_dim"] == 32 and e["model"]["image_shape"] == [3, 64, 64]
    assert e["recipe"]["sigma_dvae"] == 15 and e["recipe"]["hflip"] is True
    assert e["epochs"] == e["recipe"]["epochs"] and e["training_seconds"] > 0
    assert e["data"]["n_train"] == 4560 and e["data"]["n_test"] == 660 and "'train'" in e["data"]["data_source"]
    assert sha256_file(pretrained_dir() / e["file"]) == e["sha256"]
    vae = load_pretrained("celeba64_conv_dvae15")
    assert vae.config() == e["model"] and not vae.training


def test_celeba_prior_test_elbo_and_reconstructions(celeba_test):
    vae = load_pretrained("celeba64_conv_dvae15")
    elbo = evaluate_elbo(vae, celeba_test.images)  # the 660 test faces, same fixed-seed estimator as in training
    assert elbo == pytest.approx(load_manifest()["celeba64_conv_dvae15"]["final_test_elbo"], rel=1e-3)
    x = celeba_test.images[:64]
    with torch.no_grad():
        rec = psnr(vae.reconstruct(x), x)
        samples = vae.decode(torch.randn(16, 32, generator=torch.Generator().manual_seed(0)))
    assert float(rec.mean()) > 18.0  # blurry (Fig. 8b) but faces: a zero image scores about 6 dB
    assert samples.shape == (16, 3, 64, 64) and float(samples.std(0).mean()) > 0.02  # samples differ
