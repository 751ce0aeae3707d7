"""The Gaussian VAE base and the two architectures of JPMAP §3.1."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from jpmap_core.models import MLPVAE, ConvVAE, build_model


@pytest.fixture
def mlp():
    return MLPVAE().eval()


def test_mlp_architecture_is_the_papers(mlp):
    linears = [m for m in mlp.encoder if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 500), (500, 500), (500, 16)]
    linears = [m for m in mlp.decoder if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 500), (500, 500), (500, 784)]
    assert any(isinstance(m, torch.nn.ELU) for m in mlp.encoder)
    assert not any(isinstance(m, torch.nn.ReLU) for m in mlp.modules())
    assert mlp.log_gamma.numel() == 1  # a single isotropic decoder std


def test_mlp_shapes_and_decoder_range(mlp):
    x = torch.rand(5, 1, 28, 28)
    mu, logvar = mlp.encode(x)
    assert mu.shape == logvar.shape == (5, 8)
    xr = mlp.decode(mu)
    assert xr.shape == (5, 1, 28, 28)
    assert float(xr.detach().min()) >= 0 and float(xr.detach().max()) <= 1
    assert mlp.reconstruct(x).shape == x.shape


def test_conv_shapes():
    vae = ConvVAE(widths=(8, 8, 16, 16), fc_dim=32).eval()
    x = torch.rand(2, 3, 64, 64)
    mu, logvar = vae.encode(x)
    assert mu.shape == (2, 32) and logvar.shape == (2, 32)
    assert vae.decode(mu).shape == (2, 3, 64, 64)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in vae.modules())


def test_elbo_matches_torch_distributions(mlp):
    """ELBO = E_q[log N(x; mu_theta(z), gamma^2 I)] - KL(N(mu, exp(logvar)) || N(0, I)) (eq. 2.3)."""
    with torch.no_grad():
        mlp.log_gamma.fill_(math.log(0.3))
    x = torch.rand(4, 1, 28, 28)
    g = torch.Generator().manual_seed(3)
    elbo = mlp.elbo(x, generator=g)
    g = torch.Generator().manual_seed(3)
    mu, logvar = mlp.encode(x)
    std = (0.5 * logvar).exp()
    z = mu + std * torch.randn(mu.shape, generator=g)
    rec = Normal(mlp.decode(z), 0.3).log_prob(x).flatten(1).sum(1)
    kl = kl_divergence(Normal(mu, std), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(elbo, rec - kl, rtol=1e-5, atol=1e-3)


def test_encoder_second_output_is_a_log_variance(mlp):
    """Sigma_phi = exp(logvar): the KL term must use it as a variance (log-std would halve it)."""
    mu, logvar = torch.zeros(1, 8), torch.full((1, 8), math.log(4.0))  # variance 4, std 2
    kl = mlp.kl_to_prior(mu, logvar)
    ref = kl_divergence(Normal(mu, torch.full_like(mu, 2.0)), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(kl, ref)


def test_denoising_elbo_uses_noisy_encoder_input_and_clean_target(mlp):
    x = torch.rand(3, 1, 28, 28)
    x_noisy = x + 0.1 * torch.randn_like(x)
    a = mlp.elbo(x, x_noisy, generator=torch.Generator().manual_seed(0))
    b = mlp.elbo(x, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(a, b)


def test_gamma_and_beta(mlp):
    with torch.no_grad():
        mlp.log_gamma.fill_(math.log(0.1))
    assert float(mlp.gamma.detach()) == pytest.approx(0.1)
    assert mlp.beta == pytest.approx(100.0)


def test_sample_is_reproducible_with_a_generator(mlp):
    a = mlp.sample(4, generator=torch.Generator().manual_seed(7))
    b = mlp.sample(4, generator=torch.Generator().manual_seed(7))
    c = mlp.sample(4, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (4, 1, 28, 28)


def test_config_round_trip():
    for vae in (MLPVAE(hidden=(64, 32), latent_dim=4), ConvVAE(widths=(4, 4, 8, 8), fc_dim=16, latent_dim=6)):
        clone = build_model(vae.config())
        clone.load_state_dict(vae.state_dict())
        assert clone.config() == vae.config()
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model({"arch": "transformer"})


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.rand(1, 28, 28), "4 dimensions"),
        (torch.rand(2, 1, 32, 32), "image shape"),
        (torch.rand(2, 3, 28, 28), "image shape"),
        ((torch.rand(2, 1, 28, 28) * 255).to(torch.uint8), "floating"),
        (torch.rand(2, 1, 28, 28) * 255, "0-255"),
        (torch.full((2, 1, 28, 28), float("nan")), "NaN"),
    ],
)
def test_models_reject_bad_images(mlp, bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        mlp.encode(bad)


def test_noisy_inputs_are_accepted_only_when_asked(mlp):
    x = torch.rand(2, 1, 28, 28) * 1.4 - 0.2
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mlp.encode(x)
    mu, _ = mlp.encode(x, allow_out_of_range=True)
    assert mu.shape == (2, 8)


def test_decode_rejects_wrong_latent_shape(mlp):
    with pytest.raises(ValueError, match=r"\(B, 8\)"):
        mlp.decode(torch.zeros(2, 9))
    with pytest.raises(ValueError, match="NaN"):
        mlp.decode(torch.full((1, 8), float("nan")))


def test_gaussian_vaes_offer_the_prior_interface():
    from jpmap_core.models import MLPVAE, ConvVAE, Prior, check_prior

    for vae in (MLPVAE(latent_dim=4, hidden=(8,)), ConvVAE(latent_dim=5, widths=(4, 8, 8, 8), fc_dim=16)):
        assert isinstance(vae, Prior) and check_prior(vae) is vae
        assert vae.latent_shape == (vae.latent_dim,)
        z = torch.randn(3, vae.latent_dim)
        torch.testing.assert_close(vae.neg_log_prior(z), 0.5 * z.pow(2).sum(1))  # -log N(0, I), constants dropped
        with torch.no_grad():
            assert torch.equal(vae.decode(z, check=False), vae.decode(z))
    with pytest.raises(ValueError, match="z must have shape"):
        MLPVAE(latent_dim=4, hidden=(8,)).decode(torch.zeros(2, 5))


def test_an_object_without_the_interface_is_not_a_prior():
    from jpmap_core.models import check_prior

    class Half:
        image_shape = (1, 8, 8)

        def decode(self, z):
            return z

    with pytest.raises(TypeError, match="lacks latent_shape, encode, neg_log_prior"):
        check_prior(Half())
