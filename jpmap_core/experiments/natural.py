"""PnP-HVAE on natural images (§6.3, Table 2): non-blind deblurring of BSD test images by PnP-HVAE with the patch prior
``bsd_patch_hvae`` and by the classical baselines that can be had offline (EPLL with ``bsd_patch_gmm``, TV, Wiener),
on the same images, kernels and noise.

* **Images** (:func:`test_images`): the 20 test images of :func:`~jpmap_core.data.bsd_split` -- the 10 CBSD10 images
  (PnP-HVAE's deblurring inputs) and the first 10 other CBSD68 images in natural name order; none of the 48 images
  that trained ``bsd_patch_hvae`` and ``bsd_patch_gmm``.
* **Kernels** (:data:`TABLE2_KERNELS`): files 4 and 7 (anisotropic Gaussian) and 9 and 11 (motion: Levin et al.'s
  kernel 8, and a DPIR motion kernel) of ``kernels/pnphvae_kernels12``, the four the official configuration lists for
  BSD; the twelve are DPIR's set (1-8 Gaussian, point-symmetric; 9-12 motion).
* **Noise and temperature** (:data:`TABLE2_TAU`): sigma 2.55, 7.65, 12.75 (0-255 scale) with tau 0.95, 0.8, 0.6
  (§6.3); PnP-HVAE runs at most 50 iterations.
* **Noise draws**: image ``i`` of a (kernel, sigma) cell gets its noise from a generator seeded with
  ``seed + 1000 k + 100 s + i`` (kernel ``k``, sigma ``s`` by position), so every method sees the same ``y`` and a cell
  does not depend on which images come with it (:func:`~jpmap_core.experiments.pnp_hvae_analysis.deblurring_problems`).

Rows of :func:`deblurring_table`: ``{kernel, sigma, method, n_images, psnr_mean, psnr_se, ssim_mean, lpips_mean,
seconds_per_image}``, LPIPS ``None`` when its weights are unavailable (offline). Restorations are clamped to [0, 1]
before every metric.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..metrics import lpips, lpips_available, psnr, ssim, summarize
from ..solvers import solve
from .pnp_hvae_analysis import deblurring_problems

__all__ = [
    "DeblurMethod",
    "TABLE2_KERNELS",
    "TABLE2_SIGMAS",
    "TABLE2_TAU",
    "deblurring_table",
    "default_methods",
    "table2_kernels",
    "tau_for",
    "test_images",
]

#: kernel name -> file number in ``kernels/pnphvae_kernels12`` (the official BSD configuration's 4, 7, 9, 11)
TABLE2_KERNELS = {"gaussian_4": 4, "gaussian_7": 7, "motion_9": 9, "motion_11": 11}
#: noise std (0-255 scale) -> PnP-HVAE temperature (§6.3)
TABLE2_TAU = {2.55: 0.95, 7.65: 0.8, 12.75: 0.6}
TABLE2_SIGMAS = tuple(TABLE2_TAU)


@dataclass
class DeblurMethod:
    """A method of the table: a registered solver, its prior, and options; ``per_sigma(sigma)`` adds options that
    depend on the noise level (PnP-HVAE's temperature)."""

    solver: str
    prior: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    per_sigma: Callable[[float], dict[str, Any]] | None = None

    def options_at(self, sigma: float) -> dict[str, Any]:
        return {**self.options, **(self.per_sigma(sigma) if self.per_sigma else {})}


def table2_kernels(root: str | None = None) -> dict[str, Tensor]:
    """The four kernels of :data:`TABLE2_KERNELS` (2D tensors summing to 1)."""
    from ..data import load_kernels

    kernels = load_kernels("pnphvae12", root)
    return {name: kernels[number - 1] for name, number in TABLE2_KERNELS.items()}


def test_images(root: str | None = None, limit: int | None = None) -> tuple[list[Tensor], list[str]]:
    """The BSD test images (module docstring) at their own size, ``(1, 3, H, W)`` each, and their file names (the first
    ``limit`` of them in :func:`~jpmap_core.data.bsd_split` order when given)."""
    from ..data import load_bsd_split

    _, test = load_bsd_split(root)
    n = len(test) if limit is None else int(limit)
    return list(test.images[:n]), list((test.names or [])[:n])


def tau_for(sigma: float) -> float:
    """PnP-HVAE's temperature for a Table 2 noise level (:data:`TABLE2_TAU`)."""
    for s, tau in TABLE2_TAU.items():
        if abs(float(sigma) - s) < 1e-9:
            return tau
    raise ValueError(f"no Table 2 temperature for sigma {sigma!r}; Table 2 uses sigma in {list(TABLE2_TAU)}")


def default_methods(hvae: Any, gmm: Any | None, *, max_iters: int = 50, gamma: float | None = 10 / 255) -> dict:
    """PnP-HVAE (``hvae``, tau of :data:`TABLE2_TAU`, at most ``max_iters`` iterations, decoder std ``gamma``: the
    official BSD config's 10/255), EPLL (``gmm``; left out when ``None``), TV and Wiener (their default priors)."""
    methods = {
        "pnp_hvae": DeblurMethod("pnp_hvae", hvae, {"max_iters": max_iters, "gamma": gamma},
                                 per_sigma=lambda s: {"tau": tau_for(s)}),
    }  # fmt: skip
    if gmm is not None:
        methods["epll"] = DeblurMethod("epll", gmm)
    methods["tv"] = DeblurMethod("tv")
    methods["wiener"] = DeblurMethod("wiener")
    return methods


def deblurring_table(
    images: Sequence[Tensor],
    kernels: Mapping[str, Tensor],
    sigmas: Sequence[float],
    methods: Mapping[str, DeblurMethod],
    *,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[tuple[str, float, str], dict[str, Tensor]]]:
    """Restore every image for every (kernel, sigma) with every method; returns the table rows and, per
    ``(kernel, sigma, method)``, the per-image ``psnr``, ``ssim`` (and ``lpips`` when available) in image order.

    Images of the same size are restored in one batch. ``progress`` receives one line per finished cell.
    """
    if not images or not kernels or not sigmas or not methods:
        raise ValueError("deblurring_table needs at least one image, kernel, sigma and method")
    use_lpips = lpips_available()
    rows: list[dict[str, Any]] = []
    per_image: dict[tuple[str, float, str], dict[str, Tensor]] = {}
    for ki, (kname, kernel) in enumerate(kernels.items()):
        for si, sigma in enumerate(sigmas):
            problems, clean, index = deblurring_problems(images, kernel, float(sigma), seed=seed + 1000 * ki + 100 * si)
            for mname, method in methods.items():
                scores: dict[str, list[Tensor]] = {"psnr": [], "ssim": [], "lpips": []}
                order: list[int] = []
                t0 = time.perf_counter()
                for p, x, idx in zip(problems, clean, index, strict=True):
                    r = solve(method.solver, p.y, p.op, method.prior, sigma=p.sigma, **method.options_at(float(sigma)))
                    est = r.x.clamp(0, 1).to(x.dtype)
                    scores["psnr"].append(psnr(est, x))
                    scores["ssim"].append(ssim(est, x))
                    if use_lpips:
                        scores["lpips"].append(lpips(est, x))
                    order += idx
                seconds = time.perf_counter() - t0
                perm = torch.argsort(torch.tensor(order))
                cell = {k: torch.cat(v)[perm] for k, v in scores.items() if v}
                per_image[(kname, float(sigma), mname)] = cell
                p_sum = summarize(cell["psnr"])
                rows.append({
                    "kernel": kname, "sigma": float(sigma), "method": mname, "n_images": len(order),
                    "psnr_mean": p_sum["mean"], "psnr_se": p_sum["sem"], "ssim_mean": float(cell["ssim"].mean()),
                    "lpips_mean": float(cell["lpips"].mean()) if "lpips" in cell else None,
                    "seconds_per_image": seconds / len(order),
                })  # fmt: skip
                if progress:
                    progress(f"{kname} sigma {sigma:g} {mname}: PSNR {p_sum['mean']:.2f} dB ({seconds:.0f}s)")
    return rows, per_image
