"""The MNIST restoration benchmark of JPMAP §3.4 (Figs. 6 and 7): CSGM against JPMAP over three degradation sweeps.

Problems and levels (the paper's, ``PAPER_LEVELS``):

* ``denoising`` -- ``A = I``, noise std ``sigma`` in {25, 50, 75, 110, 150} (0-255 scale);
* ``compressed_sensing`` -- ``m`` in {40, 80, 140, 200, 300} Gaussian measurements (``A`` with i.i.d.
  ``N(0, 1/m)`` entries), noise std ``sigma = 10``;
* ``inpainting`` -- a fraction in {0.5, ..., 0.9} of the pixels missing (one random mask per image), ``sigma = 10``.

Methods (``METHODS``), all with the same VAE prior, the same degraded images and the same iteration caps
(:class:`Budget`):

* ``csgm`` -- CSGM (eq. 1.3, lambda = sigma^2 as in the paper);
* ``jpmap_fixed_beta`` -- JPMAP Algorithm 2.3 with ``beta = 1/gamma^2``;
* ``jpmap_alpha1``, ``jpmap_alpha5``, ``jpmap_alpha10`` -- Algorithm 2.4 with ``eps = (alpha/255)^2 d``, starting at
  ``beta0 = 0.1/gamma^2`` with the rate ``rho = 100/d`` (the official code's defaults).

Every (problem, level) draws its operator (mask, matrix) and its noise from its own ``torch.Generator`` seeded by
:func:`level_seed` -- a function of the notebook's ``SEED``, the problem and the level only, so a level gets the
same degradation whichever other levels run with it. The restorations are clamped to [0, 1] before every metric,
for all methods alike. A solver call restores all images of a (problem, level) at once (the solvers are batched),
and calls are merged further (``run_benchmark(merge=...)``): the inpainting levels as **one** batch with one mask
per image (``Inpainting(masks)``), the denoising levels with one ``sigma`` per image, the compressed-sensing levels
(different ``m``), or every problem, as one :class:`~jpmap_core.operators.BatchBlocks` batch. The solvers give every
image its own state, so the result of an image does not depend on its batch (tested); merging only changes how
many batched steps run one after the other, which sets the time on a GPU.
"""

from __future__ import annotations

import csv
import io
import math
import os
import textwrap
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._io import atomic_write_text
from ..cache import CallCache
from ..metrics import lpips, lpips_status, psnr, ssim
from ..operators import BatchBlocks, Denoising, Inpainting, LinearOperator, make_problem
from ..solvers import solve as run_solver

__all__ = [
    "ALPHAS",
    "Benchmark",
    "Budget",
    "Degraded",
    "MERGE_MODES",
    "METHODS",
    "MEASUREMENT_SIGMA",
    "PAPER_LEVELS",
    "PROBLEMS",
    "degrade",
    "level_key",
    "level_seed",
    "lpips_panel_text",
    "nearest_level",
    "plot_sweeps",
    "psnr_gain",
    "qualitative_grid",
    "resolve_merge",
    "results_table",
    "run_benchmark",
    "score",
    "solve",
    "table_markdown",
    "win_fraction",
    "write_csv",
]

PROBLEMS = ("denoising", "compressed_sensing", "inpainting")
METHODS = ("csgm", "jpmap_fixed_beta", "jpmap_alpha1", "jpmap_alpha5", "jpmap_alpha10")
ALPHAS = {"jpmap_alpha1": 1.0, "jpmap_alpha5": 5.0, "jpmap_alpha10": 10.0}
PAPER_LEVELS: dict[str, tuple[float, ...]] = {
    "denoising": (25, 50, 75, 110, 150),
    "compressed_sensing": (40, 80, 140, 200, 300),
    "inpainting": (0.5, 0.6, 0.7, 0.8, 0.9),
}
MERGE_MODES = ("none", "inpainting", "levels", "all")
MEASUREMENT_SIGMA = 10.0  # noise std (0-255) of compressed sensing and inpainting (paper Figs. 6-7)
IMAGE_SHAPE = (1, 28, 28)

METHOD_LABELS = {
    "csgm": "CSGM",
    "jpmap_fixed_beta": r"JPMAP ($\beta = 1/\gamma^2$)",
    "jpmap_alpha1": r"JPMAP $\alpha = 1$",
    "jpmap_alpha5": r"JPMAP $\alpha = 5$",
    "jpmap_alpha10": r"JPMAP $\alpha = 10$",
}
PROBLEM_LABELS = {"denoising": "Denoising", "compressed_sensing": "Compressed sensing", "inpainting": "Inpainting"}
LEVEL_AXIS = {
    "denoising": r"noise std $\sigma$ (grey levels, 0-255)",
    "compressed_sensing": r"measurements $m$ (of $d = 784$), $\sigma = 10$",
    "inpainting": r"missing pixels (%), $\sigma = 10$",
}
#: +1: a larger level is more ill-posed (more noise, more missing pixels); -1: a smaller one (fewer measurements)
ILL_POSED_DIRECTION = {"denoising": 1, "compressed_sensing": -1, "inpainting": 1}


def _check_problem(problem: str) -> str:
    if problem not in PROBLEMS:
        raise ValueError(f"unknown problem {problem!r}; expected one of {PROBLEMS}")
    return problem


def _check_level(problem: str, level: float) -> float:
    """The level as a number (an int for integral noise levels and measurement counts), checked for its problem."""
    try:
        v = float(level)
    except (TypeError, ValueError):
        raise TypeError(f"the level of {problem} must be a number, got {level!r}") from None
    if problem == "denoising" and not (math.isfinite(v) and v > 0):
        raise ValueError(f"denoising levels are noise stds > 0 on the 0-255 scale, got {level!r}")
    if problem == "compressed_sensing" and not (v == int(v) and 1 <= v):
        raise ValueError(f"compressed sensing levels are numbers of measurements m >= 1, got {level!r}")
    if problem == "inpainting" and not 0 <= v < 1:
        raise ValueError(f"inpainting levels are fractions of missing pixels in [0, 1), got {level!r}")
    return int(v) if problem != "inpainting" and v.is_integer() else v


def level_key(level: float) -> str:
    """The level as a short string, the key of per-level dicts in metrics.json: ``25``, ``140``, ``0.8``."""
    return f"{float(level):g}"


