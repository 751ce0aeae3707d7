"""The Levenberg-Marquardt latent step (``z_optimizer="lm"``): its derivatives, its stopping point, its energies
against Adam's on the shipped MNIST prior, and batched = per image."""

from __future__ import annotations

import copy

import pytest
import torch

from jpmap_core.energy import J1, coupling
from jpmap_core.experiments import mnist_benchmark as mb
from jpmap_core.models import MLPVAE, ConvVAE, GaussianVAE
from jpmap_core.operators import CompressedSensing, Inpainting, make_problem
from jpmap_core.pretrained import load_pretrained
from jpmap_core.solvers import csgm, jpmap, mapz_splitting
from jpmap_core.solvers._common import adam_minimize
from jpmap_core.solvers._lm import LMPool, lm_minimize

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def tiny():
    """A float64 MLP VAE on 8x8 images with a 3-dim latent and a small gamma (a sharp, non-convex z-problem)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = MLPVAE(image_shape=SHAPE, latent_dim=3, hidden=(16,), gamma_init=0.1)
    return vae.double().eval().requires_grad_(False)


@pytest.fixture(scope="module")
def vae():
    return load_pretrained("mnist_mlp_dvae15")


def _autograd_jacobian(vae, z):
    return torch.stack([torch.autograd.functional.jacobian(lambda v: vae.decode(v[None])[0], zi) for zi in z])


def test_closed_form_mlp_jacobian_equals_autograd(tiny):
    z = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    G, J = tiny.decode_jacobian(z)
    torch.testing.assert_close(G, tiny.decode(z), rtol=0, atol=1e-14)
    ref = _autograd_jacobian(tiny, z)  # (B, C, H, W, l)
    torch.testing.assert_close(J, ref.permute(0, 4, 1, 2, 3), rtol=1e-10, atol=1e-12)
    G2, J2 = GaussianVAE.decode_jacobian(tiny, z)  # the generic forward-mode pass gives the same
    torch.testing.assert_close(J2, J, rtol=1e-10, atol=1e-12)


def test_forward_mode_conv_jacobian_equals_autograd_in_chunks():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        conv = ConvVAE(image_shape=(3, 8, 8), latent_dim=4, widths=(2, 3, 4, 5), fc_dim=6, kernel_size=3)
    conv = conv.double().eval().requires_grad_(False)
    conv.jacobian_chunk = 8  # two rows per forward-mode pass: the chunks must join up
    z = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    G, J = conv.decode_jacobian(z)
    assert J.shape == (5, 4, 3, 8, 8)
    torch.testing.assert_close(G, conv.decode(z), rtol=0, atol=1e-14)
    torch.testing.assert_close(J, _autograd_jacobian(conv, z).permute(0, 4, 1, 2, 3), rtol=1e-10, atol=1e-12)


def _z_step(vae, x, beta):
    """JPMAP's z-step on images x as LMPool's least squares and as Adam's loss (J1 / beta in z)."""

    def residual(z, idx):
        G, JG = vae.decode_jacobian(z)
        return (G - x[idx]).flatten(1), JG.flatten(2), torch.full((z.shape[0],), 1 / beta, dtype=z.dtype)

    def loss(z, idx):
        return 0.5 * coupling(x[idx], vae.decode(z, check=False)) + vae.neg_log_prior(z) / beta

    return residual, loss


def _grad_norm(loss, z):
    z = z.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(z, torch.arange(z.shape[0])).sum(), z)
    return g.norm(dim=1) / z.shape[1]


