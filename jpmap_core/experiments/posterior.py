r"""VBLE and VBLE-xz against JPMAP (notebook 12): MMSE estimates, posterior samples, uncertainty maps, calibration.

JPMAP returns one point, the joint MAP of ``p(x, z | y)``; VBLE fits a Gaussian ``q(z) = N(zbar, diag(a^2))`` to the
latent posterior ``p(z | y)`` and VBLE-xz fits ``q(z) q_b(x | z)`` to the joint posterior ``p(x, z | y)``
(:mod:`jpmap_core.solvers.vble`, slides ``vble_vblexz_slides.txt``). Both give an MMSE estimate, samples and a
pixelwise standard deviation. On the same images and measurements, :func:`run_task` runs the three methods and
scores them:

* **estimates**: PSNR and SSIM of the MMSE-x estimate ``1/S sum_i D(z_i)`` and PSNR of the MAP-z decode
  ``D(zbar)`` (the slides' "MMSE-z"), against a MAP on the same prior: JPMAP's ``x`` (Alg. 2.3) for the Gaussian
  VAEs, or (``map_method="csgm"``, the compressive autoencoder, which has no Gaussian encoder for JPMAP) the latent
  MAP ``D(z_hat)``, ``z_hat = argmin_z ||A D(z) - y||^2 / (2 sigma^2) - log p(z)`` (the CAE's rate as ``-log p``),
  by Adam from the encoder's code of ``A_dagger y``; every image is clamped to [0, 1] before a metric;
* **calibration**, from the ``S`` posterior samples: per pixel (and channel), the central interval of nominal level
  ``p`` is ``[Q((1-p)/2), Q((1+p)/2)]`` of the samples' empirical quantiles (linear interpolation,
  ``torch.quantile``'s rule); its **coverage** is the fraction of ground-truth values ``x*`` inside it (bounds
  included). A calibrated posterior covers a fraction ``p``; below ``p`` it is over-confident. The samples are
  used as drawn (not clamped to [0, 1]);
  Where ``x*`` is exactly 0 or 1 (MNIST's background and strokes) a decoder ending in a sigmoid never reaches it,
  so :func:`calibration_verdict` also reports the coverage over the interior pixels ``0 < x* < 1`` alone;
* **the 90% error quantile** (the slides' "VBLE-xz VS VBLE sampling ability" figure): per pixel, the 0.9-quantile of
  ``|x_i - x_MMSE|`` over the samples, the error the posterior predicts, to set beside the true error
  ``|x_MMSE - x*|``; the fraction of pixels whose true error is below it is a second coverage at 90%;
* **std-error correlation**: the Pearson correlation between the posterior std and the true error ``|x_MMSE - x*|``
  over the pixels (and channels) of one image, then **averaged over the images** (an image whose std is constant
  has no correlation and is left out of the mean);
* **time**: seconds per image of each solver call (one batched call per method and problem), wall clock and CPU time
  of the process; for VBLE the call fits the posterior and draws the ``S`` samples, split into the two by the fit's
  own clock.

:func:`table_rows` and :func:`reliability_rows` give the rows ``metrics.json`` records; :func:`calibration_verdict`
compares the two posteriors problem by problem; :func:`posterior_figure` and :func:`reliability_figure` draw them.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..metrics import psnr, ssim
from ..operators import Problem, make_problem
from ..solvers import Restoration, solve

__all__ = [
    "LABELS",
    "MAP_LABELS",
    "METHODS",
    "NOMINAL_LEVELS",
    "POSTERIOR_METHODS",
    "RELIABILITY_KEYS",
    "TABLE_KEYS",
    "MethodResult",
    "Task",
    "TaskRun",
    "by_task",
    "calibration_error",
    "calibration_reading",
    "calibration_verdict",
    "coverage",
    "empirical_quantile",
    "error_quantile",
    "markdown_table",
    "observation_image",
    "pearson_per_image",
    "psnr_gap",
    "posterior_figure",
    "reliability_figure",
    "reliability_rows",
    "run_task",
    "table_rows",
    "task_seed",
    "timing_rows",
]

#: nominal levels of the central intervals (the reliability curve's x axis)
NOMINAL_LEVELS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
POSTERIOR_METHODS = ("vble", "vble_xz")
METHODS = ("map", *POSTERIOR_METHODS)
LABELS = {"map": "JPMAP", "vble": "VBLE", "vble_xz": "VBLE-xz"}
DATASET_LABELS = {"mnist": "MNIST", "celeba": "CelebA", "bsd": "BSD"}
#: the MAP-type solver of a run (``run_task(map_method=...)``) -> how figures name it
MAP_LABELS = {"jpmap": "JPMAP", "csgm": "latent MAP"}
#: the keys of every row of :func:`table_rows`, in order
TABLE_KEYS = (
    "dataset",
    "task",
    "method",
    "n_images",
    "psnr_mmse",
    "psnr_map",
    "ssim_mmse",
    "coverage_90",
    "std_error_corr",
    "seconds_per_image",
)
RELIABILITY_KEYS = ("dataset", "task", "method", "nominal", "coverage")


# ---- the problems ------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Task:
    """One degradation of one test set: a :func:`~jpmap_core.operators.make_problem` name, its level and noise std
    (0-255 scale), and for blur and super-resolution the kernel and where it comes from."""

    dataset: str
    problem: str
    sigma: float
    level: float | int | None = None
    kernel: Tensor | None = None
    kernel_name: str | None = None

    @property
    def label(self) -> str:
        """What figures and tables print, e.g. ``"inpainting, 80% missing, sigma 10"``."""
        what = {
            "inpainting": lambda: f"inpainting, {100 * float(self.level):g}% missing",
            "compressed_sensing": lambda: f"compressed sensing, m = {self.level}",
            "blur": lambda: "deblurring" + (f" ({self.kernel_name})" if self.kernel_name else ""),
            "super_resolution": lambda: f"super-resolution x{self.level}",
            "denoising": lambda: "denoising",
        }[self.problem]()
        return f"{what}, $\\sigma = {self.sigma:g}$"

    @property
    def short(self) -> str:
        return {"compressed_sensing": "CS", "super_resolution": f"SR x{self.level}", "blur": "deblurring"}.get(
            self.problem, self.problem
        )


def task_seed(seed: int, task: Task) -> int:
    """The seed of a task's random draws (mask, matrix, noise): a function of ``seed``, the dataset and the problem
    only, so that a task's measurements do not depend on which other tasks run."""
    return (int(seed) * 1_000_003 + zlib.crc32(f"{task.dataset}/{task.problem}/{task.level}".encode())) % 2**31


