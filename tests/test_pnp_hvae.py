"""PnP-HVAE (Prost et al., ICCV 2023): Algorithm 2 (Propositions 1-2), J1 of eq. 15, the Adam baseline of §5.3;
initialisation, image sizes, batching and bad input. A tiny float64 HVAE, so that comparisons hold to ~1e-10."""

from __future__ import annotations

import math

import pytest
import torch

from jpmap_core.energy import J1
from jpmap_core.models import HVAE, MLPVAE
from jpmap_core.operators import BlurFFT, Denoising, Inpainting, SuperResolution
from jpmap_core.solvers import SOLVERS, adam_j1, csgm, jpmap, mapz_splitting, pnp_hvae
from jpmap_core.solvers.pnp_hvae import T, bicubic_upsample, hvae_step, j1_pnp_hvae, latent_size, x_step

SHAPE = (3, 8, 8)
KERNEL = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=torch.float64) / 16


def _tiny() -> HVAE:
    """A tiny HVAE whose reconstruction depends on its input: VDVAE's initialisation (zero last layer of the prior
    nets, scaled-down residual branches) leaves it nearly constant, so the prior nets get random weights and the
    latent projections, residual branches and output layer are scaled up."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = HVAE(image_shape=SHAPE, widths=(4, 6), groups=(1, 2), latent_channels=(2, 3), enc_blocks=1, gamma_init=0.1)
        m = m.double().eval()
        with torch.no_grad():
            for g in m.decoder:
                if g.prior is not None:
                    g.prior.c4.weight.normal_(0, 0.3)
                    g.prior.c4.bias.normal_(0, 0.3)
                g.z_proj.weight.mul_(10)
                g.resnet.c4.weight.mul_(10)
            m.out_conv.weight.mul_(10)
    return m.requires_grad_(False)


@pytest.fixture(scope="module")
def hvae() -> HVAE:
    return _tiny()


def _images(b: int, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _noisy(x: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return x + sigma / 255 * torch.randn(x.shape, generator=g, dtype=x.dtype)


def _operators(b: int) -> dict:
    g = torch.Generator().manual_seed(5)
    return {
        "inpainting": Inpainting(image_shape=SHAPE, missing=0.5, batch_size=b, generator=g),
        "blur": BlurFFT(KERNEL, SHAPE),
        "super_resolution": SuperResolution(KERNEL, 2, SHAPE),
    }


def _problem(op, x: torch.Tensor, sigma: float = 10.0, seed: int = 1) -> torch.Tensor:
    return op.degrade(x, sigma, generator=torch.Generator().manual_seed(seed))


def _dense(op, shape=SHAPE) -> torch.Tensor:
    """The matrix of ``op`` for one image (rows: measurements, columns: pixels), from the images of the basis."""
    d = math.prod(shape)
    basis = torch.eye(d, dtype=torch.float64).reshape(d, *shape)
    return op.A(basis).reshape(d, -1).T


def _prox_dense(A: torch.Tensor, v: torch.Tensor, y: torch.Tensor, sigma: float, gamma: float) -> torch.Tensor:
    """``argmin_x gamma^2/(2 sigma^2) ||Ax - y||^2 + 1/2 ||x - v||^2`` of one image by a dense solve."""
    g = gamma**2 / (sigma / 255) ** 2
    lhs = torch.eye(A.shape[1], dtype=A.dtype) + g * A.T @ A
    return torch.linalg.solve(lhs, v.flatten() + g * A.T @ y.flatten()).reshape(v.shape)


def _j1_explicit(x, z, y, op, model, sigma: float, taus: list[float], gamma: float) -> torch.Tensor:
    """Eq. 15 term by term: data term, Gaussian decoder, and each group's Gaussian conditional prior over tau_l^2."""
    view = model.at_size(*latent_size(model, *x.shape[-2:]))
    groups = view.conditionals(None, z)
    nlp = sum(
        (0.5 * ((g.z - g.p_mean) ** 2 * torch.exp(-g.p_logvar) + g.p_logvar)).flatten(1).sum(1) / t**2
        for g, t in zip(groups, taus, strict=True)
    )
    mu = view.decode(z)
    h, w = x.shape[-2:]
    top, left = (mu.shape[-2] - h) // 2, (mu.shape[-1] - w) // 2
    mu = mu[..., top : top + h, left : left + w]
    fid = (op.A(x) - y).flatten(1).pow(2).sum(1) / (2 * (sigma / 255) ** 2)
    return fid + (x - mu).flatten(1).pow(2).sum(1) / (2 * gamma**2) + nlp


