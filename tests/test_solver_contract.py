"""The contract of :data:`jpmap_core.solvers.SOLVERS`, checked for every registered solver on a tiny prior.

A solver added to the registry gets these tests for free; it only needs an entry in :data:`TINY` (options that
keep it fast here), and the first test fails until it has one. Each solver (or variant) is tested on the tiny prior
it accepts (:data:`PRIOR_OF`: a flat MLP VAE unless listed), on images of that prior's size (8x8, or 64x64 for the
compressive autoencoder, whose total stride is 64). The tiny priors and problems are in float64, so that
"batched equals alone" is tested to 1e-9: in float32 a batched matrix product may round differently from a single
row's, and Adam's normalised steps carry such differences along a descent.
"""

from __future__ import annotations

import math

import pytest
import torch

from jpmap_core.models import HVAE, MLPVAE, CAEHyperprior, Prior, RealNVP
from jpmap_core.operators import make_problem
from jpmap_core.solvers import SOLVERS, Restoration, solve

#: per solver, options that keep it to a fraction of a second on an 8x8 image with a 3-dim latent
TINY = {
    "csgm": {"max_iters": 40},
    "jpmap": {"n1": 1, "n2": 2, "n_max": 3, "adam_max_iters": 20},
    "mapz_splitting": {"maxiter": 3, "adam_max_iters": 20},
    "vble": {"max_iters": 20, "n_posterior_samples": 8},
    "vble_xz": {"max_iters": 20, "n_posterior_samples": 8},
    "pnp_hvae": {"max_iters": 5, "patience": 1},
    "adam_j1": {"max_iters": 10, "patience": 1},
    "aipo": {"K": 2, "n_mle": 3, "max_rounds": 3},
    "aipo_baseline": {"budget": 8, "n_mle": 3},
    "aipo_latent": {"K": 2, "n_mle": 3, "max_rounds": 3},
    "wiener": {},
    "tv": {"max_iters": 5, "prox_iters": 20},
    "epll": {"betas": [1e3, 1e4]},
}
#: solvers that need another prior than the flat MLP VAE (aipo_latent takes the VAE, its latent problem is CSGM's)
PRIOR_OF = {"pnp_hvae": "hvae", "adam_j1": "hvae", "aipo": "flow", "aipo_baseline": "flow"}
PRIOR_OF.update({"vble[prior=cae]": "cae", "vble_xz[prior=cae]": "cae"})
#: the classical baselines: no learned prior (None), or EPLL's patch mixture (not a Prior: no latent, z is (B, 0))
PRIOR_OF.update(wiener="none", tv="none", epll="gmm")
#: variants of a registered solver run through the same contract: name -> (registered name, options)
VARIANTS = {
    "csgm[z_optimizer=lm]": ("csgm", dict(TINY["csgm"], z_optimizer="lm")),
    "jpmap[z_optimizer=lm]": ("jpmap", dict(TINY["jpmap"], z_optimizer="lm")),
    # the compressive autoencoder prior: VBLE's uniform posterior (its default for this prior)
    "vble[prior=cae]": ("vble", dict(TINY["vble"], max_iters=5)),
    "vble_xz[prior=cae]": ("vble_xz", dict(TINY["vble_xz"], max_iters=5)),
}
CASES = sorted(SOLVERS) + sorted(VARIANTS)
SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def tiny_priors():
    """A flat MLP VAE (3-dim latent), a hierarchical VAE (3 packed latent groups), a RealNVP flow (image-shaped
    latent, weights perturbed off the identity) and a compressive autoencoder (64x64 images, packed y and z),
    float64."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = MLPVAE(image_shape=SHAPE, latent_dim=3, hidden=(16,), gamma_init=0.1)
        hvae = HVAE(
            image_shape=SHAPE, widths=(4, 6), groups=(1, 2), latent_channels=(2, 3), enc_blocks=1, gamma_init=0.1
        )
        flow = RealNVP(SHAPE, levels=2, steps=1, width=4, blocks=0).double()
        with torch.no_grad():
            for p in flow.parameters():
                p.add_(0.05 * torch.randn_like(p))
        cae = CAEHyperprior(image_shape=(3, 64, 64), N=2, M=3, lmbda=0.01)
    return {
        "cae": cae.double().eval().requires_grad_(False),
        "vae": vae.double().eval().requires_grad_(False),
        "hvae": hvae.double().eval().requires_grad_(False),
        "flow": flow.eval().requires_grad_(False),
    }


@pytest.fixture
def name() -> str:
    """The solver under test: the tests parametrized over ``name`` override it, and :func:`prior` follows."""
    return "csgm"


@pytest.fixture(scope="module")
def tiny_gmm():
    """A 3-component mixture of 3x3 grey patches (random covariances), EPLL's prior."""
    from jpmap_core.models import PatchGMM

    g = torch.Generator().manual_seed(0)
    gmm = PatchGMM(n_components=3, patch_size=3, channels=1)
    a = torch.randn(3, 9, 9, generator=g, dtype=torch.float64)
    gmm.covariances.copy_(a @ a.transpose(1, 2) / 9 + 0.01 * torch.eye(9))
    return gmm


@pytest.fixture
def prior(name, tiny_priors, tiny_gmm):
    """The tiny prior solver ``name`` accepts (:data:`PRIOR_OF`)."""
    kind = PRIOR_OF.get(name, "vae")
    return {"none": None, "gmm": tiny_gmm}[kind] if kind in ("none", "gmm") else tiny_priors[kind]


