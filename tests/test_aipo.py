"""AIPO (Liu et al., ICML 2023): the MLE start of eq. (4), Algorithm 2's lambda schedules, equal-budget baselines."""

from __future__ import annotations

import math

import pytest
import torch

from jpmap_core.models import MLPVAE, Glow, RealNVP
from jpmap_core.operators import make_problem
from jpmap_core.solvers import aipo, aipo_baseline, mle_start
from jpmap_core.solvers.aipo import aipo_latent, lambda_update, latent_energy, map_loss, project_affine

SHAPE = (1, 8, 8)
FAST = {"K": 3, "n_mle": 10}


def _flow(cls=RealNVP, **kw):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        flow = cls(SHAPE, levels=2, steps=1, width=4, blocks=0, **kw).double()
        with torch.no_grad():
            for p in flow.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return flow.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def flow():
    return _flow()


def _images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.1 + 0.8 * torch.rand(n, *SHAPE, generator=g, dtype=torch.float64)


def _problem(name: str, n: int = 3, sigma: float = 25.5, seed: int = 0):
    level = {"denoising": None, "inpainting": 0.25, "compressed_sensing": 24}[name]
    return make_problem(name, _images(n, seed), sigma=sigma, level=level, seed=seed)


# ---- the MLE start x*(0), eq. (4) and Appendix A ---------------------------------------------------
def test_projection_is_appendix_a_for_inpainting_and_compressed_sensing():
    x = torch.rand(2, *SHAPE, dtype=torch.float64)
    p = _problem("inpainting", 2)
    m = p.op.mask.double()
    torch.testing.assert_close(project_affine(x, p.y, p.op), m * p.y + (1 - m) * x, rtol=0, atol=1e-10)
    p = _problem("compressed_sensing", 2)
    a = p.op.matrix.double()
    xf = x.flatten(1)
    expected = xf - (a.T @ torch.linalg.solve(a @ a.T, (xf @ a.T - p.y).T)).T
    torch.testing.assert_close(project_affine(x, p.y, p.op).flatten(1), expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ["inpainting", "compressed_sensing"])
def test_mle_start_satisfies_the_constraint_before_clipping_and_lowers_the_neg_log_prior(name):
    """Noiseless problem, clip=False: every iterate satisfies f(x) = y, and -log p_G decreases (eq. 4). (From a
    random start: this near-identity flow's density peaks at x = 1/2, whose projection is the default start.)"""
    flow = _flow(Glow, logit_alpha=None)  # x - 1/2 preprocessing: defined outside [0, 1] too
    p = _problem(name, sigma=0.0)
    x_init = torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    start = mle_start(p.y, p.op, flow, steps=40, lr=0.01, x_init=x_init, clip=False)
    residual = (p.op.A(start.x) - p.y).flatten(1).norm(dim=1) / p.y.flatten(1).norm(dim=1)
    assert float(residual.max()) < 1e-9
    assert start.grad_evals == 40 and start.neg_log_prior.shape == (41, 3)
    assert bool((start.neg_log_prior[-1] < start.neg_log_prior[0] - 0.2).all())


def test_mle_start_with_clipping_keeps_the_observed_pixels_and_stays_in_the_unit_box(flow):
    p = _problem("inpainting")
    start = mle_start(p.y, p.op, flow, steps=20)
    assert float(start.x.min()) >= 0 and float(start.x.max()) <= 1
    m = p.op.mask.double()
    torch.testing.assert_close(m * start.x, m * p.y.clamp(0, 1), rtol=0, atol=1e-9)


def test_mle_start_for_denoising_is_y_without_gradient_evaluations(flow):
    """Denoising: the constraint set of eq. (4) is the single point y (Remark 3.1)."""
    p = _problem("denoising")
    start = mle_start(p.y, p.op, flow, steps=500)
    assert start.grad_evals == 0
    torch.testing.assert_close(start.x, p.y.clamp(0, 1))


# ---- Algorithm 2 -----------------------------------------------------------------------------------
def test_lambda_update_is_step_8_and_remark_c1():
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    lam, target = t(0.1, 0.1, 0.1), t(1.0, 1.0, 0.12)
    loss_start, loss_end, logp = t(-90.0, -90.0, -90.0), t(-100.0, -100.0, -100.0), t(200.0, 200.0, 200.0)
    dmin, prev = t(0.05, 0.01, 0.05), t(math.nan, 0.2, 0.05)
    lo, hi = t(0.0125, 0.0125, 0.0125), t(0.2, 0.2, 0.2)
    new_lam, new_dmin, change, delta = lambda_update(lam, target, loss_start, loss_end, logp, dmin, prev, r=0.05, lo=lo,
                                                     hi=hi)  # fmt: skip
    # step 8: delta = max(r |L / log p_G|, delta_min) = max(0.05 * 0.5, delta_min)
    torch.testing.assert_close(delta, t(0.05, 0.025, 0.05))
    # step 13, clipped at Lambda
    torch.testing.assert_close(new_lam, t(0.15, 0.125, 0.12))
    # step 10: Delta' = |(-90 + 100) / -90| = 1/9; delta_min^(Delta'/Delta) clipped to [lo, hi]; unchanged without Delta
    torch.testing.assert_close(change, t(1 / 9, 1 / 9, 1 / 9))
    expected = t(0.05, min(max(0.01 ** ((1 / 9) / 0.2), 0.0125), 0.2), min(max(0.05 ** ((1 / 9) / 0.05), 0.0125), 0.2))
    torch.testing.assert_close(new_dmin, expected)


