"""The flow priors of AIPO (RealNVP, Glow): exact inverse, exact log-determinants, the Prior interface, manifests."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from jpmap_core.models import ARCHITECTURES, Glow, Prior, RealNVP, build_model
from jpmap_core.models.flow import ActNorm, AffineCoupling, InvConv1x1, Squeeze, dequantize
from jpmap_core.pretrained import export_pretrained, load_pretrained

TINY = {
    "realnvp": (RealNVP, (2, 8, 8), {"levels": 2, "steps": 2, "width": 6, "blocks": 1}),
    "glow": (Glow, (2, 8, 8), {"levels": 2, "steps": 2, "width": 6, "blocks": 1}),
}


def perturb(module: torch.nn.Module, std: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Add seeded noise to every parameter: a new flow is the identity, a perturbed one is not."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def tiny_flow(arch: str, *, identity: bool = False):
    cls, shape, kw = TINY[arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        flow = cls(shape, **kw).double()
    return (flow if identity else perturb(flow)).eval()


def images(n: int, shape, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_decode_inverts_encode_to_1e5_in_float64(arch):
    flow = tiny_flow(arch)
    x = images(4, flow.image_shape)
    z, logvar = flow.encode(x)
    assert logvar is None and z.shape == x.shape
    torch.testing.assert_close(flow.decode(z), x, rtol=0, atol=1e-5)
    z2 = torch.randn(3, *flow.image_shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(flow.encode(flow.decode(z2), allow_out_of_range=True)[0], z2, rtol=0, atol=1e-5)


def _log_abs_det_jacobian(fn, x: torch.Tensor) -> float:
    """``log |det d fn(x) / dx|`` of one image by autograd's dense Jacobian."""
    shape = x.shape
    jac = torch.autograd.functional.jacobian(lambda v: fn(v.view(shape)).flatten(), x.flatten())
    return float(torch.linalg.slogdet(jac)[1])


LAYERS = {
    "squeeze": lambda c: Squeeze(),
    "actnorm": lambda c: ActNorm(c),
    "invconv1x1": lambda c: InvConv1x1(c),
    "coupling_checkerboard_0": lambda c: AffineCoupling(c, "checkerboard", 0, 5, 1),
    "coupling_checkerboard_1": lambda c: AffineCoupling(c, "checkerboard", 1, 5, 1),
    "coupling_channel_0": lambda c: AffineCoupling(c, "channel", 0, 5, 0),
    "coupling_channel_1": lambda c: AffineCoupling(c, "channel", 1, 5, 0),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_every_layer_log_det_matches_the_autograd_jacobian(name):
    torch.manual_seed(3)
    layer = perturb(LAYERS[name](4).double(), std=0.3)
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    y, logdet = layer(x)
    assert logdet.shape == (1,)
    assert float(logdet.detach()[0]) == pytest.approx(_log_abs_det_jacobian(lambda v: layer(v)[0], x), abs=1e-8)
    torch.testing.assert_close(layer.inverse(y), x, rtol=0, atol=1e-10)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_whole_flow_log_det_with_preprocessing_matches_the_autograd_jacobian(arch):
    flow = tiny_flow(arch)
    x = images(1, flow.image_shape, seed=4)
    _, logdet = flow.forward_and_log_det(x)
    assert float(logdet.detach()[0]) == pytest.approx(
        _log_abs_det_jacobian(lambda v: flow.forward_and_log_det(v)[0], x), abs=1e-7
    )


@pytest.mark.parametrize("arch", sorted(TINY))
def test_new_flow_gives_the_standard_normal_base_through_the_preprocessing(arch):
    """Zero-initialised couplings, identity actnorm, 1x1 rotations: log p_G(x) = log N(T(x); 0, I) + log|T'(x)|.

    (The rotations are drawn in float32, so they are orthogonal to float32 precision only: rtol 1e-6.)"""
    flow = tiny_flow(arch, identity=True)
    x = images(3, flow.image_shape, seed=5)
    a = flow.logit_alpha
    if a is None:
        s, log_jac = x - 0.5, torch.zeros(3, dtype=x.dtype)
    else:
        p = a + (1 - 2 * a) * x
        s = torch.log(p / (1 - p))
        log_jac = (math.log(1 - 2 * a) - torch.log(p * (1 - p))).flatten(1).sum(1)
    expected = Normal(0.0, 1.0).log_prob(s).flatten(1).sum(1) + log_jac
    torch.testing.assert_close(flow.log_prob(x), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_log_prob_is_base_density_plus_log_det_and_bits_per_dim_follow(arch):
    flow = tiny_flow(arch)
    x = images(3, flow.image_shape, seed=6)
    z, logdet = flow.forward_and_log_det(x)
    lp = flow.log_prob(x)
    torch.testing.assert_close(lp, -flow.neg_log_prior(z) - 0.5 * flow.d * math.log(2 * math.pi) + logdet)
    n = flow.d
    torch.testing.assert_close(flow.bits_per_dim(x), (-lp / n + math.log(256)) / math.log(2))


@pytest.mark.parametrize("arch", sorted(TINY))
def test_batched_log_prob_equals_each_image_alone(arch):
    flow = tiny_flow(arch)
    x = images(4, flow.image_shape, seed=7)
    both = flow.log_prob(x)
    for b in range(4):
        torch.testing.assert_close(both[b : b + 1], flow.log_prob(x[b : b + 1]), rtol=1e-12, atol=1e-10)


def test_flows_offer_the_prior_interface_with_an_image_shaped_latent():
    for arch in TINY:
        flow = tiny_flow(arch)
        assert isinstance(flow, Prior) and flow.latent_shape == flow.image_shape
        z = torch.ones(2, *flow.image_shape, dtype=torch.float64)
        torch.testing.assert_close(flow.neg_log_prior(z), torch.full((2,), 0.5 * flow.d, dtype=torch.float64))


def test_dequantization_stays_in_the_pixel_bin():
    x = torch.arange(256, dtype=torch.float64).view(1, 1, 16, 16) / 255
    xd = dequantize(x, torch.Generator().manual_seed(0))
    k = torch.arange(256, dtype=torch.float64).view(1, 1, 16, 16)
    assert bool(((xd >= k / 256) & (xd < (k + 1) / 256)).all())


def test_actnorm_data_init_whitens_each_channel():
    flow = Glow((3, 8, 8), levels=1, steps=1, width=4)
    x = torch.rand(16, 3, 8, 8) * 0.3 + 0.2
    flow.data_init(x)
    norm = next(m for m in flow.modules() if isinstance(m, ActNorm))
    h = flow._preprocess(x)[0]
    h = flow.scales[0][0](h)[0]  # squeeze, then the first actnorm
    out = norm(h)[0]
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(12), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=(0, 2, 3), unbiased=False), torch.ones(12), atol=1e-4, rtol=0)
    assert not norm.init_pending


