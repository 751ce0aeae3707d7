"""The compressive autoencoder with a scale hyperprior (Ballé et al. 2018), tested against its definitions: GDN and
its inverse, the entropy bottleneck's cumulative and bin likelihoods, the Gaussian conditional, the noise / rounding
relaxation, the Prior interface (packed y and z, any size) and its training loop."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from jpmap_core.data import ImageSet
from jpmap_core.models import CAEHyperprior, Prior, build_model
from jpmap_core.models.cae import GDN, EntropyBottleneck, GaussianConditional, add_uniform_noise, lower_bound
from jpmap_core.train import TrainConfig, main, train

TINY = {"arch": "cae_hyperprior", "image_shape": [3, 64, 64], "N": 4, "M": 6, "lmbda": 0.01}


@pytest.fixture(scope="module")
def cae() -> CAEHyperprior:
    torch.manual_seed(0)
    return build_model(TINY).eval()


def _images(b: int, h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, max(1, h // 8), max(1, w // 8), generator=g)
    return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)


# ---- GDN ------------------------------------------------------------------------------------------
def test_gdn_matches_its_formula_and_its_parameters_stay_nonnegative():
    torch.manual_seed(1)
    gdn = GDN(3)
    with torch.no_grad():
        gdn.beta_.copy_(torch.tensor([1.2, -0.3, 0.7]))  # a negative raw value still gives beta >= beta_min
        gdn.gamma_.copy_(torch.rand(3, 3) - 0.2)
    beta, gamma = gdn.beta.detach(), gdn.gamma.detach()
    assert bool((beta >= 1e-6 * 0.99).all()) and bool((gamma >= 0).all())
    u = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    gdn = gdn.double()
    beta, gamma = gdn.beta.detach(), gdn.gamma.detach()
    norm = torch.sqrt(beta[None, :, None, None] + torch.einsum("ij,bjhw->bihw", gamma, u * u))
    torch.testing.assert_close(gdn(u), u / norm)
    igdn = GDN(3, inverse=True).double()
    igdn.load_state_dict(gdn.state_dict())
    torch.testing.assert_close(igdn(u), u * norm)


def test_igdn_approximately_inverts_gdn_with_the_same_parameters():
    """IGDN is GDN's one-step fixed-point inverse (Ballé 2017): close for a weak normalisation, not exact."""
    gdn, igdn = GDN(4).double(), GDN(4, inverse=True).double()  # beta = 1, gamma = 0.1 I at initialisation
    u = 0.5 * torch.randn(3, 4, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    err = (igdn(gdn(u)) - u).abs().max()
    assert 0 < err < 0.05 * u.abs().max()
    with torch.no_grad():  # a stronger normalisation: the one-step inverse gets worse, as it should
        gdn.gamma_.mul_(3.0)
        igdn.gamma_.mul_(3.0)
    assert (igdn(gdn(u)) - u).abs().max() > err


def test_lower_bound_clamps_but_lets_the_gradient_push_up():
    x = torch.tensor([0.5, 2.0], requires_grad=True)
    y = lower_bound(x, 1.0)
    assert y.tolist() == [1.0, 2.0]
    (-y.sum()).backward()  # gradient descent on -y pushes x up: passes at 0.5 too
    assert x.grad.tolist() == [-1.0, -1.0]
    x.grad = None
    lower_bound(x, 1.0).sum().backward()  # would push 0.5 further down: blocked
    assert x.grad.tolist() == [0.0, 1.0]


# ---- entropy models ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bottleneck() -> EntropyBottleneck:
    torch.manual_seed(2)
    eb = EntropyBottleneck(3).double()
    with torch.no_grad():  # move away from the initialisation: a skewed, non-trivial density
        for p in eb.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return eb


def test_bottleneck_cumulative_is_monotone_with_limits_zero_and_one(bottleneck):
    v = torch.linspace(-3000, 3000, 60001, dtype=torch.float64)  # heavy tails at initialisation: logit ~ v / 10
    c = bottleneck.cumulative(v.expand(1, 3, -1)).detach()[0]
    assert bool((c.diff(dim=-1) >= 0).all())
    assert float(c[:, 0].max()) < 1e-6 and float(c[:, -1].min()) > 1 - 1e-6


def test_bottleneck_bin_likelihoods_sum_to_one_over_the_integers(bottleneck):
    """sum_v c(v + 1/2) - c(v - 1/2) telescopes to c(inf) - c(-inf) = 1 (eq. 10 is a probability over bins); at a
    non-integer offset too (the relaxed density integrates to 1). Tolerance: the 1e-9 floor of the far tail bins."""
    for offset in (0.0, 0.3):
        v = torch.arange(-3000, 3001, dtype=torch.float64) + offset
        lik = bottleneck.likelihood(v.expand(1, 3, -1)).detach()[0]
        torch.testing.assert_close(lik.sum(-1), torch.ones(3, dtype=torch.float64), atol=2e-5, rtol=0)


def test_bottleneck_likelihood_is_the_cdf_difference_and_stable_in_the_tails(bottleneck):
    v = torch.tensor([-3.0, -0.2, 0.0, 1.7, 4.0], dtype=torch.float64).expand(1, 3, -1)
    direct = bottleneck.cumulative(v + 0.5) - bottleneck.cumulative(v - 0.5)
    torch.testing.assert_close(bottleneck.likelihood(v), direct.clamp_min(1e-9))
    far = torch.full((1, 3, 1), 30.0, dtype=torch.float64)  # both cdfs round to 1 in a naive difference
    assert bool((bottleneck.likelihood(far) >= 1e-9).all())


def test_gaussian_conditional_matches_normal_cdf_differences():
    gc = GaussianConditional()
    g = torch.Generator().manual_seed(3)
    v = 4 * torch.randn(200, generator=g, dtype=torch.float64)
    s = 0.2 + 3 * torch.rand(200, generator=g, dtype=torch.float64)
    mu = torch.randn(200, generator=g, dtype=torch.float64)
    normal = torch.distributions.Normal(mu, s)
    expected = (normal.cdf(v + 0.5) - normal.cdf(v - 0.5)).clamp_min(1e-9)
    torch.testing.assert_close(gc.likelihood(v, s, mu), expected, atol=1e-12, rtol=1e-9)
    # scales below 0.11 are bounded: the likelihood of a tiny scale is that of 0.11
    tiny = torch.full((5,), 0.01, dtype=torch.float64)
    torch.testing.assert_close(gc.likelihood(v[:5], tiny), gc.likelihood(v[:5], torch.full_like(tiny, 0.11)))
    # integer bins of one Gaussian sum to one (up to the 1e-9 floor of the tail bins)
    k = torch.arange(-40, 41, dtype=torch.float64)
    assert abs(float(gc.likelihood(k, torch.full_like(k, 2.5)).sum()) - 1) < 1e-7


def test_uniform_noise_in_training_rounding_at_eval(cae):
    g = torch.Generator().manual_seed(4)
    v = torch.randn(10000, dtype=torch.float64)
    noisy = add_uniform_noise(v, g)
    d = noisy - v
    assert float(d.abs().max()) <= 0.5 and abs(float(d.mean())) < 0.02 and abs(float(d.var()) - 1 / 12) < 0.005
    x = _images(2)
    with torch.no_grad():
        y = cae.g_a(x)
        x_eval, ry, rz = cae(x)  # eval mode: rounded latents, deterministic
        torch.testing.assert_close(x_eval, cae.g_s(torch.round(y)))
        assert torch.equal(cae(x)[0], x_eval)
        cae.train()
        try:
            a = cae(x, torch.Generator().manual_seed(0))[0]
            b = cae(x, torch.Generator().manual_seed(0))[0]
            c = cae(x, torch.Generator().manual_seed(1))[0]
        finally:
            cae.eval()
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---- the Prior ----------------------------------------------------------------------------------------
def test_cae_is_a_prior_with_packed_y_and_z(cae):
    assert isinstance(cae, Prior)
    assert cae.stride == 64 and cae.y_shape == (6, 4, 4) and cae.z_shape == (4, 1, 1)
    assert cae.latent_shape == (6 * 16 + 4,)
    x = _images(3)
    lat, logvar = cae.encode(x)
    assert logvar is None and lat.shape == (3, 100)
    y, z = cae.unpack(lat)
    torch.testing.assert_close(y, cae.g_a(x))
    torch.testing.assert_close(z, cae.h_a(cae.g_a(x).abs()))
    torch.testing.assert_close(cae.pack(y, z), lat)
    torch.testing.assert_close(cae.decode(lat), cae.g_s(y))
    # decode ignores z; the prior depends on it
    lat2 = lat.clone()
    lat2[:, 96:] += 1.0
    torch.testing.assert_close(cae.decode(lat2), cae.decode(lat))
    assert not torch.allclose(cae.neg_log_prior(lat2), cae.neg_log_prior(lat))


def test_neg_log_prior_is_the_rate_in_nats(cae):
    x = _images(2)
    lat, _ = cae.encode(x)
    y, z = cae.unpack(lat)
    py = cae.gaussian_conditional.likelihood(y, cae.h_s(z))
    pz = cae.entropy_bottleneck.likelihood(z)
    expected = -(py.log().flatten(1).sum(1) + pz.log().flatten(1).sum(1))
    torch.testing.assert_close(cae.neg_log_prior(lat), expected)
    # at rounded latents it is the eval-mode rate in bits times log 2
    with torch.no_grad():
        _, ry, rz = cae(x)
    yr, zr = torch.round(y), torch.round(z)
    torch.testing.assert_close(cae.neg_log_prior(cae.pack(yr, zr)), (ry + rz) * math.log(2), rtol=1e-5, atol=1e-4)


def test_gamma_is_the_decoder_std_of_the_rate_distortion_loss(cae):
    """bpp + lmbda 255^2 MSE = (R_bits + lmbda 255^2 / C ||x - x_hat||^2) / npix, and ||.||^2 / (2 gamma^2) =
    log 2 * lmbda 255^2 / C ||.||^2 (the slides' p(x|z) = N(D(z), 1 / (2 alpha log 2)))."""
    alpha = cae.lmbda * 255.0**2 / 3
    torch.testing.assert_close(float(1 / (2 * cae.gamma**2)), alpha * math.log(2), rtol=1e-6, atol=0)


def test_any_multiple_of_the_stride_and_padding_for_other_sizes(cae):
    view = cae.at_size(64, 128)
    assert isinstance(view, Prior) and view.latent_shape == (6 * 4 * 8 + 4 * 2,)
    x = _images(2, 64, 128)
    lat, _ = view.encode(x)
    assert view.decode(lat).shape == (2, 3, 64, 128)
    assert view.neg_log_prior(lat).shape == (2,)
    odd = _images(1, 50, 70)
    assert cae.reconstruct(odd).shape == (1, 3, 50, 70)
    with pytest.raises(ValueError, match="multiple of the CAE's total stride 64"):
        cae.at_size(48, 64)


def test_batched_equals_per_image(cae):
    x = _images(3)
    lat, _ = cae.encode(x)
    nlp, dec = cae.neg_log_prior(lat), cae.decode(lat)
    for i in range(3):
        torch.testing.assert_close(cae.neg_log_prior(lat[i : i + 1]), nlp[i : i + 1], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(cae.decode(lat[i : i + 1]), dec[i : i + 1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: m.encode(torch.rand(1, 3, 32, 32)), "image shape"),
        (lambda m: m.encode(torch.full((1, 3, 64, 64), float("nan"))), "NaN"),
        (lambda m: m.decode(torch.zeros(1, 5)), r"shape \(B, 100\)"),
        (lambda m: m.neg_log_prior(torch.full((1, 100), float("nan"))), "NaN"),
        (lambda m: m.rd_loss(torch.rand(1, 3, 64, 96)), "multiple of the CAE's total stride"),
        (lambda m: CAEHyperprior(lmbda=0.0), "lmbda must be a finite number > 0"),
        (lambda m: CAEHyperprior(lmbda=-1.0), "lmbda must be a finite number > 0"),
        (lambda m: CAEHyperprior(image_shape=(3, 60, 64)), "multiple of the CAE's total stride"),
    ],
)
def test_bad_inputs_raise_clear_errors(cae, call, match):
    with pytest.raises(ValueError, match=match):
        call(cae)


def test_config_round_trip_and_export_load(tmp_path, cae):
    from jpmap_core.pretrained import export_pretrained, load_pretrained

    rebuilt = build_model(cae.config())
    rebuilt.load_state_dict(cae.state_dict())
    x = _images(1)
    torch.testing.assert_close(rebuilt.eval().reconstruct(x), cae.reconstruct(x))
    export_pretrained(cae, "tiny_cae", {"model": cae.config()}, tmp_path)
    loaded = load_pretrained("tiny_cae", directory=str(tmp_path))
    torch.testing.assert_close(loaded.reconstruct(x), cae.reconstruct(x))


# ---- training -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_data() -> tuple[ImageSet, ImageSet]:
    tr = [_images(1, 256, 272, seed=i) for i in range(4)]
    te = [_images(1, 272, 256, seed=10 + i) for i in range(2)]
    return (ImageSet(tr, "synthetic", names=[f"tr{i}" for i in range(4)]),
            ImageSet(te, "synthetic", names=[f"te{i}" for i in range(2)]))  # fmt: skip


def _cfg(**kw) -> TrainConfig:
    base = dict(name="tiny_cae", dataset="bsd_patches", model={"arch": "cae_hyperprior", "N": 4, "M": 6},
                sigma_dvae=0.0, epochs=2, lr=3e-3, batch_size=4, seed=0, n_test=8, patch_size=64,
                steps_per_epoch=4, warmup_steps=2, lmbda=0.01, ema_rate=0.5)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_training_lowers_the_loss_logs_rate_and_psnr(tmp_path, tiny_data):
    model, log = train(_cfg(epochs=3), tmp_path / "run", progress=False, data=tiny_data)
    assert isinstance(model, CAEHyperprior) and not model.training
    assert len(log) == 3 and log[-1]["step"] == 12
    assert log[-1]["test_loss"] < log[0]["test_loss"]
    for key in ("test_bpp", "test_psnr", "train_bpp", "train_psnr", "seconds"):
        assert math.isfinite(log[-1][key])


def test_resume_gives_bitwise_the_weights_of_an_uninterrupted_run(tmp_path, tiny_data):
    full, _ = train(_cfg(), tmp_path / "a", progress=False, data=tiny_data)
    train(_cfg(epochs=1), tmp_path / "b", progress=False, data=tiny_data)
    resumed, log = train(_cfg(), tmp_path / "b", resume=True, progress=False, data=tiny_data)
    assert len(log) == 2
    for (k, v), w in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    with pytest.raises(ValueError, match="lmbda=0.01 \\(now 0.02\\)"):
        train(_cfg(lmbda=0.02), tmp_path / "b", resume=True, progress=False, data=tiny_data)


def test_manifest_entry_names_the_data_rate_and_psnr(tmp_path, tiny_data):
    from jpmap_core.train import load_patch_data, manifest_entry

    cfg = _cfg(epochs=1)
    model, log = train(cfg, tmp_path / "run", progress=False, data=tiny_data)
    entry = manifest_entry(cfg, model, log, load_patch_data(cfg, tiny_data)[2])
    assert entry["data"]["train_images"] == ["tr0", "tr1", "tr2", "tr3"]
    assert entry["final_test_bpp"] == log[-1]["test_bpp"] and entry["final_test_psnr"] == log[-1]["test_psnr"]
    assert entry["recipe"]["lmbda"] == 0.01 and entry["model"]["lmbda"] == 0.01
    assert "--arch cae_hyperprior" in entry["command"] and "--lmbda 0.01" in entry["command"]


@pytest.mark.parametrize(
    "args, match",
    [
        (["--lmbda", "0"], "--lmbda must be a finite number > 0"),
        (["--patch-size", "32"], "multiple of 64"),
        (["--channels", "4"], "N,M"),
        (["--latent-channels", "2"], "not an option of --arch cae_hyperprior"),
    ],
)
def test_cli_rejects_bad_cae_options(capsys, args, match):
    with pytest.raises(SystemExit):
        main(["--name", "x", "--dataset", "bsd_patches", "--arch", "cae_hyperprior", *args])
    assert match in capsys.readouterr().err


def test_cli_rejects_cae_options_for_other_archs(capsys):
    with pytest.raises(SystemExit):
        main(["--name", "x", "--dataset", "bsd_patches", "--arch", "hvae", "--lmbda", "0.01"])
    assert "--lmbda are options of --arch cae_hyperprior" in capsys.readouterr().err


def test_cli_trains_and_exports_the_cae_on_bsd_patches(tmp_path):
    from jpmap_core.data import DataNotFoundError, bsd_split, resolve_root
    from jpmap_core.pretrained import load_pretrained

    try:
        train_names, test_names = bsd_split()
    except DataNotFoundError as e:
        pytest.skip("needs the CBSD68 images: " + " ".join(str(e).split()))
    rc = main(["--name", "cli_cae", "--dataset", "bsd_patches", "--arch", "cae_hyperprior", "--channels", "4,6",
               "--lmbda", "0.01", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", "--n-test", "4",
               "--data-root", str(resolve_root()), "--run-dir", str(tmp_path / "run"), "--export", str(tmp_path / "w"),
               "--no-progress"])  # fmt: skip
    assert rc == 0
    e = json.loads((tmp_path / "w" / "manifest.json").read_text())["cli_cae"]
    assert e["model"] == {"arch": "cae_hyperprior", "image_shape": [3, 64, 64], "N": 4, "M": 6, "lmbda": 0.01}
    assert e["data"]["train_images"] == train_names and e["data"]["test_images"] == test_names
    assert e["steps"] == 2 and e["recipe"]["optimizer"] == "Adam" and e["recipe"]["exported_weights"] == "EMA"
    assert math.isfinite(e["final_test_bpp"]) and math.isfinite(e["final_test_psnr"]) and len(e["sha256"]) == 64
    assert "--channels 4,6" in e["command"] and "--lmbda 0.01" in e["command"]
    prior = load_pretrained("cli_cae", directory=str(tmp_path / "w"))
    assert isinstance(prior, CAEHyperprior) and prior.lmbda == 0.01