def test_lambda_schedules_are_nondecreasing_and_end_at_each_images_lambda(flow):
    p = _problem("inpainting")
    targets = torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64)
    r = aipo(p.y, p.op, flow, sigma=p.sigma, lam=targets, **FAST)
    lam = r.history["lambda"]
    for b in range(3):
        col = lam[:, b][~torch.isnan(lam[:, b])]
        assert float(col[0]) == 0.0  # Algorithm 2 starts at lambda = 0
        assert bool((col[1:] >= col[:-1]).all()), f"image {b}: lambda decreased: {col.tolist()}"
        assert float(col[-1]) == pytest.approx(float(targets[b]))
        steps = col[1:] - col[:-1]  # every increase is at least delta_min,l = Lambda/80 (or the last, clipped one)
        assert bool((steps[:-1] >= targets[b] / 80 - 1e-12).all())
    torch.testing.assert_close(r.per_image["lambda"], targets)
    assert bool(r.converged.all())
    assert int(r.per_image["rounds"].max()) <= 81 + 1


def test_history_objective_is_the_papers_map_loss_without_sigma(flow):
    """L_MAP = ||y - f(x)||^2 - lambda log p_G(x) (§3.1): no 1/(2 sigma^2), so sigma does not change the result."""
    p = _problem("compressed_sensing")
    r = aipo(p.y, p.op, flow, sigma=p.sigma, lam=0.5, **FAST)
    last = torch.stack([col[~torch.isnan(col)][-1] for col in r.history["objective"].T])
    torch.testing.assert_close(last, map_loss(r.x, p.y, p.op, flow, 0.5))
    torch.testing.assert_close(r.per_image["objective"], last)
    other = aipo(p.y, p.op, flow, sigma=5.0, lam=0.5, **FAST)
    torch.testing.assert_close(other.x, r.x)


def test_aipo_lowers_the_map_loss_below_its_mle_start(flow):
    p = _problem("inpainting")
    r = aipo(p.y, p.op, flow, sigma=p.sigma, lam=1.0, **FAST)
    start = map_loss(r.per_image["x_mle"], p.y, p.op, flow, 1.0)
    assert bool((r.per_image["objective"] < start).all())
    torch.testing.assert_close(r.z, flow.encode(r.x)[0])


def test_batched_equals_per_image_with_per_image_lambda(flow):
    p = _problem("inpainting")
    targets = torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64)
    both = aipo(p.y, p.op, flow, sigma=p.sigma, lam=targets, **FAST)
    for b in range(3):
        rows = torch.tensor([b])
        one = aipo(p.y[rows], p.op.rows(rows), flow, sigma=p.sigma, lam=float(targets[b]), **FAST)
        torch.testing.assert_close(both.x[rows], one.x, rtol=1e-9, atol=1e-9)
        assert int(both.per_image["rounds"][b]) == int(one.per_image["rounds"][0])
        col = both.history["lambda"][:, b]
        torch.testing.assert_close(col[~torch.isnan(col)], one.history["lambda"][:, 0], rtol=1e-9, atol=1e-12)


# ---- the baselines of §4.1 -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["inpainting", "denoising"])
def test_budget_is_equal_across_aipo_and_its_three_baselines(flow, name):
    p = _problem(name)
    r = aipo(p.y, p.op, flow, sigma=p.sigma, lam=torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64), **FAST)
    budget = r.per_image["grad_evals"]
    n_mle = 0 if name == "denoising" else FAST["n_mle"]
    torch.testing.assert_close(budget, r.iterations + n_mle)
    lam = torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64)
    for init in ("mle", "random", "zero"):
        g = torch.Generator().manual_seed(0)
        b = aipo_baseline(
            p.y, p.op, flow, sigma=p.sigma, lam=lam, init=init, budget=budget, n_mle=FAST["n_mle"], generator=g
        )
        assert torch.equal(b.per_image["grad_evals"], budget), init
        adam = budget - n_mle if init == "mle" else budget  # the random and zero starts get the MLE's steps as Adam's
        assert torch.equal(b.per_image["adam_steps"], adam) and torch.equal(b.iterations, adam)
        ev = b.history["grad_evals"]
        assert torch.equal(torch.stack([c[c >= 0][-1] for c in ev.T]), budget)
        assert b.info["budget"]["mle_steps"] == (n_mle if init == "mle" else 0)