def test_bad_inputs_and_configs_raise_clear_errors():
    flow = tiny_flow("realnvp")
    with pytest.raises(ValueError, match="image shape"):
        flow.encode(torch.rand(1, 1, 8, 8, dtype=torch.float64))
    x = images(1, flow.image_shape)
    x[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        flow.encode(x)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        flow.encode(images(1, flow.image_shape) + 2)
    with pytest.raises(ValueError, match="domain"):
        flow.log_prob(images(1, flow.image_shape) - 0.5)
    with pytest.raises(ValueError, match="z must have shape"):
        flow.decode(torch.zeros(1, 2, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        flow.decode(torch.full((1, *flow.image_shape), math.nan, dtype=torch.float64))
    with pytest.raises(ValueError, match="divisible by 4"):
        Glow((3, 6, 6), levels=2)
    with pytest.raises(ValueError, match="levels"):
        RealNVP((3, 8, 8), levels=0)
    with pytest.raises(ValueError, match="logit_alpha"):
        RealNVP((3, 8, 8), logit_alpha=0.7)
    with pytest.raises(ValueError, match="even number of channels"):
        AffineCoupling(3, "channel", 0, 4, 0)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_config_round_trip_rebuilds_the_same_flow(arch):
    flow = tiny_flow(arch)
    assert arch in ARCHITECTURES and flow.config()["arch"] == arch
    rebuilt = build_model(flow.config()).double()
    rebuilt.load_state_dict(flow.state_dict())
    assert rebuilt.config() == flow.config()
    x = images(2, flow.image_shape)
    torch.testing.assert_close(rebuilt.eval().log_prob(x), flow.log_prob(x))


@pytest.mark.parametrize("arch", sorted(TINY))
def test_export_then_load_pretrained_gives_the_same_density(tmp_path, arch):
    flow = tiny_flow(arch).float()
    export_pretrained(flow, f"tiny_{arch}", {"model": flow.config()}, tmp_path)
    loaded = load_pretrained(f"tiny_{arch}", directory=tmp_path)
    assert type(loaded) is type(flow) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    x = images(2, flow.image_shape).float()
    torch.testing.assert_close(loaded.log_prob(x), flow.log_prob(x))