def level_seed(seed: int, problem: str, level: float) -> int:
    """Seed of the generator that draws the operator and the noise of ``(problem, level)``.

    Depends only on ``seed``, the problem and the level (not on which other levels run), so that every method
    and every profile sees the same degradation of a given image at a given level.
    """
    _check_problem(problem)
    tag = zlib.crc32(f"{problem}/{level_key(level)}".encode())
    return (int(seed) * 1_000_003 + tag) % (2**62)


@dataclass
class Degraded:
    """Measurements of a batch of images: ``y = A x + n`` with noise std ``sigma`` (0-255 scale).

    ``levels``: the level of each image (a merged batch mixes levels); ``sigma``: a number or one per image
    (``(B,)``, when denoising levels are merged); ``observation``: what the paper's Fig. 7 shows as the corrupted
    image (``y`` for denoising, ``A^T y`` for inpainting, missing pixels black; ``None`` for compressed sensing,
    whose ``y`` is not an image, and for merged batches). ``problems``: the problem of each image (default: all
    ``problem``; a batch that merges problems has ``problem`` ``"mixed"``).
    """

    problem: str
    levels: list[float]
    sigma: float | Tensor
    op: LinearOperator
    y: Tensor
    observation: Tensor | None
    problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.problems:
            self.problems = [self.problem] * len(self.levels)


def degrade(problem: str, level: float, x: Tensor, seed: int) -> Degraded:
    """Degrade the images ``x`` (CPU, ``(B, 1, 28, 28)``) at ``level``, drawing from ``level_seed(seed, ...)``
    (:func:`jpmap_core.operators.make_problem`: the operator, then the noise)."""
    _check_problem(problem)
    level = _check_level(problem, level)
    g = torch.Generator().manual_seed(level_seed(seed, problem, level))
    sigma = level if problem == "denoising" else MEASUREMENT_SIGMA  # a denoising level is its noise std
    p = make_problem(problem, x, sigma=sigma, level=None if problem == "denoising" else level, generator=g)
    return Degraded(problem, [level] * x.shape[0], sigma, p.op, p.y, p.observation)


def _sigmas(parts: Sequence[Degraded]) -> float | Tensor:
    """One sigma if every part has the same, else a ``(B,)`` tensor with each image's."""
    values = {float(p.sigma) for p in parts if not isinstance(p.sigma, Tensor)}
    if len(values) == 1 and not any(isinstance(p.sigma, Tensor) for p in parts):
        return values.pop()
    return torch.cat(
        [p.sigma if isinstance(p.sigma, Tensor) else torch.full((len(p.levels),), float(p.sigma)) for p in parts]
    ).double()


def _merge(parts: Sequence[Degraded]) -> Degraded:
    """One batch of several (problem, level) parts, images in part order.

    Inpainting parts: one ``Inpainting`` with their masks stacked; denoising parts: one ``Denoising`` with one sigma
    per image; anything else (compressed sensing at several ``m``, several problems): a ``BatchBlocks`` batch, whose
    blocks are the parts (consecutive inpainting or denoising parts merged first).
    """
    if len(parts) == 1:
        return parts[0]
    groups: list[list[Degraded]] = []
    for p in parts:  # runs of inpainting / denoising parts become one block each
        if groups and p.problem in ("inpainting", "denoising") and groups[-1][0].problem == p.problem:
            groups[-1].append(p)
        else:
            groups.append([p])
    blocks = []
    for g in groups:
        if len(g) == 1:
            blocks.append(g[0])
            continue
        if g[0].problem == "inpainting":
            op: LinearOperator = Inpainting(torch.cat([_masks(p.op, len(p.levels)) for p in g]))
        else:
            op = Denoising()
        obs = None if any(p.observation is None for p in g) else torch.cat([p.observation for p in g])
        blocks.append(
            Degraded(g[0].problem, [lv for p in g for lv in p.levels], _sigmas(g), op, torch.cat([p.y for p in g]), obs)
        )
    sigma = _sigmas(blocks)
    problems = [pr for b in blocks for pr in b.problems]
    levels = [lv for b in blocks for lv in b.levels]
    if len(blocks) == 1:
        return blocks[0]
    shape = next((b.op.image_shape for b in blocks if b.op.image_shape is not None), tuple(blocks[0].y.shape[1:]))
    op = BatchBlocks([b.op for b in blocks], [len(b.levels) for b in blocks], image_shape=shape)
    y = op.pack([b.y for b in blocks])
    name = problems[0] if len(set(problems)) == 1 else "mixed"
    return Degraded(name, levels, sigma, op, y, None, problems)


def _masks(op: LinearOperator, n: int) -> Tensor:
    """The ``(n, C, H, W)`` masks of an inpainting operator (a shared mask repeated)."""
    assert isinstance(op, Inpainting)
    return op.mask if op.mask.shape[0] == n else op.mask.expand(n, -1, -1, -1)


@dataclass(frozen=True)
class Budget:
    """Iteration caps and Alg. 2.4 settings, the same for every problem and level.

    Paper / official code: ``n1 = 25, n2 = 150`` (§3.4), ``n_max = 300``, every JPMAP z-step at most 3000 Adam steps,
    CSGM's descent at most 5000, Alg. 2.4 at most ``k_max = 350`` outer iterations with ``rho = 100/d`` and
    ``beta0 = 0.1/gamma^2``. ``z_optimizer``: the paper's Adam, or ``"lm"`` (Levenberg-Marquardt on the same latent
    energies, same stopping rule; the caps then count its Jacobian evaluations).
    """

    n1: int = 25
    n2: int = 150
    n_max: int = 300
    adam_max_iters: int = 3000
    csgm_max_iters: int = 5000
    k_max: int = 350
    rho_d: float = 100.0
    beta0_gamma2: float = 0.1
    z_optimizer: str = "adam"  # the latent optimiser of CSGM and of JPMAP's z-steps: "adam" (the paper's) or "lm"

    def __post_init__(self) -> None:
        if self.z_optimizer not in ("adam", "lm"):
            raise ValueError(f"Budget.z_optimizer must be 'adam' or 'lm', got {self.z_optimizer!r}")
        for name in ("n1", "n2", "n_max", "adam_max_iters", "csgm_max_iters", "k_max"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"Budget.{name} must be an integer >= 0, got {v!r}")
        if self.csgm_max_iters < 1:
            raise ValueError(f"Budget.csgm_max_iters must be >= 1, got {self.csgm_max_iters}")
        if not self.n1 <= self.n2 <= self.n_max:
            raise ValueError(f"Alg. 2.3 needs n1 <= n2 <= n_max, got {self.n1}, {self.n2}, {self.n_max}")
        for name in ("rho_d", "beta0_gamma2"):
            v = float(getattr(self, name))
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"Budget.{name} must be a finite number > 0, got {v!r}")