def degrade(task: Task, x: Tensor, seed: int) -> Problem:
    """``y = A x + n`` of ``task`` for the clean images ``x`` (draws seeded with :func:`task_seed`)."""
    return make_problem(task.problem, x, sigma=task.sigma, level=task.level, seed=task_seed(seed, task),
                        kernel=task.kernel)  # fmt: skip


def observation_image(problem: Problem) -> Tensor:
    """What a figure shows as the degraded image: ``A^T y`` (inpainting: missing pixels black; blur: ``y``), the
    low-resolution ``y`` enlarged by pixel repetition (super-resolution), ``A^dagger y`` (compressed sensing)."""
    if problem.name == "super_resolution":
        s = int(problem.level)
        return problem.y.repeat_interleave(s, -2).repeat_interleave(s, -1)
    if problem.name == "compressed_sensing":
        return problem.op.A_dagger(problem.y)
    return problem.op.A_adjoint(problem.y)


# ---- calibration statistics --------------------------------------------------------------------------------------
def _check_levels(levels: Sequence[float]) -> Tensor:
    lv = torch.as_tensor(list(levels), dtype=torch.float64)
    if lv.dim() != 1 or lv.numel() == 0 or not bool(((lv > 0) & (lv < 1)).all()):
        raise ValueError(f"nominal levels must be numbers in (0, 1), got {list(levels)!r}")
    return lv


def empirical_quantile(sorted_samples: Tensor, q: float) -> Tensor:
    """The ``q``-quantile along dim 1 of samples already sorted along it (``(B, S, ...)`` -> ``(B, ...)``), by
    linear interpolation between order statistics (``torch.quantile``'s default rule, without its size limit)."""
    S = sorted_samples.shape[1]
    if S < 2:
        raise ValueError(f"need at least 2 samples for a quantile, got {S}")
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], got {q!r}")
    h = (S - 1) * float(q)
    lo = min(int(math.floor(h)), S - 2)
    frac = h - lo
    a, b = sorted_samples[:, lo], sorted_samples[:, lo + 1]
    return a + frac * (b - a)