@pytest.mark.parametrize("secant", [True, False])
def test_lm_stops_where_the_gradient_vanishes(tiny, secant):
    """From random codes, on random images (large residuals: far from a zero-residual problem), every row stops by
    the gradient test, and the gradient there, recomputed by autograd, is below the tolerance."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, *SHAPE, generator=g, dtype=torch.float64)
    residual, loss = _z_step(tiny, x, beta=tiny.beta)
    z0 = 2 * torch.randn(6, 3, generator=g, dtype=torch.float64)
    tol = 1e-8
    r = lm_minimize(residual, z0, scale=0.5, tol=tol, max_iters=500, secant=secant)
    assert bool(r.converged.all()), r.steps
    assert bool((_grad_norm(loss, r.z) < tol).all())
    torch.testing.assert_close(r.loss, loss(r.z, torch.arange(6)), rtol=1e-12, atol=0)
    assert bool((r.loss <= loss(z0, torch.arange(6))).all())  # a descent never ends above its start
    # and it is the minimiser Adam finds from the same codes (to Adam's looser tolerance)
    a = adam_minimize(loss, z0, lr=0.01, tol=1e-6, max_iters=20000)
    torch.testing.assert_close(r.loss, a.loss, rtol=1e-6, atol=0)


def test_lm_solves_csgm_to_a_stationary_point(tiny):
    g = torch.Generator().manual_seed(4)
    x = tiny.decode(torch.randn(4, 3, generator=g, dtype=torch.float64))
    op = CompressedSensing(20, SHAPE, generator=g)
    y = op.degrade(x.float(), 10, generator=g).double()
    r = csgm(y, op, tiny, sigma=10, z_optimizer="lm", tol=1e-9, max_iters=500)
    assert bool(r.converged.all()) and r.info["z_optimizer"] == "lm"
    lam = (10 / 255) ** 2

    def energy(z, idx):
        return (op.A(tiny.decode(z)) - y).flatten(1).pow(2).sum(1) + lam * z.pow(2).sum(1)

    assert bool((_grad_norm(energy, r.z) < 1e-9).all())
    torch.testing.assert_close(r.history["objective_final"][0], energy(r.z, None), rtol=1e-12, atol=0)
    assert bool((r.per_image["decoder_evals"] == r.history["adam_steps"][0] + 1).all())


def test_lm_pool_rows_start_and_stop_independently(tiny):
    """A row restarted while others run follows the same trajectory as alone (the alternation restarts rows at any
    step), and a cap of 0 evaluations finishes a row at once."""
    g = torch.Generator().manual_seed(5)
    x = torch.rand(3, *SHAPE, generator=g, dtype=torch.float64)
    z0 = torch.randn(3, 3, generator=g, dtype=torch.float64)
    residual, _ = _z_step(tiny, x, tiny.beta)
    alone = lm_minimize(lambda z, idx: residual(z, idx + 2), z0[2:], scale=0.5, tol=1e-10, max_iters=200)
    pool = LMPool(residual, z0, scale=0.5, tol=1e-10, max_iters=200)
    pool.start(torch.tensor([0, 1]), z0[:2])
    for _ in range(3):
        pool.step()
    pool.start(torch.tensor([2]), z0[2:])
    while pool.running[2]:
        pool.step()
    torch.testing.assert_close(pool.best_z[2:], alone.z, rtol=0, atol=1e-12)
    assert int(pool.steps[2]) == int(alone.steps[0])
    empty = LMPool(residual, z0, max_iters=0)
    empty.start(torch.tensor([1]), z0[1:2])
    assert empty.busy() and empty.step().tolist() == [1] and not empty.busy()


def test_lm_needs_a_gaussian_vae_and_a_known_name(tiny):
    p = make_problem("denoising", torch.rand(2, *SHAPE, dtype=torch.float64), sigma=10, seed=0)
    with pytest.raises(ValueError, match="z_optimizer"):
        jpmap(p.y, p.op, tiny, sigma=10, z_optimizer="newton")
    with pytest.raises(ValueError, match="z_optimizer"):
        csgm(p.y, p.op, tiny, sigma=10, z_optimizer="sgd")
    with pytest.raises(ValueError, match="z_optimizer"):
        mapz_splitting(p.y, p.op, tiny, sigma=10, z_optimizer="")

    class Flowish(torch.nn.Module):  # a prior with the interface but no least-squares latent
        image_shape, latent_shape = SHAPE, SHAPE

        def encode(self, x, *, allow_out_of_range=False):
            return x, None

        def decode(self, z, *, check=True):
            return z

        def neg_log_prior(self, z):
            return z.flatten(1).abs().sum(1)

    with pytest.raises(TypeError, match="Gaussian VAE"):
        csgm(p.y, p.op, Flowish(), sigma=10, z_optimizer="lm")


@pytest.mark.parametrize("variant", ["alg23", "alg24", "splitting", "csgm"])
def test_lm_batched_equals_per_image(vae, mnist_test, variant):
    """float64, per-image masks: an image's LM z-steps never see the other images (as the Adam tests)."""
    vae64 = copy.deepcopy(vae).double()
    x = mnist_test.images[:3].double()
    g = torch.Generator().manual_seed(5)
    masks = (torch.rand(3, 1, 28, 28, generator=g) > 0.7).double()
    y = Inpainting(masks).degrade(x, 10, generator=g)

    def solve(yb, mb):
        op = Inpainting(mb)
        kw = dict(sigma=10, z_optimizer="lm", adam_max_iters=100)
        if variant == "alg23":
            return jpmap(yb, op, vae64, n1=2, n2=4, n_max=12, **kw)
        if variant == "alg24":
            return jpmap(yb, op, vae64, alpha=10, rho=1000 / 784, n1=2, n2=4, n_max=6, k_max=3, **kw)
        if variant == "splitting":
            return mapz_splitting(yb, op, vae64, betas=[0.1 * vae.beta, vae.beta], maxiter=5, **kw)
        return csgm(yb, op, vae64, sigma=10, z_optimizer="lm", max_iters=200)

    batch = solve(y, masks)
    for b in range(3):
        one = solve(y[b : b + 1], masks[b : b + 1])
        torch.testing.assert_close(batch.x[b : b + 1], one.x, rtol=0, atol=1e-9)
        torch.testing.assert_close(batch.z[b : b + 1], one.z, rtol=0, atol=1e-9)
        assert int(batch.iterations[b]) == int(one.iterations[0])
        assert int(batch.per_image["decoder_evals"][b]) == int(one.per_image["decoder_evals"][0])