def solver_call(
    method: str, y: Tensor, op: LinearOperator, vae, budget: Budget, *, alpha=None
) -> tuple[str, dict[str, Any]]:
    """The registry name (:data:`jpmap_core.solvers.SOLVERS`) and options of one of :data:`METHODS` under ``budget``:
    CSGM (``lambda = sigma^2``, the default), JPMAP Alg. 2.3 with ``beta = 1/gamma^2`` (``jpmap_fixed_beta``), or
    Alg. 2.4 with the method's ``alpha`` (``alpha`` overrides it, e.g. with a ``(B,)`` tensor of per-image values)."""
    lm = {} if budget.z_optimizer == "adam" else {"z_optimizer": budget.z_optimizer}  # adam: the solvers' default
    if method == "csgm":
        return "csgm", {"max_iters": budget.csgm_max_iters, **lm}
    common = {"n1": budget.n1, "n2": budget.n2, "n_max": budget.n_max, "adam_max_iters": budget.adam_max_iters, **lm}
    if method == "jpmap_fixed_beta":
        return "jpmap", common
    if method in ALPHAS:
        d = math.prod(y.shape[1:]) if op.d is None else op.d
        return "jpmap", dict(
            common, alpha=ALPHAS[method] if alpha is None else alpha, beta0=budget.beta0_gamma2 * vae.beta,
            rho=budget.rho_d / d, k_max=budget.k_max,
        )  # fmt: skip
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def solve(method: str, y: Tensor, op: LinearOperator, vae, sigma: float | Tensor, budget: Budget, *, alpha=None):
    """Restore a batch with ``method`` (one of :data:`METHODS`) under ``budget``, through the solver registry;
    returns the solver's Restoration. ``sigma``: a number or one per image (``(B,)``)."""
    name, options = solver_call(method, y, op, vae, budget, alpha=alpha)
    return run_solver(name, y, op, vae, sigma=sigma, **options)


def score(x: Tensor, ref: Tensor, *, with_lpips: bool) -> dict[str, Tensor]:
    """Per-image PSNR, SSIM and LPIPS of the restoration ``x`` **clamped to [0, 1]** (LPIPS NaN when not asked)."""
    xc = x.detach().clamp(0, 1)
    out = {"psnr": psnr(xc, ref).cpu(), "ssim": ssim(xc, ref).cpu()}
    if with_lpips:
        out["lpips"] = lpips(xc, ref).cpu()
    else:
        out["lpips"] = torch.full((x.shape[0],), math.nan)
    return out


@dataclass
class Record:
    """The restorations of one (problem, level, method), per image, with their metrics (all on the CPU)."""

    x: Tensor  # clamped to [0, 1]
    psnr: Tensor
    ssim: Tensor
    lpips: Tensor
    converged: Tensor
    outer_iterations: Tensor | None  # Alg. 2.4 only


@dataclass
class Benchmark:
    """Everything :func:`run_benchmark` computed."""

    x_true: Tensor
    levels: dict[str, list[float]]
    methods: list[str]
    budget: Budget
    records: dict[tuple[str, str, str], Record] = field(default_factory=dict)  # (problem, level_key, method)
    observations: dict[tuple[str, str], Tensor | None] = field(default_factory=dict)
    x0_psnr: dict[tuple[str, str], Tensor] = field(default_factory=dict)  # PSNR of x0 = A_dagger y (§3.4), clamped
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)  # {problem: {method: solver seconds}}
    calls: list[dict[str, Any]] = field(default_factory=list)  # every solver call: what it restored, its cost
    lpips_available: bool = False
    lpips_reason: str = ""

    @property
    def n_images(self) -> int:
        return int(self.x_true.shape[0])

    def record(self, problem: str, level: float, method: str) -> Record:
        return self.records[(problem, level_key(level), method)]


@dataclass
class _Solved:
    """What a solver call hands back (on the CPU): the restorations, clamped, and how each image stopped.

    ``cached``: loaded from the call cache instead of computed (``seconds`` are then those of the run that computed it).
    """

    x: Tensor
    converged: Tensor
    outer_iterations: Tensor | None
    seconds: float
    batched_steps: int
    cached: bool = False


@dataclass
class _Call:
    """One solver call of a run: ``method`` restores every image of ``batch``.

    ``method`` is one of :data:`METHODS`, or a tuple of Alg. 2.4 methods that share the call: ``batch`` then holds one
    block of images per method (:func:`_tile`) and ``jpmap`` gets a per-image ``alpha`` (:func:`_solve_call`).
    """

    batch: Degraded
    method: str | tuple[str, ...]

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods whose restorations the call computes, in the order of their blocks of images."""
        return self.method if isinstance(self.method, tuple) else (self.method,)

    @property
    def images(self) -> int:
        """The rows of the batch: images x (problem, level) parts x methods."""
        return len(self.batch.levels)


@dataclass(frozen=True)
class _Part:
    """The rows of a call's result that restore the images at one (problem, level) with one method."""

    problem: str
    level: float
    method: str
    rows: slice


def _tile(batch: Degraded, k: int) -> Degraded:
    """The batch repeated ``k`` times (images in blocks), per-image data included: one block per merged method."""
    op = batch.op
    if isinstance(op, Inpainting) and op.mask.shape[0] > 1:
        op = Inpainting(op.mask.repeat(k, 1, 1, 1))
    elif isinstance(op, BatchBlocks):
        op = BatchBlocks(op.ops * k, op.full_sizes * k, image_shape=op.image_shape)
    y = batch.y.repeat(k, *([1] * (batch.y.ndim - 1)))
    sigma = batch.sigma.repeat(k) if isinstance(batch.sigma, Tensor) else batch.sigma
    return Degraded(batch.problem, list(batch.levels) * k, sigma, op, y, None, list(batch.problems) * k)


