"""Image-quality metrics, batched and per image: PSNR, SSIM, LPIPS (JPMAP §3.4-3.5 report PSNR and LPIPS).

Every metric takes ``x`` (the estimate) and ``ref`` (the ground truth), two ``(B, C, H, W)`` float tensors of
the same shape in ``[0, data_range]``, and returns a ``(B,)`` tensor with one value per image. Inputs are used
as given (an unclipped estimate that overshoots [0, 1] a little is scored as it is); values far above
``data_range`` are refused because they are almost always the 0-255 scale by mistake.

* :func:`psnr` -- ``10 log10(data_range^2 / MSE)`` per image; ``+inf`` for identical images.
* :func:`ssim` -- Wang, Bovik, Sheikh, Simoncelli (2004), 11x11 Gaussian window (sigma 1.5), K1 = 0.01,
  K2 = 0.03, mean over the 'valid' region and the channels. Matches ``skimage.metrics.structural_similarity(
  ..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=..., channel_axis=0)``.
* :func:`lpips` -- Zhang, Isola, Efros, Shechtman, Wang (2018), AlexNet trunk, through the ``lpips`` package.
  Its ImageNet AlexNet weights come from torchvision's file in the torch hub cache, which cannot be
  downloaded offline: :func:`lpips_status` says whether it is there, and :func:`lpips` returns NaN with a
  ``UserWarning`` (never a download, never a made-up number) when it is not.
* :func:`summarize` -- mean, std, standard error and quartiles of finite values, for tables.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_choice, check_positive, check_tensor4d

__all__ = [
    "ALEXNET_WEIGHTS_FILE",
    "alexnet_weights_path",
    "lpips",
    "lpips_available",
    "lpips_status",
    "psnr",
    "ssim",
    "summarize",
]


def _check_pair(x: object, ref: object, data_range: float) -> tuple[Tensor, Tensor]:
    """Two finite ``(B, C, H, W)`` tensors of the same shape, not on a scale far above ``data_range``."""
    x = check_tensor4d(x, "x")
    ref = check_tensor4d(ref, "ref")
    if x.shape != ref.shape:
        raise ValueError(
            f"x and ref must have the same shape (B, C, H, W), got x {tuple(x.shape)} and ref {tuple(ref.shape)}"
        )
    for name, t in (("x", x), ("ref", ref)):
        peak = float(t.abs().max()) if t.numel() else 0.0
        if peak > 2 * data_range:
            raise ValueError(
                f"{name} has values up to {peak:.4g} but data_range is {data_range:g}; "
                f"images are expected in [0, {data_range:g}] (divide 0-255 images by 255)"
            )
    return x, ref


# ---- PSNR ----------------------------------------------------------------------------------------
def psnr(x: Tensor, ref: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio per image, ``10 log10(data_range^2 / MSE)`` in dB, shape ``(B,)``.

    The MSE is the mean over the channels and pixels of each image. Identical images give ``+inf`` (the
    mathematically right value, not clamped); :func:`summarize` reports how many values were infinite.
    """
    data_range = check_positive(data_range, "data_range")
    x, ref = _check_pair(x, ref, data_range)
    mse = (x - ref).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(data_range**2 / mse)


# ---- SSIM ----------------------------------------------------------------------------------------
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # skimage's value with gaussian_weights=True: radius int(3.5 * 1.5 + 0.5) = 5 -> 11x11
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _gaussian_kernel1d(sigma: float, truncate: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Normalised 1-D Gaussian taps of radius ``int(truncate * sigma + 0.5)``, as scipy.ndimage builds them."""
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    return (g / g.sum()).to(dtype=dtype, device=device)


def ssim(x: Tensor, ref: Tensor, data_range: float = 1.0) -> Tensor:
    """Structural similarity per image (Wang et al. 2004, eq. 13), shape ``(B,)``.

    Local means, variances and covariance use an 11x11 Gaussian window (sigma 1.5, population covariance),
    each channel separately; the SSIM map is averaged over the 'valid' region (pixels whose window lies inside
    the image) and over the channels. This is what ``skimage.metrics.structural_similarity`` computes with
    ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=0``: it filters the whole
    image with reflected borders and then crops 5 pixels on each side, which leaves exactly the valid region.
    Images must be at least 11x11 (MNIST's 28x28 leaves an 18x18 map).
    """
    data_range = check_positive(data_range, "data_range")
    x, ref = _check_pair(x, ref, data_range)
    b, c, h, w = x.shape
    g = _gaussian_kernel1d(SSIM_SIGMA, SSIM_TRUNCATE, x.dtype, x.device)
    win = g.numel()
    if h < win or w < win:
        raise ValueError(f"ssim needs images of at least {win}x{win} (its Gaussian window), got {h}x{w}")

    # one separable 'valid' filtering of the five images the statistics need, every channel on its own
    stack = torch.cat([x, ref, x * x, ref * ref, x * ref]).reshape(5 * b * c, 1, h, w)
    filtered = F.conv2d(F.conv2d(stack, g.view(1, 1, win, 1)), g.view(1, 1, 1, win))
    mu_x, mu_y, e_xx, e_yy, e_xy = filtered.reshape(5, b, c, h - win + 1, w - win + 1)
    var_x, var_y, cov_xy = e_xx - mu_x**2, e_yy - mu_y**2, e_xy - mu_x * mu_y

    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1)


# ---- LPIPS ---------------------------------------------------------------------------------------
#: torchvision's ImageNet AlexNet (``AlexNet_Weights.IMAGENET1K_V1``); the name carries its sha256 prefix
ALEXNET_WEIGHTS_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_WEIGHTS_URL = "https://download.pytorch.org/models/" + ALEXNET_WEIGHTS_FILE
_ALEXNET_SHA256_PREFIX = "7be5be79"
LPIPS_MIN_SIZE = 32  # the paper's footnote 3: MNIST is zero-padded from 28x28 to 32x32

_LPIPS_MODELS: dict[tuple[str, int, int, str], nn.Module] = {}


def alexnet_weights_path() -> Path:
    """Where torchvision looks for its AlexNet weights: ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS_FILE


@lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, cached per (path, size, mtime) so a 233 MB file is hashed once."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _shown(path: Path) -> str:
    """``path`` with the user's home folder written ``~`` (reasons end up in committed metrics.json files)."""
    home = Path.home()
    return "~/" + str(path.relative_to(home)) if home in path.parents else str(path)


def _lpips_state() -> tuple[bool, bool, str]:
    """``(available, official_weights, reason)``; never touches the network."""
    try:
        import lpips as _  # noqa: F401  (the package, not this module's function)
    except ImportError as e:
        return False, False, f"LPIPS unavailable: the lpips package cannot be imported ({e}); pip install lpips"
    path = alexnet_weights_path()
    if not path.is_file():
        return (
            False,
            False,
            f"LPIPS unavailable: torchvision AlexNet weights not in torch hub cache ({_shown(path)}); they cannot "
            f"be downloaded offline -- download {ALEXNET_WEIGHTS_URL} to {_shown(path)} on a machine with internet "
            f"(or set TORCH_HOME to a directory whose hub/checkpoints holds it)",
        )
    st = path.stat()
    digest = _sha256(str(path), st.st_size, st.st_mtime_ns)
    if not digest.startswith(_ALEXNET_SHA256_PREFIX):
        return (
            True,
            False,
            f"LPIPS computed with {_shown(path)}, whose sha256 starts with {digest[:8]}, not {_ALEXNET_SHA256_PREFIX}: "
            f"these are not torchvision's ImageNet AlexNet weights, so the values are not comparable with "
            f"published LPIPS",
        )
    return True, True, f"LPIPS available: AlexNet weights {_shown(path)} (sha256 verified)"


def lpips_status() -> tuple[bool, str]:
    """``(available, reason)``: LPIPS needs the ``lpips`` package and torchvision's AlexNet weights file.

    The file is looked for where torchvision caches it (:func:`alexnet_weights_path`); nothing is downloaded.
    When present, its sha256 is checked against the prefix in its name (torchvision only checks that when it
    downloads); a mismatch leaves LPIPS available but says so in ``reason``.
    """
    available, _, reason = _lpips_state()
    return available, reason


def lpips_available() -> bool:
    """Whether :func:`lpips` can compute real values (see :func:`lpips_status` for why not)."""
    return lpips_status()[0]


def _build_lpips(weights: Path, device: torch.device) -> nn.Module:
    """``lpips.LPIPS(net="alex")`` with both weight files loaded by us, ``weights_only=True`` and strictly.

    Built with ``pnet_rand=True, pretrained=False`` so the ``lpips`` constructor loads nothing and cannot
    reach torchvision's downloader; the trunk gets the AlexNet ``features.*`` tensors from ``weights`` and the
    linear layers get the package's ``weights/v0.1/alex.pth`` -- the same tensors ``lpips.LPIPS(net="alex")``
    ends up with (a test checks the outputs agree).
    """
    import lpips as lpips_pkg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation of the ``pretrained=`` argument lpips uses
        model = lpips_pkg.LPIPS(net="alex", pretrained=False, pnet_rand=True, verbose=False)
    lin_path = Path(lpips_pkg.__file__).parent / "weights" / "v0.1" / "alex.pth"
    lin = torch.load(lin_path, map_location="cpu", weights_only=True)
    try:
        trunk = torch.load(weights, map_location="cpu", weights_only=True)
        # the lpips trunk keeps torchvision's layer indices: slice{k}.{i}.{param} <- features.{i}.{param}
        state = {f"net.{key}": trunk[f"features.{key.split('.', 1)[1]}"] for key in model.net.state_dict()}
    except Exception as e:
        raise RuntimeError(
            f"cannot read AlexNet weights from {weights} ({type(e).__name__}: {e}); delete the file and "
            f"download {ALEXNET_WEIGHTS_URL} again"
        ) from e
    missing, unexpected = model.load_state_dict({**state, **lin}, strict=False)
    # scaling_layer.* are constant buffers; lins.{k} is the ModuleList holding the same modules as lin{k}
    missing = [k for k in missing if not k.startswith(("scaling_layer.", "lins."))]
    if missing or unexpected:
        raise RuntimeError(f"LPIPS weights do not fit the model: missing {missing}, unexpected {unexpected}")
    return model.eval().requires_grad_(False).to(device)


def _lpips_model(device: torch.device) -> nn.Module:
    """The LPIPS module for ``device``, built once per (weights file, device)."""
    path = alexnet_weights_path()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, str(device))
    if key not in _LPIPS_MODELS:
        _LPIPS_MODELS[key] = _build_lpips(path, device)
    return _LPIPS_MODELS[key]


def _lpips_input(x: Tensor) -> Tensor:
    """Zero-pad (centred) to at least 32x32, replicate grey to RGB, scale [0, 1] -> [-1, 1]."""
    h, w = x.shape[-2:]
    ph, pw = max(LPIPS_MIN_SIZE - h, 0), max(LPIPS_MIN_SIZE - w, 0)
    x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return 2 * x - 1


def lpips(x: Tensor, ref: Tensor, *, net: str = "alex", device: str | torch.device | None = None) -> Tensor:
    """Learned perceptual image patch similarity per image (Zhang et al. 2018, v0.1, AlexNet), shape ``(B,)``.

    Lower is better, 0 for identical images. Grayscale is replicated to 3 channels and images smaller than
    32x32 are zero-padded, centred, to 32x32 (MNIST 28 -> 32 adds 2 pixels each side), as JPMAP's footnote 3
    does. ``device`` (default: that of ``x``) is where the network runs; the result is on ``x``'s device.

    When LPIPS is unavailable (see :func:`lpips_status`) this returns a ``(B,)`` tensor of NaN and warns
    with the reason; it never downloads anything.
    """
    check_choice(net, "net", ("alex",))
    x, ref = _check_pair(x, ref, 1.0)
    if x.shape[1] not in (1, 3):
        raise ValueError(f"lpips needs 1 or 3 channels, got x and ref of shape {tuple(x.shape)}")
    available, official, reason = _lpips_state()
    if not available:
        warnings.warn(reason, UserWarning, stacklevel=2)
        return torch.full((x.shape[0],), math.nan, dtype=x.dtype, device=x.device)
    if not official:
        warnings.warn(reason, UserWarning, stacklevel=2)
    dev = torch.device(device) if device is not None else x.device
    model = _lpips_model(dev)
    with torch.no_grad():
        d = model(_lpips_input(x).to(dev, torch.float32), _lpips_input(ref).to(dev, torch.float32))
    return d.flatten().to(device=x.device, dtype=x.dtype)


# ---- tables --------------------------------------------------------------------------------------
def summarize(values: Tensor) -> dict[str, float | int]:
    """Summary of the finite entries of ``values``: mean, std (n-1), standard error, quartiles, n.

    NaN (e.g. LPIPS unavailable) and ±inf (e.g. PSNR of identical images) are left out and counted in
    ``n_nan`` and ``n_inf``. Statistics of fewer than one (std, sem: two) finite values are NaN.
    """
    v = torch.as_tensor(values).detach().to("cpu", torch.float64).flatten()
    finite = v[torch.isfinite(v)]
    n = finite.numel()
    nan = math.nan
    std = float(finite.std()) if n >= 2 else nan
    q25, median, q75 = (
        (float(q) for q in torch.quantile(finite, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)))
        if n
        else (nan, nan, nan)
    )
    return {
        "mean": float(finite.mean()) if n else nan,
        "std": std,
        "sem": std / math.sqrt(n) if n >= 2 else nan,
        "q25": q25,
        "median": median,
        "q75": q75,
        "n": n,
        "n_nan": int(torch.isnan(v).sum()),
        "n_inf": int(torch.isinf(v).sum()),
    }
