"""PnP-HVAE on natural images (§6.3, Tables 2-4, Figs. 5-6; notebook 11): non-blind deblurring and inpainting of BSD
test images by PnP-HVAE with the patch prior ``bsd_patch_hvae`` and by the classical baselines that can be had offline
(EPLL with ``bsd_patch_gmm``, TV, Wiener), on the same images, kernels, masks and noise; and the effect of the number
``L`` of latent groups (Table 4).

Prost, Houdard, Almansa & Papadakis, *Inverse problem regularization with hierarchical variational autoencoders*,
ICCV 2023.

* **Images** (:func:`test_images`): the 20 test images of :func:`~jpmap_core.data.bsd_split` -- the 10 CBSD10 images
  (PnP-HVAE's deblurring inputs) and the first 10 other CBSD68 images in natural name order; none of the 48 images
  that trained ``bsd_patch_hvae`` and ``bsd_patch_gmm``. Inpainting (Table 3) uses the first 10, the CBSD10 images.
* **Kernels** (:data:`TABLE2_KERNELS`): files 4 and 7 (anisotropic Gaussian) and 9 and 11 (motion: Levin et al.'s
  kernel 8, and a DPIR motion kernel) of ``kernels/pnphvae_kernels12``, the four the official configuration lists for
  BSD; the twelve are DPIR's set (1-8 Gaussian, point-symmetric; 9-12 motion).
* **Noise and temperature** (:data:`TABLE2_TAU`): sigma 2.55, 7.65, 12.75 (0-255 scale) with tau 0.95, 0.8, 0.6
  (§6.3); PnP-HVAE runs at most 50 iterations. Inpainting (:data:`TABLE3`): sigma 3, tau 0.6, at most 200 iterations.
* **Noise draws**: image ``i`` of a (kernel, sigma) cell gets its noise from a generator seeded with
  ``seed + 1000 k + 100 s + i`` (kernel ``k``, sigma ``s`` by position), so every method sees the same ``y`` and a cell
  does not depend on which images come with it (:func:`~jpmap_core.experiments.pnp_hvae_analysis.deblurring_problems`).
  Inpainting: image ``i``'s mask and then its noise from a generator seeded with ``seed + i``
  (:func:`inpainting_problems`).
* **Masks** (Table 3, Fig. 6): the paper "occludes diverse objects of small size"; its masks are not public. Ours are
  :func:`~jpmap_core.operators.blob_masks`: random ellipses (semi-axes 2-6% of the smaller side) until at least
  ``coverage`` (default 10%) of the pixels are hidden.

Every table runs its cells through one runner (:func:`_run_cell`): a method on the batched problems of one cell
(images of the same size are restored in one batch), each batch call loaded from a :class:`~jpmap_core.cache.CallCache`
folder when given (a stopped run resumes), then PSNR, SSIM (and LPIPS when its weights are available, else ``None``)
of the restorations clamped to [0, 1]. Rows of :func:`deblurring_table`: ``{kernel, sigma, method, n_images,
psnr_mean, psnr_se, ssim_mean, lpips_mean, seconds_per_image}``; of :func:`inpainting_table` the same without the
kernel; :func:`latent_group_table` gives Table 4's ``{name, L, n_params, n_images, psnr_mean, psnr_se, psnr_by_sigma}``.
:func:`deblurring_claims` and :func:`inpainting_claims` check the paper's claims that PnP-HVAE beats EPLL.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..metrics import lpips, lpips_available, psnr, ssim, summarize
from ..operators import Inpainting, Problem, make_problem
from ..solvers import solve
from .pnp_hvae_analysis import deblurring_problems, same_size_groups

__all__ = [
    "OBSERVATION",
    "PAPER_TABLE2",
    "PAPER_TABLE3",
    "TABLE2_KERNELS",
    "TABLE2_SIGMAS",
    "TABLE2_TAU",
    "TABLE3",
    "UNAVAILABLE",
    "LABELS",
    "DeblurMethod",
    "Restorations",
    "deblurring_claims",
    "deblurring_table",
    "default_methods",
    "inpainting_claims",
    "inpainting_methods",
    "inpainting_problems",
    "inpainting_table",
    "latent_group_table",
    "markdown_table",
    "plot_latent_groups",
    "plot_restorations",
    "sensitivity_methods",
    "table2_kernels",
    "tau_for",
    "test_images",
]

#: kernel name -> file number in ``kernels/pnphvae_kernels12`` (the official BSD configuration's 4, 7, 9, 11)
TABLE2_KERNELS = {"gaussian_4": 4, "gaussian_7": 7, "motion_9": 9, "motion_11": 11}
#: noise std (0-255 scale) -> PnP-HVAE temperature (§6.3)
TABLE2_TAU = {2.55: 0.95, 7.65: 0.8, 12.75: 0.6}
TABLE2_SIGMAS = tuple(TABLE2_TAU)
#: Table 3 (§6.3 inpainting): noise std (0-255), PnP-HVAE's temperature and iteration cap, and our mask coverage
TABLE3 = {"sigma": 3.0, "tau": 0.6, "max_iters": 200, "coverage": 0.1}
#: the paper's Table 2, mean over its 4 kernels and 20 full images: sigma -> method -> (PSNR, SSIM, LPIPS)
PAPER_TABLE2 = {
    2.55: {"pnp_hvae": (27.75, 0.79, 0.31), "gs_pnp": (29.59, 0.84, 0.22), "epll": (26.49, 0.71, 0.36),
           "pnp_mmo": (29.50, 0.83, 0.20)},
    7.65: {"pnp_hvae": (26.36, 0.72, 0.40), "gs_pnp": (27.33, 0.77, 0.31), "epll": (24.04, 0.66, 0.45),
           "pnp_mmo": (25.34, 0.69, 0.34)},
    12.75: {"pnp_hvae": (25.12, 0.73, 0.47), "gs_pnp": (26.32, 0.73, 0.37), "epll": (23.28, 0.61, 0.51),
            "pnp_mmo": (22.42, 0.53, 0.54)},
}  # fmt: skip
#: the paper's Table 3: method -> (PSNR, SSIM, LPIPS)
PAPER_TABLE3 = {"pnp_hvae": (29.54, 0.93, 0.06), "gs_pnp": (28.52, 0.93, 0.09), "epll": (29.16, 0.93, 0.06)}
#: the paper's baselines that need pretrained CNN denoisers not available offline here, and why
UNAVAILABLE = {
    "gs_pnp": "GS-PnP (Hurault et al. 2022): needs the authors' pretrained gradient-step DRUNet denoiser",
    "pnp_mmo": "PnP-MMO (Pesquet et al. 2021): needs the authors' pretrained firmly non-expansive DnCNN",
    "dpir": "DPIR (Zhang et al. 2021): needs the pretrained DRUNet denoiser",
}
#: the method name of the rows that score the observation ``y`` itself (clamped to [0, 1])
OBSERVATION = "observation"


@dataclass
class DeblurMethod:
    """A method of the tables: a registered solver, its prior, and options; ``per_sigma(sigma)`` adds options that
    depend on the noise level (PnP-HVAE's temperature)."""

    solver: str
    prior: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    per_sigma: Callable[[float], dict[str, Any]] | None = None

    def options_at(self, sigma: float) -> dict[str, Any]:
        return {**self.options, **(self.per_sigma(sigma) if self.per_sigma else {})}


@dataclass
class Restorations:
    """The images of the cells a table was asked to keep (for Figs. 5 and 6), each a list in image order of
    ``(1, C, H, W)`` tensors: ``clean[cell]``, ``observed[cell]`` (``y``) and ``restored[(*cell, method)]``
    (clamped to [0, 1]); a cell is ``(kernel, sigma)`` for deblurring and ``("inpainting", sigma)`` for inpainting."""

    clean: dict[tuple[str, float], list[Tensor]] = field(default_factory=dict)
    observed: dict[tuple[str, float], list[Tensor]] = field(default_factory=dict)
    restored: dict[tuple[str, float, str], list[Tensor]] = field(default_factory=dict)


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
    """Table 2's methods: PnP-HVAE (``hvae``, tau of :data:`TABLE2_TAU`, at most ``max_iters`` iterations, decoder std
    ``gamma``: the official BSD config's 10/255), EPLL (``gmm``; left out when ``None``), TV and Wiener (their default
    priors)."""
    methods = {
        "pnp_hvae": DeblurMethod("pnp_hvae", hvae, {"max_iters": max_iters, "gamma": gamma},
                                 per_sigma=lambda s: {"tau": tau_for(s)}),
    }  # fmt: skip
    if gmm is not None:
        methods["epll"] = DeblurMethod("epll", gmm)
    methods["tv"] = DeblurMethod("tv")
    methods["wiener"] = DeblurMethod("wiener")
    return methods


def inpainting_methods(
    hvae: Any,
    gmm: Any | None,
    *,
    tau: float = TABLE3["tau"],
    max_iters: int = TABLE3["max_iters"],
    gamma: float | None = 10 / 255,
) -> dict[str, DeblurMethod]:
    """Table 3's methods: PnP-HVAE (``tau`` 0.6, at most 200 iterations, §6.3), EPLL (``gmm``; left out when ``None``)
    and TV. The Wiener *filter* is a Fourier-domain deconvolution with no counterpart for a mask (our ``wiener``
    would fall back to conjugate gradients on its Gaussian prior): it is not a method of Table 3."""
    methods = {"pnp_hvae": DeblurMethod("pnp_hvae", hvae, {"max_iters": int(max_iters), "gamma": gamma,
                                                           "tau": float(tau)})}  # fmt: skip
    if gmm is not None:
        methods["epll"] = DeblurMethod("epll", gmm)
    methods["tv"] = DeblurMethod("tv")
    return methods


def sensitivity_methods(
    hvae: Any, *, gammas: Sequence[float | None], taus: Sequence[float], max_iters: Sequence[int]
) -> dict[str, DeblurMethod]:
    """PnP-HVAE at every ``(gamma, tau, max_iters)`` of the grid (``gamma=None``: the prior's learned decoder std),
    named ``"gamma=<255 gamma or learned>,tau=<tau>,iters=<n>"``: a small check of whether PnP-HVAE's results
    depend on its tuning (the options fixed in :func:`default_methods`)."""
    if not gammas or not taus or not max_iters:
        raise ValueError("sensitivity_methods needs at least one gamma, tau and max_iters")
    out = {}
    for g in gammas:
        label = "learned" if g is None else f"{255 * float(g):g}/255"
        for t in taus:
            for n in max_iters:
                out[f"gamma={label},tau={float(t):g},iters={int(n)}"] = DeblurMethod(
                    "pnp_hvae", hvae, {"gamma": g, "tau": float(t), "max_iters": int(n)}
                )
    return out


# ------------------------------------------------------------------------------------------------
# The shared cell runner
# ------------------------------------------------------------------------------------------------
class _Store:
    """A :class:`~jpmap_core.cache.CallCache` for calls of any method: the key holds the method's solver, options
    and the fingerprint of its prior's weights (computed once per prior), the measurements, operator and sigma."""

    def __init__(self, folder: str | Path) -> None:
        from ..cache import CallCache

        self.cache = CallCache(folder, torch.nn.Module())  # the priors' weights go into each key instead
        self._priors: dict[int, str] = {}

    def _prior(self, prior: Any) -> str | None:
        from ..cache import fingerprint

        if prior is None:
            return None
        if id(prior) not in self._priors:
            if not isinstance(prior, torch.nn.Module):
                raise TypeError(f"cannot cache calls with a prior of type {type(prior).__name__} (not a torch module)")
            self._priors[id(prior)] = fingerprint(sorted(prior.state_dict().items()))
        return self._priors[id(prior)]

    def key(self, method: DeblurMethod, options: dict[str, Any], p: Problem) -> str:
        return self.cache.key("natural v1", method.solver, options, self._prior(method.prior), p.y, p.op, p.sigma)


def _run_cell(
    problems: Sequence[Problem],
    clean: Sequence[Tensor],
    index: Sequence[Sequence[int]],
    method: DeblurMethod,
    options: dict[str, Any],
    *,
    use_lpips: bool,
    store: _Store | None = None,
    keep: bool = False,
) -> tuple[dict[str, Tensor], float, list[Tensor] | None]:
    """One method on the batched problems of one cell: per-image ``psnr``, ``ssim`` (and ``lpips``) in image order,
    the seconds the restorations took (those recorded in the cache for a cached call), and the restorations (clamped,
    image order) when ``keep``."""
    estimates: list[Tensor] = []
    seconds = 0.0
    for p, x in zip(problems, clean, strict=True):
        key = None if store is None else store.key(method, options, p)
        hit = None if key is None else store.cache.load(key)
        if hit is not None and tuple(hit[0]["x"].shape) == tuple(x.shape):
            est, took = hit[0]["x"].to(x), float(hit[1]["seconds"])
        else:
            t0 = time.perf_counter()
            r = solve(method.solver, p.y, p.op, method.prior, sigma=p.sigma, **options)
            est, took = r.x.detach(), time.perf_counter() - t0
            if store is not None and key is not None:
                store.cache.save(key, {"x": est}, {"method": method.solver, "seconds": took})
        seconds += took
        estimates.append(est)
    cell, images = _scores(estimates, clean, index, use_lpips)
    return cell, seconds, (images if keep else None)


def _scores(
    estimates: Sequence[Tensor], clean: Sequence[Tensor], index: Sequence[Sequence[int]], use_lpips: bool
) -> tuple[dict[str, Tensor], list[Tensor]]:
    """Per-image ``psnr``, ``ssim`` (and ``lpips``) of batched estimates (clamped to [0, 1]) against the clean batches,
    and the clamped estimates one by one, both in image order (``index``: the image indices of each batch)."""
    scores: dict[str, list[Tensor]] = {"psnr": [], "ssim": [], "lpips": []}
    order: list[int] = []
    images: list[Tensor] = []
    for est, x, idx in zip(estimates, clean, index, strict=True):
        est = est.clamp(0, 1).to(x.dtype)
        scores["psnr"].append(psnr(est, x))
        scores["ssim"].append(ssim(est, x))
        if use_lpips:
            scores["lpips"].append(lpips(est, x))
        order += list(idx)
        images += list(est.split(1))
    perm = torch.argsort(torch.tensor(order))
    return {k: torch.cat(v)[perm] for k, v in scores.items() if v}, [images[i] for i in perm.tolist()]


def _observation_scores(
    problems: Sequence[Problem], clean: Sequence[Tensor], index: Sequence[Sequence[int]], use_lpips: bool
) -> tuple[dict[str, Tensor], list[Tensor]]:
    """The scores of ``y`` itself (clamped to [0, 1]) against the clean images, and the clamped ``y``, image order."""
    return _scores([p.y for p in problems], clean, index, use_lpips)


def _row(cell: dict[str, Tensor], seconds: float, **labels: Any) -> dict[str, Any]:
    p_sum = summarize(cell["psnr"])
    n = int(cell["psnr"].numel())
    return {**labels, "n_images": n, "psnr_mean": p_sum["mean"], "psnr_se": p_sum["sem"],
            "ssim_mean": float(cell["ssim"].mean()),
            "lpips_mean": float(cell["lpips"].mean()) if "lpips" in cell else None,
            "seconds_per_image": seconds / n}  # fmt: skip


def _check_table_inputs(images: Sequence[Tensor], methods: Mapping[str, DeblurMethod], what: str) -> None:
    if not images or not methods:
        raise ValueError(f"{what} needs at least one image and one method")
    if OBSERVATION in methods:
        raise ValueError(f"{OBSERVATION!r} names the rows that score y itself; give the method another name")


def deblurring_table(
    images: Sequence[Tensor],
    kernels: Mapping[str, Tensor],
    sigmas: Sequence[float],
    methods: Mapping[str, DeblurMethod],
    *,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    cache: str | Path | None = None,
    keep: Sequence[tuple[str, float]] = (),
    restorations: Restorations | None = None,
    observation: bool = False,
) -> tuple[list[dict[str, Any]], dict[tuple[str, float, str], dict[str, Tensor]]]:
    """Table 2 (§6.3): restore every image for every (kernel, sigma) with every method; returns the table rows and,
    per ``(kernel, sigma, method)``, the per-image ``psnr``, ``ssim`` (and ``lpips`` when available) in image order.

    Images of the same size are restored in one batch. ``progress`` receives one line per finished cell. ``cache``: a
    folder of finished calls (:class:`~jpmap_core.cache.CallCache`; a stopped run resumes). ``observation``: also a
    row (method :data:`OBSERVATION`) scoring ``y`` itself, first in each cell. ``keep``: the ``(kernel, sigma)`` cells
    whose images go into ``restorations`` (a :class:`Restorations` to fill, for Fig. 5).
    """
    if not kernels or not sigmas:
        raise ValueError("deblurring_table needs at least one image, kernel, sigma and method")
    _check_table_inputs(images, methods, "deblurring_table")
    if keep and restorations is None:
        raise ValueError("keep names cells whose images go into restorations; pass restorations=Restorations()")
    unknown = [c for c in keep if c[0] not in kernels or not any(abs(float(c[1]) - float(s)) < 1e-9 for s in sigmas)]
    if unknown:
        raise ValueError(
            f"keep lists cells {unknown} that are not run (kernels {list(kernels)}, sigmas {list(sigmas)})"
        )
    kept = {(k, float(s)) for k, s in keep}
    use_lpips = lpips_available()
    store = None if cache is None else _Store(cache)
    rows: list[dict[str, Any]] = []
    per_image: dict[tuple[str, float, str], dict[str, Tensor]] = {}
    for ki, (kname, kernel) in enumerate(kernels.items()):
        for si, sigma in enumerate(sigmas):
            sigma = float(sigma)
            problems, clean, index = deblurring_problems(images, kernel, sigma, seed=seed + 1000 * ki + 100 * si)
            keep_cell = (kname, sigma) in kept
            if observation or keep_cell:
                obs, ys = _observation_scores(problems, clean, index, use_lpips)
                if observation:
                    per_image[(kname, sigma, OBSERVATION)] = obs
                    rows.append(_row(obs, 0.0, kernel=kname, sigma=sigma, method=OBSERVATION))
                if keep_cell and restorations is not None:
                    restorations.observed[(kname, sigma)] = ys
                    restorations.clean[(kname, sigma)] = list(images)
            for mname, method in methods.items():
                cell, seconds, est = _run_cell(problems, clean, index, method, method.options_at(sigma),
                                               use_lpips=use_lpips, store=store, keep=keep_cell)  # fmt: skip
                per_image[(kname, sigma, mname)] = cell
                if est is not None and restorations is not None:
                    restorations.restored[(kname, sigma, mname)] = est
                rows.append(_row(cell, seconds, kernel=kname, sigma=sigma, method=mname))
                if progress:
                    progress(f"{kname} sigma {sigma:g} {mname}: PSNR {rows[-1]['psnr_mean']:.2f} dB ({seconds:.0f}s)")
    return rows, per_image


def inpainting_problems(
    images: Sequence[Tensor], *, sigma: float = TABLE3["sigma"], coverage: float = TABLE3["coverage"], seed: int
) -> tuple[list[Problem], list[Tensor], list[list[int]]]:
    """``y_i = M_i x_i + n_i`` (Table 3): image ``i`` (``(1, C, H, W)``) gets a blob mask hiding at least ``coverage``
    of its pixels (:func:`~jpmap_core.operators.blob_masks`) and then noise of std ``sigma`` (0-255), both from a
    generator seeded with ``seed + i``, so image ``i`` gets the same mask and ``y_i`` whichever images come with it.
    Images of the same size are batched into one problem (their masks stacked).

    Returns ``(problems, clean batches, image indices of each batch)``, batches in order of first appearance."""
    if not 0 < float(coverage) < 1:
        raise ValueError(f"coverage (fraction of hidden pixels) must be in (0, 1), got {coverage!r}")
    problems, batches, index = [], [], []
    for idx in same_size_groups(images, "inpainting_problems"):
        parts = [make_problem("inpainting", images[i], sigma=sigma, level=float(coverage), seed=int(seed) + i,
                              mask="blobs") for i in idx]  # fmt: skip
        op = Inpainting(torch.cat([p.op.mask for p in parts]))
        problems.append(Problem("inpainting", float(coverage), parts[0].sigma, op, torch.cat([p.y for p in parts])))
        batches.append(torch.cat([images[i] for i in idx]))
        index.append(list(idx))
    return problems, batches, index


def inpainting_table(
    images: Sequence[Tensor],
    methods: Mapping[str, DeblurMethod],
    *,
    sigma: float = TABLE3["sigma"],
    coverage: float = TABLE3["coverage"],
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    cache: str | Path | None = None,
    restorations: Restorations | None = None,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Tensor]], list[float]]:
    """Table 3 (§6.3): every method on the same masked, noisy images (:func:`inpainting_problems`); the first row
    (method :data:`OBSERVATION`) scores ``y`` itself. Returns the rows ``{method, n_images, psnr_mean, psnr_se,
    ssim_mean, lpips_mean, seconds_per_image}``, the per-image scores per method, and each image's hidden fraction.
    ``restorations``: filled with every image of the table (cell ``("inpainting", sigma)``), for Fig. 6."""
    _check_table_inputs(images, methods, "inpainting_table")
    use_lpips = lpips_available()
    store = None if cache is None else _Store(cache)
    problems, clean, index = inpainting_problems(images, sigma=sigma, coverage=coverage, seed=seed)
    hidden = torch.cat([1 - p.op.mask[:, 0].flatten(1).mean(1) for p in problems])
    hidden = hidden[torch.argsort(torch.tensor([i for idx in index for i in idx]))].tolist()
    obs, ys = _observation_scores(problems, clean, index, use_lpips)
    cell_id = ("inpainting", float(sigma))
    if restorations is not None:
        restorations.observed[cell_id] = ys
        restorations.clean[cell_id] = list(images)
    rows = [_row(obs, 0.0, method=OBSERVATION)]
    per_image = {OBSERVATION: obs}
    for mname, method in methods.items():
        cell, seconds, est = _run_cell(problems, clean, index, method, dict(method.options), use_lpips=use_lpips,
                                       store=store, keep=restorations is not None)  # fmt: skip
        per_image[mname] = cell
        if est is not None and restorations is not None:
            restorations.restored[(*cell_id, mname)] = est
        rows.append(_row(cell, seconds, method=mname))
        if progress:
            progress(f"inpainting {mname}: PSNR {rows[-1]['psnr_mean']:.2f} dB ({seconds:.0f}s)")
    return rows, per_image, hidden


