"""VBLE and VBLE-xz (VBLE slides): the ELBO estimator, the fitted posterior against closed forms on a linear-Gaussian
model, the posterior outputs, the noise streams and bad input.

The linear-Gaussian model: ``D(z) = W z + c``, ``p(z) = N(0, I)``, ``p(y | z) = N(A D(z), s^2 I)``. The posterior of
``z`` is Gaussian with precision ``Lambda = I + W^T A^T A W / s^2`` and mean ``Lambda^{-1} W^T A^T (y - A c) / s^2``.
Everything runs in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from jpmap_core.models import MLPVAE
from jpmap_core.operators import CompressedSensing, Inpainting
from jpmap_core.solvers import SOLVERS, csgm, posterior_samples, vble, vble_xz
from jpmap_core.solvers.vble import elbo

SHAPE = (1, 4, 4)
D = 16
NPIX = 16
SIGMA = 25.0
S = SIGMA / 255
#: fits precise enough for the closed-form comparisons: many SGVB draws per step, small steps, no early stop
PRECISE = {"n_samples": 256, "lr": 0.01, "max_iters": 1000, "patience": 10**9}


class LinearGaussianPrior:
    """The :class:`~jpmap_core.models.Prior` interface for ``D(z) = W z + c``, ``p(z) = N(0, I)``, an encoder ``W^+ x``
    and ``p(x | z) = N(D(z), gamma^2 I)`` (VBLE-xz's decoder std)."""

    def __init__(self, W: torch.Tensor, c: torch.Tensor, gamma: float = 0.05) -> None:
        self.W, self.c, self.image_shape = W, c, SHAPE
        self.gamma = torch.tensor(gamma, dtype=W.dtype)
        self.E = torch.linalg.pinv(W)

    @property
    def latent_shape(self) -> tuple[int]:
        return (self.W.shape[1],)

    def encode(self, x, *, allow_out_of_range=False):
        return x.flatten(1) @ self.E.T, None

    def decode(self, z, *, check=True):
        return (z @ self.W.T + self.c).view(-1, *SHAPE)

    def neg_log_prior(self, z):
        return 0.5 * z.pow(2).sum(1)


class PixelStdPrior(LinearGaussianPrior):
    """A decoder with a variance head: ``sigma_theta(z)`` is a fixed map (VBLE-xz must use it, not ``gamma``)."""

    def __init__(self, W, c, std_map):
        super().__init__(W, c, gamma=1.0)
        self.std_map = std_map

    def decoder_std(self, z):
        return self.std_map.expand(z.shape[0], *SHAPE)


def _dense(op) -> torch.Tensor:
    """The matrix ``(m, d)`` of ``op``."""
    return op.A(torch.eye(D, dtype=torch.float64).view(D, *SHAPE)).reshape(D, -1).T


def _disjoint_W(g, n_latent=4, width=3) -> torch.Tensor:
    """Columns with disjoint supports (pixels ``width*j .. width*j + width-1``): ``W^T M W`` is diagonal for any mask
    ``M``; the last ``D - n_latent*width`` pixels are not seen by the decoder."""
    W = torch.zeros(D, n_latent, dtype=torch.float64)
    for j in range(n_latent):
        W[width * j : width * (j + 1), j] = 0.2 + 0.2 * torch.rand(width, generator=g, dtype=torch.float64)
    return W


def _mask(missing=(1, 4, 7, 13, 14)) -> Inpainting:
    m = torch.ones(1, *SHAPE, dtype=torch.float64)
    m.view(-1)[list(missing)] = 0
    return Inpainting(mask=m)


def _observe(prior, op, B, g):
    x = prior.decode(torch.randn(B, prior.latent_shape[0], generator=g, dtype=torch.float64))
    y = op.A(x)
    return y + S * torch.randn(y.shape, generator=g, dtype=y.dtype)


def _posterior(prior, Am, y):
    """Exact posterior of z: mean ``(B, l)``, precision ``Lambda`` and covariance."""
    AW = Am @ prior.W
    lam = torch.eye(AW.shape[1], dtype=torch.float64) + AW.T @ AW / S**2
    mu = torch.linalg.solve(lam, AW.T @ (y.flatten(1) - Am @ prior.c).T / S**2).T
    return mu, lam, torch.linalg.inv(lam)


def _closed_form_elbo(prior, Am, y, zbar, a, b=None, std=None):
    """ELBO per pixel of ``N(zbar, diag(a^2))`` (and of ``q_b(x|z)`` with a constant decoder std map ``std``)."""
    AW = Am @ prior.W
    res = (zbar @ prior.W.T + prior.c) @ Am.T - y.flatten(1)
    data = res.pow(2).sum(1) + (a.pow(2) * AW.pow(2).sum(0)).sum(1)
    value = -data / (2 * S**2) - Am.shape[0] / 2 * math.log(2 * math.pi * S**2)
    value = value - 0.5 * (zbar.pow(2) + a.pow(2)).sum(1) + a.log().sum(1) + 0.5 * zbar.shape[1]
    if b is not None:
        bb = b.flatten(1)
        diag_ata = Am.pow(2).sum(0)
        value = value - (bb.pow(2) * std.flatten() ** 2 * diag_ata / (2 * S**2) - bb.log() + bb.pow(2) / 2 - 0.5).sum(1)
    return value / NPIX


def _log_evidence(prior, Am, y):
    AW = Am @ prior.W
    cov = AW @ AW.T + S**2 * torch.eye(Am.shape[0], dtype=torch.float64)
    dist = torch.distributions.MultivariateNormal(Am @ prior.c, covariance_matrix=cov)
    return dist.log_prob(y.flatten(1)) / NPIX


@pytest.fixture(scope="module")
def diagonal_model():
    """Disjoint decoder columns and an inpainting mask: the exact posterior of z is a diagonal Gaussian."""
    g = torch.Generator().manual_seed(0)
    prior = LinearGaussianPrior(_disjoint_W(g), 0.5 * torch.ones(D, dtype=torch.float64))
    op = _mask()
    return prior, op, _observe(prior, op, 2, g)


@pytest.fixture(scope="module")
def diagonal_fits(diagonal_model):
    prior, op, y = diagonal_model
    r = vble(y, op, prior, sigma=SIGMA, n_posterior_samples=4000, **PRECISE)
    rxz = vble_xz(y, op, prior, sigma=SIGMA, n_posterior_samples=4000, **PRECISE)
    return r, rxz


@pytest.fixture(scope="module")
def tiny_mlp():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = MLPVAE(image_shape=(1, 8, 8), latent_dim=3, hidden=(16,), gamma_init=0.1)
    return vae.double().eval().requires_grad_(False)


@pytest.fixture(scope="module")
def mlp_problem():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 1, 8, 8, generator=g, dtype=torch.float64)
    op = Inpainting(image_shape=(1, 8, 8), missing=0.5, batch_size=3, generator=g)
    return x, op, op.degrade(x, SIGMA, generator=g)