def _solve_call(method: str | tuple[str, ...], batch: Degraded, vae, budget: Budget, device: torch.device) -> _Solved:
    """One solver call. ``method`` may be a tuple of Alg. 2.4 methods: then ``batch`` holds one block of images
    per method (:func:`_tile`) and one call of Alg. 2.4 with a per-image ``alpha`` restores them all."""
    t0 = time.perf_counter()
    if isinstance(method, tuple):
        n = len(batch.levels) // len(method)
        alpha = torch.tensor([ALPHAS[m] for m in method for _ in range(n)], dtype=torch.float64)
        r = solve("jpmap_alpha1", batch.y.to(device), batch.op, vae, batch.sigma, budget, alpha=alpha)
    else:
        r = solve(method, batch.y.to(device), batch.op, vae, batch.sigma, budget)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    outer = r.per_image.get("outer_iterations")
    return _Solved(
        x=r.x.detach().clamp(0, 1).cpu(),
        converged=r.converged.cpu(),
        outer_iterations=None if outer is None else outer.cpu(),
        seconds=time.perf_counter() - t0,
        batched_steps=int(r.info.get("batched_steps", 0)),
    )


_WORKER: dict[str, Any] = {}


def _worker_init(vae, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["vae"] = vae


def _worker_call(method: str | tuple[str, ...], batch: Degraded, budget: Budget) -> _Solved:
    return _solve_call(method, batch, _WORKER["vae"], budget, torch.device("cpu"))


def resolve_merge(merge: str, device: str | torch.device) -> str:
    """The merge mode ``"auto"`` stands for on ``device`` (see :func:`run_benchmark`), or ``merge``, checked."""
    if merge == "auto":
        return "levels" if torch.device(device).type == "cpu" else "all"
    if merge not in MERGE_MODES:
        raise ValueError(f"unknown merge {merge!r}; expected 'auto' or one of {MERGE_MODES}")
    return merge


#: the order in which a pool starts the calls: the longest first, so that the workers finish together
_COST_RANK = {"jpmap_alpha1": 0, "jpmap_alpha5": 1, "jpmap_alpha10": 2, "jpmap_fixed_beta": 3, "csgm": 4}


def run_benchmark(
    x: Tensor,
    vae,
    levels: Mapping[str, Sequence[float]],
    *,
    methods: Sequence[str] = METHODS,
    budget: Budget | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    merge: str = "auto",
    merge_alphas: bool = True,
    workers: int = 1,
    progress: bool = False,
    cache: str | os.PathLike | None = None,
) -> Benchmark:
    """Degrade the images ``x`` at every level of every problem in ``levels`` and restore them with every method.

    A solver call restores all images of its batch at once. ``merge`` (:data:`MERGE_MODES`) says which
    (problem, level) pairs share a batch: ``"none"`` (one call per level), ``"inpainting"`` (the inpainting levels
    together, one mask per image), ``"levels"`` (every problem's levels together: denoising with one sigma per
    image, compressed sensing as a ``BatchBlocks`` of its ``m``) or ``"all"`` (every problem and level in one
    batch); ``"auto"``: ``"all"`` on a GPU (fewest batched steps one after the other: a step of this small network
    should cost little more for 5000 images than for 100 there), ``"levels"`` on the CPU (9 calls that ``workers``
    processes share: the fastest mode on 2 cores, see ``benchmarks/RESULTS.md``). With ``merge_alphas`` the Alg. 2.4
    methods
    (``jpmap_alpha*``) share one call per batch, one block of images per alpha (``jpmap`` takes a per-image
    ``alpha``). A call's seconds are shared equally among its methods, and among its problems in proportion to
    their images. Each image keeps its own state, so merging changes no result (tested). Metrics are computed on
    the restorations clamped to [0, 1]. ``Benchmark.calls`` lists every call (problems, images, seconds, batched
    Adam steps, and whether it came from the cache).

    ``cache``: a folder where every finished call is saved (safetensors, written atomically) under a key made of
    everything that decides its result -- method, caps, measurements, sigma, operator, the prior's weights and the
    solver code (any change to ``solvers/``, ``models/``, ``energy.py`` or ``operators.py`` gives new keys). A run
    that is interrupted (stopped by hand, a time limit, a lost GPU) and started again computes only the calls it
    lacks; a cached call keeps the seconds it took when it ran.
    ``workers > 1`` (CPU only; ignored on other devices) runs the calls in that many processes with one torch
    thread each (the calls are independent, so the results are those of ``workers = 1``; ``Benchmark.seconds``
    then adds up the calls' own times, not the wall time). ``progress``: a ``tqdm.auto`` bar over the calls.

    Steps, in order: :func:`_new_benchmark` (the arguments checked), :func:`_degrade_levels` (measurements, Fig. 7
    observations, PSNR of ``x0``), :func:`_batches` (the parts merged as ``merge`` says), :func:`_plan_calls` (one
    call per batch and method), :func:`_run_calls` (each call loaded from the cache or computed) and
    :func:`_assemble` (scores, records, seconds).
    """
    budget = budget or Budget()
    _check_arguments(levels, methods, workers)
    x = x.detach().cpu()
    dev = torch.device(device)
    merge = resolve_merge(merge, dev)
    bench = _new_benchmark(x, levels, methods, budget)
    parts = _degrade_levels(bench, seed)
    calls = _plan_calls(_batches(parts, merge), bench.methods, merge_alphas)
    solved = _run_calls(calls, vae, budget, dev, workers=workers, cache=cache, progress=progress)
    _assemble(bench, calls, solved)
    return bench


# ---- the steps of run_benchmark, in order ---------------------------------------------------------------------
def _check_arguments(levels: Mapping[str, Sequence[float]], methods: Sequence[str], workers: int) -> None:
    """Refuse unknown methods and problems, and a number of workers that is not an integer >= 1."""
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {list(methods)}")
    unknown = [p for p in levels if p not in PROBLEMS]
    if unknown:
        raise ValueError(f"unknown problems {unknown}; expected keys among {PROBLEMS}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")


def _new_benchmark(
    x: Tensor, levels: Mapping[str, Sequence[float]], methods: Sequence[str], budget: Budget
) -> Benchmark:
    """An empty :class:`Benchmark` of the images ``x`` (CPU): the problems that have levels, in :data:`PROBLEMS`
    order, their levels checked (:func:`_check_level`, distinct), and whether LPIPS can be computed."""
    available, reason = lpips_status()
    checked = {p: [_check_level(p, lv) for lv in levels[p]] for p in PROBLEMS if p in levels and levels[p]}
    for problem, lvls in checked.items():
        if len({level_key(lv) for lv in lvls}) != len(lvls):
            raise ValueError(f"{problem} levels must be distinct, got {lvls}")
    return Benchmark(
        x_true=x, levels=checked, methods=list(methods), budget=budget, lpips_available=available, lpips_reason=reason
    )


def _degrade_levels(bench: Benchmark, seed: int) -> dict[str, list[Degraded]]:
    """The images degraded at every level of every problem (:func:`degrade`: each level draws from its own
    generator), one part per level; notes in ``bench`` each level's observation (Fig. 7) and the PSNR of
    ``x0 = A_dagger y`` clamped to [0, 1] (§3.4)."""
    parts: dict[str, list[Degraded]] = {}
    for problem, lvls in bench.levels.items():
        parts[problem] = [degrade(problem, lv, bench.x_true, seed) for lv in lvls]
        for lv, part in zip(lvls, parts[problem], strict=True):
            bench.observations[(problem, level_key(lv))] = part.observation
            bench.x0_psnr[(problem, level_key(lv))] = psnr(part.op.A_dagger(part.y).clamp(0, 1), bench.x_true)
    return parts


def _batches(parts: Mapping[str, Sequence[Degraded]], merge: str) -> list[Degraded]:
    """The batches of a run under a resolved ``merge`` mode (:func:`resolve_merge`), parts merged by :func:`_merge`:
    every part in one batch (``"all"``), one batch per problem (``"levels"``), the inpainting levels in one batch
    and every other part alone (``"inpainting"``), or every part alone (``"none"``)."""
    if merge == "all":
        everything = [p for ps in parts.values() for p in ps]
        return [_merge(everything)] if everything else []
    batches: list[Degraded] = []
    for problem, ps in parts.items():
        if merge == "levels" or (merge == "inpainting" and problem == "inpainting"):
            batches.append(_merge(ps))
        else:
            batches.extend(ps)
    return batches


def _plan_calls(batches: Sequence[Degraded], methods: Sequence[str], merge_alphas: bool) -> list[_Call]:
    """The solver calls, batch after batch: one per method; with ``merge_alphas`` and several Alg. 2.4 methods,
    those share one call on the batch tiled once per alpha (:func:`_tile`), after the other methods."""
    alpha_methods = tuple(m for m in methods if m in ALPHAS)
    grouped = merge_alphas and len(alpha_methods) > 1
    calls: list[_Call] = []
    for b in batches:
        calls += [_Call(b, m) for m in methods if not (grouped and m in ALPHAS)]
        if grouped:
            calls.append(_Call(_tile(b, len(alpha_methods)), alpha_methods))
    return calls


def _run_calls(
    calls: Sequence[_Call],
    vae,
    budget: Budget,
    device: torch.device,
    *,
    workers: int,
    cache: str | os.PathLike | None,
    progress: bool,
) -> list[_Solved]:
    """The result of every call, in ``calls`` order: loaded from the folder ``cache`` when it holds the call, else
    computed -- in ``workers`` processes on the CPU (:func:`_compute_in_processes`), else here on ``device`` -- and
    saved there as soon as it finishes (so that an interrupted run keeps what it finished)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(calls), desc="solver calls", disable=not progress)
    store = None if cache is None else CallCache(cache, vae)
    keys = [] if store is None else [_cache_key(store, call, budget) for call in calls]
    results: dict[int, _Solved] = {} if store is None else _load_finished(store, keys)
    bar.update(len(results))

    def done(i: int, out: _Solved) -> None:
        results[i] = out
        if store is not None:
            store.save(keys[i], *_cache_entry(calls[i], out))
        bar.update()

    todo = [i for i in range(len(calls)) if i not in results]
    if workers > 1 and device.type == "cpu" and len(todo) > 1:
        _compute_in_processes(calls, todo, vae, budget, workers, done)
    else:
        for i in todo:
            done(i, _solve_call(calls[i].method, calls[i].batch, vae, budget, device))
    bar.close()
    return [results[i] for i in range(len(calls))]


def _cache_key(store: CallCache, call: _Call, budget: Budget) -> str:
    """The call's key in the cache: everything that decides its result, by value. Changing what goes in here
    changes every key, and users' interrupted runs would no longer find their finished calls."""
    return store.key(call.method, sorted(vars(budget).items()), call.batch.sigma, call.batch.op, call.batch.y)


def _cache_entry(call: _Call, out: _Solved) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and metadata that :meth:`CallCache.save` writes for a finished call (:func:`_from_cache` reads
    them back)."""
    tensors = {"x": out.x, "converged": out.converged.to(torch.uint8)}
    if out.outer_iterations is not None:
        tensors["outer_iterations"] = out.outer_iterations
    return tensors, {"seconds": out.seconds, "batched_steps": out.batched_steps, "method": call.method}


def _from_cache(tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> _Solved:
    """A finished call as :func:`_cache_entry` saved it."""
    return _Solved(
        x=tensors["x"],
        converged=tensors["converged"].bool(),
        outer_iterations=tensors.get("outer_iterations"),
        seconds=float(meta["seconds"]),
        batched_steps=int(meta["batched_steps"]),
        cached=True,
    )


def _load_finished(store: CallCache, keys: Sequence[str]) -> dict[int, _Solved]:
    """``{index: result}`` of the calls (given by their keys) that the cache holds, readable."""
    found: dict[int, _Solved] = {}
    for i, key in enumerate(keys):
        hit = store.load(key)
        if hit is not None:
            found[i] = _from_cache(*hit)
    return found


def _start_rank(call: _Call) -> tuple[int, int]:
    """The order in which a pool starts the calls: the merged alphas, then by :data:`_COST_RANK`, larger first."""
    return (-1 if isinstance(call.method, tuple) else _COST_RANK[call.method], -call.images)


def _compute_in_processes(
    calls: Sequence[_Call],
    todo: Sequence[int],
    vae,
    budget: Budget,
    workers: int,
    done: Callable[[int, _Solved], None],
) -> None:
    """Compute the calls ``todo`` (indices into ``calls``) in ``workers`` fresh processes with one torch thread
    each, the longest first (:func:`_start_rank`); ``done(index, result)`` as each one finishes."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    order = sorted(todo, key=lambda i: _start_rank(calls[i]))
    ctx = mp.get_context("spawn")  # a clean interpreter: safe under Jupyter's threads, whatever the platform
    with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx, initializer=_worker_init,
                             initargs=(vae, 1)) as pool:  # fmt: skip
        futures = {pool.submit(_worker_call, calls[i].method, calls[i].batch, budget): i for i in order}
        for f in as_completed(futures):
            done(futures[f], f.result())