def latent_group_table(
    priors: Mapping[str, Any],
    images: Sequence[Tensor],
    kernels: Mapping[str, Tensor],
    sigmas: Sequence[float],
    *,
    max_iters: int = 50,
    gamma: float | None = 10 / 255,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    cache: str | Path | None = None,
) -> tuple[list[dict[str, Any]], dict[tuple[str, float, str], dict[str, Tensor]]]:
    """Table 4 (§6.3, "effect of the number of latent groups"): PnP-HVAE with each prior of ``priors`` (name -> HVAE)
    on the same deblurring problems as Table 2 (tau of :data:`TABLE2_TAU`, at most ``max_iters`` iterations, decoder
    std ``gamma``). One row per prior, in the order given: ``{name, L, n_params, n_images, psnr_mean, psnr_se,
    psnr_by_sigma}``, the mean and standard error over every (kernel, sigma, image) and the mean per sigma (a list
    in ``sigmas`` order, Table 4's rows). Also returns the per-image scores of :func:`deblurring_table`."""
    if not priors:
        raise ValueError("latent_group_table needs at least one prior")
    methods = {}
    for name, prior in priors.items():
        if not hasattr(prior, "n_groups"):
            raise TypeError(f"prior {name!r} is a {type(prior).__name__}, not a hierarchical VAE (no n_groups)")
        methods[name] = DeblurMethod("pnp_hvae", prior, {"max_iters": int(max_iters), "gamma": gamma},
                                     per_sigma=lambda s: {"tau": tau_for(s)})  # fmt: skip
    _, per_image = deblurring_table(images, kernels, sigmas, methods, seed=seed, progress=progress, cache=cache)
    rows = []
    for name, prior in priors.items():
        every = torch.cat([per_image[(k, float(s), name)]["psnr"] for k in kernels for s in sigmas])
        by_sigma = [float(torch.cat([per_image[(k, float(s), name)]["psnr"] for k in kernels]).mean()) for s in sigmas]
        summary = summarize(every)
        rows.append({"name": name, "L": int(prior.n_groups), "n_params": sum(p.numel() for p in prior.parameters()),
                     "n_images": len(images), "psnr_mean": summary["mean"], "psnr_se": summary["sem"],
                     "sigmas": [float(s) for s in sigmas], "psnr_by_sigma": by_sigma})  # fmt: skip
    return rows, per_image


