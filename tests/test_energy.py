"""J1, J2 and their exact partial minimisers (JPMAP eqs. 2.5-2.11)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from jpmap_core.energy import J1, J2, as_beta, x_step, z_step_J2
from jpmap_core.models import MLPVAE
from jpmap_core.operators import CompressedSensing, Denoising, Inpainting


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    v = MLPVAE(image_shape=(1, 8, 8), latent_dim=3, hidden=(32,)).double().eval().requires_grad_(False)
    with torch.no_grad():
        v.log_gamma.fill_(math.log(0.2))
    return v


def _ops():
    g = torch.Generator().manual_seed(1)
    return {
        "denoising": Denoising(),
        "inpainting": Inpainting(image_shape=(1, 8, 8), missing=0.6, batch_size=2, generator=g),
        "cs": CompressedSensing(20, (1, 8, 8), generator=g, matrix=None),
    }


@pytest.mark.parametrize("name", ["denoising", "inpainting", "cs"])
def test_closed_form_x_step_equals_the_autograd_minimiser_of_J1(vae, name):
    op = _ops()[name]
    if name == "cs":
        op.matrix = op.matrix.double()
    g = torch.Generator().manual_seed(2)
    x_true = torch.rand(2, 1, 8, 8, generator=g, dtype=torch.float64)
    y = op.A(x_true) + 0.05 * torch.randn(op.A(x_true).shape, generator=g, dtype=torch.float64)
    z = torch.randn(2, 3, generator=g, dtype=torch.float64)
    beta = torch.tensor([7.0, 40.0], dtype=torch.float64)
    sigma = 0.05 * 255
    x_cf = x_step(vae.decode(z), y, op, sigma, beta)
    x = torch.zeros_like(x_true, requires_grad=True)
    opt = torch.optim.LBFGS([x], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        opt.zero_grad()
        e = J1(x, z, y, op, vae, sigma, beta).sum()
        e.backward()
        return e

    opt.step(closure)
    torch.testing.assert_close(x_cf, x.detach(), atol=1e-6, rtol=1e-6)


def test_J1_terms_and_default_beta(vae):
    op = Denoising()
    x, y = torch.rand(2, 1, 8, 8, dtype=torch.float64), torch.rand(2, 1, 8, 8, dtype=torch.float64)
    z = torch.randn(2, 3, dtype=torch.float64)
    s = 10 / 255
    mu = vae.decode(z)
    ref = ((x - y) ** 2).flatten(1).sum(1) / (2 * s * s) + 0.5 / 0.2**2 * ((x - mu) ** 2).flatten(1).sum(1)
    ref = ref + 0.5 * (z**2).sum(1)
    torch.testing.assert_close(J1(x, z, y, op, vae, 10), ref)  # beta = 1/gamma^2 by default
    torch.testing.assert_close(J1(x, z, y, op, vae, 10, beta=25.0), J1(x, z, y, op, vae, 10, beta=1 / 0.2**2))


def test_J2_uses_the_encoder_covariance_as_a_variance(vae):
    """K_phi(x, z) = -log N(z; mu_phi(x), diag(exp(logvar))) up to l/2 log(2 pi)  (eq. 2.10)."""
    op = Denoising()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    z = torch.randn(3, 3, dtype=torch.float64)
    mu, logvar = vae.encode(x)
    k_phi = -Normal(mu, (0.5 * logvar).exp()).log_prob(z).sum(1) - 1.5 * math.log(2 * math.pi)
    f = J2(x, z, x, op, vae, 10) - J2(x, mu, x, op, vae, 10) + (-Normal(mu, (0.5 * logvar).exp()).log_prob(mu).sum(1))
    f = f - 1.5 * math.log(2 * math.pi)
    torch.testing.assert_close(f, k_phi)


def test_encoder_mean_minimises_J2_in_z(vae):
    op = Denoising()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    z_star = z_step_J2(x, vae).requires_grad_(True)
    (g,) = torch.autograd.grad(J2(x, z_star, x, op, vae, 10).sum(), z_star)
    assert float(g.abs().max()) < 1e-10
    e0 = J2(x, z_star.detach(), x, op, vae, 10)
    e1 = J2(x, z_star.detach() + 0.1 * torch.randn(2, 3, dtype=torch.float64), x, op, vae, 10)
    assert bool((e1 > e0).all())


def test_energies_reject_bad_sigma_and_beta(vae):
    op, x = Denoising(), torch.rand(1, 1, 8, 8, dtype=torch.float64)
    z = torch.zeros(1, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="sigma"):
        J1(x, z, x, op, vae, 0)
    with pytest.raises(ValueError, match="beta"):
        as_beta(torch.tensor([1.0, -1.0]), vae, 2, x)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        as_beta(torch.ones(3), vae, 2, x)