@pytest.fixture(scope="module")
def problems():
    """An inpainting problem of 3 images per image shape of the tiny priors."""
    out = {}
    for shape in (SHAPE, (3, 64, 64)):
        g = torch.Generator().manual_seed(1)
        x = torch.rand(3, *shape, generator=g, dtype=torch.float64)
        out[shape] = (x, make_problem("inpainting", x, sigma=10, level=0.5, generator=g))
    return out


@pytest.fixture
def problem(prior, problems):
    """The problem of the prior's image shape (the tiny 1x8x8 one for the classical baselines, whose prior is ``None``
    or a patch mixture with no image shape)."""
    return problems[tuple(getattr(prior, "image_shape", SHAPE))]


def _solve(name, prior, y, op, sigma):
    method, options = VARIANTS.get(name, (name, TINY.get(name)))
    return solve(method, y, op, prior, sigma=sigma, **options)


def test_every_registered_solver_has_tiny_options():
    assert set(TINY) == set(SOLVERS), f"add tiny options for {sorted(set(SOLVERS) - set(TINY))} to TINY"


def test_the_priors_of_these_tests_offer_the_prior_interface(tiny_priors):
    assert set(PRIOR_OF) <= set(CASES) and set(PRIOR_OF.values()) <= set(tiny_priors) | {"none", "gmm"}
    assert all(isinstance(p, Prior) for p in tiny_priors.values())
    assert tiny_priors["vae"].latent_shape == (3,) and tiny_priors["hvae"].latent_shape == (2 * 64 + 2 * 3 * 16,)
    assert tiny_priors["flow"].latent_shape == SHAPE
    assert tiny_priors["cae"].latent_shape == (3 * 4 * 4 + 2,)


@pytest.mark.parametrize("name", CASES)
def test_solver_returns_a_wellformed_restoration(name, prior, problem):
    x_true, p = problem
    r = _solve(name, prior, p.y, p.op, p.sigma)
    B = x_true.shape[0]
    assert isinstance(r, Restoration) and len(r) == B
    assert r.x.shape == x_true.shape and r.x_decoded.shape == x_true.shape
    assert r.z.shape == (B, *getattr(prior, "latent_shape", (0,)))  # the classical baselines have no latent
    assert r.converged.shape == (B,) and r.converged.dtype == torch.bool
    assert r.iterations.shape == (B,) and not r.iterations.is_floating_point() and bool((r.iterations >= 0).all())
    for t in (r.x, r.x_decoded, r.z):
        assert bool(torch.isfinite(t).all())
    obj = r.history["objective"]
    assert obj.dim() == 2 and obj.shape[1] == B, "history['objective'] is (T, B)"
    last = torch.stack([col[~torch.isnan(col)][-1] for col in obj.T])  # every image recorded its objective
    assert bool(torch.isfinite(last).all())
    for key, v in r.per_image.items():
        assert isinstance(v, torch.Tensor) and v.shape[0] == B, f"per_image[{key!r}] is batch-first"
    assert r.info["method"] == VARIANTS.get(name, (name,))[0] and r.info["seconds"] >= 0


@pytest.mark.parametrize("name", CASES)
def test_solver_batched_equals_alone(name, prior, problem):
    _, p = problem
    both = _solve(name, prior, p.y, p.op, p.sigma)
    for b in range(p.y.shape[0]):
        rows = torch.tensor([b])
        one = _solve(name, prior, p.y[rows], p.op.rows(rows), p.sigma)
        torch.testing.assert_close(both.x[rows], one.x, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(both.z[rows], one.z, rtol=1e-9, atol=1e-9)
        assert bool(both.converged[b] == one.converged[0]) and int(both.iterations[b]) == int(one.iterations[0])


@pytest.mark.parametrize("name", CASES)
def test_solver_per_image_sigma_equals_each_sigma_alone(name, prior):
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, *getattr(prior, "image_shape", SHAPE), generator=g, dtype=torch.float64)
    sigmas = torch.tensor([5.0, 40.0])
    y = torch.cat([make_problem("denoising", x[i : i + 1], sigma=float(s), seed=i).y for i, s in enumerate(sigmas)])
    op = make_problem("denoising", x, sigma=1.0, seed=0).op
    mixed = _solve(name, prior, y, op, sigmas)
    for i, s in enumerate(sigmas.tolist()):
        alone = _solve(name, prior, y[i : i + 1], op, s)
        torch.testing.assert_close(mixed.x[i : i + 1], alone.x, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", CASES)
def test_solver_refuses_bad_input_with_a_clear_message(name, prior, problem):
    _, p = problem
    y_nan = p.y.clone()
    y_nan[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        _solve(name, prior, y_nan, p.op, p.sigma)
    for bad_sigma in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="sigma"):
            _solve(name, prior, p.y, p.op, bad_sigma)
    with pytest.raises(ValueError, match="sigma has 2 values"):
        _solve(name, prior, p.y, p.op, torch.tensor([10.0, 10.0]))
    with pytest.raises(ValueError, match="shape"):
        _solve(name, prior, p.y[:, :, :4], p.op, p.sigma)
    with pytest.raises(TypeError, match="not a prior"):
        solve(VARIANTS.get(name, (name,))[0], p.y, p.op, object(), sigma=p.sigma)


def test_solve_names_the_registered_methods_for_an_unknown_one(prior, problem):
    _, p = problem
    with pytest.raises(ValueError, match="registered solvers: .*csgm, .*jpmap"):
        solve("pnp", p.y, p.op, prior, sigma=10)