# ------------------------------------------------------------------------------------------------
# The paper's claims
# ------------------------------------------------------------------------------------------------
def deblurring_claims(
    per_image: Mapping[tuple[str, float, str], Mapping[str, Tensor]], a: str = "pnp_hvae", b: str = "epll"
) -> dict[str, Any]:
    """§6.3 / Table 2: "PnP-HVAE beats EPLL on deblurring at every noise level". Per sigma: the mean PSNR of ``a`` and
    of ``b`` (mean over the kernels of the per-kernel means, as Table 2 averages), whether ``a`` is higher, and the
    per-image wins of ``a`` over ``b`` (strictly higher PSNR) among the (kernel, image) pairs. ``holds_every_sigma``:
    ``a``'s mean is higher at every sigma."""
    sigmas = sorted({s for (_, s, m) in per_image if m == a})
    if not sigmas or not any(m == b for (_, _, m) in per_image):
        raise ValueError(f"deblurring_claims needs per-image scores of both {a!r} and {b!r}")
    out: dict[str, Any] = {"methods": [a, b], "per_sigma": []}
    for s in sigmas:
        kernels = [k for (k, s2, m) in per_image if m == a and s2 == s]
        ma = [float(per_image[(k, s, a)]["psnr"].mean()) for k in kernels]
        mb = [float(per_image[(k, s, b)]["psnr"].mean()) for k in kernels]
        wins = sum(int((per_image[(k, s, a)]["psnr"] > per_image[(k, s, b)]["psnr"]).sum()) for k in kernels)
        pairs = sum(int(per_image[(k, s, a)]["psnr"].numel()) for k in kernels)
        mean_a, mean_b = sum(ma) / len(ma), sum(mb) / len(mb)
        out["per_sigma"].append({"sigma": s, "n_kernels": len(kernels), f"{a}_psnr": mean_a, f"{b}_psnr": mean_b,
                                 "difference_db": mean_a - mean_b, "a_beats_b": mean_a > mean_b,
                                 "image_wins": wins, "pairs": pairs})  # fmt: skip
    out["holds_every_sigma"] = all(r["a_beats_b"] for r in out["per_sigma"])
    out["sigmas_where_it_holds"] = sum(r["a_beats_b"] for r in out["per_sigma"])
    out["n_sigmas"] = len(sigmas)
    return out


