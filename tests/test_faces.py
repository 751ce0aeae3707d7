"""The faces experiment of notebook 07 (JPMAP Fig. 8): restoration, comparison, summaries and figures."""

from __future__ import annotations

import matplotlib
import pytest
import torch

from jpmap_core.experiments import faces
from jpmap_core.experiments import mnist_benchmark as mb
from jpmap_core.metrics import psnr
from jpmap_core.models import ConvVAE

matplotlib.use("Agg")

BUDGET = mb.Budget(n1=2, n2=3, n_max=4, adam_max_iters=15, csgm_max_iters=40)


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    m = ConvVAE(image_shape=(3, 16, 16), latent_dim=4, widths=(4, 4, 4, 4), fc_dim=16, gamma_init=0.2).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


@pytest.fixture(scope="module")
def x():
    return torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def run(vae, x):
    return faces.restore_faces(x, vae, dataset="toy", source="random", budget=BUDGET, seed=3)


def test_restore_faces_scores_clamped_restorations_of_the_same_observation(run, x, vae):
    assert run.n_images == 5 and set(run.x) == set(faces.METHODS)
    for m in faces.METHODS:
        xm = run.x[m]
        assert xm.shape == x.shape and float(xm.min()) >= 0 and float(xm.max()) <= 1
        torch.testing.assert_close(run.scores[m]["psnr"], psnr(xm, x))
        torch.testing.assert_close(run.decoded_psnr[m], psnr(run.x_decoded[m], x))
        assert bool(torch.isnan(run.scores[m]["lpips"]).all())  # not asked: NaN, never a made-up value
        assert run.z_distance[m].shape == (5,) and bool(torch.isfinite(run.z_distance[m]).all())
        assert run.seconds[m] > 0
    # the observation is A^T y of an 80% mask: about 80% of the pixels are exactly 0
    missing = float((run.observation == 0).all(1).double().mean())
    assert 0.6 < missing < 0.95
    torch.testing.assert_close(run.x_decoded["csgm"], run.x["csgm"])  # CSGM returns mu_theta(z_hat)
    # JPMAP returns the x-step: on the missing pixels it is mu_theta(z_hat), on the observed ones it moves toward y
    miss = (run.observation == 0).all(1, keepdim=True).expand_as(x)
    xj, gj = run.x["jpmap_fixed_beta"], run.x_decoded["jpmap_fixed_beta"]
    torch.testing.assert_close(xj[miss], gj[miss])
    torch.testing.assert_close(run.recon, faces.reconstruct(vae, x).clamp(0, 1))
    torch.testing.assert_close(run.recon_psnr, psnr(run.recon, x))


def test_restore_faces_is_reproducible(run, vae, x):
    again = faces.restore_faces(x, vae, dataset="toy", source="random", budget=BUDGET, seed=3)
    for m in faces.METHODS:
        assert torch.equal(again.x[m], run.x[m])
    other = faces.restore_faces(x, vae, dataset="toy", source="random", budget=BUDGET, seed=4, methods=("csgm",))
    assert not torch.equal(other.observation, run.observation)  # another seed, another mask and noise
    assert set(other.x) == {"csgm"}


def test_chunks_and_the_cache_give_the_same_faces(run, vae, x, tmp_path):
    """Restoring 2 faces per call equals one call for all (each face keeps its state); a second run loads every chunk
    from the cache with the seconds it took, and a lost chunk is recomputed alone."""
    kw = dict(dataset="toy", source="random", budget=BUDGET, seed=3, chunk=2, cache=tmp_path)
    first = faces.restore_faces(x, vae, **kw)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3 * len(faces.METHODS)  # chunks of 2, 2 and 1 faces
    for m in faces.METHODS:
        torch.testing.assert_close(first.x[m], run.x[m], rtol=0, atol=1e-5)
        torch.testing.assert_close(first.z_distance[m], run.z_distance[m], rtol=0, atol=1e-4)
        assert torch.equal(first.iterations[m], run.iterations[m]) and first.cached_chunks[m] == 0
    sorted(tmp_path.glob("*.safetensors"))[0].unlink()
    again = faces.restore_faces(x, vae, **kw)
    assert sum(again.cached_chunks.values()) == 3 * len(faces.METHODS) - 1
    for m in faces.METHODS:
        assert torch.equal(again.x[m], first.x[m]) and torch.equal(again.converged[m], first.converged[m])
        assert torch.equal(again.decoded_psnr[m], first.decoded_psnr[m])
    with pytest.raises(ValueError, match="chunk"):
        faces.restore_faces(x, vae, dataset="toy", source="s", budget=BUDGET, chunk=0)