def _last(history_column: torch.Tensor) -> torch.Tensor:
    return torch.stack([col[~torch.isnan(col)][-1] for col in history_column.T])


def test_both_solvers_are_registered():
    assert SOLVERS["pnp_hvae"] is pnp_hvae and SOLVERS["adam_j1"] is adam_j1


def test_tempered_autoencode_is_encode_tempered_then_decode_with_prior(hvae):
    x = _noisy(_images(3), 20, 0).clamp(0, 1)
    tau = [0.9, 0.7, 0.5]
    z, mu, nlp = hvae.tempered_autoencode(x, tau)
    torch.testing.assert_close(z, hvae.encode_tempered(x, tau), rtol=0, atol=0)
    mu2, nlp2 = hvae.decode_with_prior(z, tau)
    torch.testing.assert_close(mu, mu2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(nlp, nlp2, rtol=1e-12, atol=1e-12)


# ---- Algorithm 2 and Propositions 1-2 ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["inpainting", "blur", "super_resolution"])
def test_one_iteration_is_the_prox_of_the_hvae_reconstruction_proposition_1(hvae, name):
    """x_1 = prox_{gamma^2 f}(HVAE(x_0, tau)) (eq. 19), z_1 = E_tau(x_0) (Algorithm 1), x_decoded = mu_theta(z_1)."""
    x_true = _images(2)
    op = _operators(2)[name]
    y = _problem(op, x_true)
    x0 = _noisy(x_true, 30, 2)  # leaves [0, 1]: the encoder sees it clamped, as in the official code
    tau, gamma = 0.6, float(hvae.gamma)
    r = pnp_hvae(y, op, hvae, sigma=10, tau=tau, x0=x0, max_iters=1)
    recon = hvae.reconstruct(x0.clamp(0, 1), tau)  # HVAE(x, tau) = mu_theta(E_tau(x)), computed on its own
    torch.testing.assert_close(r.z, hvae.encode_tempered(x0.clamp(0, 1), tau), rtol=0, atol=1e-13)
    torch.testing.assert_close(r.x_decoded, recon, rtol=0, atol=1e-13)
    A = _dense(op.rows(torch.tensor([0])) if name == "inpainting" else op)
    expected = _prox_dense(A, recon[0], y[0], 10, gamma)
    torch.testing.assert_close(r.x[0], expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(T(x0, y, op, hvae, sigma=10, tau=tau), r.x, rtol=0, atol=1e-13)
    assert int(r.iterations[0]) == 1 and not bool(r.converged.any())


@pytest.mark.parametrize("name", ["inpainting", "blur", "super_resolution"])
def test_x_step_solves_the_normal_equations_of_algorithm_2(name):
    """x = (A^T A + sigma^2/gamma^2 I)^{-1} (A^T y + sigma^2/gamma^2 mu_theta(z)), one sigma per image."""
    op = _operators(2)[name]
    y = _problem(op, _images(2))
    mu = _images(2, seed=3)
    sigma, gamma = torch.tensor([5.0, 25.0], dtype=torch.float64), 0.07
    x = x_step(mu, y, op, sigma=sigma, gamma=gamma)
    for b in range(2):
        A = _dense(op.rows(torch.tensor([b])) if name == "inpainting" else op)
        c = (float(sigma[b]) / 255) ** 2 / gamma**2
        lhs = A.T @ A + c * torch.eye(A.shape[1], dtype=A.dtype)
        expected = torch.linalg.solve(lhs, A.T @ y[b].flatten() + c * mu[b].flatten())
        torch.testing.assert_close(x[b].flatten(), expected, rtol=0, atol=1e-10)


def test_x_step_and_T_contract_as_proposition_2_says(hvae):
    """||T(u) - T(v)|| <= sigma^2 / (gamma^2 lambda_min + sigma^2) ||HVAE(u) - HVAE(v)|| (eq. 20 before L_tau), with
    equality for denoising (A = I, lambda_min = 1) where the x-step is affine."""
    sigma, gamma, tau = 20.0, float(hvae.gamma), 0.8
    s2 = (sigma / 255) ** 2
    u, v = _noisy(_images(3), 25, 0), _noisy(_images(3), 25, 1)
    mild = torch.tensor([[0.1, 0.2, 0.1], [0.2, 1.0, 0.2], [0.1, 0.2, 0.1]], dtype=torch.float64) / 2.2
    blur = BlurFFT(mild, SHAPE)  # its transfer function has no zero (KERNEL's vanishes at the Nyquist frequency)
    lam_min = float(torch.linalg.eigvalsh(_dense(blur).T @ _dense(blur)).min())
    assert lam_min > 0.01  # a blur with an invertible transfer function: a strict contraction
    for op, lam in ((Denoising(), 1.0), (blur, lam_min)):
        y = _problem(op, _images(3, seed=4), sigma)
        factor = s2 / (gamma**2 * lam + s2)
        diff_T = (
            (T(u, y, op, hvae, sigma=sigma, tau=tau) - T(v, y, op, hvae, sigma=sigma, tau=tau)).flatten(1).norm(dim=1)
        )
        diff_H = (hvae.reconstruct(u.clamp(0, 1), tau) - hvae.reconstruct(v.clamp(0, 1), tau)).flatten(1).norm(dim=1)
        assert bool((diff_T <= factor * diff_H * (1 + 1e-10)).all())
        if lam == 1.0:
            torch.testing.assert_close(diff_T, factor * diff_H, rtol=1e-10, atol=0)


def test_lower_temperature_contracts_more(hvae):
    """§5.3, Fig. 1: the ratio ||HVAE(u, tau) - HVAE(v, tau)|| / ||u - v|| on noisy images falls with tau, and
    tends to 0 (E_tau(x) -> the prior's mean path, which does not depend on x, as lambda_l = 1/tau_l^2 - 1 -> inf).
    So T contracts more and the steps between iterates of Algorithm 2 shrink faster."""
    x = _images(6, seed=7)
    u, v = _noisy(x, 50, 8).clamp(0, 1), _noisy(x, 50, 9).clamp(0, 1)
    taus = [1.0, 0.8, 0.6, 0.3, 0.1, 0.01]
    ratios = torch.stack(
        [(hvae.reconstruct(u, t) - hvae.reconstruct(v, t)).flatten(1).norm(dim=1) / (u - v).flatten(1).norm(dim=1)
         for t in taus]
    )  # fmt: skip
    assert bool((ratios[1:] < ratios[:-1]).all()), ratios
    assert bool((ratios[-1] < 1e-3 * ratios[0]).all())
    y = _noisy(x, 25, 10)
    steps = [pnp_hvae(y, Denoising(), hvae, sigma=25, tau=t, max_iters=3).history["residual"][1:] for t in (1.0, 0.3)]
    assert bool((steps[1] < steps[0]).all())


# ---- what is recorded ------------------------------------------------------------------------------------------
def test_recorded_objective_is_j1_of_eq15_at_every_iterate(hvae):
    """Row k of history["objective"] is J1(x_k, z_k) with tempered priors (eq. 15, constants dropped): compared with
    the term-by-term formula at the result of a run stopped after k iterations."""
    op = _operators(3)["inpainting"]
    y = _problem(op, _images(3))
    tau, gamma = [0.9, 0.7, 0.5], 0.05
    full = pnp_hvae(y, op, hvae, sigma=10, tau=tau, gamma=gamma, max_iters=3)
    for k in (1, 2, 3):
        r = pnp_hvae(y, op, hvae, sigma=10, tau=tau, gamma=gamma, max_iters=k)
        expected = _j1_explicit(r.x, r.z, y, op, hvae, 10, tau, gamma)
        torch.testing.assert_close(full.history["objective"][k - 1], expected, rtol=1e-10, atol=1e-8)
        torch.testing.assert_close(j1_pnp_hvae(r.x, r.z, y, op, hvae, sigma=10, tau=tau, gamma=gamma), expected)
    steps = (full.x - pnp_hvae(y, op, hvae, sigma=10, tau=tau, gamma=gamma, max_iters=2).x).flatten(1).norm(dim=1)
    torch.testing.assert_close(full.history["residual"][2], steps, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(full.per_image["reconstruction"], hvae.reconstruct(full.x.clamp(0, 1), tau))


def test_recorded_lipschitz_ratio_is_that_of_T(hvae):
    """Fig. 2 right: L_k = ||T(x_k) - T(x_{k-1})|| / ||x_k - x_{k-1}||, for Algorithm 2 (where T(x_{k-1}) = x_k) and
    for the Adam iterates; the last row of a run needs one more evaluation of T, the others do not."""
    op = BlurFFT(KERNEL, SHAPE)
    y = _problem(op, _images(2), 10)
    kw = dict(sigma=10, tau=0.7)

    def ratio(a, b):
        return (T(a, y, op, hvae, **kw) - T(b, y, op, hvae, **kw)).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(
            dim=1
        )

    one = pnp_hvae(y, op, hvae, max_iters=1, record_lipschitz=True, **kw)
    two = pnp_hvae(y, op, hvae, max_iters=2, record_lipschitz=True, **kw)
    expected = ratio(one.x, y)  # official x_0 = y for deblurring
    torch.testing.assert_close(one.history["lipschitz"][0], expected, rtol=1e-9, atol=0)
    torch.testing.assert_close(two.history["lipschitz"][0], expected, rtol=1e-9, atol=0)
    assert "lipschitz" not in pnp_hvae(y, op, hvae, max_iters=1, **kw).history
    a1 = adam_j1(y, op, hvae, max_iters=1, record_lipschitz=True, **kw)
    a2 = adam_j1(y, op, hvae, max_iters=2, record_lipschitz=True, **kw)
    torch.testing.assert_close(a1.history["lipschitz"][0], ratio(a1.x, y), rtol=1e-9, atol=0)
    torch.testing.assert_close(a2.history["lipschitz"][1], ratio(a2.x, a1.x), rtol=1e-9, atol=0)


# ---- the Adam baseline -----------------------------------------------------------------------------------------
def test_adam_baseline_decreases_j1_and_stops_each_image_on_its_own(hvae):
    op = _operators(4)["inpainting"]
    y = _problem(op, _images(4))
    tau = 0.8
    r = adam_j1(y, op, hvae, sigma=10, tau=tau, patience=1, max_iters=60)
    J, n = r.history["objective"], r.iterations
    assert len(set(n.tolist())) >= 3, "the images should stop at different steps"
    assert bool((r.converged == (n < 60)).all()) and bool(r.converged.any()) and not bool(r.converged.all())
    for b in range(4):
        assert bool(torch.isfinite(J[: n[b], b]).all()) and bool(torch.isnan(J[n[b] :, b]).all())
    assert bool((_last(J) < 0.2 * r.per_image["objective_initial"]).all())
    torch.testing.assert_close(_last(J), j1_pnp_hvae(r.x, r.z, y, op, hvae, sigma=10, tau=tau), rtol=1e-10, atol=1e-8)
    z0 = hvae.encode(y.clamp(0, 1))[0]  # official start: x_0 = y, z_0 from the encoder at x_0
    J0 = j1_pnp_hvae(y, z0, y, op, hvae, sigma=10, tau=tau)
    torch.testing.assert_close(r.per_image["objective_initial"], J0, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(r.x_decoded, hvae.decode(r.z))


def test_adam_steps_are_those_of_torch_adam_on_x_and_z(hvae):
    """One image: the baseline's iterates are torch.optim.Adam's on [x, z] with the loss J1 / d (official code)."""
    op = BlurFFT(KERNEL, SHAPE)
    y = _problem(op, _images(1), 10)
    r = adam_j1(y, op, hvae, sigma=10, tau=0.7, lr=0.01, max_iters=5, patience=100)
    x = y.clone().requires_grad_(True)
    z = hvae.encode(y.clamp(0, 1))[0].clone().requires_grad_(True)
    opt = torch.optim.Adam([x, z], lr=0.01)
    for _ in range(5):
        opt.zero_grad()
        (j1_pnp_hvae(x, z, y, op, hvae, sigma=10, tau=0.7) / x[0].numel()).sum().backward()
        opt.step()
    torch.testing.assert_close(r.x, x.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(r.z, z.detach(), rtol=0, atol=1e-12)


# ---- initialisation, sizes, batching, reproducibility ------------------------------------------------------------
def test_official_initialisation_is_y_or_its_bicubic_upsampling(hvae):
    ops = _operators(2)
    for name in ("inpainting", "blur"):  # measurements are images of the image's size: x_0 = y
        op = ops[name]
        y = _problem(op, _images(2))
        r = pnp_hvae(y, op, hvae, sigma=10, max_iters=1)
        torch.testing.assert_close(r.x, T(y, y, op, hvae, sigma=10, tau=0.8), rtol=0, atol=1e-13)
    sr = ops["super_resolution"]
    y = _problem(sr, _images(2))
    up = bicubic_upsample(y, 2)
    assert up.shape == (2, *SHAPE)
    torch.testing.assert_close(up[..., ::2, ::2], y, rtol=0, atol=1e-12)  # y's samples on the decimation grid
    ramp = torch.arange(8, dtype=torch.float64).expand(1, 1, 4, 8)  # cubic interpolation reproduces it away from
    inside = torch.arange(2, 13, dtype=torch.float64) / 2  # the borders, where the replicated edge is a kink
    torch.testing.assert_close(bicubic_upsample(ramp, 2)[..., 2:13], inside.expand(1, 1, 8, 11), rtol=0, atol=1e-12)
    r = pnp_hvae(y, sr, hvae, sigma=10, max_iters=1)
    torch.testing.assert_close(r.x, T(up, y, sr, hvae, sigma=10, tau=0.8), rtol=0, atol=1e-13)
    for init, x0 in (("dagger", sr.A_dagger(y)), ("adjoint", sr.A_adjoint(y))):
        r = pnp_hvae(y, sr, hvae, sigma=10, max_iters=1, init=init)
        torch.testing.assert_close(r.x, T(x0, y, sr, hvae, sigma=10, tau=0.8), rtol=0, atol=1e-13)


@pytest.mark.parametrize("size", [(7, 9), (6, 10), (5, 8)])
def test_images_of_any_size_are_restored_at_their_size(hvae, size):
    """Sizes that are multiples of the stride use the prior at that size; the others are reflect-padded for the HVAE
    and cropped back; z holds the latents of info["latent_size"]."""
    h, w = size
    x_true = _images(2, h, w)
    op = Denoising()
    y = _problem(op, x_true, 15)
    hp, wp = h + h % 2, w + w % 2
    for solver in (pnp_hvae, adam_j1):
        r = solver(y, op, hvae, sigma=15, max_iters=2)
        assert r.x.shape == r.x_decoded.shape == x_true.shape
        assert r.info["latent_size"] == (hp, wp) and r.z.shape == (2, *hvae.at_size(hp, wp).latent_shape)
        torch.testing.assert_close(_last(r.history["objective"]), j1_pnp_hvae(r.x, r.z, y, op, hvae, sigma=15, tau=0.8))
    one = pnp_hvae(y, op, hvae, sigma=15, max_iters=1)
    expected = x_step(hvae.reconstruct(y.clamp(0, 1), 0.8), y, op, sigma=15, gamma=float(hvae.gamma))
    torch.testing.assert_close(one.x, expected, rtol=0, atol=1e-13)
    torch.testing.assert_close(one.x_decoded, hvae_step(y, hvae, 0.8).x_decoded)


class _WholeBatchOnly:
    """An operator that cannot be restricted to some images (like a wrapped deepinv physics): no ``rows``."""

    def __init__(self, op):
        self.op = op

    def A(self, x):
        return self.op.A(x)

    def A_adjoint(self, y):
        return self.op.A_adjoint(y)

    def A_dagger(self, y):
        return self.op.A_dagger(y)

    def prox_l2(self, z, y, gamma):
        return self.op.prox_l2(z, y, gamma)


@pytest.mark.parametrize("solver", [pnp_hvae, adam_j1])
def test_batched_equals_per_image_when_images_stop_at_different_times(hvae, solver):
    """Images of one batch stop at different iterations (one sigma each), on an odd size, with an operator applied to
    the whole batch: each image's result and history are those of solving it alone."""
    x = _images(3, 7, 9)
    sigmas = torch.tensor([2.55, 12.75, 40.0], dtype=torch.float64)
    y = torch.cat([_problem(Denoising(), x[i : i + 1], float(s), seed=i) for i, s in enumerate(sigmas)])
    op = _WholeBatchOnly(Denoising())
    kw = dict(tau=[0.9, 0.7, 0.5], patience=1, max_iters=40, record_lipschitz=True)
    both = solver(y, op, hvae, sigma=sigmas, **kw)
    assert len(set(both.iterations.tolist())) > 1, "the test needs images that stop at different iterations"
    for b in range(3):
        one = solver(y[b : b + 1], op, hvae, sigma=float(sigmas[b]), **kw)
        torch.testing.assert_close(both.x[b : b + 1], one.x, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(both.z[b : b + 1], one.z, rtol=1e-9, atol=1e-10)
        assert int(both.iterations[b]) == int(one.iterations[0]) and bool(both.converged[b] == one.converged[0])
        n = int(one.iterations[0])
        for key in ("objective", "residual"):
            torch.testing.assert_close(both.history[key][:n, b], one.history[key][:, 0], rtol=1e-8, atol=1e-10)
        big = one.history["residual"][:, 0] > 1e-8  # L_k is a ratio of residuals: noise once they reach rounding
        torch.testing.assert_close(both.history["lipschitz"][:n, b][big], one.history["lipschitz"][:, 0][big])


def test_same_inputs_give_the_same_numbers(hvae):
    op = _operators(2)["super_resolution"]
    y = _problem(op, _images(2))
    for solver in (pnp_hvae, adam_j1):
        a, b = solver(y, op, hvae, sigma=10, max_iters=4), solver(y, op, hvae, sigma=10, max_iters=4)
        assert torch.equal(a.x, b.x) and torch.equal(a.z, b.z) and torch.equal(a.x_decoded, b.x_decoded)
        torch.testing.assert_close(a.history["objective"], b.history["objective"], rtol=0, atol=0, equal_nan=True)


# ---- the JPMAP solvers on an HVAE ---------------------------------------------------------------------------------
def test_jpmap_family_on_an_hvae_minimises_the_untempered_pnp_hvae_j1(hvae):
    """JPMAP's J1 with an HVAE prior (its -log p(z) for 1/2 ||z||^2, beta = 1/gamma^2) is PnP-HVAE's eq. 15 at tau = 1,
    so csgm, jpmap and mapz_splitting accept an HVAE at the images' size."""
    op = _operators(2)["inpainting"]
    y = _problem(op, _images(2))
    r = jpmap(y, op, hvae, sigma=10, n1=1, n2=2, n_max=3, adam_max_iters=10)
    torch.testing.assert_close(_last(r.history["objective"]), j1_pnp_hvae(r.x, r.z, y, op, hvae, sigma=10, tau=1.0))
    torch.testing.assert_close(J1(r.x, r.z, y, op, hvae, 10), j1_pnp_hvae(r.x, r.z, y, op, hvae, sigma=10, tau=1.0))
    assert csgm(y, op, hvae, sigma=10, max_iters=5).z.shape == (2, *hvae.latent_shape)
    r = mapz_splitting(y, op, hvae, sigma=10, betas=[hvae.beta], maxiter=2, adam_max_iters=10)
    torch.testing.assert_close(_last(r.history["objective"]), j1_pnp_hvae(r.x, r.z, y, op, hvae, sigma=10, tau=1.0))
    y_big = _problem(Denoising(), _images(1, 16, 8))
    with pytest.raises(ValueError, match="at_size"):
        jpmap(y_big, Denoising(), hvae, sigma=10, n1=1, n2=1, n_max=1)
    view = hvae.at_size(16, 8)
    assert jpmap(y_big, Denoising(), view, sigma=10, n1=1, n2=1, n_max=1, adam_max_iters=5).x.shape == y_big.shape


# ---- bad input ---------------------------------------------------------------------------------------------------
BAD = [
    ({"tau": 0.0}, ValueError, r"tau_l must lie in \(0, 1\]"),
    ({"tau": 1.5}, ValueError, r"tau_l must lie in \(0, 1\]"),
    ({"tau": [0.5, 0.5]}, ValueError, "tau lists 2 temperatures but the model has 3 latent groups"),
    ({"sigma": 0.0}, ValueError, "sigma"),
    ({"sigma": -3.0}, ValueError, "sigma"),
    ({"sigma": torch.tensor([1.0, 2.0, 3.0])}, ValueError, "sigma has 3 values but the batch has B = 2"),
    ({"gamma": 0.0}, ValueError, "gamma"),
    ({"max_iters": 0}, ValueError, "max_iters must be an integer >= 1"),
    ({"patience": -1}, ValueError, "patience"),
    ({"tol": 1.5}, ValueError, "tol must be a number in"),
    ({"init": "bicubic"}, ValueError, "unknown init 'bicubic'"),
    ({"x0": torch.zeros(2, 3, 8, 7, dtype=torch.float64)}, ValueError, "x0 has shape"),
]


@pytest.mark.parametrize("solver", [pnp_hvae, adam_j1])
@pytest.mark.parametrize(("kwargs", "error", "match"), BAD)
def test_bad_options_raise_clear_errors(hvae, solver, kwargs, error, match):
    op = _operators(2)["blur"]
    y = _problem(op, _images(2))
    with pytest.raises(error, match=match):
        solver(y, op, hvae, **{"sigma": 10, **kwargs})


@pytest.mark.parametrize("solver", [pnp_hvae, adam_j1])
def test_bad_problems_raise_clear_errors(hvae, solver):
    op = _operators(2)["blur"]
    y = _problem(op, _images(2))
    with pytest.raises(ValueError, match="y has shape"):
        solver(y[..., :6], op, hvae, sigma=10)
    y_nan = y.clone()
    y_nan[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        solver(y_nan, op, hvae, sigma=10)
    grey = _images(2)[:, :1]
    with pytest.raises(ValueError, match="1 channels .* but the HVAE models 3"):
        solver(grey, Denoising(), hvae, sigma=10)
    with pytest.raises(TypeError, match="hierarchical VAE"):
        solver(y, op, MLPVAE(image_shape=SHAPE, latent_dim=2, hidden=(4,)).double(), sigma=10)
    with pytest.raises(TypeError, match="not a prior"):
        solver(y, op, object(), sigma=10)
    with pytest.raises(TypeError, match="op must provide"):
        solver(y, object(), hvae, sigma=10)


def test_bad_latents_raise_clear_errors(hvae):
    op = _operators(2)["blur"]
    y = _problem(op, _images(2))
    with pytest.raises(ValueError, match=r"z0 must be a finite \(B, N\)"):
        adam_j1(y, op, hvae, sigma=10, z0=torch.zeros(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="lr"):
        adam_j1(y, op, hvae, sigma=10, lr=0.0)
    with pytest.raises(ValueError, match=r"z must have shape \(B, 224\)"):
        j1_pnp_hvae(y, torch.zeros(2, 5, dtype=torch.float64), y, op, hvae, sigma=10, tau=0.8)