def inpainting_claims(
    per_image: Mapping[str, Mapping[str, Tensor]], a: str = "pnp_hvae", b: str = "epll"
) -> dict[str, Any]:
    """§6.3 / Table 3: "PnP-HVAE outperforms the compared methods" on inpainting (here: EPLL, the one compared method
    available): mean PSNR of ``a`` and ``b``, whether ``a`` is higher, per-image wins of ``a``, and the same for every
    other method of the table (``beats_every_method``)."""
    if a not in per_image or b not in per_image:
        raise ValueError(f"inpainting_claims needs per-image scores of both {a!r} and {b!r}")
    pa = per_image[a]["psnr"]
    others = {m: c["psnr"] for m, c in per_image.items() if m not in (a, OBSERVATION)}
    mean_a = float(pa.mean())
    return {"methods": [a, b], f"{a}_psnr": mean_a, f"{b}_psnr": float(others[b].mean()),
            "difference_db": mean_a - float(others[b].mean()), "a_beats_b": mean_a > float(others[b].mean()),
            "image_wins": int((pa > others[b]).sum()), "n_images": int(pa.numel()),
            "beats_every_method": all(mean_a > float(v.mean()) for v in others.values()),
            "mean_psnr": {m: float(v.mean()) for m, v in others.items()} | {a: mean_a}}  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Tables and figures