def coverage(
    samples: Tensor, x_true: Tensor, levels: Sequence[float] = NOMINAL_LEVELS, *, mask: Tensor | None = None
) -> Tensor:
    """``(B, L)``: for each image and nominal level ``p``, the fraction of the values of ``x_true`` ``(B, C, H, W)``
    inside the central interval ``[Q((1-p)/2), Q((1+p)/2)]`` of ``samples`` ``(B, S, C, H, W)`` (per pixel and
    channel, bounds included). ``mask`` (bool, the shape of ``x_true``): count only those values (NaN for an image
    without any)."""
    lv = _check_levels(levels)
    B = x_true.shape[0]
    if samples.dim() != x_true.dim() + 1 or samples.shape[0] != B or samples.shape[2:] != x_true.shape[1:]:
        raise ValueError(
            f"samples must be (B, S, *image) for x_true of shape {tuple(x_true.shape)}, got {tuple(samples.shape)}"
        )
    if mask is not None and tuple(mask.shape) != tuple(x_true.shape):
        raise ValueError(f"mask must have the shape of x_true {tuple(x_true.shape)}, got {tuple(mask.shape)}")
    w = (torch.ones_like(x_true, dtype=torch.float64) if mask is None else mask.double()).flatten(1)
    s = samples.sort(dim=1).values
    out = []
    for p in lv.tolist():
        lo, hi = empirical_quantile(s, (1 - p) / 2), empirical_quantile(s, (1 + p) / 2)
        inside = ((x_true >= lo) & (x_true <= hi)).flatten(1).double()
        out.append((inside * w).sum(1) / w.sum(1))
    return torch.stack(out, 1)


def error_quantile(samples: Tensor, center: Tensor, q: float = 0.9) -> Tensor:
    """Per pixel, the ``q``-quantile over the samples ``(B, S, ...)`` of ``|x_i - center|`` (``center`` ``(B, ...)``,
    the MMSE estimate): the error the posterior predicts with probability ``q`` (the slides' "90% error quantile")."""
    d = (samples - center.unsqueeze(1)).abs().sort(dim=1).values
    return empirical_quantile(d, q)