def test_baseline_starts_are_the_papers(flow):
    p = _problem("inpainting")
    zero = aipo_baseline(p.y, p.op, flow, sigma=p.sigma, init="zero", budget=0)
    torch.testing.assert_close(zero.x, flow.decode(torch.zeros(3, *SHAPE, dtype=torch.float64)).clamp(0, 1))
    mle = aipo_baseline(p.y, p.op, flow, sigma=p.sigma, init="mle", budget=7, n_mle=7)
    torch.testing.assert_close(mle.x, mle_start(p.y, p.op, flow, steps=7).x)
    a = aipo_baseline(
        p.y, p.op, flow, sigma=p.sigma, init="random", budget=0, generator=torch.Generator().manual_seed(3)
    )
    z0 = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(a.x, flow.decode(z0).clamp(0, 1))


def test_fixed_lambda_adam_lowers_the_map_loss_from_its_start(flow):
    p = _problem("compressed_sensing")
    b = aipo_baseline(p.y, p.op, flow, sigma=p.sigma, lam=1.0, init="zero", budget=30)
    obj = b.history["objective"]
    assert bool((obj[-1] < obj[0]).all())


# ---- bad input -------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(flow):
    p = _problem("inpainting")
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="lam"):
            aipo(p.y, p.op, flow, sigma=p.sigma, lam=bad)
    with pytest.raises(ValueError, match=r"lam \(Lambda\) must be a number or a \(B,\) = \(3,\) tensor"):
        aipo(p.y, p.op, flow, sigma=p.sigma, lam=torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="finite and > 0 for every image"):
        aipo(p.y, p.op, flow, sigma=p.sigma, lam=torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    y = p.y.clone()
    y[1, 0, 2, 2] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        aipo(y, p.op, flow, sigma=p.sigma)
    with pytest.raises(ValueError, match="shape"):
        aipo(p.y[:, :, :4], p.op, flow, sigma=p.sigma)
    with pytest.raises(ValueError, match="K"):
        aipo(p.y, p.op, flow, sigma=p.sigma, K=0)
    with pytest.raises(ValueError, match="r \\(target change rate\\)"):
        aipo(p.y, p.op, flow, sigma=p.sigma, r=1.5)
    with pytest.raises(ValueError, match="optimizer"):
        aipo(p.y, p.op, flow, sigma=p.sigma, optimizer="lbfgs")
    vae = MLPVAE(image_shape=SHAPE, latent_dim=3, hidden=(8,)).double().eval()
    with pytest.raises(TypeError, match="log_prob"):
        aipo(p.y, p.op, vae, sigma=p.sigma)
    with pytest.raises(ValueError, match="init"):
        aipo_baseline(p.y, p.op, flow, sigma=p.sigma, init="ones")
    with pytest.raises(ValueError, match="smaller than the 500 gradient evaluations of the MLE start"):
        aipo_baseline(p.y, p.op, flow, sigma=p.sigma, init="mle", budget=100)
    with pytest.raises(ValueError, match="budget"):
        aipo_baseline(p.y, p.op, flow, sigma=p.sigma, budget=torch.tensor([1, 2]))


# ---- Algorithm 2 on CSGM's latent problem (aipo_latent) --------------------------------------------
LATENT_FAST = {"K": 3, "n_mle": 10, "alpha": 0.05}


@pytest.fixture(scope="module")
def vae():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return MLPVAE(image_shape=SHAPE, latent_dim=3, hidden=(16,), gamma_init=0.1).double().eval()


def test_latent_schedule_starts_at_zero_is_nondecreasing_and_ends_at_each_lambda(vae):
    p = _problem("compressed_sensing")
    targets = torch.tensor([0.05, 0.3, 1.0], dtype=torch.float64)
    r = aipo_latent(p.y, p.op, vae, sigma=p.sigma, lam=targets, **LATENT_FAST)
    lam = r.history["lambda"]
    for b in range(3):
        col = lam[:, b][~torch.isnan(lam[:, b])]
        assert float(col[0]) == 0.0
        assert bool((col[1:] >= col[:-1]).all()), f"image {b}: lambda decreased: {col.tolist()}"
        assert float(col[-1]) == float(targets[b])
    torch.testing.assert_close(r.per_image["lambda"], targets, rtol=0, atol=0)
    assert bool(r.converged.all())


def test_latent_gradient_evaluations_are_the_start_plus_every_rounds_k(vae):
    """K_i = round(K 1.1^i) inner steps in round i, after n_mle steps of the lambda = 0 fit; the history's last
    grad_evals of each image is its total."""
    p = _problem("inpainting")
    r = aipo_latent(p.y, p.op, vae, sigma=p.sigma, lam=torch.tensor([0.05, 0.3, 1.0], dtype=torch.float64),
                    **LATENT_FAST)  # fmt: skip
    for b in range(3):
        n = int(r.per_image["rounds"][b])
        expected = 10 + sum(max(1, round(3 * 1.1**i)) for i in range(n))
        assert int(r.per_image["grad_evals"][b]) == expected
        col = r.history["grad_evals"][:, b]
        assert int(col[col >= 0][-1]) == expected
    assert r.info["mle_steps"] == 10 and r.info["method"] == "aipo_latent"


def test_latent_objective_is_csgms_energy_at_lambda_and_x_is_the_decoded_code(vae):
    """E(z; Lambda) = ||A G(z) - y||^2 + Lambda ||z||^2 (JPMAP eq. 1.3); default Lambda = sigma^2 (CSGM's)."""
    p = _problem("compressed_sensing", sigma=25.5)
    r = aipo_latent(p.y, p.op, vae, sigma=p.sigma, **LATENT_FAST)
    lam = (25.5 / 255) ** 2
    torch.testing.assert_close(r.per_image["lambda"], torch.full((3,), lam, dtype=torch.float64))
    energy = (p.op.A(vae.decode(r.z)) - p.y).flatten(1).pow(2).sum(1) + lam * r.z.pow(2).sum(1)
    torch.testing.assert_close(r.per_image["objective"], energy)
    torch.testing.assert_close(latent_energy(r.z, p.y, p.op, vae, lam), energy)
    torch.testing.assert_close(r.x, vae.decode(r.z))
    start = latent_energy(r.per_image["z_mle"], p.y, p.op, vae, lam)
    zero = latent_energy(torch.zeros_like(r.z), p.y, p.op, vae, lam)
    assert bool((start < zero).all()), "the lambda = 0 fit lowers the data term from z = 0"


def test_latent_starts_zero_encoder_and_given(vae):
    p = _problem("inpainting")
    none = dict(LATENT_FAST, n_mle=0, K=1, max_rounds=1)
    r = aipo_latent(p.y, p.op, vae, sigma=p.sigma, z_init="zero", **none)
    assert bool((r.per_image["z_mle"] == 0).all())
    r = aipo_latent(p.y, p.op, vae, sigma=p.sigma, z_init="encoder", **none)
    torch.testing.assert_close(r.per_image["z_mle"], vae.encode(p.op.A_adjoint(p.y).clamp(0, 1))[0])
    z0 = torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = aipo_latent(p.y, p.op, vae, sigma=p.sigma, z_init=z0, **none)
    torch.testing.assert_close(r.per_image["z_mle"], z0)


def test_latent_batched_equals_per_image(vae):
    p = _problem("inpainting")
    targets = torch.tensor([0.05, 0.3, 1.0], dtype=torch.float64)
    both = aipo_latent(p.y, p.op, vae, sigma=p.sigma, lam=targets, z_init="encoder", **LATENT_FAST)
    for b in range(3):
        rows = torch.tensor([b])
        one = aipo_latent(p.y[rows], p.op.rows(rows), vae, sigma=p.sigma, lam=float(targets[b]), z_init="encoder",
                          **LATENT_FAST)  # fmt: skip
        torch.testing.assert_close(both.z[rows], one.z, rtol=1e-9, atol=1e-9)
        assert int(both.per_image["grad_evals"][b]) == int(one.per_image["grad_evals"][0])


def test_latent_bad_inputs_raise_clear_errors(vae):
    p = _problem("inpainting")
    with pytest.raises(ValueError, match="z_init must be one of 'zero', 'encoder'"):
        aipo_latent(p.y, p.op, vae, sigma=p.sigma, z_init="random")
    with pytest.raises(ValueError, match=r"z_init must be a finite \(B, \*latent_shape\) = \(3, 3\) tensor"):
        aipo_latent(p.y, p.op, vae, sigma=p.sigma, z_init=torch.zeros(3, 4, dtype=torch.float64))
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="lam"):
            aipo_latent(p.y, p.op, vae, sigma=p.sigma, lam=bad)
    with pytest.raises(ValueError, match="n_mle"):
        aipo_latent(p.y, p.op, vae, sigma=p.sigma, n_mle=-1)
    with pytest.raises(ValueError, match="K"):
        aipo_latent(p.y, p.op, vae, sigma=p.sigma, K=0)
    with pytest.raises(ValueError, match="sigma"):
        aipo_latent(p.y, p.op, vae, sigma=0.0)