# ------------------------------------------------------------------------------------------------
LABELS = {"pnp_hvae": "PnP-HVAE", "epll": "EPLL", "tv": "TV", "wiener": "Wiener", OBSERVATION: "y (observation)",
          "gs_pnp": "GS-PnP", "pnp_mmo": "PnP-MMO", "dpir": "DPIR"}  # fmt: skip


def _fmt(v: Any, digits: int) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def markdown_table(rows: Sequence[Mapping[str, Any]], *, by_sigma: bool, paper: Mapping | None = None) -> str:
    """Table 2 (``by_sigma``: mean over the kernels per (sigma, method)) or Table 3 as markdown, with the paper's
    values beside ours (``paper``: :data:`PAPER_TABLE2` or :data:`PAPER_TABLE3`) and one line per unavailable
    baseline (:data:`UNAVAILABLE`)."""
    head = "method | PSNR (dB) | SSIM | LPIPS | s/image | paper PSNR / SSIM / LPIPS |"
    lines = ["| " + ("sigma | " if by_sigma else "") + head, "|" + "---|" * (7 if by_sigma else 6)]
    groups: dict[tuple[float | None, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r.get("sigma") if by_sigma else None, r["method"]), []).append(r)
    sigmas = sorted({s for s, _ in groups}, key=lambda s: -1 if s is None else s)
    for s in sigmas:
        for (s2, m), rs in groups.items():
            if s2 != s:
                continue
            mean = {k: (None if any(r[k] is None for r in rs) else sum(r[k] for r in rs) / len(rs))
                    for k in ("psnr_mean", "ssim_mean", "lpips_mean", "seconds_per_image")}  # fmt: skip
            ref = (paper.get(s, {}) if by_sigma else paper).get(m) if paper else None
            ref_s = " / ".join(f"{v:g}" for v in ref) if ref else ""
            lines.append("| " + (f"{s:g} | " if by_sigma else "") + f"{LABELS.get(m, m)} | {_fmt(mean['psnr_mean'], 2)}"
                         f" | {_fmt(mean['ssim_mean'], 3)} | {_fmt(mean['lpips_mean'], 3)} | "
                         f"{_fmt(mean['seconds_per_image'], 1)} | {ref_s} |")  # fmt: skip
        if paper:
            for m in UNAVAILABLE:
                ref = (paper.get(s, {}) if by_sigma else paper).get(m)
                if ref:
                    lines.append(
                        "| " + (f"{s:g} | " if by_sigma else "") + f"{LABELS[m]} | not run: pretrained "
                        "weights unavailable offline | | | | " + " / ".join(f"{v:g}" for v in ref) + " |"
                    )
    return "\n".join(lines)