def test_bad_input_is_rejected(vae, x):
    with pytest.raises(ValueError, match="x_true must be"):
        faces.restore_faces(x[:, :1], vae, dataset="toy", source="s", budget=BUDGET)
    with pytest.raises(ValueError, match="sigma must be 10"):
        faces.restore_faces(x, vae, dataset="toy", source="s", budget=BUDGET, sigma=20)
    with pytest.raises(ValueError, match="unknown methods"):
        faces.restore_faces(x, vae, dataset="toy", source="s", budget=BUDGET, methods=("pnp",))


def _with_psnr(run, csgm, jpmap):
    r = faces.FaceRun(**{k: getattr(run, k) for k in ("dataset", "source", "names", "x_true", "observation")},
                      missing=run.missing, sigma=run.sigma, budget=run.budget)  # fmt: skip
    r.scores = {"csgm": {"psnr": torch.tensor(csgm)}, "jpmap_fixed_beta": {"psnr": torch.tensor(jpmap)}}
    r.z_distance, r.z_true_norm = run.z_distance, run.z_true_norm
    r.decoded_psnr = {"csgm": torch.tensor(csgm), "jpmap_fixed_beta": torch.tensor(csgm) + 0.01}
    return r


def test_compare_counts_wins_ties_and_stuck_images(run):
    r = _with_psnr(run, [20.0, 20.0, 20.0, 20.0, 25.0], [22.0, 20.05, 19.5, 20.5, 22.0])
    c = faces.compare(r)
    assert (c["wins"], c["losses"], c["ties"]) == (2, 2, 1)  # +2, +0.5 | -0.5, -3 | +0.05
    assert c["baseline_stuck"] == 1 and c["method_stuck"] == 1  # +2 dB | -3 dB
    assert c["win_fraction"] == pytest.approx(3 / 5)
    assert c["psnr_diff"]["mean"] == pytest.approx((2 + 0.05 - 0.5 + 0.5 - 3) / 5, abs=1e-6)
    assert c["psnr_diff"]["median"] == pytest.approx(0.05, abs=1e-6)
    assert faces.largest_differences(r, 2) == [4, 0]
    assert c["decoded_psnr_diff"]["mean"] == pytest.approx(0.01, abs=1e-6) and c["decoded_wins"] == 0


def test_summary_has_the_keys_other_checks_read(run):
    for prefix in ("", "ffhq_"):
        s = faces.summary(run, prefix=prefix)
        for key in ("psnr_csgm_mean", "psnr_jpmap_mean", "recon_psnr_mean", "n_images", "data_source"):
            assert prefix + key in s, prefix + key
        assert s[prefix + "psnr_jpmap_mean"] == pytest.approx(float(run.scores["jpmap_fixed_beta"]["psnr"].mean()))
        assert s[prefix + "lpips_csgm_mean"] is None  # unavailable is None, not a number
        assert len(s[prefix + "per_image"]) == 5


def test_figures_and_the_image_browser(run):
    import matplotlib.pyplot as plt

    fig = faces.restoration_grid(run, [0, 2, 4])
    assert len(fig.axes) == 5 * 3  # x*, y, CSGM, JPMAP, JPMAP mu_theta(z_hat)
    plt.close(fig)
    fig = faces.reconstruction_grid(run, [1, 3])
    assert len(fig.axes) == 2 * 2
    plt.close(fig)
    fig = faces.plot_psnr_pairs({"toy": run})
    plt.close(fig)
    fig = faces.image_panel({"toy": run}, "toy", 4)
    assert len(fig.axes) == 5  # x*, y, CSGM, JPMAP, reconstruction
    plt.close(fig)
    with pytest.raises(ValueError, match="unknown test set"):
        faces.image_panel({"toy": run}, "celeba", 0)
    with pytest.raises(ValueError, match="index must be"):
        faces.image_panel({"toy": run}, "toy", 5)