def pearson_per_image(a: Tensor, b: Tensor) -> Tensor:
    """``(B,)`` Pearson correlation of ``a`` and ``b`` over the values of each image (NaN where one is constant)."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    den = a.pow(2).sum(1).sqrt() * b.pow(2).sum(1).sqrt()
    r = (a * b).sum(1) / den
    return torch.where(den > 0, r, torch.full_like(r, math.nan))


def calibration_error(levels: Sequence[float], cov: Sequence[float] | Tensor) -> float:
    """Mean ``|coverage - nominal|`` over the levels (0 = the diagonal, perfect calibration)."""
    lv = _check_levels(levels)
    c = torch.as_tensor(cov, dtype=torch.float64).flatten()
    if c.numel() != lv.numel():
        raise ValueError(f"give one coverage per level ({lv.numel()}), got {c.numel()}")
    return float((c - lv).abs().mean())


# ---- running the methods -----------------------------------------------------------------------------------------
@dataclass
class MethodResult:
    """One method on one task, per image (CPU tensors). The posterior fields are ``None`` for the MAP (JPMAP)."""

    method: str
    x: Tensor  # the estimate, clamped to [0, 1]: JPMAP's x, or the MMSE-x 1/S sum D(z_i)
    x_decoded: Tensor  # clamped: JPMAP's mu_theta(z_hat), or the MAP-z decode D(zbar) (the slides' MMSE-z)
    psnr: Tensor
    ssim: Tensor
    psnr_decoded: Tensor
    seconds: float  # the whole (batched) solver call, wall clock
    iterations: Tensor
    converged: Tensor
    seconds_fit: float | None = None  # VBLE: the Adam fit, from its clock
    std: Tensor | None = None  # pixelwise posterior std (over the S samples)
    error_q90: Tensor | None = None  # 90% quantile of |x_i - x_MMSE|
    shown_samples: Tensor | None = None  # (B, 2, C, H, W) the first two posterior samples
    coverage: Tensor | None = None  # (B, L) at the task's nominal levels
    coverage_interior: Tensor | None = None  # (B, L) over the pixels with 0 < x* < 1 only (NaN: none)
    error_q90_coverage: Tensor | None = None  # (B,) fraction of pixels with |x_MMSE - x*| <= error_q90
    std_error_corr: Tensor | None = None  # (B,) Pearson(std, |x_MMSE - x*|) per image
    b_mean: float | None = None  # VBLE-xz: the mean of its x-noise factor b
    z_scale_mean: float | None = None  # mean of the latent posterior std a
    restoration: Restoration | None = field(default=None, repr=False)  # kept for the explorer (samples dropped)
    cpu_seconds: float | None = None  # CPU time of the process during the call (time.process_time)

    @property
    def seconds_sampling(self) -> float | None:
        return None if self.seconds_fit is None else max(self.seconds - self.seconds_fit, 0.0)


@dataclass
class TaskRun:
    """All methods on one task: the same clean images ``x_true``, the same measurements."""

    task: Task
    x_true: Tensor
    observation: Tensor
    levels: tuple[float, ...]
    n_samples: int
    results: dict[str, MethodResult] = field(default_factory=dict)
    problem: Problem | None = field(default=None, repr=False)
    map_method: str = "jpmap"  # the solver of the "map" row

    @property
    def n_images(self) -> int:
        return int(self.x_true.shape[0])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fit_seconds(r: Restoration) -> float | None:
    s = r.history.get("seconds")
    if s is None or s.numel() == 0:
        return None
    return float(torch.nan_to_num(s.double(), nan=-math.inf).max())


def run_task(
    task: Task,
    x_true: Tensor,
    prior: Any,
    *,
    seed: int = 0,
    jpmap_options: Mapping[str, Any] | None = None,
    vble_options: Mapping[str, Any] | None = None,
    n_samples: int = 100,
    levels: Sequence[float] = NOMINAL_LEVELS,
    methods: Sequence[str] = METHODS,
    device: str | torch.device = "cpu",
    keep_restorations: bool = True,
    map_method: str = "jpmap",
) -> TaskRun:
    """Degrade ``x_true`` (``(B, C, H, W)`` on the CPU) as ``task`` says, restore it with every method in one batched
    call each, and score the estimates and the posteriors (module docstring).

    ``jpmap_options``: keywords of the MAP solver ``map_method``: :func:`~jpmap_core.solvers.jpmap` (Alg. 2.3; e.g.
    the caps ``n_max``, ``adam_max_iters``), or :func:`~jpmap_core.solvers.csgm` (``"csgm"``: the latent MAP with the
    prior's ``-log p(z)``, e.g. ``max_iters``; started at the encoder's code of ``A_dagger y`` clamped to [0, 1]
    unless ``z0`` is given); ``vble_options``: keywords shared by :func:`~jpmap_core.solvers.vble` and
    :func:`~jpmap_core.solvers.vble_xz` (e.g. ``max_iters``). Each posterior draws ``n_samples`` samples (the MMSE
    estimate, the std and the calibration use them all), from noise streams seeded by ``seed``.
    ``keep_restorations``: keep each posterior's :class:`Restoration` (without its samples) for
    :func:`jpmap_core.widgets.posterior_explorer_frame`.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; expected some of {METHODS}")
    if map_method not in MAP_LABELS:
        raise ValueError(f"unknown map_method {map_method!r}; expected one of {sorted(MAP_LABELS)}")
    lv = tuple(float(v) for v in _check_levels(levels).tolist())
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 2:
        raise ValueError(f"n_samples must be an integer >= 2 (a std and quantiles need 2), got {n_samples!r}")
    if x_true.ndim != 4 or tuple(x_true.shape[1:]) != tuple(prior.image_shape):
        raise ValueError(f"x_true must be (B, *{tuple(prior.image_shape)}) images, got {tuple(x_true.shape)}")
    device = torch.device(device)
    problem = degrade(task, x_true, seed)
    run = TaskRun(task, x_true, observation_image(problem).clamp(0, 1).cpu(), lv, n_samples, problem=problem,
                  map_method=map_method)  # fmt: skip
    y = problem.y.to(device)
    for m in methods:
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        if m == "map":
            options = dict(jpmap_options or {})
            if map_method == "csgm" and "z0" not in options:
                with torch.no_grad():
                    x0 = problem.op.A_dagger(y).clamp(0, 1)
                    options["z0"] = prior.encode(x0)[0].detach()
            r = solve(map_method, y, problem.op, prior, sigma=problem.sigma, **options)
        else:
            g = torch.Generator().manual_seed(int(seed))
            r = solve(m, y, problem.op, prior, sigma=problem.sigma, n_posterior_samples=n_samples,
                      n_keep_samples=n_samples, generator=g, **dict(vble_options or {}))  # fmt: skip
        _sync(device)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        x = r.x.detach().clamp(0, 1).cpu()
        xd = r.x_decoded.detach().clamp(0, 1).cpu()
        res = MethodResult(
            method=m, x=x, x_decoded=xd, psnr=psnr(x, x_true), ssim=ssim(x, x_true), psnr_decoded=psnr(xd, x_true),
            seconds=seconds, iterations=r.iterations.cpu(), converged=r.converged.cpu(), cpu_seconds=cpu_seconds,
        )  # fmt: skip
        if m != "map":
            samples = r.per_image["samples"].detach().cpu()
            mmse = r.x.detach().cpu()  # as returned: the samples' centre
            res.seconds_fit = _fit_seconds(r)
            res.std = r.per_image["std"].detach().cpu()
            res.error_q90 = error_quantile(samples, mmse, 0.9)
            res.shown_samples = samples[:, :2].clone()
            res.coverage = coverage(samples, x_true, lv)
            res.coverage_interior = coverage(samples, x_true, lv, mask=(x_true > 0) & (x_true < 1))
            true_error = (mmse - x_true).abs()
            res.error_q90_coverage = (true_error <= res.error_q90).flatten(1).double().mean(1)
            res.std_error_corr = pearson_per_image(res.std, true_error)
            res.z_scale_mean = float(r.per_image["z_scale"].mean())
            if "b" in r.per_image:
                res.b_mean = float(r.per_image["b"].mean())
            del samples
            if keep_restorations:
                r.per_image["samples"] = r.per_image["samples"][:, :2]
                res.restoration = r
        run.results[m] = res
    return run


