"""The classical baselines of PnP-HVAE's Tables 2-3 (Wiener, TV, EPLL) and EPLL's patch mixture (``bsd_patch_gmm``).
The registry-wide contract (batched equals alone, per-image sigma, bad input) is in test_solver_contract.py."""

from __future__ import annotations

import pytest
import torch

from jpmap_core.metrics import psnr
from jpmap_core.models import PatchGMM
from jpmap_core.operators import BlurFFT, as_operator, make_problem
from jpmap_core.solvers import epll, solve, tv, wiener


def _smooth(n: int, size: int = 24, seed: int = 0, channels: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, channels, size // 4, size // 4, generator=g, dtype=torch.float64)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def bsd():
    from jpmap_core.data import DataNotFoundError, load_bsd_split

    try:
        return load_bsd_split()
    except DataNotFoundError as e:
        pytest.skip("needs the CBSD68 images: " + " ".join(str(e).split()))


# ---- Wiener -------------------------------------------------------------------------------------------------
def test_wiener_inverts_a_noiseless_invertible_blur_as_the_regularisation_vanishes():
    x = _smooth(2)
    k = torch.tensor([[0.0, 0.1, 0.0], [0.1, 0.6, 0.1], [0.0, 0.1, 0.0]], dtype=torch.float64)  # |H| >= 0.2
    op = BlurFFT(k, (3, 24, 24))
    y = op.A(x)
    errors = [float((wiener(y, op, sigma=1.0, s2=s2).x - x).abs().max()) for s2 in (1e-2, 1e2, 1e8)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-6


def test_wiener_closed_form_equals_conjugate_gradients_on_the_same_blur():
    """Our BlurFFT takes the Fourier closed form; deepinv's BlurFFT (wrapped) takes the CG path: same minimiser."""
    from deepinv.physics import BlurFFT as DeepinvBlur

    x = _smooth(2, seed=1)
    k = torch.rand(5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    k /= k.sum()
    ours = BlurFFT(k, (3, 24, 24))
    theirs = as_operator(DeepinvBlur(img_size=(3, 24, 24), filter=k[None, None]), (3, 24, 24))
    y = ours.degrade(x, 10.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(theirs.A(x), ours.A(x))
    a = wiener(y[:1], ours, sigma=10.0)
    b = wiener(y[:1], theirs, sigma=10.0, cg_tol=1e-12)
    assert a.info["solver"].startswith("closed form") and b.info["solver"] == "conjugate gradients"
    torch.testing.assert_close(a.x, b.x, rtol=0, atol=1e-8)


def test_wiener_estimate_minimises_its_objective():
    from jpmap_core.solvers.wiener import wiener_objective

    x = _smooth(1, seed=2)
    p = make_problem("inpainting", x, sigma=5.0, level=0.4, seed=0)
    r = wiener(p.y, p.op, sigma=5.0)
    s2 = r.info["s2"]
    f0 = wiener_objective(r.x, p.y, p.op, 5 / 255, s2)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        d = 1e-3 * torch.randn(r.x.shape, generator=g, dtype=r.x.dtype)
        assert float(wiener_objective(r.x + d, p.y, p.op, 5 / 255, s2)) > float(f0)
    assert float(r.history["objective"][0, 0]) == pytest.approx(float(f0))


# ---- TV -----------------------------------------------------------------------------------------------------
def test_tv_objective_never_increases_and_falls_below_its_start():
    x = _smooth(2, seed=3)
    k = torch.ones(5, 5, dtype=torch.float64) / 25
    p = make_problem("blur", x, sigma=10.0, kernel=k, seed=0)
    r = tv(p.y, p.op, sigma=10.0, max_iters=15, prox_iters=100)
    for b in range(2):
        obj = r.history["objective"][:, b]
        obj = obj[~torch.isnan(obj)]
        assert len(obj) == int(r.iterations[b]) + 1
        assert bool((obj[1:] <= obj[:-1] + 1e-9).all()) and float(obj[-1]) < float(obj[0])
    assert bool((psnr(r.x.clamp(0, 1), x) > psnr(p.y.clamp(0, 1), x)).all())


def test_tv_and_wiener_refuse_a_learned_prior_and_bad_options():
    x = _smooth(1)
    p = make_problem("denoising", x, sigma=10.0, seed=0)
    with pytest.raises(TypeError, match="uses no learned prior"):
        tv(p.y, p.op, PatchGMM(2, 3, 3), sigma=10.0)
    with pytest.raises(ValueError, match="max_iters"):
        tv(p.y, p.op, sigma=10.0, max_iters=0)
    with pytest.raises(ValueError, match="s2"):
        wiener(p.y, p.op, sigma=10.0, s2=-1.0)


# ---- EPLL ---------------------------------------------------------------------------------------------------
def test_patch_gmm_round_trips_through_safetensors_and_the_manifest(tmp_path):
    from jpmap_core.pretrained import export_pretrained, load_pretrained

    gmm = PatchGMM(n_components=3, patch_size=3, channels=1)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 9, 9, generator=g)
    gmm.covariances.copy_(a @ a.transpose(1, 2) / 9 + 0.01 * torch.eye(9))
    gmm.weights.copy_(torch.tensor([0.2, 0.3, 0.5]))
    export_pretrained(gmm, "tiny_gmm", {"model": gmm.config()}, tmp_path)
    back = load_pretrained("tiny_gmm", directory=tmp_path)
    assert isinstance(back, PatchGMM) and back.config() == gmm.config()
    patches = torch.randn(5, 9, generator=g)
    torch.testing.assert_close(back.neg_log_likelihood(patches), gmm.neg_log_likelihood(patches))
    with pytest.raises(ValueError, match=r"patches must have shape \(N, 9\)"):
        gmm.neg_log_likelihood(torch.zeros(5, 8))


def test_epll_refuses_a_mixture_of_the_wrong_kind():
    x = _smooth(1, size=12)
    p = make_problem("denoising", x, sigma=10.0, seed=0)
    with pytest.raises(TypeError, match="needs a PatchGMM"):
        epll(p.y, p.op, None, sigma=10.0)
    with pytest.raises(ValueError, match="channels"):
        epll(p.y, p.op, PatchGMM(2, 3, 1), sigma=10.0)


@pytest.fixture(scope="module")
def bsd_gmm():
    from jpmap_core.pretrained import PretrainedError, load_pretrained

    try:
        return load_pretrained("bsd_patch_gmm")
    except PretrainedError as e:
        pytest.skip(f"bsd_patch_gmm is not available: {e}")


def test_shipped_gmm_manifest_names_its_recipe_and_training_images(bsd_gmm, bsd):
    from jpmap_core.pretrained import manifest_entry

    e = manifest_entry("bsd_patch_gmm")
    assert e["model"] == {"arch": "gmm", "n_components": 50, "patch_size": 6, "channels": 3}
    assert e["data"]["train_images"] == bsd[0].names and len(e["data"]["train_images"]) == 48
    assert e["recipe"]["seed"] == 0 and e["recipe"]["em_iters"] > 0 and e["final_test_log_likelihood"] > 0
    assert float(bsd_gmm.means.abs().max()) == 0.0  # zero-mean components (deepinv's EPLL ignores the means)


def test_epll_with_the_shipped_mixture_deblurs_bsd_crops(bsd_gmm, bsd):
    from jpmap_core.data import load_kernels

    x = torch.cat([im[..., 120:152, 200:232] for im in bsd[1].images[:2]])
    p = make_problem("blur", x, sigma=7.65, kernel=load_kernels("pnphvae12")[3], seed=0)
    r = solve("epll", p.y, p.op, bsd_gmm, sigma=7.65)
    assert bool((psnr(r.x.clamp(0, 1), x) > psnr(p.y.clamp(0, 1), x) + 0.5).all())
    assert r.x.dtype == torch.float32 and r.info["implementation"] == "deepinv.optim.EPLL"


def test_gradient_statistics_of_the_defaults_are_those_of_the_bsd_training_images(bsd):
    from jpmap_core.solvers._classical import BSD_TRAIN_GRADIENTS, gradient_statistics

    stats = gradient_statistics(bsd[0].images)
    for key, value in BSD_TRAIN_GRADIENTS.items():
        assert stats[key] == pytest.approx(value, rel=1e-6)


def test_epll_starts_from_the_wiener_estimate_unless_told_otherwise():
    gmm = PatchGMM(n_components=2, patch_size=3, channels=3)
    x = _smooth(1, size=12)
    p = make_problem("blur", x, sigma=10.0, kernel=torch.ones(3, 3, dtype=torch.float64) / 9, seed=0)
    w = wiener(p.y, p.op, sigma=10.0).x
    a = epll(p.y, p.op, gmm, sigma=10.0)
    b = epll(p.y, p.op, gmm, sigma=10.0, x0=w)
    torch.testing.assert_close(a.x, b.x)
    assert a.info["init"] == "wiener" and b.info["init"] == "x0"
    c = epll(p.y, p.op, gmm, sigma=10.0, init="adjoint")
    assert c.info["init"] == "adjoint" and not torch.allclose(a.x, c.x)
    with pytest.raises(ValueError, match="unknown init"):
        epll(p.y, p.op, gmm, sigma=10.0, init="zeros")