def test_lm_J1_is_never_worse_than_adams_on_the_shipped_prior(vae, mnist_test):
    """Alg. 2.3 on 6 test digits (inpainting 80%, sigma 10; denoising sigma 110), every z-step to Adam's stopping
    rule: with LM z-steps J1 is never more than 1e-3 (relative) above Adam's, with several times fewer decoder
    evaluations (both sides stop at the same outer tolerance or after the same 30 alternations)."""
    x = mnist_test.images[:6]
    for name, level, sigma in (("inpainting", 0.8, 10.0), ("denoising", None, 110.0)):
        p = make_problem(name, x, sigma=sigma, level=level, seed=0)
        kw = dict(sigma=sigma, n1=3, n2=6, n_max=30)
        adam = jpmap(p.y, p.op, vae, **kw)
        lm = jpmap(p.y, p.op, vae, z_optimizer="lm", **kw)
        J_adam = J1(adam.x, adam.z, p.y, p.op, vae, sigma)
        J_lm = J1(lm.x, lm.z, p.y, p.op, vae, sigma)
        worst = float(((J_lm - J_adam) / J_adam.abs()).max())
        assert worst <= 1e-3, f"{name}: LM's J1 is {worst:.2e} above Adam's"
        evals = lm.per_image["decoder_evals"].sum() / adam.per_image["decoder_evals"].sum()
        assert float(evals) < 0.25, f"{name}: LM used {float(evals):.2f} of Adam's decoder evaluations"


def test_notebook_06_budget_passes_the_latent_optimiser_to_every_method():
    y, op, vae = torch.zeros(2, 1, 28, 28), Inpainting(torch.ones(1, 1, 28, 28)), _Beta()
    for method in mb.METHODS:
        _, options = mb.solver_call(method, y, op, vae, mb.Budget(z_optimizer="lm"))
        assert options["z_optimizer"] == "lm", method
        _, options = mb.solver_call(method, y, op, vae, mb.Budget())
        assert "z_optimizer" not in options  # the paper's Adam: the solvers' default
    with pytest.raises(ValueError, match="z_optimizer"):
        mb.Budget(z_optimizer="newton")


class _Beta:  # what solver_call reads of a prior: beta = 1/gamma^2 (Alg. 2.4's beta0)
    beta = 1.0