# ---- tables ------------------------------------------------------------------------------------------------------
def _mean(v: Tensor | None) -> float | None:
    if v is None:
        return None
    v = v.double()
    v = v[torch.isfinite(v)]
    return float(v.mean()) if v.numel() else None


def _level_index(run: TaskRun, p: float) -> int:
    for i, v in enumerate(run.levels):
        if abs(v - p) < 1e-9:
            return i
    raise ValueError(f"the run has no nominal level {p} (levels {run.levels})")


def mean_coverage(run: TaskRun, method: str) -> list[float]:
    """Coverage per nominal level, averaged over the images (each image has the same number of pixels, so this is
    also the pooled fraction)."""
    return [float(v) for v in run.results[method].coverage.mean(0)]


def table_rows(runs: Sequence[TaskRun]) -> list[dict[str, Any]]:
    """One row per (task, method) with exactly :data:`TABLE_KEYS`. ``psnr_map`` is the PSNR of the method's MAP-type
    estimate: JPMAP's ``x`` for ``map``, the MAP-z decode ``D(zbar)`` (the slides' "MMSE-z") for the posteriors;
    the posterior columns (``psnr_mmse``, ``ssim_mmse``, ``coverage_90``, ``std_error_corr``) are ``None`` for
    ``map``. Means over the images; ``std_error_corr`` averages the per-image correlations."""
    rows = []
    for run in runs:
        for m, res in run.results.items():
            post = m != "map"
            rows.append(
                {
                    "dataset": run.task.dataset,
                    "task": run.task.problem,
                    "method": m,
                    "n_images": run.n_images,
                    "psnr_mmse": _mean(res.psnr) if post else None,
                    "psnr_map": _mean(res.psnr_decoded if post else res.psnr),
                    "ssim_mmse": _mean(res.ssim) if post else None,
                    "coverage_90": float(res.coverage[:, _level_index(run, 0.9)].mean()) if post else None,
                    "std_error_corr": _mean(res.std_error_corr) if post else None,
                    "seconds_per_image": res.seconds / run.n_images,
                }
            )
    return rows


def reliability_rows(runs: Sequence[TaskRun]) -> list[dict[str, Any]]:
    """One row per (task, posterior method, nominal level): the coverage averaged over the images."""
    rows = []
    for run in runs:
        for m in POSTERIOR_METHODS:
            if m in run.results:
                for p, c in zip(run.levels, mean_coverage(run, m), strict=True):
                    rows.append({"dataset": run.task.dataset, "task": run.task.problem, "method": m, "nominal": p,
                                 "coverage": c})  # fmt: skip
    return rows


def timing_rows(runs: Sequence[TaskRun]) -> list[dict[str, Any]]:
    """Seconds per image of each call (wall clock, and the CPU time of the process: on a CPU run with one thread
    the compute time whatever else the machine runs); for the posteriors the wall time split into the fit and the
    ``n_samples`` draws by the fit's own clock."""
    rows = []
    for run in runs:
        for m, res in run.results.items():
            n = run.n_images
            rows.append(
                {
                    "dataset": run.task.dataset,
                    "task": run.task.problem,
                    "method": m,
                    "seconds_per_image": res.seconds / n,
                    "cpu_seconds_per_image": None if res.cpu_seconds is None else res.cpu_seconds / n,
                    "fit_seconds_per_image": None if res.seconds_fit is None else res.seconds_fit / n,
                    "sampling_seconds_per_image": None if res.seconds_sampling is None else res.seconds_sampling / n,
                    "n_samples": run.n_samples if m != "map" else None,
                    "iterations_mean": float(res.iterations.double().mean()),
                    "converged_fraction": float(res.converged.double().mean()),
                }
            )
    return rows