def _assemble(bench: Benchmark, calls: Sequence[_Call], solved: Sequence[_Solved]) -> None:
    """Fill ``bench`` from the results: each call's summary in ``bench.calls``, a scored :class:`Record` per
    (problem, level, method), and the calls' seconds per problem and method (:data:`METHODS` order)."""
    n = bench.n_images
    for call, out in zip(calls, solved, strict=True):
        bench.calls.append(_call_summary(call, out))
        s = score(out.x, bench.x_true.repeat(call.images // n, 1, 1, 1), with_lpips=bench.lpips_available)
        for part in _parts(call, n):
            seconds = bench.seconds.setdefault(part.problem, {})
            seconds.setdefault(part.method, 0.0)
            seconds[part.method] += out.seconds * n / call.images  # this part's share of the call
            bench.records[(part.problem, level_key(part.level), part.method)] = _record(out, s, part.rows)
    for problem in bench.seconds:  # METHODS order, whatever order the calls finished in
        bench.seconds[problem] = {m: bench.seconds[problem][m] for m in bench.methods}


def _call_summary(call: _Call, out: _Solved) -> dict[str, Any]:
    """A row of ``Benchmark.calls``: what the call restored and what it cost."""
    return {
        "methods": list(call.methods),
        "problems": sorted(set(call.batch.problems)),
        "images": call.images,
        "seconds": out.seconds,
        "batched_steps": out.batched_steps,
        "cached": out.cached,
    }


def _parts(call: _Call, n: int) -> list[_Part]:
    """The call's result cut into its (problem, level, method) parts of ``n`` rows each, in row order."""
    per_method = call.images // len(call.methods)
    return [
        _Part(call.batch.problems[j], call.batch.levels[j], call.methods[j // per_method], slice(j, j + n))
        for j in range(0, call.images, n)
    ]


def _record(out: _Solved, scores: Mapping[str, Tensor], rows: slice) -> Record:
    """The :class:`Record` of the rows ``rows`` of a call's result, with their scores."""
    return Record(
        x=out.x[rows],
        psnr=scores["psnr"][rows],
        ssim=scores["ssim"][rows],
        lpips=scores["lpips"][rows],
        converged=out.converged[rows],
        outer_iterations=None if out.outer_iterations is None else out.outer_iterations[rows],
    )


# ------------------------------------------------------------------------------------------------
# Tables and claims
# ------------------------------------------------------------------------------------------------
def _mean_se(v: Tensor) -> tuple[float | None, float | None]:
    """Mean and standard error (std with n - 1, over sqrt n) of the finite values; None where undefined."""
    v = v.detach().double().flatten()
    v = v[torch.isfinite(v)]
    n = v.numel()
    mean = float(v.mean()) if n else None
    se = float(v.std() / math.sqrt(n)) if n >= 2 else None
    return mean, se


def results_table(bench: Benchmark) -> list[dict[str, Any]]:
    """One row per (problem, level, method): ``problem, level, method, n_images, psnr_mean, psnr_se, ssim_mean,
    ssim_se, lpips_mean, lpips_se`` (LPIPS ``None`` when unavailable), ``converged_fraction`` (CSGM: Adam's
    stopping rule met; Alg. 2.3: tolerance met; Alg. 2.4: constraint ``||G(z) - x||^2 <= eps`` met) and
    ``outer_iterations_mean`` (Alg. 2.4)."""
    rows = []
    for problem, lvls in bench.levels.items():
        for lv in lvls:
            for method in bench.methods:
                rec = bench.record(problem, lv, method)
                pm, ps = _mean_se(rec.psnr)
                sm, ss = _mean_se(rec.ssim)
                lm, ls = _mean_se(rec.lpips)
                rows.append(
                    {
                        "problem": problem,
                        "level": lv,
                        "method": method,
                        "n_images": int(rec.psnr.numel()),
                        "psnr_mean": pm,
                        "psnr_se": ps,
                        "ssim_mean": sm,
                        "ssim_se": ss,
                        "lpips_mean": lm,
                        "lpips_se": ls,
                        "converged_fraction": float(rec.converged.float().mean()),
                        "outer_iterations_mean": None
                        if rec.outer_iterations is None
                        else float(rec.outer_iterations.float().mean()),
                    }
                )
    return rows


def win_fraction(
    bench: Benchmark, method: str = "jpmap_fixed_beta", baseline: str = "csgm", metric: str = "psnr"
) -> dict[str, dict[str, float]]:
    """``{problem: {level_key: fraction of images where method's metric is strictly higher than baseline's}}``."""
    out: dict[str, dict[str, float]] = {}
    for problem, lvls in bench.levels.items():
        out[problem] = {}
        for lv in lvls:
            a = getattr(bench.record(problem, lv, method), metric)
            b = getattr(bench.record(problem, lv, baseline), metric)
            out[problem][level_key(lv)] = float((a > b).double().mean())
    return out


def psnr_gain(
    bench: Benchmark, method: str = "jpmap_fixed_beta", baseline: str = "csgm"
) -> dict[str, dict[str, float]]:
    """``{problem: {level_key: mean over images of PSNR(method) - PSNR(baseline)}}`` in dB."""
    out: dict[str, dict[str, float]] = {}
    for problem, lvls in bench.levels.items():
        out[problem] = {}
        for lv in lvls:
            d = bench.record(problem, lv, method).psnr - bench.record(problem, lv, baseline).psnr
            out[problem][level_key(lv)] = float(d.double().mean())
    return out


def pooled_win_fraction(bench: Benchmark, method: str = "jpmap_fixed_beta", baseline: str = "csgm") -> dict:
    """Fraction of (image, level) pairs where ``method`` has the higher PSNR: per problem and over all problems."""
    wins, total, out = 0, 0, {}
    for problem, lvls in bench.levels.items():
        w = sum(
            int((bench.record(problem, lv, method).psnr > bench.record(problem, lv, baseline).psnr).sum())
            for lv in lvls
        )
        t = bench.n_images * len(lvls)
        out[problem] = w / t
        wins, total = wins + w, total + t
    out["all"] = wins / total if total else math.nan
    return out


def ill_posed_trend(gain: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Per problem: the gain at the most ill-posed level minus the gain at the least ill-posed one (> 0: the gap
    grows with ill-posedness, as §3.4 says); problems with a single level are left out."""
    out = {}
    for problem, by_level in gain.items():
        if len(by_level) < 2:
            continue
        ordered = sorted(by_level, key=lambda k: ILL_POSED_DIRECTION[problem] * float(k))
        out[problem] = by_level[ordered[-1]] - by_level[ordered[0]]
    return out


def claims(bench: Benchmark) -> dict[str, Any]:
    """The numbers behind §3.4's claims, for metrics.json (keys without dots, so reference checks can reach them).

    * ``jpmap_win_fraction``: ``{problem: {level_key: fraction}}`` of images where JPMAP (beta = 1/gamma^2) has a
      higher PSNR than CSGM; ``win_fraction_vs_csgm``: the same for every JPMAP variant ``{method: {...}}``;
    * ``jpmap_win_fraction_pooled``: the same pooled over the levels of each problem, and over all (``all``);
      ``win_fraction_pooled_vs_csgm``: that for every JPMAP variant;
    * ``psnr_gain_vs_csgm``: mean PSNR difference (dB) ``{method: {problem: {level_key: dB}}}``;
    * ``psnr_gain_trend``: per problem, JPMAP's (fixed beta) gain over CSGM at the most ill-posed level minus
      that at the least ill-posed one (> 0: the gap grows with ill-posedness);
    * ``psnr_drops_with_ill_posedness``: per problem, the fraction of methods whose mean PSNR is lower at the most
      ill-posed level than at the least ill-posed one;
    * ``min_psnr_gain_over_x0``: the smallest mean gain (dB) of any method at any level over ``x0 = A_dagger y``;
    * ``alg24_constraint_met_fraction``: per Alg. 2.4 method, the fraction of (image, level) pairs that met
      ``||G(z) - x||^2 <= eps`` within ``k_max`` outer iterations.
    """
    jp = [m for m in bench.methods if m != "csgm"]
    out: dict[str, Any] = {}
    if "csgm" in bench.methods and "jpmap_fixed_beta" in bench.methods:
        gain = psnr_gain(bench)
        out["jpmap_win_fraction"] = win_fraction(bench)
        out["jpmap_win_fraction_pooled"] = pooled_win_fraction(bench)
        out["psnr_gain_trend"] = ill_posed_trend(gain)
    if "csgm" in bench.methods:
        out["win_fraction_vs_csgm"] = {m: win_fraction(bench, m) for m in jp}
        out["win_fraction_pooled_vs_csgm"] = {m: pooled_win_fraction(bench, m) for m in jp}
        out["psnr_gain_vs_csgm"] = {m: psnr_gain(bench, m) for m in jp}
    drops = {}
    for problem, lvls in bench.levels.items():
        if len(lvls) < 2:
            continue
        ordered = sorted(lvls, key=lambda lv: ILL_POSED_DIRECTION[problem] * float(lv))
        easy, hard = ordered[0], ordered[-1]
        lower = [
            float(bench.record(problem, hard, m).psnr.mean()) < float(bench.record(problem, easy, m).psnr.mean())
            for m in bench.methods
        ]
        drops[problem] = sum(lower) / len(lower)
    out["psnr_drops_with_ill_posedness"] = drops
    out["min_psnr_gain_over_x0"] = min(
        float((bench.record(p, lv, m).psnr - bench.x0_psnr[(p, level_key(lv))]).mean())
        for p, lvls in bench.levels.items()
        for lv in lvls
        for m in bench.methods
    )
    pairs = [(p, lv) for p, lvls in bench.levels.items() for lv in lvls]
    out["alg24_constraint_met_fraction"] = {
        m: float(torch.cat([bench.record(p, lv, m).converged.float() for p, lv in pairs]).mean())
        for m in bench.methods
        if m in ALPHAS
    }
    return out


def _fmt(v: float | None, digits: int) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def table_markdown(rows: Sequence[Mapping[str, Any]], wins: Mapping[str, Mapping[str, float]] | None = None) -> str:
    """A markdown table of the rows: mean +/- standard error of PSNR, SSIM and LPIPS per method and level; with
    ``wins`` (from :func:`win_fraction`), the fraction of images where JPMAP (fixed beta) beats CSGM in PSNR."""
    head = ["problem", "level", "method", "n", "PSNR (dB)", "SSIM", "LPIPS", "converged"]
    if wins is not None:
        head.append("JPMAP > CSGM")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for r in rows:
        lv = f"{100 * r['level']:g}%" if r["problem"] == "inpainting" else f"{r['level']:g}"
        cells = [
            r["problem"],
            lv,
            r["method"],
            str(r["n_images"]),
            f"{_fmt(r['psnr_mean'], 2)} ± {_fmt(r['psnr_se'], 2)}",
            f"{_fmt(r['ssim_mean'], 3)} ± {_fmt(r['ssim_se'], 3)}",
            "unavailable" if r["lpips_mean"] is None else f"{_fmt(r['lpips_mean'], 3)} ± {_fmt(r['lpips_se'], 3)}",
            f"{r['converged_fraction']:.2f}",
        ]
        if wins is not None:
            cells.append(f"{wins[r['problem']][level_key(r['level'])]:.2f}" if r["method"] == "csgm" else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


CSV_COLUMNS = (
    "problem", "level", "method", "n_images", "psnr_mean", "psnr_se", "ssim_mean", "ssim_se", "lpips_mean",
    "lpips_se", "converged_fraction", "outer_iterations_mean", "jpmap_fixed_beta_win_fraction",
)  # fmt: skip


def write_csv(
    rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, wins: Mapping[str, Mapping[str, float]] | None = None
) -> Path:
    """Write the table atomically as CSV (empty cells for unavailable values); ``wins`` fills the last column on
    the CSGM rows (the fraction of images where JPMAP with fixed beta has the higher PSNR)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        row = {k: r.get(k) for k in CSV_COLUMNS}
        row["jpmap_fixed_beta_win_fraction"] = (
            wins[r["problem"]][level_key(r["level"])] if wins is not None and r["method"] == "csgm" else None
        )
        w.writerow({k: "" if v is None or (isinstance(v, float) and math.isnan(v)) else v for k, v in row.items()})
    return atomic_write_text(Path(path), buf.getvalue())


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------
def _x_values(problem: str, levels: Sequence[float]) -> list[float]:
    return [100 * float(lv) for lv in levels] if problem == "inpainting" else [float(lv) for lv in levels]


def lpips_panel_text(reason: str | None) -> str:
    """The one short line an LPIPS panel without values shows, free of the machine's paths.

    ``reason`` is :func:`~jpmap_core.metrics.lpips_status`'s full reason (paths, URL, what to do), which stays in
    ``metrics.json``; the panel keeps its first clause, and for missing AlexNet weights points to data/README.md.
    """
    text = (reason or "").strip()
    if "AlexNet weights not" in text:
        return "LPIPS unavailable: AlexNet weights not found offline; see data/README.md"
    text = text.split(" (")[0].split("; ")[0].split(" -- ")[0].strip()  # the first clause: no path, no instructions
    if not text.startswith("LPIPS unavailable"):
        text = f"LPIPS unavailable: {text}" if text else "LPIPS unavailable"
    return text


def plot_sweeps(
    rows: Sequence[Mapping[str, Any]],
    *,
    lpips_reason: str | None = None,
    z: float = 1.96,
    methods: Sequence[str] = METHODS,
    problems: Sequence[str] | None = None,
):
    """Fig. 6: one row per problem, columns PSNR, LPIPS (the paper's panels (a)-(f)) and SSIM (g)-(i), against the
    degradation level: mean over the images with a band of ``mean +/- z * standard error``.

    An LPIPS panel whose rows hold no value shows ``lpips_reason`` instead of a curve.
    """
    import matplotlib.pyplot as plt

    from ..plotting import setup_style

    setup_style()
    problems = [p for p in (problems or PROBLEMS) if any(r["problem"] == p for r in rows)]
    fig, axes = plt.subplots(len(problems), 3, figsize=(13, 3.3 * len(problems)), squeeze=False)
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    markers = dict(zip(METHODS, "os^Dv", strict=True))
    metrics = (("psnr", "PSNR (dB), higher is better"), ("lpips", "LPIPS, lower is better"), ("ssim", "SSIM"))
    for i, problem in enumerate(problems):
        for j, (metric, ylabel) in enumerate(metrics):
            ax = axes[i][j]
            k = PROBLEMS.index(problem)  # the paper's panel letters, whichever problems ran
            letter = "abcdef"[2 * k + j] if j < 2 else "ghi"[k]
            ax.set_title(f"({letter}) {PROBLEM_LABELS[problem]} ({metric.upper()})", loc="left")
            ax.set_xlabel(LEVEL_AXIS[problem])
            ax.set_ylabel(ylabel)
            drawn = False
            for method in methods:
                sel = [r for r in rows if r["problem"] == problem and r["method"] == method]
                sel = [r for r in sel if r[f"{metric}_mean"] is not None]
                if not sel:
                    continue
                sel.sort(key=lambda r: float(r["level"]))
                xs = _x_values(problem, [r["level"] for r in sel])
                mean = [r[f"{metric}_mean"] for r in sel]
                se = [r[f"{metric}_se"] if r[f"{metric}_se"] is not None else math.nan for r in sel]
                ax.plot(xs, mean, marker=markers[method], color=colors[method], label=METHOD_LABELS[method], lw=1.4)
                lo = [m - z * s for m, s in zip(mean, se, strict=True)]
                hi = [m + z * s for m, s in zip(mean, se, strict=True)]
                ax.fill_between(xs, lo, hi, color=colors[method], alpha=0.15, lw=0)
                ax.set_xticks(xs)
                drawn = True
            if not drawn and metric == "lpips":
                text = lpips_panel_text(lpips_reason)
                ax.text(
                    0.5, 0.5, "\n".join(textwrap.wrap(text, 48)), ha="center", va="center", fontsize=7,
                    transform=ax.transAxes, wrap=True,
                )  # fmt: skip
                ax.set_xticks([])
                ax.set_yticks([])
            if problem == "compressed_sensing" and drawn:
                ax.invert_xaxis()  # fewer measurements (more ill-posed) to the right, as the other problems
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(handles), bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def nearest_level(levels: Sequence[float], wanted: float) -> float:
    """The level of ``levels`` closest to ``wanted`` (``wanted`` itself when it ran): Fig. 7 needs a level that ran."""
    if not levels:
        raise ValueError("no levels ran for this problem")
    return min(levels, key=lambda lv: (abs(float(lv) - float(wanted)), float(lv)))


FIG7_METHODS = ("csgm", "jpmap_fixed_beta", "jpmap_alpha10", "jpmap_alpha5", "jpmap_alpha1")


def qualitative_grid(
    bench: Benchmark, problem: str, level: float, n_show: int, *, show_psnr: bool = True, title: str | None = None
):
    """Fig. 7: columns = the first ``n_show`` test images; rows = ``x*``, the observation (not for compressed
    sensing), CSGM, JPMAP (beta = 1/gamma^2), JPMAP alpha = 10, 5, 1 (the methods that ran), PSNR (dB) above each.
    ``title``: a heading above the grid."""
    from ..plotting import image_grid

    k = min(int(n_show), bench.n_images)
    rows, labels = [bench.x_true[:k]], [r"$x^*$"]
    obs = bench.observations[(problem, level_key(level))]
    if obs is not None:
        rows.append(obs[:k])
        labels.append("$y$" if problem == "denoising" else r"$A^\top y$")
    shown = [m for m in FIG7_METHODS if m in bench.methods]
    for m in shown:
        rows.append(bench.record(problem, level, m).x[:k])
        labels.append(METHOD_LABELS[m].replace("JPMAP ", "JPMAP\n"))
    fig = image_grid(rows, labels, scale=1.15)
    if show_psnr:
        first = len(rows) - len(shown)
        for i, m in enumerate(shown):
            p = bench.record(problem, level, m).psnr
            for j in range(k):
                fig.axes[(first + i) * k + j].set_title(f"{float(p[j]):.1f}", fontsize=7, pad=1)
        fig.subplots_adjust(hspace=0.28)
    if title:
        fig.suptitle(title, y=0.93 if show_psnr else 0.92)
    return fig