# ---- the estimator ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("xz", [False, True], ids=["vble", "vble_xz"])
def test_elbo_estimator_is_unbiased_on_a_linear_gaussian_model(xz):
    """The SGVB estimate (one draw) averaged over many draws matches the closed-form ELBO of a Gaussian q within
    Monte Carlo error (4 standard errors), for a q that is not the posterior, with a dense operator."""
    g = torch.Generator().manual_seed(3)
    W = 0.3 * torch.randn(D, 4, generator=g, dtype=torch.float64)
    prior = LinearGaussianPrior(W, 0.5 * torch.ones(D, dtype=torch.float64))
    op = CompressedSensing(10, SHAPE, generator=g)
    y1 = _observe(prior, op, 1, g)
    n = 20000
    zbar = torch.randn(1, 4, generator=g, dtype=torch.float64)
    a = 0.1 + 0.3 * torch.rand(1, 4, generator=g, dtype=torch.float64)
    b = (0.3 + 0.7 * torch.rand(1, *SHAPE, generator=g, dtype=torch.float64)) if xz else None
    kw = {"b": b.expand(n, *SHAPE)} if xz else {}
    draws = elbo(
        y1.expand(n, -1), op, prior, zbar.expand(n, -1), a.expand(n, -1), sigma=SIGMA, generator=g, **kw
    )  # one draw for each of n copies: n independent estimates
    exact = _closed_form_elbo(prior, _dense(op), y1, zbar, a, b, std=torch.full((D,), 0.05, dtype=torch.float64))
    se = draws.std() / math.sqrt(n)
    assert float(draws.std()) > 1e-3, "the estimate is random: the test compares a mean"
    assert abs(float(draws.mean() - exact)) < 4 * float(se), (float(draws.mean()), float(exact), float(se))


# ---- VBLE on the linear-Gaussian model ----------------------------------------------------------------------
def test_vble_recovers_the_exact_posterior_when_it_is_in_the_family(diagonal_model, diagonal_fits):
    """With a diagonal posterior precision, the mean-field family contains the posterior: VBLE recovers its mean
    and standard deviations ``1/sqrt(Lambda_ii)``, the ELBO reaches the log-evidence, and the MMSE-x and pixel std
    are those of ``x = W z + c`` under the posterior (within optimisation and Monte Carlo tolerances)."""
    prior, op, y = diagonal_model
    r, _ = diagonal_fits
    mu, lam, cov = _posterior(prior, _dense(op), y)
    assert torch.count_nonzero(lam - torch.diag(lam.diag())) == 0
    sd = cov.diag().sqrt()
    assert float(((r.z - mu) / sd).abs().max()) < 0.1
    torch.testing.assert_close(r.per_image["z_scale"], sd.expand_as(r.z), rtol=0.08, atol=0)
    fitted = _closed_form_elbo(prior, _dense(op), y, r.z, r.per_image["z_scale"])
    evidence = _log_evidence(prior, _dense(op), y)
    assert bool((fitted <= evidence + 1e-12).all())  # a lower bound
    assert float((evidence - fitted).max()) < 5e-4  # nats per pixel: the gap is the KL to the posterior
    assert float((r.per_image["elbo"] - fitted).abs().max()) < 5e-3  # the reported ELBO estimates it
    x_mean = (mu @ prior.W.T + prior.c).view(-1, *SHAPE)
    x_sd = (prior.W @ cov @ prior.W.T).diag().sqrt().view(1, *SHAPE)
    assert bool(((r.x - x_mean).abs() <= 0.15 * x_sd + 1e-12).all())
    torch.testing.assert_close(r.per_image["std"], x_sd.expand_as(r.x), rtol=0.1, atol=1e-12)
    torch.testing.assert_close(r.x_decoded, prior.decode(r.z))


def test_vble_mean_field_variances_are_the_inverse_precision_diagonal():
    """With a correlated posterior, the mean-field optimum keeps the exact mean but its variances are
    ``1/Lambda_ii``, smaller than the marginal variances ``(Lambda^-1)_ii`` (the known under-dispersion of mean-field
    variational inference): VBLE finds ``1/sqrt(Lambda_ii)``."""
    g = torch.Generator().manual_seed(5)
    W = 0.3 * torch.randn(D, 4, generator=g, dtype=torch.float64)
    prior = LinearGaussianPrior(W, 0.5 * torch.ones(D, dtype=torch.float64))
    op = CompressedSensing(6, SHAPE, generator=g)
    y = _observe(prior, op, 1, g)
    mu, lam, cov = _posterior(prior, _dense(op), y)
    mean_field, marginal = lam.diag().rsqrt(), cov.diag().sqrt()
    assert float((mean_field / marginal).min()) < 0.8, "the test needs a correlated posterior"
    r = vble(y, op, prior, sigma=SIGMA, **PRECISE)
    assert float(((r.z - mu) / marginal).abs().max()) < 0.1
    torch.testing.assert_close(r.per_image["z_scale"][0], mean_field, rtol=0.08, atol=0)


# ---- VBLE-xz -----------------------------------------------------------------------------------------------
def test_vble_xz_latent_is_vbles_and_b_has_its_closed_form(diagonal_model, diagonal_fits):
    """With a constant decoder std ``gamma`` the VBLE-xz ELBO separates: ``E||A(D(z) + b gamma xi) - y||^2 =
    E||A D(z) - y||^2 + sum_k b_k^2 gamma^2 (A^T A)_kk``, so ``(zbar, a)`` maximise VBLE's ELBO, the optimal
    ``b_k = (1 + gamma^2 (A^T A)_kk / s^2)^{-1/2}`` (1 on missing pixels), the optimal ELBO is VBLE's minus
    ``1/2 sum_k log(1 + gamma^2 (A^T A)_kk / s^2)``, and the pixel variance is VBLE's plus ``b_k^2 gamma^2``."""
    prior, op, y = diagonal_model
    r, rxz = diagonal_fits
    Am, gamma = _dense(op), float(prior.gamma)
    mu, _, cov = _posterior(prior, Am, y)
    sd = cov.diag().sqrt()
    assert float(((rxz.z - mu) / sd).abs().max()) < 0.1
    torch.testing.assert_close(rxz.per_image["z_scale"], sd.expand_as(rxz.z), rtol=0.08, atol=0)
    c = gamma**2 * Am.pow(2).sum(0).view(1, *SHAPE) / S**2
    b_star = (1 + c).rsqrt()
    assert rxz.per_image["b"].shape == y.shape
    torch.testing.assert_close(rxz.per_image["b"], b_star.expand_as(y), rtol=0.06, atol=0)
    assert bool((b_star.view(-1)[[1, 4, 7, 13, 14]] == 1).all())
    gap = 0.5 * torch.log1p(c).sum() / NPIX
    torch.testing.assert_close(rxz.per_image["elbo"], r.per_image["elbo"] - gap, rtol=0, atol=5e-3)
    std = torch.full((D,), gamma, dtype=torch.float64)
    exact = _closed_form_elbo(prior, Am, y, mu, sd.expand_as(mu), b_star.expand(2, -1, -1, -1), std)
    torch.testing.assert_close(rxz.per_image["elbo"], exact, rtol=0, atol=5e-3)
    var_xz = r.per_image["std"].pow(2) + b_star.pow(2) * gamma**2
    torch.testing.assert_close(rxz.per_image["std"], var_xz.sqrt(), rtol=0.1, atol=0)
    assert bool((rxz.per_image["std"] > r.per_image["std"]).all())


def test_vble_xz_optimal_b_does_not_depend_on_the_decoder(tiny_mlp, mlp_problem):
    """The separation holds for any decoder when its std is a constant: on an MLP VAE (gamma = 0.1) with one factor
    per image (``b="image"``), the negative ELBO's ``b``-terms are ``b^2 gamma^2 sum_k (A^T A)_kk / (2 s^2) +
    d (-log b + b^2/2 - 1/2)``, minimised at ``b = (1 + gamma^2 f / s^2)^{-1/2}`` (``f``: fraction of observed
    pixels)."""
    x, op, y = mlp_problem
    r = vble_xz(y, op, tiny_mlp, sigma=SIGMA, b="image", n_samples=64, lr=0.01, max_iters=1000, patience=10**9)
    f = op.mask.flatten(1).mean(1).double()
    b_star = (1 + float(tiny_mlp.gamma) ** 2 * f / S**2).rsqrt()
    assert r.per_image["b"].shape == (3, 1, 1, 1)
    torch.testing.assert_close(r.per_image["b"].flatten(), b_star, rtol=0.03, atol=0)


def test_vble_xz_uses_the_priors_decoder_std_method(diagonal_model):
    """A prior with ``decoder_std(z)`` (a variance head) sets ``sigma_theta`` pixel by pixel: the fitted ``b`` is the
    closed form with that map, not with ``gamma``."""
    prior, op, y = diagonal_model
    g = torch.Generator().manual_seed(9)
    std_map = (0.02 + 0.1 * torch.rand(1, *SHAPE, generator=g, dtype=torch.float64)).view(1, *SHAPE)
    rich = PixelStdPrior(prior.W, prior.c, std_map)
    r = vble_xz(y, op, rich, sigma=SIGMA, **PRECISE)
    b_star = (1 + std_map.pow(2) * _dense(op).pow(2).sum(0).view(1, *SHAPE) / S**2).rsqrt()
    torch.testing.assert_close(r.per_image["b"], b_star.expand_as(y), rtol=0.06, atol=0)
    assert r.info["decoder_std"] == "prior.decoder_std(z)"


def test_vble_std_is_zero_where_the_decoder_ignores_z_and_vble_xz_adds_the_representation_error(
    diagonal_model, diagonal_fits
):
    """Pixels 12-15 are not in the decoder's range (zero rows of W): every VBLE sample has the same value there
    (std exactly 0); VBLE-xz's samples there carry the representation error, std ``b gamma`` with ``b = 1`` where
    the pixel is missing."""
    prior, _, _ = diagonal_model
    r, rxz = diagonal_fits
    free = torch.tensor([12, 13, 14, 15])
    assert bool((prior.W[free] == 0).all())
    assert bool((r.per_image["std"].flatten(1)[:, free] == 0).all())
    assert bool((r.per_image["std"].flatten(1)[:, :12] > 0).all())
    torch.testing.assert_close(
        rxz.per_image["std"].flatten(1)[:, [13, 14]], torch.full((2, 2), float(prior.gamma), dtype=torch.float64),
        rtol=0.1, atol=0,
    )  # fmt: skip


def test_vble_xz_with_a_fixed_b_keeps_it():
    g = torch.Generator().manual_seed(2)
    prior = LinearGaussianPrior(_disjoint_W(g), 0.5 * torch.ones(D, dtype=torch.float64))
    op = _mask()
    y = _observe(prior, op, 2, g)
    r = vble_xz(y, op, prior, sigma=SIGMA, b=torch.tensor([0.5, 2.0], dtype=torch.float64), max_iters=10)
    assert r.per_image["b"].flatten().tolist() == [0.5, 2.0]
    assert r.info["b"] == "fixed"


# ---- outputs, batching, randomness --------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["vble", "vble_xz"])
def test_every_output_of_an_image_is_the_same_alone_or_in_a_batch(method, tiny_mlp, mlp_problem):
    _, op, y = mlp_problem
    stop = {"vble": {"max_iters": 45, "patience": 10}, "vble_xz": {"max_iters": 45, "patience": 20}}[method]
    kw = {**stop, "n_posterior_samples": 10, "n_keep_samples": 3, "sample_batch": 4}
    both = SOLVERS[method](y, op, tiny_mlp, sigma=SIGMA, generator=torch.Generator().manual_seed(4), **kw)
    assert bool(both.converged.any()) and not bool(both.converged.all()), "the test needs images that stop apart"
    for b in (2, 0):
        rows = torch.tensor([b])
        one = SOLVERS[method](
            y[rows], op.rows(rows), tiny_mlp, sigma=SIGMA, generator=torch.Generator().manual_seed(4), **kw
        )
        for key, v in one.per_image.items():
            torch.testing.assert_close(both.per_image[key][rows], v, rtol=1e-9, atol=1e-12, msg=key)
        for key, v in one.history.items():
            if key == "seconds":
                continue
            T = v.shape[0]
            torch.testing.assert_close(both.history[key][:T, b], v[:, 0], rtol=1e-9, atol=1e-12, equal_nan=True)
        torch.testing.assert_close(both.x[rows], one.x, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(both.x_decoded[rows], one.x_decoded, rtol=1e-9, atol=1e-12)


class WithoutRows:
    """An operator that cannot be restricted to a subset of images (as a wrapped deepinv physics)."""

    def __init__(self, op):
        self.op = op

    def A(self, x):
        return self.op.A(x)

    def A_adjoint(self, y):
        return self.op.A_adjoint(y)

    def A_dagger(self, y, *args):
        return self.op.A_dagger(y, *args)

    def prox_l2(self, z, y, gamma):
        return self.op.prox_l2(z, y, gamma)


@pytest.mark.parametrize("method", ["vble", "vble_xz"])
def test_an_operator_without_rows_gives_the_same_fit(method, tiny_mlp, mlp_problem):
    """Per-image masks, applied through the whole batch once per SGVB draw when ``op.rows`` is missing."""
    _, op, y = mlp_problem
    kw = {"max_iters": 12, "n_samples": 2, "n_posterior_samples": 4}
    r = SOLVERS[method](y, op, tiny_mlp, sigma=SIGMA, **kw)
    w = SOLVERS[method](y, WithoutRows(op), tiny_mlp, sigma=SIGMA, **kw)
    torch.testing.assert_close(w.x, r.x, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w.per_image["elbo"], r.per_image["elbo"], rtol=1e-9, atol=1e-12)


def test_same_seed_same_numbers_and_different_seeds_different_samples(tiny_mlp, mlp_problem):
    _, op, y = mlp_problem
    kw = {"max_iters": 15, "n_posterior_samples": 6}

    def run(seed):
        return vble_xz(y, op, tiny_mlp, sigma=SIGMA, generator=torch.Generator().manual_seed(seed), **kw)

    r1, r2, r3 = run(0), run(0), run(1)
    assert torch.equal(r1.per_image["samples"], r2.per_image["samples"]) and torch.equal(r1.x, r2.x)
    assert not bool(torch.isclose(r1.per_image["samples"], r3.per_image["samples"]).any())
    assert not torch.equal(r1.z, r3.z)
    g = torch.Generator().manual_seed(0)  # one generator, two calls: the draws follow one another
    first = vble(y, op, tiny_mlp, sigma=SIGMA, generator=g, **kw)
    second = vble(y, op, tiny_mlp, sigma=SIGMA, generator=g, **kw)
    assert not torch.equal(first.per_image["samples"], second.per_image["samples"])
    default = vble(y, op, tiny_mlp, sigma=SIGMA, **kw)  # no generator: a fixed base seed
    assert torch.equal(default.x, vble(y, op, tiny_mlp, sigma=SIGMA, **kw).x)


@pytest.mark.parametrize("method", ["vble", "vble_xz"])
def test_mmse_x_and_std_are_those_of_the_samples_when_all_are_kept(method, tiny_mlp, mlp_problem):
    """VBLE's MMSE-x is the mean of its samples; VBLE-xz's is the mean of their decoder means ``D(z_i)``, which
    differs from the samples' mean by the mean of the x-noise only (``b gamma / sqrt(S)`` per pixel). The std is
    the samples' std (with the x-noise) in both."""
    _, op, y = mlp_problem
    n = 7
    r = SOLVERS[method](
        y, op, tiny_mlp, sigma=SIGMA, max_iters=10, n_posterior_samples=n, n_keep_samples=n, sample_batch=3
    )
    s = r.per_image["samples"]
    assert s.shape == (3, n, 1, 8, 8)
    torch.testing.assert_close(r.per_image["std"], s.std(1), rtol=1e-9, atol=1e-12)
    assert r.per_image["z_scale"].shape == r.z.shape and bool((r.per_image["z_scale"] > 0).all())
    if method == "vble":
        torch.testing.assert_close(r.x, s.mean(1), rtol=0, atol=1e-12)
    else:
        noise = r.per_image["b"] * float(tiny_mlp.gamma) / math.sqrt(n)
        assert bool(((r.x - s.mean(1)).abs() < 5 * noise).all())
        assert not torch.allclose(r.x, s.mean(1))


def test_elbo_increases_along_the_fit(tiny_mlp, mlp_problem):
    _, op, y = mlp_problem
    r = vble(y, op, tiny_mlp, sigma=SIGMA, max_iters=200, patience=10**9, n_samples=4)
    obj = r.history["objective"]
    assert obj.shape == (200, 3)
    assert bool((obj[-20:].mean(0) > obj[:5].mean(0)).all())
    # the reported ELBO is data + KL with the normalisation: objective = -(data + m/2 log(2 pi s^2)/HW + kl)
    const = 64 / 2 * math.log(2 * math.pi * S**2) / 64
    torch.testing.assert_close(obj, -(r.history["data_fidelity"] + const + r.history["kl"]))


def test_posterior_samples_draws_more_of_the_fitted_posterior(diagonal_model, diagonal_fits):
    """On-demand samples: ``(B, n, C, H, W)``, reproducible, independent of the batch, and distributed as the
    fitted posterior (their mean is ``W zbar + c`` and their std is the fit's, within Monte Carlo error)."""
    prior, _, _ = diagonal_model
    for r in diagonal_fits:
        s = posterior_samples(prior, r, 3000, generator=torch.Generator().manual_seed(0), sample_batch=700)
        assert s.shape == (2, 3000, *SHAPE)
        a = r.per_image["z_scale"]
        sd_mean = ((prior.W * a[:, None, :]).pow(2).sum(2).sqrt().view(2, *SHAPE) + 1e-12) / math.sqrt(3000)
        if "b" in r.per_image:
            sd_mean = sd_mean + float(prior.gamma) / math.sqrt(3000)
        assert bool(((s.mean(1) - prior.decode(r.z)).abs() <= 5 * sd_mean).all())
        torch.testing.assert_close(s.std(1), r.per_image["std"], rtol=0.1, atol=1e-12)
        again = posterior_samples(prior, r, 3000, generator=torch.Generator().manual_seed(0), sample_batch=700)
        assert torch.equal(again, s)
        alone = posterior_samples(
            prior,
            type(r)(r.x[1:], r.z[1:], r.x_decoded[1:], r.converged[1:], r.iterations[1:], info=r.info,
                    per_image={k: v[1:] for k, v in r.per_image.items()}),
            3000,
            generator=torch.Generator().manual_seed(0),
            sample_batch=700,
        )  # fmt: skip
        torch.testing.assert_close(alone, s[1:], rtol=1e-12, atol=1e-12)


# ---- bad input ---------------------------------------------------------------------------------------------
def test_bad_input_raises_clear_errors(tiny_mlp, mlp_problem, diagonal_model):
    _, op, y = mlp_problem
    for method in (vble, vble_xz):
        with pytest.raises(ValueError, match="n_samples"):
            method(y, op, tiny_mlp, sigma=SIGMA, n_samples=0)
        with pytest.raises(ValueError, match="n_posterior_samples"):
            method(y, op, tiny_mlp, sigma=SIGMA, n_posterior_samples=1)
        with pytest.raises(ValueError, match="n_keep_samples"):
            method(y, op, tiny_mlp, sigma=SIGMA, n_posterior_samples=4, n_keep_samples=5)
        with pytest.raises(ValueError, match="lr"):
            method(y, op, tiny_mlp, sigma=SIGMA, lr=0.0)
        with pytest.raises(ValueError, match="max_iters"):
            method(y, op, tiny_mlp, sigma=SIGMA, max_iters=0)
        with pytest.raises(ValueError, match="a0"):
            method(y, op, tiny_mlp, sigma=SIGMA, a0=-1.0)
        with pytest.raises(ValueError, match="z0 must be"):
            method(y, op, tiny_mlp, sigma=SIGMA, z0=torch.zeros(3, 4, dtype=torch.float64))
        with pytest.raises(ValueError, match="sigma"):
            method(y, op, tiny_mlp, sigma=-5.0)
    with pytest.raises(ValueError, match="b must be 'pixel', 'image' or a fixed number"):
        vble_xz(y, op, tiny_mlp, sigma=SIGMA, b="channel")
    with pytest.raises(ValueError, match="b must be finite and > 0"):
        vble_xz(y, op, tiny_mlp, sigma=SIGMA, b=torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="decoder_std"):
        vble_xz(y, op, tiny_mlp, sigma=SIGMA, decoder_std=0.0)
    prior, op_lin, y_lin = diagonal_model
    no_std = LinearGaussianPrior(prior.W, prior.c)
    del no_std.gamma
    with pytest.raises(TypeError, match="decoder_std"):
        vble_xz(y_lin, op_lin, no_std, sigma=SIGMA)
    other = csgm(y, op, tiny_mlp, sigma=SIGMA, max_iters=2)
    with pytest.raises(ValueError, match="vble or vble_xz Restoration"):
        posterior_samples(tiny_mlp, other, 3)


# ---- the uniform posterior (compressive autoencoder priors) --------------------------------------------------
def _closed_form_elbo_uniform(prior, Am, y, zbar, a):
    """ELBO per pixel of ``q(z) = U(zbar -+ a/2)`` for the linear-Gaussian model: each ``z_k`` has mean ``zbar_k``
    and variance ``a_k^2 / 12``, and ``H(q) = sum log a`` (``p(z) = N(0, I)`` with its ``l/2 log 2 pi``)."""
    AW = Am @ prior.W
    var = a.pow(2) / 12
    res = (zbar @ prior.W.T + prior.c) @ Am.T - y.flatten(1)
    data = res.pow(2).sum(1) + (var * AW.pow(2).sum(0)).sum(1)
    value = -data / (2 * S**2) - Am.shape[0] / 2 * math.log(2 * math.pi * S**2)
    value = value - 0.5 * (zbar.pow(2) + var).sum(1) - 0.5 * zbar.shape[1] * math.log(2 * math.pi) + a.log().sum(1)
    return value / NPIX


def test_uniform_elbo_estimator_is_unbiased_with_entropy_sum_log_a():
    """The SGVB estimate for ``q = U(zbar -+ a/2)`` (draws ``zbar + a (u - 1/2)``), averaged over many draws, matches
    the closed form whose entropy is ``sum log a`` (slides, "[Appendice] CAE expressed in the VAE framework")."""
    g = torch.Generator().manual_seed(5)
    W = 0.3 * torch.randn(D, 4, generator=g, dtype=torch.float64)
    prior = LinearGaussianPrior(W, 0.5 * torch.ones(D, dtype=torch.float64))
    op = CompressedSensing(10, SHAPE, generator=g)
    y1 = _observe(prior, op, 1, g)
    n = 20000
    zbar = torch.randn(1, 4, generator=g, dtype=torch.float64)
    a = 0.3 + 0.8 * torch.rand(1, 4, generator=g, dtype=torch.float64)
    draws = elbo(
        y1.expand(n, -1), op, prior, zbar.expand(n, -1), a.expand(n, -1), sigma=SIGMA, posterior="uniform", generator=g
    )
    exact = _closed_form_elbo_uniform(prior, _dense(op), y1, zbar, a)
    se = draws.std() / math.sqrt(n)
    assert float(draws.std()) > 1e-3
    assert abs(float(draws.mean() - exact)) < 4 * float(se), (float(draws.mean()), float(exact), float(se))
    # entropy: doubling a adds l log 2 / npix to the ELBO's entropy part (checked on a z-free model: W = 0)
    flat = LinearGaussianPrior(torch.zeros(D, 4, dtype=torch.float64), prior.c)
    e1 = elbo(y1, op, flat, torch.zeros(1, 4, dtype=torch.float64), 1.0, sigma=SIGMA, posterior="uniform",
              n_samples=4000, generator=torch.Generator().manual_seed(0))  # fmt: skip
    e2 = elbo(y1, op, flat, torch.zeros(1, 4, dtype=torch.float64), 2.0, sigma=SIGMA, posterior="uniform",
              n_samples=4000, generator=torch.Generator().manual_seed(0))  # fmt: skip
    # E[-1/2 z^2] changes by -(4 - 1)/24 per coordinate
    torch.testing.assert_close(e2 - e1, torch.tensor([4 * (math.log(2) - 3 / 24) / NPIX], dtype=torch.float64),
                               rtol=0, atol=2e-3 / NPIX)  # fmt: skip


def test_vble_uniform_fits_the_posterior_mean_and_the_optimal_width(diagonal_model):
    """With a diagonal Gaussian posterior ``N(mu, diag(1/Lambda))``, the best uniform ``q`` has the posterior's mean
    and width ``a = sqrt(12 / Lambda_kk)`` (maximise ``-a^2 Lambda / 24 + log a``): VBLE finds both, and its samples
    lie in ``zbar -+ a/2``."""
    prior, op, y = diagonal_model
    r = vble(y, op, prior, sigma=SIGMA, posterior="uniform", n_posterior_samples=2000, **PRECISE)
    assert r.info["posterior"] == "uniform" and r.info["a0"] == 1.0
    mu, lam, cov = _posterior(prior, _dense(op), y)
    sd = cov.diag().sqrt()
    assert float(((r.z - mu) / sd).abs().max()) < 0.1
    torch.testing.assert_close(r.per_image["z_scale"], (12 / lam.diag()).sqrt().expand_as(r.z), rtol=0.08, atol=0)
    s = posterior_samples(prior, r, 500, generator=torch.Generator().manual_seed(0))
    z = (s.flatten(2) - prior.c) @ prior.E.T  # the decoder is injective on its range: recover z
    half = r.per_image["z_scale"][:, None] / 2
    assert bool(((z - r.z[:, None]).abs() <= half + 1e-9).all())
    assert float(((z - r.z[:, None]).abs() / half).max()) > 0.95  # and fill it


def test_the_cae_prior_defaults_to_the_uniform_posterior_and_the_choice_is_checked(diagonal_model):
    from jpmap_core.models import CAEHyperprior
    from jpmap_core.operators import make_problem

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cae = CAEHyperprior(N=2, M=3, lmbda=0.01).double().eval().requires_grad_(False)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p = make_problem("denoising", x, sigma=10, seed=0)
    r = vble(p.y, p.op, cae, sigma=10, max_iters=3, n_posterior_samples=4)
    assert r.info["posterior"] == "uniform" and r.info["a0"] == 1.0
    g = vble(p.y, p.op, cae, sigma=10, max_iters=3, n_posterior_samples=4, posterior="gaussian")
    assert g.info["posterior"] == "gaussian" and g.info["a0"] == pytest.approx(math.exp(-3))
    prior, op, y = diagonal_model
    assert vble(y, op, prior, sigma=SIGMA, max_iters=2, n_posterior_samples=4).info["posterior"] == "gaussian"
    for method in (vble, vble_xz):
        with pytest.raises(ValueError, match="posterior must be 'gaussian' or 'uniform'"):
            method(y, op, prior, sigma=SIGMA, posterior="laplace")
    with pytest.raises(ValueError, match="posterior must be 'gaussian' or 'uniform'"):
        elbo(y, op, prior, torch.zeros(2, 4, dtype=torch.float64), 1.0, sigma=SIGMA, posterior="normal")
    with pytest.raises(ValueError, match="zbar contains NaN"):
        elbo(y, op, prior, torch.full((2, 4), math.nan, dtype=torch.float64), 1.0, sigma=SIGMA, posterior="uniform")