def by_task(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """``{dataset: {task: {method: row}}}`` from table rows (for dotted keys such as ``mnist.inpainting.vble``)."""
    out: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for r in rows:
        out.setdefault(r["dataset"], {}).setdefault(r["task"], {})[r["method"]] = dict(r)
    return out


def _std_over_error(run: TaskRun, method: str) -> float | None:
    res = run.results[method]
    err = float((res.x - run.x_true).abs().double().mean())
    return float(res.std.double().mean()) / err if err > 0 else None


def calibration_verdict(runs: Sequence[TaskRun]) -> dict[str, Any]:
    """Per task: each posterior's calibration error (mean ``|coverage - nominal|`` over the levels), its coverage at
    90% (over all pixels, and over the interior pixels ``0 < x* < 1`` only, a mean over the images that have some),
    the fraction of pixels whose true error is below the 90% error quantile, the std-error correlation, the ratio
    mean std / mean absolute error of the MMSE estimate, and whether VBLE-xz is the better calibrated (smaller
    calibration error); per dataset, on how many tasks it is; ``coverage_monotone``: whether every coverage curve is
    non-decreasing in the nominal level (the intervals of one set of samples nest, so it must be)."""
    tasks: dict[str, dict[str, Any]] = {}
    datasets: dict[str, dict[str, Any]] = {}
    monotone = True
    for run in runs:
        if not all(m in run.results for m in POSTERIOR_METHODS):
            continue
        err = {m: calibration_error(run.levels, mean_coverage(run, m)) for m in POSTERIOR_METHODS}
        cov90 = {m: float(run.results[m].coverage[:, _level_index(run, 0.9)].mean()) for m in POSTERIOR_METHODS}
        better = err["vble_xz"] < err["vble"]
        i90 = _level_index(run, 0.9)
        for m in POSTERIOR_METHODS:
            c = torch.tensor(mean_coverage(run, m))
            monotone &= bool((c[1:] >= c[:-1]).all())
        tasks.setdefault(run.task.dataset, {})[run.task.problem] = {
            "calibration_error": err,
            "coverage_90": cov90,
            "coverage_90_interior": {m: _mean(run.results[m].coverage_interior[:, i90]) for m in POSTERIOR_METHODS},
            "interior_fraction": float(((run.x_true > 0) & (run.x_true < 1)).double().mean()),
            "error_q90_coverage": {m: _mean(run.results[m].error_q90_coverage) for m in POSTERIOR_METHODS},
            "xz_better_calibrated": better,
            "xz_minus_vble_coverage_90": cov90["vble_xz"] - cov90["vble"],
            "std_error_corr": {m: _mean(run.results[m].std_error_corr) for m in POSTERIOR_METHODS},
            "std_over_error": {m: _std_over_error(run, m) for m in POSTERIOR_METHODS},
        }
        d = datasets.setdefault(run.task.dataset, {"n_tasks": 0, "xz_better_on": 0})
        d["n_tasks"] += 1
        d["xz_better_on"] += int(better)
    for d in datasets.values():
        d["xz_better_on_all"] = d["xz_better_on"] == d["n_tasks"]
    return {"tasks": tasks, "datasets": datasets, "coverage_monotone": monotone}


def psnr_gap(runs: Sequence[TaskRun]) -> dict[str, dict[str, dict[str, float]]]:
    """``{dataset: {task: {method: dB}}}``: mean over the images of PSNR(MMSE-x) - PSNR(the MAP's x: JPMAP's, or the
    latent MAP's decode), per posterior method (positive: the MMSE estimate is the better)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for run in runs:
        if "map" not in run.results:
            continue
        ref = run.results["map"].psnr.double()
        out.setdefault(run.task.dataset, {})[run.task.problem] = {
            m: float((run.results[m].psnr.double() - ref).mean()) for m in POSTERIOR_METHODS if m in run.results
        }
    return out


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, digits: int = 3) -> str:
    """Rows as a Markdown table (floats with ``digits`` significant decimals, ``None`` as a dash)."""
    rows = list(rows)
    if not rows:
        return ""
    columns = list(columns or rows[0])

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{max(digits - 1, 1)}f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def calibration_reading(
    verdict: Mapping[str, Any],
    recon_psnr: Mapping[str, float] | None = None,
    *,
    claim_dataset: str | None = "celeba",
    labels: Mapping[str, str] | None = None,
) -> str:
    """The verdict of :func:`calibration_verdict` in words, dataset by dataset and task by task (computed from the
    numbers, never written in advance); ``recon_psnr``: the autoencoder's reconstruction PSNR of each test set (the
    prior's representation error); ``claim_dataset``: where the claim "VBLE-xz is better calibrated than VBLE" is
    checked (a last paragraph says whether it holds on every task of that dataset)."""
    labels = dict(DATASET_LABELS, **(labels or {}))
    out = []
    for ds, tasks in verdict["tasks"].items():
        parts = []
        for task, v in tasks.items():
            e, c = v["calibration_error"], v["coverage_90"]
            who = "VBLE-xz" if v["xz_better_calibrated"] else "VBLE"
            parts.append(
                f"{task}: {who} is the better calibrated (calibration error VBLE {e['vble']:.3f}, VBLE-xz "
                f"{e['vble_xz']:.3f}; coverage of the 90% intervals VBLE {c['vble']:.3f}, VBLE-xz {c['vble_xz']:.3f})"
            )
        sat = {t: v for t, v in tasks.items() if v.get("interior_fraction", 1.0) < 0.95}
        if sat:
            parts_i = [
                f"{t}: VBLE {v['coverage_90_interior']['vble']:.3f}, VBLE-xz {v['coverage_90_interior']['vble_xz']:.3f}"
                for t, v in sat.items()
            ]
            frac = min(v["interior_fraction"] for v in sat.values())
            parts.append(
                f"over the {100 * frac:.0f}% of the pixels with $0 < x^* < 1$ alone, the 90% intervals cover "
                + ", ".join(parts_i)
            )
        d = verdict["datasets"][ds]
        rec = "" if not recon_psnr or ds not in recon_psnr else f" (autoencoder reconstruction {recon_psnr[ds]:.1f} dB)"
        text = (
            f"**{labels.get(ds, ds)}**{rec}: VBLE-xz is the better calibrated on {d['xz_better_on']} of "
            f"{d['n_tasks']} problems. " + "; ".join(parts) + "."
        )
        ratio = [v["std_over_error"] for v in tasks.values()]
        corr = [v["std_error_corr"] for v in tasks.values()]
        if all(r.get("vble") is not None for r in ratio):
            lo, hi = min(r["vble"] for r in ratio), max(r["vble"] for r in ratio)
            text += f" VBLE's mean std is {lo:.2f} to {hi:.2f} times its mean absolute error"
            lo, hi = min(r["vble_xz"] for r in ratio), max(r["vble_xz"] for r in ratio)
            text += f", VBLE-xz's {lo:.2f} to {hi:.2f} times."
        if all(c.get("vble") is not None and c.get("vble_xz") is not None for c in corr):
            v1, v2 = [c["vble"] for c in corr], [c["vble_xz"] for c in corr]
            text += (
                f" Std-error correlation: VBLE {min(v1):.2f} to {max(v1):.2f}, VBLE-xz {min(v2):.2f} to {max(v2):.2f}."
            )
        out.append(text)
    if claim_dataset is not None and claim_dataset in verdict["datasets"]:
        d = verdict["datasets"][claim_dataset]
        holds = d["xz_better_on"] == d["n_tasks"]
        out.append(
            f"**The claim** (VBLE-xz better calibrated than VBLE on {labels.get(claim_dataset, claim_dataset)}): "
            + ("holds on every problem of this run." if holds else
               f"does not hold on every problem of this run (on {d['xz_better_on']} of {d['n_tasks']}).")
        )  # fmt: skip
    return "\n\n".join(out)


# ---- figures -----------------------------------------------------------------------------------------------------
COLUMNS = (
    r"$x^*$",
    "observation",
    "JPMAP\n(MAP)",
    "MMSE-x",
    "MMSE-z\n" + r"$D(\bar z)$",
    "sample 1",
    "sample 2",
    "posterior std",
    r"$|\hat x_{MMSE} - x^*|$",
    "90% error\nquantile",
)


def _show_image(ax, img: Tensor) -> None:
    img = img.detach().cpu().clamp(0, 1)
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img.permute(1, 2, 0).numpy())


def _blank(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    for s in ax.spines.values():
        s.set_visible(False)


def posterior_figure(runs: Sequence[TaskRun], index: int = 0, *, title: str | None = None, scale: float = 1.05):
    """The slides' "VBLE-xz VS VBLE sampling ability" figure for image ``index`` of every task: two rows per task
    (VBLE, VBLE-xz), columns :data:`COLUMNS`; ``x*``, the observation and the MAP (JPMAP, or the latent MAP:
    :data:`MAP_LABELS`) in the first row of each pair. The
    three uncertainty maps (std, true error, 90% error quantile; channel means for colour images) of both rows of a
    task share one colour scale (0 to the largest 99th percentile of the six maps), printed beside the pair, and
    each map its mean value; the estimates carry their PSNR (dB)."""
    import matplotlib.pyplot as plt

    from ..plotting import setup_style

    setup_style()
    runs = list(runs)
    if not runs:
        raise ValueError("no task to draw")
    for run in runs:
        if not 0 <= index < run.n_images:
            raise ValueError(f"index must be in [0, {run.n_images - 1}] for {run.task.label}, got {index!r}")
    nrow, ncol = 2 * len(runs), len(COLUMNS)
    fig, axes = plt.subplots(nrow, ncol, figsize=(scale * ncol + 0.6, scale * 1.12 * nrow), squeeze=False)
    for ax in axes.flat:
        _blank(ax)
    for t, run in enumerate(runs):
        i = index
        maps = {}
        for m in POSTERIOR_METHODS:
            res = run.results[m]
            err = (res.x[i] - run.x_true[i]).abs()  # of the clamped MMSE: what the figure shows
            maps[m] = [res.std[i].mean(0), err.mean(0), res.error_q90[i].mean(0)]
        vmax = max(float(torch.quantile(mp.flatten().double(), 0.99)) for ms in maps.values() for mp in ms)
        vmax = vmax if vmax > 0 else 1.0
        top = axes[2 * t]
        _show_image(top[0], run.x_true[i])
        _show_image(top[1], run.observation[i])
        jp = run.results.get("map")
        if jp is not None:
            _show_image(top[2], jp.x[i])
            top[2].set_title(f"{float(jp.psnr[i]):.1f} dB", fontsize=7, pad=1)
        im = None
        for k, m in enumerate(POSTERIOR_METHODS):
            row = axes[2 * t + k]
            res = run.results[m]
            _show_image(row[3], res.x[i])
            row[3].set_title(f"{float(res.psnr[i]):.1f} dB", fontsize=7, pad=1)
            _show_image(row[4], res.x_decoded[i])
            row[4].set_title(f"{float(res.psnr_decoded[i]):.1f} dB", fontsize=7, pad=1)
            for j in range(2):
                _show_image(row[5 + j], res.shown_samples[i, j])
            for j, mp in enumerate(maps[m]):
                im = row[7 + j].imshow(mp.numpy(), cmap="magma", vmin=0, vmax=vmax)
                row[7 + j].set_title(f"mean {float(mp.mean()):.3f}", fontsize=7, pad=1)
            row[0].set_ylabel(f"{run.task.short}\n{LABELS[m]}", rotation=0, ha="right", va="center", fontsize=9)
        cax = axes[2 * t, -1].inset_axes([1.06, -1.0, 0.06, 1.9])
        fig.colorbar(im, cax=cax)
        cax.tick_params(labelsize=6)
    map_names = dict.fromkeys(MAP_LABELS[run.map_method] for run in runs)
    for j, label in enumerate(COLUMNS):
        if j == 2:  # the MAP solver(s) of these runs
            label = " / ".join(map_names) + "\n(MAP)"
        axes[0, j].annotate(label, (0.5, 1.32), xycoords="axes fraction", ha="center", va="bottom", fontsize=8)
    fig.subplots_adjust(wspace=0.05, hspace=0.3)
    if title:
        fig.suptitle(title, fontsize=10, y=1.0 + (0.25 if nrow > 2 else 0.45) / nrow)  # above the column titles
    return fig


def reliability_figure(runs: Sequence[TaskRun], *, ncols: int | None = None):
    """Reliability curves: one panel per task, the coverage of the central intervals (mean over the images) against
    the nominal level for VBLE and VBLE-xz, the diagonal = perfect calibration; the legend gives each posterior's
    calibration error (mean ``|coverage - nominal|``). Where fewer than 95% of the ground-truth values lie strictly
    inside (0, 1) (MNIST), dotted curves give the coverage over those interior pixels alone."""
    import matplotlib.pyplot as plt

    from ..plotting import setup_style

    setup_style()
    runs = list(runs)
    n = len(runs)
    ncols = ncols or min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for k, (ax, run) in enumerate(zip(axes.flat, runs, strict=False)):
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="calibrated", zorder=0)
        interior = float(((run.x_true > 0) & (run.x_true < 1)).double().mean())
        for m, marker in zip(POSTERIOR_METHODS, "os", strict=True):
            if m not in run.results:
                continue
            cov = mean_coverage(run, m)
            err = calibration_error(run.levels, cov)
            line = ax.plot(run.levels, cov, marker=marker, ms=4, lw=1.3, label=f"{LABELS[m]} (error {err:.2f})")[0]
            if interior < 0.95:  # many pixels at exactly 0 or 1 (MNIST): the coverage over the others too
                ci = [float(v) for v in run.results[m].coverage_interior.nanmean(0)]
                ax.plot(run.levels, ci, marker=marker, ms=3, lw=1.0, ls=":", color=line.get_color(), mfc="none",
                        label=f"{LABELS[m]}, pixels $0 < x^* < 1$")  # fmt: skip
        ax.set_xlim(0.45, 1.0)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("nominal level of the central interval")
        if k % ncols == 0:
            ax.set_ylabel("coverage of $x^*$ (fraction of pixels)")
        name = DATASET_LABELS.get(run.task.dataset, run.task.dataset)
        ax.set_title(f"({'abcdefghij'[k]}) {name}: {run.task.label}\n{run.n_images} images, "
                     f"{run.n_samples} samples", fontsize=8)  # fmt: skip
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig
