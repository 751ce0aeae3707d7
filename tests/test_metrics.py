"""Metrics: PSNR by hand, SSIM against scikit-image, LPIPS's availability contract (offline, no download)."""

from __future__ import annotations

import math
import socket
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from skimage.metrics import structural_similarity

from jpmap_core import metrics
from jpmap_core.metrics import ALEXNET_WEIGHTS_FILE, lpips, lpips_available, lpips_status, psnr, ssim, summarize


def _rand(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _noisy(x: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return (x + sigma * noise).clamp(0, 1)


def _structured(c: int, h: int, w: int) -> torch.Tensor:
    """A ramp, a disc and a checkerboard, different per channel: edges and flat areas, not just noise."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    disc = (((yy - 0.5) ** 2 + (xx - 0.4) ** 2) < 0.08).float()
    checker = ((torch.arange(h)[:, None] // 4 + torch.arange(w)[None, :] // 4) % 2).float()
    chans = [0.5 * xx + 0.4 * disc, 0.7 * disc + 0.2 * checker, 0.3 + 0.6 * yy * checker]
    return torch.stack(chans[:c]).clamp(0, 1)


def _skimage_ssim(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return torch.tensor(
        [
            structural_similarity(
                a.double().numpy(),
                b.double().numpy(),
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
                data_range=1,
                channel_axis=0,
            )
            for a, b in zip(x, ref, strict=True)
        ],
        dtype=torch.float64,
    )


# ---- PSNR ----------------------------------------------------------------------------------------
def test_psnr_of_constant_offset_0p1_is_20db():
    ref = torch.full((1, 1, 8, 8), 0.5, dtype=torch.float64)
    assert psnr(ref + 0.1, ref).item() == pytest.approx(20.0, abs=1e-9)  # 10 log10(1 / 0.01)


def test_psnr_is_per_image():
    ref = torch.full((2, 3, 8, 8), 0.5, dtype=torch.float64)
    x = ref + torch.tensor([0.1, 0.01], dtype=torch.float64).view(2, 1, 1, 1)
    out = psnr(x, ref)
    assert out.shape == (2,)
    assert out.tolist() == pytest.approx([20.0, 40.0], abs=1e-9)


def test_psnr_of_identical_images_is_inf():
    x = _rand((3, 1, 28, 28))
    assert torch.isinf(psnr(x, x)).all()


def test_psnr_uses_data_range():
    x, ref = _rand((2, 1, 8, 8), 0), _rand((2, 1, 8, 8), 1)
    torch.testing.assert_close(psnr(255 * x, 255 * ref, data_range=255), psnr(x, ref))


# ---- SSIM ----------------------------------------------------------------------------------------
def test_ssim_of_identical_images_is_one():
    x = torch.cat([_rand((2, 3, 32, 32)), _structured(3, 32, 32)[None]])
    torch.testing.assert_close(ssim(x, x), torch.ones(3))


@pytest.mark.parametrize("c, h, w", [(1, 28, 28), (3, 32, 32), (3, 13, 20)], ids=["gray28", "rgb32", "rgb13x20"])
@pytest.mark.parametrize("kind", ["random", "structured"])
def test_ssim_matches_skimage_gaussian_window(kind: str, c: int, h: int, w: int):
    if kind == "random":
        ref = _rand((4, c, h, w))
    else:
        ref = _structured(c, h, w)[None].repeat(4, 1, 1, 1)
    x = torch.stack([_noisy(r, s, seed=i) for i, (r, s) in enumerate(zip(ref, [0.02, 0.1, 0.3, 0.6], strict=True))])
    ours = ssim(x, ref)
    assert ours.shape == (4,) and ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), _skimage_ssim(x, ref), atol=1e-4, rtol=0)


def test_ssim_decreases_with_noise():
    ref = _structured(1, 28, 28)[None]
    scores = [ssim(_noisy(ref, s), ref).item() for s in (0.01, 0.05, 0.1, 0.2, 0.4)]
    assert all(a > b for a, b in zip(scores, scores[1:], strict=False)), scores


def test_ssim_batched_equals_per_image():
    ref, x = _rand((5, 3, 16, 16), 0), _rand((5, 3, 16, 16), 1)
    per_image = torch.cat([ssim(x[i : i + 1], ref[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(ssim(x, ref), per_image)


def test_ssim_refuses_images_smaller_than_its_window():
    with pytest.raises(ValueError, match="11x11"):
        ssim(_rand((1, 1, 10, 28)), _rand((1, 1, 10, 28)))


# ---- input checks --------------------------------------------------------------------------------
def _lpips_quiet(x, ref):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lpips(x, ref)


METRICS = pytest.mark.parametrize("metric", [psnr, ssim, _lpips_quiet], ids=["psnr", "ssim", "lpips"])


@METRICS
def test_shape_mismatch_error_names_both_shapes(metric):
    with pytest.raises(ValueError, match=r"x \(2, 1, 28, 28\) and ref \(1, 1, 28, 28\)"):
        metric(_rand((2, 1, 28, 28)), _rand((1, 1, 28, 28)))  # no broadcasting


@METRICS
def test_nan_error_names_the_argument(metric):
    ref = _rand((1, 1, 28, 28))
    ref[0, 0, 3, 3] = math.nan
    with pytest.raises(ValueError, match="ref contains 1 NaN"):
        metric(_rand((1, 1, 28, 28)), ref)


@METRICS
def test_3d_tensor_error_names_the_argument(metric):
    with pytest.raises(ValueError, match=r"x must have shape \(B, C, H, W\).*\(1, 28, 28\)"):
        metric(_rand((1, 28, 28)), _rand((1, 28, 28)))


@METRICS
def test_non_tensor_is_a_type_error(metric):
    with pytest.raises(TypeError, match="ref must be a torch.Tensor"):
        metric(_rand((1, 1, 28, 28)), np.zeros((1, 1, 28, 28)))


@METRICS
def test_0_255_scale_is_refused(metric):
    with pytest.raises(ValueError, match="x has values up to .*divide 0-255 images by 255"):
        metric(255 * _rand((1, 1, 28, 28)), _rand((1, 1, 28, 28)))


# ---- LPIPS ---------------------------------------------------------------------------------------
def _fail(*args, **kwargs):
    raise AssertionError("network access attempted")


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection or torch/torchvision weight download fails the test."""
    monkeypatch.setattr(socket.socket, "connect", _fail)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _fail)


@pytest.fixture
def no_torchvision_loader(monkeypatch):
    """torchvision's weight loader (load_state_dict_from_url: no hash check on cached files, weights_only=False)
    is never used by jpmap_core.metrics."""
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _fail)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", _fail)


def _use_torch_home(monkeypatch, home) -> None:
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # in case anything called torch.hub.set_dir
    monkeypatch.setattr(metrics, "_LPIPS_MODELS", {})


@pytest.fixture
def empty_torch_home(monkeypatch, tmp_path, no_network, no_torchvision_loader):
    _use_torch_home(monkeypatch, tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def fake_alexnet_home(tmp_path_factory):
    """A TORCH_HOME whose hub cache holds a seeded, randomly initialised torchvision AlexNet state_dict."""
    home = tmp_path_factory.mktemp("torch_home")
    ckpt = home / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        torch.save(torchvision.models.alexnet(weights=None).state_dict(), ckpt / ALEXNET_WEIGHTS_FILE)
    return home


@pytest.fixture
def fake_alexnet(monkeypatch, fake_alexnet_home, no_network, no_torchvision_loader):
    _use_torch_home(monkeypatch, fake_alexnet_home)
    return fake_alexnet_home


def _lpips_fake(x, ref, **kwargs):
    """lpips with the fake weights, which must be flagged as not torchvision's ImageNet AlexNet."""
    with pytest.warns(UserWarning, match="not torchvision's ImageNet AlexNet"):
        return lpips(x, ref, **kwargs)


def test_lpips_unavailable_without_alexnet_weights_in_hub_cache(empty_torch_home):
    expected = empty_torch_home / "hub" / "checkpoints" / ALEXNET_WEIGHTS_FILE
    available, reason = lpips_status()
    assert not available and not lpips_available()
    assert str(expected) in reason and "cannot be downloaded offline" in reason


def test_lpips_unavailable_returns_nan_with_warning_and_no_download(empty_torch_home):
    x = _rand((3, 1, 28, 28))
    with pytest.warns(UserWarning, match="LPIPS unavailable.*alexnet-owt-7be5be79.pth"):
        out = lpips(x, _noisy(x, 0.1))
    assert out.shape == (3,) and torch.isnan(out).all()
    assert not (empty_torch_home / "hub" / "checkpoints" / ALEXNET_WEIGHTS_FILE).exists()
    assert metrics._LPIPS_MODELS == {}  # no network was even built


def test_lpips_available_with_weights_in_hub_cache_but_flags_wrong_hash(fake_alexnet):
    available, reason = lpips_status()
    assert available and lpips_available()
    assert "sha256" in reason and "not comparable" in reason


def test_lpips_mnist_size_is_zero_for_identical_and_positive_per_image_otherwise(fake_alexnet):
    x = _rand((3, 1, 28, 28))
    y = torch.stack([_noisy(x[0], 0.05), _noisy(x[1], 0.2), _noisy(x[2], 0.5)])
    same, diff = _lpips_fake(x, x), _lpips_fake(x, y)
    assert same.shape == diff.shape == (3,)
    torch.testing.assert_close(same, torch.zeros(3), atol=1e-6, rtol=0)
    assert torch.isfinite(diff).all() and (diff > 0).all()
    assert len(set(diff.tolist())) == 3
    per_image = torch.cat([_lpips_fake(x[i : i + 1], y[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(diff, per_image, atol=1e-6, rtol=1e-5)


def test_lpips_pads_28_to_32_centred_with_zeros_and_replicates_grey(fake_alexnet):
    x, y = _rand((2, 1, 28, 28), 0), _rand((2, 1, 28, 28), 1)
    rgb32 = lambda t: F.pad(t, (2, 2, 2, 2)).repeat(1, 3, 1, 1)
    torch.testing.assert_close(_lpips_fake(x, y), _lpips_fake(rgb32(x), rgb32(y)))
    shifted = lambda t: F.pad(t, (0, 4, 0, 4)).repeat(1, 3, 1, 1)  # a non-centred pad is a different input
    assert not torch.allclose(_lpips_fake(x, y), _lpips_fake(shifted(x), shifted(y)))


def test_lpips_equals_the_lpips_package_loading_the_same_files(monkeypatch, fake_alexnet_home, no_network):
    """Our weights_only, strict loading gives the network that ``lpips.LPIPS(net="alex")`` builds itself."""
    import lpips as lpips_pkg

    _use_torch_home(monkeypatch, fake_alexnet_home)
    x, y = _rand((2, 3, 32, 32), 0), _rand((2, 3, 32, 32), 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = lpips_pkg.LPIPS(net="alex", verbose=False)(x, y, normalize=True).flatten()
    torch.testing.assert_close(_lpips_fake(x, y), reference)


def test_lpips_builds_its_network_once_per_device(fake_alexnet, monkeypatch):
    built = []
    build = metrics._build_lpips
    monkeypatch.setattr(metrics, "_build_lpips", lambda *a: built.append(a) or build(*a))
    x = _rand((1, 1, 28, 28))
    for _ in range(3):
        _lpips_fake(x, x)
    assert len(built) == 1


def test_lpips_rejects_unsupported_channel_counts_and_nets():
    with pytest.raises(ValueError, match="1 or 3 channels"):
        lpips(_rand((1, 2, 32, 32)), _rand((1, 2, 32, 32)))
    with pytest.raises(ValueError, match="unknown net 'vgg'"):
        lpips(_rand((1, 3, 32, 32)), _rand((1, 3, 32, 32)), net="vgg")


# ---- summarize -----------------------------------------------------------------------------------
def test_summarize_excludes_and_counts_nan_and_inf():
    values = torch.tensor([1.0, 2.0, 4.0, 7.0, math.nan, math.inf, -math.inf])
    s = summarize(values)
    finite = np.array([1.0, 2.0, 4.0, 7.0])
    assert (s["n"], s["n_nan"], s["n_inf"]) == (4, 1, 2)
    assert s["mean"] == pytest.approx(finite.mean())
    assert s["std"] == pytest.approx(finite.std(ddof=1))
    assert s["sem"] == pytest.approx(finite.std(ddof=1) / 2)
    assert [s["q25"], s["median"], s["q75"]] == pytest.approx(np.quantile(finite, [0.25, 0.5, 0.75]).tolist())


def test_summarize_of_all_nan_is_nan_with_counts():
    s = summarize(torch.full((3,), math.nan))
    assert s["n"] == 0 and s["n_nan"] == 3 and math.isnan(s["mean"]) and math.isnan(s["median"])
