"""The hierarchical VAE prior of PnP-HVAE (§3-4, eqs. 6-10, 15, 17, 18, Algorithm 1; PatchVDVAE §6.2)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from jpmap_core.models import HVAE, Prior, build_model, check_prior, linear_temperature, tempered_mean
from jpmap_core.models.hvae import check_temperature, gaussian_kl

TINY = dict(image_shape=(3, 8, 8), widths=(4, 6), groups=(1, 2), latent_channels=(2, 3), enc_blocks=1)


def _tiny(**kw) -> HVAE:
    torch.manual_seed(0)
    m = HVAE(**{**TINY, **kw}).double().eval()
    with torch.no_grad():  # non-trivial prior nets (VDVAE zero-initialises their last layer)
        for g in m.decoder[1:]:
            g.prior.c4.weight.normal_(0, 0.3)
            g.prior.c4.bias.normal_(0, 0.3)
    return m.requires_grad_(False)


@pytest.fixture
def hvae() -> HVAE:
    return _tiny()


def _images(b: int, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_structure_groups_are_coarse_to_fine_and_packed_size_adds_up(hvae):
    assert hvae.n_groups == 3 and hvae.stride == 2
    assert hvae.group_strides == [2, 2, 1]
    assert hvae.group_shapes == [(3, 4, 4), (3, 4, 4), (2, 8, 8)]
    assert hvae.latent_shape == (3 * 16 + 3 * 16 + 2 * 64,)
    assert hvae.at_size(6, 10).group_shapes == [(3, 3, 5), (3, 3, 5), (2, 6, 10)]


def test_pack_unpack_round_trip(hvae):
    for view in (hvae, hvae.at_size(4, 12)):
        z = torch.randn(5, view.latent_shape[0], dtype=torch.float64)
        groups = view.unpack(z)
        assert [tuple(g.shape[1:]) for g in groups] == view.group_shapes
        assert torch.equal(view.pack(groups), z)
        assert all(torch.equal(a, b) for a, b in zip(view.unpack(view.pack(groups)), groups, strict=True))


def test_model_and_sized_view_satisfy_the_prior_protocol(hvae):
    for prior, (h, w) in ((hvae, (8, 8)), (hvae.at_size(6, 10), (6, 10))):
        assert isinstance(prior, Prior) and check_prior(prior) is prior
        assert prior.image_shape == (3, h, w)
        x = _images(2, h, w)
        mean, logvar = prior.encode(x)
        assert mean.shape == logvar.shape == (2, *prior.latent_shape)
        out = prior.decode(mean)
        assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
        assert prior.neg_log_prior(mean).shape == (2,)
        assert torch.equal(prior.decode(mean, check=False), out)
        assert prior.beta == pytest.approx(1 / float(prior.gamma) ** 2)


def test_sized_view_shares_the_weights(hvae):
    view = hvae.at_size(4, 6)
    z = torch.randn(1, view.latent_shape[0], dtype=torch.float64)
    before = view.decode(z)
    with torch.no_grad():
        hvae.out_conv.bias.add_(1.0)
    assert not torch.allclose(view.decode(z), before)


def test_tau_one_gives_the_encoder_means(hvae):
    x = _images(3)
    mean, _ = hvae.encode(x)
    assert torch.equal(hvae.encode_tempered(x, 1.0), mean)
    assert torch.equal(hvae.encode_tempered(x, [1.0, 1.0, 1.0]), mean)
    assert not torch.allclose(hvae.encode_tempered(x, 0.7), mean)


def test_eq18_is_the_precision_weighted_mean():
    g = torch.Generator().manual_seed(1)
    mq, mp = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    lq, lp = (
        3 * torch.randn(50, generator=g, dtype=torch.float64),
        3 * torch.randn(50, generator=g, dtype=torch.float64),
    )
    sq, sp = torch.exp(-lq), torch.exp(-lp)
    for tau in (0.3, 0.6, 0.95):
        lam = 1 / tau**2 - 1
        ref = (sq * mq + lam * sp * mp) / (sq + lam * sp)  # eq. (18) with diagonal precisions
        torch.testing.assert_close(tempered_mean(mq, lq, mp, lp, lam), ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(tempered_mean(mq, lq, mp, lp, 0.0), mq)  # tau = 1: the encoder mean
    torch.testing.assert_close(tempered_mean(mq, lq, mp, lp, 1e12), mp)  # tau -> 0: the prior mean


def _j2_group(z: torch.Tensor, g, lam: float) -> torch.Tensor:
    """-log q(z_l | x, z_<l) - lambda_l log p(z_l | z_<l) (one group's term of eq. 17), with torch.distributions."""
    q = Normal(g.q_mean, torch.exp(0.5 * g.q_logvar))
    p = Normal(g.p_mean, torch.exp(0.5 * g.p_logvar))
    return -(q.log_prob(z) + lam * p.log_prob(z)).sum()


def _lbfgs_min(f, z0: torch.Tensor) -> torch.Tensor:
    z = z0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([z], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        opt.zero_grad()
        loss = f(z)
        loss.backward()
        return loss

    opt.step(closure)
    return z.detach()


@pytest.mark.parametrize("tau", [0.5, 0.8])
def test_alg1_single_group_matches_brute_force_minimisation_of_J2(tau):
    """With one group, Algorithm 1 is argmin_z J2(x, z) (eq. 17) for the prior N(0, I): compare with LBFGS."""
    torch.manual_seed(0)
    m = (
        HVAE(image_shape=(3, 4, 4), widths=(5,), groups=(1,), latent_channels=2, enc_blocks=1)
        .double()
        .eval()
        .requires_grad_(False)
    )
    x = _images(2, 4, 4)
    lam = 1 / tau**2 - 1
    z_alg1 = m.encode_tempered(x, tau)
    (g,) = m.conditionals(x, z_alg1)
    z_bf = _lbfgs_min(lambda z: _j2_group(z, g, lam), g.q_mean)
    torch.testing.assert_close(m.pack([z_bf]), z_alg1, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("tau", [[0.9, 0.7, 0.5], [1.0, 1.0, 0.6]])
def test_alg1_last_group_given_the_earlier_ones_matches_brute_force(hvae, tau):
    """For the last group, given z_<l from Algorithm 1, eq. (18) minimises that group's term of J2."""
    x = _images(2)
    z_alg1 = hvae.encode_tempered(x, tau)
    groups = hvae.conditionals(x, z_alg1)
    lam = 1 / tau[-1] ** 2 - 1
    last = groups[-1]
    z_bf = _lbfgs_min(lambda z: _j2_group(z, last, lam), last.q_mean)
    torch.testing.assert_close(z_bf, hvae.unpack(z_alg1)[-1], rtol=1e-7, atol=1e-8)
    # the last group's Gaussians depend on the earlier choices: tempering them changes its posterior
    untempered_path = hvae.conditionals(x, hvae.encode(x)[0])[-1].q_mean
    assert torch.allclose(last.q_mean, untempered_path) == all(t == 1 for t in tau[:-1])


def test_neg_log_prior_at_tau_equals_the_explicit_gaussian_sum(hvae):
    z = torch.randn(3, hvae.latent_shape[0], dtype=torch.float64)
    taus = [0.9, 0.6, 0.75]
    groups = hvae.conditionals(None, z)
    assert torch.equal(groups[0].p_mean, torch.zeros_like(groups[0].p_mean))  # p(z_0) = N(0, I)
    ref = torch.zeros(3, dtype=torch.float64)
    for g, zl, t in zip(groups, hvae.unpack(z), taus, strict=True):
        logp = Normal(g.p_mean, torch.exp(0.5 * g.p_logvar)).log_prob(zl) + 0.5 * math.log(2 * math.pi)
        ref -= logp.flatten(1).sum(1) / t**2
    torch.testing.assert_close(hvae.neg_log_prior(z, taus), ref, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(hvae.neg_log_prior(z), hvae.neg_log_prior(z, 1.0))
    # the log-variance terms depend on z_<l: they are not dropped constants
    assert not torch.allclose(groups[1].p_logvar, torch.zeros_like(groups[1].p_logvar))


def test_batched_equals_per_image(hvae):
    x = _images(3)
    tau = [0.9, 0.7, 0.6]
    z = hvae.encode_tempered(x, tau)
    batched = (hvae.encode(x)[0], z, hvae.decode(z), hvae.neg_log_prior(z, tau), hvae.reconstruct(x, tau))
    for i in range(3):
        xi = x[i : i + 1]
        zi = hvae.encode_tempered(xi, tau)
        alone = (hvae.encode(xi)[0], zi, hvae.decode(zi), hvae.neg_log_prior(zi, tau), hvae.reconstruct(xi, tau))
        for b, a in zip(batched, alone, strict=True):
            torch.testing.assert_close(b[i : i + 1], a, rtol=1e-12, atol=1e-12)


def test_reconstruct_on_any_size_returns_that_size(hvae):
    x = _images(2, 11, 13)
    out = hvae.reconstruct(x, 0.8)
    assert out.shape == x.shape
    x6 = _images(2, 6, 10)  # a multiple of the stride: no padding, same as decode(E_tau(x)) at that size
    view = hvae.at_size(6, 10)
    torch.testing.assert_close(hvae.reconstruct(x6, 0.8), view.decode(view.encode_tempered(x6, 0.8)))
    assert hvae.reconstruct(_images(1, 1, 3)).shape == (1, 3, 1, 3)  # smaller than the pad: replicate


def test_sample_is_reproducible_with_a_seed(hvae):
    a = hvae.sample(3, 0.8, generator=torch.Generator().manual_seed(5))
    b = hvae.sample(3, 0.8, generator=torch.Generator().manual_seed(5))
    c = hvae.sample(3, 0.8, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (3, 3, 8, 8)
    assert hvae.sample(2, size=(4, 6), generator=torch.Generator().manual_seed(0)).shape == (2, 3, 4, 6)
    cold = hvae.sample(64, 0.05, generator=torch.Generator().manual_seed(5))
    warm = hvae.sample(64, 1.0, generator=torch.Generator().manual_seed(5))
    assert float(cold.std(0).mean()) < float(warm.std(0).mean())  # lower temperature, less diverse samples


def test_gamma_fixed_or_learned():
    learned, fixed = _tiny(gamma_init=0.2), _tiny(gamma_init=10 / 255, learn_gamma=False)
    assert float(learned.gamma) == pytest.approx(0.2) and float(fixed.gamma) == pytest.approx(10 / 255)
    assert fixed.beta == pytest.approx((255 / 10) ** 2)
    assert "log_gamma" in dict(learned.named_parameters())
    assert "log_gamma" not in dict(fixed.named_parameters()) and "log_gamma" in fixed.state_dict()
    x = _images(2)
    for m in (learned, fixed):
        m.train().requires_grad_(True)
        (-m.elbo(x, generator=torch.Generator().manual_seed(0)).mean()).backward()
    assert learned.log_gamma.grad is not None and fixed.log_gamma.grad is None
    mu = torch.full_like(x, 0.5)
    ref = -Normal(mu, 0.2).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(learned.neg_log_likelihood(x, mu), ref)


@pytest.mark.parametrize(
    "tau, error, match",
    [
        (0.0, ValueError, r"\(0, 1\]"),
        (-0.5, ValueError, r"\(0, 1\]"),
        (1.2, ValueError, r"\(0, 1\]"),
        (float("nan"), ValueError, r"\(0, 1\]"),
        ([0.5, 0.5], ValueError, "3 latent groups"),
        ([0.5, 0.5, 2.0], ValueError, "group 2"),
        (torch.full((2, 3), 0.5), ValueError, "shape"),
        ("cold", TypeError, "tau must be"),
    ],
)
def test_bad_temperatures_raise(hvae, tau, error, match):
    x = _images(1)
    with pytest.raises(error, match=match):
        hvae.encode_tempered(x, tau)
    with pytest.raises(error, match=match):
        hvae.reconstruct(x, tau)


def test_temperature_forms_and_linear_schedule():
    assert check_temperature(None, 3) == [1.0, 1.0, 1.0]
    assert check_temperature(0.5, 2) == [0.5, 0.5]
    assert check_temperature(torch.tensor([0.5, 0.6]), 2) == pytest.approx([0.5, 0.6])
    assert check_temperature(lambda k: 0.9 - 0.1 * k, 3) == pytest.approx([0.9, 0.8, 0.7])
    sched = linear_temperature(0.8, 0.6, 5)
    assert sched == pytest.approx([0.8, 0.75, 0.7, 0.65, 0.6])
    assert linear_temperature(0.7, 0.2, 1) == [0.7]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: m.encode(torch.rand(2, 1, 8, 8, dtype=torch.float64)), "image shape"),
        (lambda m: m.encode(torch.rand(3, 8, 8, dtype=torch.float64)), "4 dimensions"),
        (lambda m: m.encode(torch.full((1, 3, 8, 8), float("nan"), dtype=torch.float64)), "NaN"),
        (lambda m: m.encode(torch.rand(1, 3, 16, 16, dtype=torch.float64)), "at_size"),
        (lambda m: m.encode(torch.rand(1, 3, 8, 8, dtype=torch.float64) * 255), "0-255"),
        (lambda m: m.at_size(7, 8), "multiple of the HVAE's total stride 2"),
        (lambda m: m.decode(torch.zeros(2, 10, dtype=torch.float64)), r"z must have shape \(B, 224\)"),
        (lambda m: m.decode(torch.zeros(224, dtype=torch.float64)), r"z must have shape"),
        (lambda m: m.decode(torch.full((1, 224), float("nan"), dtype=torch.float64)), "NaN"),
        (lambda m: m.reconstruct(torch.rand(1, 4, 9, 9, dtype=torch.float64)), "channels"),
        (lambda m: m.elbo(torch.rand(1, 3, 9, 8, dtype=torch.float64)), "multiple"),
        (lambda m: m.unpack(torch.zeros(1, 224), (4, 4)), r"\(B, 56\)"),
        (lambda m: m.pack([torch.zeros(1, 3, 4, 4)]), "3 latent groups"),
    ],
)
def test_bad_inputs_raise_clear_errors(hvae, call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(hvae)


def test_noisy_inputs_are_accepted_only_when_asked(hvae):
    x = _images(1) * 1.4 - 0.2
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        hvae.encode_tempered(x, 0.8)
    assert hvae.encode_tempered(x, 0.8, allow_out_of_range=True).shape == (1, 224)
    assert hvae.reconstruct(x, 0.8, allow_out_of_range=True).shape == x.shape


def test_bad_constructor_arguments_raise():
    with pytest.raises(ValueError, match="multiples of the total stride 4"):
        HVAE(image_shape=(3, 10, 12), widths=(4, 4, 4), groups=(1, 1, 1), latent_channels=2, enc_blocks=1)
    with pytest.raises(ValueError, match="top group"):
        HVAE(image_shape=(3, 8, 8), widths=(4, 4), groups=(1, 0))
    with pytest.raises(ValueError, match="one value per resolution"):
        HVAE(image_shape=(3, 8, 8), widths=(4, 4), groups=(1, 1, 1))


def test_elbo_is_finite_and_its_kl_terms_are_nonnegative(hvae):
    x = _images(4)
    g = torch.Generator().manual_seed(0)
    nll, kl = hvae.elbo_terms(x, generator=g)
    assert nll.shape == (4,) and kl.shape == (4, 3)
    assert bool(torch.isfinite(nll).all()) and bool((kl >= 0).all())
    elbo = hvae.elbo(x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(elbo, -(nll + kl.sum(1)))
    torch.testing.assert_close(hvae.kl_per_group(x, generator=torch.Generator().manual_seed(0)), kl)
    # the analytic KL is the Gaussian KL of torch.distributions
    a = torch.randn(2, 7, dtype=torch.float64)
    b, c, d = torch.randn_like(a), torch.randn_like(a), torch.randn_like(a)
    ref = kl_divergence(Normal(a, torch.exp(0.5 * b)), Normal(c, torch.exp(0.5 * d)))
    torch.testing.assert_close(gaussian_kl(a, b, c, d), ref)


def test_elbo_on_a_larger_image_and_denoising_input(hvae):
    x = _images(2, 12, 16)
    assert hvae.elbo(x).shape == (2,)
    noisy = x + 0.05 * torch.randn_like(x)
    a = hvae.elbo(x, noisy, generator=torch.Generator().manual_seed(0))
    b = hvae.elbo(x, generator=torch.Generator().manual_seed(0))
    assert float((a - b).abs().max()) > 1e-6  # the encoder saw the noisy input


def test_encode_tempered_is_differentiable(hvae):
    x = _images(1).requires_grad_(True)
    hvae.encode_tempered(x, 0.7).pow(2).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_config_round_trip_rebuilds_the_same_model(hvae):
    clone = build_model(hvae.config()).double()
    clone.load_state_dict(hvae.state_dict())
    assert clone.config() == hvae.config() and hvae.config()["arch"] == "hvae"
    x = _images(2)
    torch.testing.assert_close(clone.eval().reconstruct(x, 0.8), hvae.reconstruct(x, 0.8))


@pytest.mark.parametrize("learn_gamma", [True, False])
def test_export_then_load_round_trip(tmp_path, learn_gamma):
    from jpmap_core.pretrained import export_pretrained, load_pretrained

    m = _tiny(gamma_init=0.05, learn_gamma=learn_gamma).float()
    entry = export_pretrained(m, "tiny_hvae", {"model": m.config(), "command": "test"}, tmp_path)
    assert entry["sha256"] and entry["model"]["arch"] == "hvae"
    loaded = load_pretrained("tiny_hvae", directory=tmp_path)
    assert isinstance(loaded, HVAE) and loaded.config() == m.config() and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    x = _images(2, 16, 8).float()
    torch.testing.assert_close(loaded.reconstruct(x, 0.7), m.reconstruct(x, 0.7))
    assert float(loaded.gamma) == pytest.approx(0.05)


def test_decode_with_prior_is_decode_and_neg_log_prior_in_one_pass(hvae):
    z = torch.randn(2, hvae.latent_shape[0], dtype=torch.float64)
    mu, nlp = hvae.at_size(8, 8).decode_with_prior(z, [0.9, 0.8, 0.7])
    assert torch.equal(mu, hvae.decode(z))
    torch.testing.assert_close(nlp, hvae.neg_log_prior(z, [0.9, 0.8, 0.7]), rtol=1e-12, atol=0)