def plot_restorations(
    columns: Sequence[tuple[str, Tensor, Tensor, Mapping[str, Tensor]]], *, scale: float = 2.2
) -> Any:
    """Figs. 5 and 6: one column per ``(title, x*, y, {method: restoration})`` (``(1, C, H, W)`` each; columns may
    differ in size), rows ``x*``, ``y`` and the methods in order, each image titled with its PSNR against ``x*``."""
    import matplotlib.pyplot as plt

    from ..plotting import setup_style

    if not columns:
        raise ValueError("plot_restorations needs at least one column")
    setup_style()
    methods = list(columns[0][3])
    n_rows = 2 + len(methods)
    fig, axes = plt.subplots(n_rows, len(columns), figsize=(scale * len(columns), scale * n_rows), squeeze=False)
    for j, (title, x, y, restored) in enumerate(columns):
        shown = [("$x^*$", x), ("$y$", y)] + [(LABELS.get(m, m), restored[m]) for m in methods]
        for i, (label, img) in enumerate(shown):
            ax = axes[i][j]
            ax.imshow(img[0].detach().cpu().clamp(0, 1).permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            note = "" if i == 0 else f"{float(psnr(img.clamp(0, 1).to(x), x)[0]):.2f} dB"
            ax.set_title(f"{title}\n{note}" if i == 0 else note, fontsize=8)
            if j == 0:
                ax.set_ylabel(label)
    fig.tight_layout()
    return fig


def plot_latent_groups(rows: Sequence[Mapping[str, Any]]) -> Any:
    """Table 4 as a figure: PSNR (mean over kernels and images) against the number ``L`` of latent groups, one line per
    sigma and the overall mean with its standard error."""
    import matplotlib.pyplot as plt

    from ..plotting import setup_style

    setup_style()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    order = sorted(range(len(rows)), key=lambda i: rows[i]["L"])
    L = [rows[i]["L"] for i in order]
    for j, s in enumerate(rows[0]["sigmas"]):
        ax.plot(L, [rows[i]["psnr_by_sigma"][j] for i in order], "o-", label=f"$\\sigma = {s:g}$")
    se = [0.0 if rows[i]["psnr_se"] is None or math.isnan(rows[i]["psnr_se"]) else rows[i]["psnr_se"] for i in order]
    ax.errorbar(L, [rows[i]["psnr_mean"] for i in order], yerr=se, fmt="s--", color="k", label="all")
    ax.set_xlabel("latent groups $L$")
    ax.set_ylabel("PSNR (dB)")
    ax.set_xticks(L)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
