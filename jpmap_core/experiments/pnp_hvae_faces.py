r"""Face restoration with PnP-HVAE (Prost, Houdard, Almansa, Papadakis, ICCV 2023, §6.1, Table 1 and Fig. 3).

**The paper's experiment.** §6.1 restores 100 CelebA faces with the VDVAE prior trained on FFHQ (66 latent groups,
256x256): super-resolution x4 (a Gaussian low-pass filter, x4 sub-sampling, noise std ``sigma = 3`` on the 0-255
scale), motion deblurring and Gaussian deblurring (``sigma = 8``), and inpainting (Fig. 3). Table 1 reports PSNR,
SSIM, LPIPS and seconds per image of PnP-HVAE (Algorithm 2), of the Adam baseline on the same ``J1`` (eq. 15, §5.3),
of ILO (StyleGAN2) and of DPS (a diffusion model). Its claims: PnP-HVAE has the best PSNR and SSIM on every task; it
is "consistent with the degraded observation" where Adam and ILO are less so; it is faster than Adam.

**Here** (notebook 10): the same tasks on CelebA 64x64 test faces (and FFHQ faces resized to 64, out of
distribution) with the 7-group face HVAE ``celeba64_hvae`` trained on 4,560 CelebA training faces, four latent
methods on the same degraded faces: ``pnp_hvae`` (:func:`~jpmap_core.solvers.pnp_hvae.pnp_hvae`), ``adam_j1``
(:func:`~jpmap_core.solvers.pnp_hvae.adam_j1`, same prior, same ``J1``, same ``tau``), and JPMAP (Alg. 2.3, fixed
``beta = 1/gamma^2``) and CSGM with the convolutional VAE ``celeba64_conv_dvae15`` of notebook 07, through
:func:`~jpmap_core.experiments.mnist_benchmark.solve` under a :class:`~jpmap_core.experiments.mnist_benchmark.Budget`.
ILO and DPS need StyleGAN2 / diffusion weights that this project does not have (:data:`UNAVAILABLE`).

**Settings per task** (:data:`PAPER_TASKS`), from the official configs (github.com/jprost76/PnP-HVAE, ``conf/exp/``):

* ``sr4`` (``face_sr.yaml``): kernel ``pnphvae_kernels12/4.npy`` (the isotropic Gaussian of std 2.0 px, the config's
  low-pass), factor 4, ``sigma = 3``, ``tau`` linear from 0.8 (coarsest group) to 0.5 (finest), decoder std 5/255,
  at most 50 iterations, plateau rule ``tol = 1e-3``, ``patience = 10``;
* ``deblur_motion`` (``face_deblurring.yaml``): kernel ``9.npy`` (the motion kernel of that config), ``sigma = 8``,
  ``tau`` linear 0.99 -> 0.8, decoder std 5/255, 50 iterations, ``tol = 1e-3``, ``patience = 10``;
* ``deblur_gaussian`` (no official config; Table 1 row "Deblurring (Gaussian)"): kernel ``4.npy`` (the largest
  isotropic Gaussian of the set, the one the SR config uses), otherwise as motion deblurring;
* ``inpainting`` (``face_inpainting.yaml``): ``sigma = 3``, ``tau = 0.5`` on every group, decoder std 10/255, at most
  100 iterations, ``tol = 1e-5``, ``patience = 50``. The official mask (one hand-drawn mask per image) is not public
  for CelebA test faces; the rule here: seeded elliptical blobs (:func:`~jpmap_core.operators.blob_masks`) with
  semi-axes 8-16% of the side (5-10 px on 64x64) until 25% of the pixels are hidden, one mask per face.

The official kernels are 25x25 for 256x256 faces; on 64x64 faces the same kernels blur four times as much of the face
(a difference from the paper that the notebook states). Every degradation draws from a ``torch.Generator`` seeded by
the notebook seed, the dataset and the task (:func:`task_seed`): the operator (mask), then the noise.

**Scores** (:func:`table_rows`, :func:`claims`): PSNR, SSIM (LPIPS where its weights are installed, else ``None``) of
the restorations clamped to [0, 1]; the data-fit ratio ``||A x - y|| / (sigma sqrt(m))`` (1 for an estimate that
fits ``y`` up to the noise, the truth's is about 1, below 1 for one that fits the noise too; ``m`` measurements per
face, the observed pixels for inpainting), and the seconds per face of one
batched solver call per method and task on the machine that ran it.
"""

from __future__ import annotations

import math
import os
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..cache import CallCache
from ..metrics import psnr
from ..models.hvae import linear_temperature
from ..operators import BlurFFT, Inpainting, LinearOperator, SuperResolution, blob_masks
from ..solvers.pnp_hvae import adam_j1, initial_x, pnp_hvae
from . import mnist_benchmark as mb

__all__ = [
    "HVAE_METHODS",
    "LABELS",
    "METHODS",
    "PAPER_TABLE1",
    "PAPER_TASKS",
    "TABLE_KEYS",
    "Task",
    "TaskRun",
    "UNAVAILABLE",
    "VAE_METHODS",
    "claims",
    "figure3",
    "markdown_table",
    "median_face",
    "restore_task",
    "table_rows",
    "task_grid",
    "task_seed",
    "win_counts",
]

#: methods on the hierarchical prior (``celeba64_hvae``) and on the convolutional VAE (``celeba64_conv_dvae15``)
HVAE_METHODS = ("pnp_hvae", "adam_j1")
VAE_METHODS = ("jpmap", "csgm")
METHODS = HVAE_METHODS + VAE_METHODS
LABELS = {"pnp_hvae": "PnP-HVAE", "adam_j1": "Adam on $J_1$", "jpmap": "JPMAP", "csgm": "CSGM"}
#: the registry names of :mod:`~jpmap_core.experiments.mnist_benchmark` for the VAE methods
_MB_NAMES = {"jpmap": "jpmap_fixed_beta", "csgm": "csgm"}
#: Table 1's methods this project cannot run, and why
UNAVAILABLE = {
    "ilo": "ILO (Daras et al. 2021) optimises a StyleGAN2 generator trained on FFHQ 256x256; no StyleGAN2 weights are "
    "available offline here",
    "dps": "DPS (Chung et al. 2023) samples with a pretrained FFHQ diffusion model (1000 steps); no diffusion weights "
    "are available offline here",
}
#: the keys of one row of :func:`table_rows`
TABLE_KEYS = (
    "dataset", "task", "method", "n_images", "psnr_mean", "psnr_se", "ssim_mean", "ssim_se", "lpips_mean",
    "seconds_per_image", "residual_ratio_mean", "iterations_mean", "converged_fraction", "psnr_reconstruction_mean",
    "ssim_reconstruction_mean",
)  # fmt: skip
#: Table 1 of the paper (PSNR, SSIM, LPIPS, seconds) for the two methods this notebook can run
PAPER_TABLE1 = {
    ("sr4", "adam_j1"): (28.56, 0.75, 0.38, 26),
    ("sr4", "pnp_hvae"): (29.32, 0.82, 0.28, 15),
    ("deblur_motion", "adam_j1"): (26.69, 0.75, 0.27, 12),
    ("deblur_motion", "pnp_hvae"): (30.40, 0.84, 0.16, 10),
    ("deblur_gaussian", "adam_j1"): (30.17, 0.83, 0.21, 12),
    ("deblur_gaussian", "pnp_hvae"): (30.81, 0.86, 0.24, 10),
}
#: semi-axes of the inpainting blobs, as fractions of the image side (5-10 px on 64x64 faces)
INPAINTING_AXES = (0.08, 0.16)


def task_seed(seed: int, *names: str) -> int:
    """A seed per (notebook seed, names): stable across runs and Python versions (crc32, not ``hash``)."""
    return (int(seed) * 1_000_003 + zlib.crc32("/".join(names).encode())) % (2**31 - 1)


@dataclass(frozen=True)
class Task:
    """One row group of Table 1 (or Fig. 3's inpainting): the degradation and PnP-HVAE's official settings.

    ``kernel``: file number in ``kernels/pnphvae_kernels12`` (``load_kernels("pnphvae12")[kernel - 1]``);
    ``tau``: ``(coarsest, finest)`` of the linear schedule (:func:`~jpmap_core.models.hvae.linear_temperature`);
    ``decoder_std``: the ``gamma`` of the x-step on the 0-255 scale (the configs' ``decoder_std``).
    """

    key: str
    label: str
    problem: str  # "super_resolution", "blur" or "inpainting"
    sigma: float
    kernel: int | None = None
    factor: int | None = None
    coverage: float | None = None
    tau: tuple[float, float] = (0.8, 0.8)
    decoder_std: float = 5.0
    max_iters: int = 50
    patience: int = 10
    tol: float = 1e-3

    def __post_init__(self) -> None:
        if self.problem not in ("super_resolution", "blur", "inpainting"):
            raise ValueError(f"problem must be super_resolution, blur or inpainting, got {self.problem!r}")
        if (self.problem == "inpainting") == (self.kernel is not None):
            raise ValueError(f"task {self.key!r}: blur and super-resolution need a kernel, inpainting none")
        if self.problem == "super_resolution" and not self.factor:
            raise ValueError(f"task {self.key!r}: super-resolution needs a factor")
        if self.problem == "inpainting" and not (self.coverage and 0 < self.coverage < 1):
            raise ValueError(f"task {self.key!r}: inpainting needs a coverage in (0, 1), got {self.coverage!r}")
        if not all(0 < t <= 1 for t in self.tau):
            raise ValueError(f"task {self.key!r}: temperatures must lie in (0, 1], got {self.tau}")

    def temperature(self, n_groups: int) -> list[float]:
        """``tau_l`` per latent group: linear from ``tau[0]`` (coarsest) to ``tau[1]`` (finest)."""
        return linear_temperature(self.tau[0], self.tau[1], n_groups)

    def degrade(
        self, x: Tensor, *, kernels: Sequence[Tensor] | None, seed: int, dataset: str
    ) -> tuple[LinearOperator, Tensor]:
        """``(op, y)`` for the clean faces ``x`` ``(B, C, H, W)``: the operator (inpainting: one blob mask per face,
        drawn first), then ``y = A x + sigma/255 n``, all from one generator seeded by ``(seed, dataset, key)``."""
        if x.ndim != 4:
            raise ValueError(f"x must be (B, C, H, W) faces, got shape {tuple(x.shape)}")
        g = torch.Generator().manual_seed(task_seed(seed, dataset, self.key))
        shape = tuple(int(s) for s in x.shape[1:])
        if self.problem == "inpainting":
            op: LinearOperator = Inpainting(blob_masks(shape, self.coverage, x.shape[0], g, axes=INPAINTING_AXES))
        else:
            if kernels is None or not 1 <= int(self.kernel) <= len(kernels):
                n = None if kernels is None else len(kernels)
                raise ValueError(f"task {self.key!r} needs kernel file {self.kernel}.npy; got {n} kernels")
            k = kernels[int(self.kernel) - 1]
            op = BlurFFT(k, shape) if self.problem == "blur" else SuperResolution(k, int(self.factor), shape)
        return op, op.degrade(x, self.sigma, generator=g)


PAPER_TASKS = {
    "sr4": Task("sr4", r"SR $\times 4$, $\sigma = 3$", "super_resolution", 3.0, kernel=4, factor=4, tau=(0.8, 0.5)),
    "deblur_motion": Task("deblur_motion", r"Deblurring (motion), $\sigma = 8$", "blur", 8.0, kernel=9,
                          tau=(0.99, 0.8)),
    "deblur_gaussian": Task("deblur_gaussian", r"Deblurring (Gaussian), $\sigma = 8$", "blur", 8.0, kernel=4,
                            tau=(0.99, 0.8)),
    "inpainting": Task("inpainting", r"Inpainting (25% blobs), $\sigma = 3$", "inpainting", 3.0, coverage=0.25,
                       tau=(0.5, 0.5), decoder_std=10.0, max_iters=100, patience=50, tol=1e-5),
}  # fmt: skip


@dataclass
class TaskRun:
    """Everything :func:`restore_task` computed for one (dataset, task); tensors on the CPU, one entry per face."""

    dataset: str
    source: str
    task: Task
    names: list[str]
    x_true: Tensor
    observation: Tensor  # what a figure shows as y (nearest-neighbour upsampled for super-resolution)
    x0: Tensor  # the back-projection PnP-HVAE starts from (y, or bicubic y), clamped
    x0_psnr: Tensor
    truth_residual: Tensor  # ||A x* - y|| / (sigma sqrt(m)): the noise itself
    tau: list[float]
    x: dict[str, Tensor] = field(default_factory=dict)  # method -> restoration clamped to [0, 1]
    scores: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # method -> {psnr, ssim, lpips}
    residual: dict[str, Tensor] = field(default_factory=dict)  # method -> ||A x - y|| / (sigma sqrt(m))
    iterations: dict[str, Tensor] = field(default_factory=dict)
    converged: dict[str, Tensor] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # method -> seconds of its solver calls
    cached_chunks: dict[str, int] = field(default_factory=dict)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> solver options used
    #: PnP-HVAE's HVAE(x_n, tau), what the official code saves (``muk``), clamped; its PSNR and SSIM
    reconstruction: Tensor | None = None
    reconstruction_scores: dict[str, Tensor] = field(default_factory=dict)

    @property
    def n_images(self) -> int:
        return int(self.x_true.shape[0])


def _residual_ratio(op: LinearOperator, x: Tensor, y: Tensor, sigma: float) -> Tensor:
    """``||A x - y|| / (sigma sqrt(m))`` per face; for inpainting over the ``m`` observed entries only (``y`` holds
    pure noise where pixels are missing, which no estimate can fit)."""
    r = op.A(x) - y
    if isinstance(op, Inpainting):
        mask = op.mask.expand_as(r)
        return (mask * r).flatten(1).norm(dim=1) / (sigma / 255 * mask.flatten(1).sum(dim=1).sqrt())
    return r.flatten(1).norm(dim=1) / (sigma / 255 * math.sqrt(y[0].numel()))


def _observation(op: LinearOperator, y: Tensor, shape: Sequence[int]) -> Tensor:
    if isinstance(op, SuperResolution):
        return y.repeat_interleave(op.factor, dim=-2).repeat_interleave(op.factor, dim=-1)
    return y if tuple(y.shape[1:]) == tuple(shape) else op.A_adjoint(y)


def hvae_options(task: Task, n_groups: int, *, max_iters: int | None = None, lr: float = 0.01) -> dict[str, Any]:
    """Options of :func:`pnp_hvae` (and, with ``lr``, of :func:`adam_j1`) for ``task``: its temperature schedule,
    decoder std and plateau rule; ``max_iters`` caps the task's iteration count (``None``: the official one)."""
    n = task.max_iters if max_iters is None else min(int(max_iters), task.max_iters)
    return {"tau": task.temperature(n_groups), "max_iters": n, "tol": task.tol, "patience": task.patience,
            "gamma": task.decoder_std / 255}  # fmt: skip


def _solve(method: str, y: Tensor, op: LinearOperator, prior: Any, task: Task, budget: mb.Budget,
           hopts: dict[str, Any], lr: float) -> Any:  # fmt: skip
    if method == "pnp_hvae":
        return pnp_hvae(y, op, prior, sigma=task.sigma, **hopts)
    if method == "adam_j1":
        return adam_j1(y, op, prior, sigma=task.sigma, lr=lr, **hopts)
    return mb.solve(_MB_NAMES[method], y, op, prior, task.sigma, budget)


def _rows(op: LinearOperator, rows: slice, n: int) -> LinearOperator:
    if isinstance(op, Inpainting):
        return Inpainting(op.mask[rows]) if op.mask.shape[0] == n else op
    return op  # blur and super-resolution: one kernel for every face


def restore_task(
    x_true: Tensor,
    task: Task,
    *,
    hvae: Any,
    vae: Any | None,
    dataset: str,
    source: str = "",
    names: Sequence[str] | None = None,
    kernels: Sequence[Tensor] | None = None,
    budget: mb.Budget | None = None,
    max_iters: int | None = None,
    lr: float = 0.01,
    methods: Sequence[str] = METHODS,
    seed: int = 0,
    with_lpips: bool = False,
    chunk: int | None = None,
    cache: str | os.PathLike | None = None,
) -> TaskRun:
    """Degrade ``x_true`` (``(B, 3, H, W)`` in [0, 1], CPU) by ``task`` and restore it with every method, one batched
    solver call per method (per ``chunk`` faces when given; each face keeps its own state), then score.

    ``hvae``: the hierarchical prior of ``pnp_hvae`` and ``adam_j1`` (with ``task``'s temperatures, decoder std and
    plateau rule, at most ``max_iters`` iterations; Adam with learning rate ``lr``, 0.01 as the official
    ``config.yaml``); ``vae``: the Gaussian VAE of ``jpmap`` and ``csgm`` under ``budget`` (required when one of them
    is asked). ``cache``: a folder of finished calls (:class:`~jpmap_core.cache.CallCache`, keyed by the prior's
    weights, the method, its options, the operator and ``y``), so that a stopped run resumes; a cached call keeps
    the seconds it took. The solvers run on each prior's device (``y`` is moved there); results come back to the CPU.
    """
    if x_true.ndim != 4 or x_true.shape[0] < 1:
        raise ValueError(f"x_true must be (B, C, H, W) faces with B >= 1, got shape {tuple(x_true.shape)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; expected some of {METHODS}")
    if any(m in VAE_METHODS for m in methods) and (vae is None or budget is None):
        raise ValueError("jpmap and csgm need a Gaussian VAE prior (vae=...) and a budget (mb.Budget)")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive number of faces per call, or None (all at once), got {chunk!r}")
    n = x_true.shape[0]
    names = list(names) if names is not None else [str(i) for i in range(n)]
    if len(names) != n:
        raise ValueError(f"names has {len(names)} entries for {n} faces")
    op, y = task.degrade(x_true, kernels=kernels, seed=seed, dataset=dataset)
    x0 = initial_x(y, op, "official").clamp(0, 1)
    hopts = hvae_options(task, hvae.n_groups, max_iters=max_iters)
    run = TaskRun(
        dataset, source, task, names, x_true, _observation(op, y, x_true.shape[1:]).clamp(0, 1), x0,
        psnr(x0, x_true), _residual_ratio(op, x_true, y, task.sigma), hopts["tau"],
    )  # fmt: skip
    step = n if chunk is None else chunk
    for m in methods:
        prior = hvae if m in HVAE_METHODS else vae
        if m in HVAE_METHODS:
            run.options[m] = dict(hopts, lr=lr) if m == "adam_j1" else dict(hopts)
        else:
            run.options[m] = dict(vars(budget))
        store = None if cache is None else CallCache(cache, prior)
        parts: list[dict[str, Tensor]] = []
        run.seconds[m], run.cached_chunks[m] = 0.0, 0
        for lo in range(0, n, step):
            rows = slice(lo, min(lo + step, n))
            op_r, y_r = _rows(op, rows, n), y[rows]
            key = hit = None
            if store is not None:
                key = store.key("pnp_hvae_faces", m, sorted(run.options[m].items()), task.sigma, op_r, y_r)
                hit = store.load(key)
            if hit is not None and (m != "pnp_hvae" or "reconstruction" in hit[0]):
                part, meta = hit
                run.cached_chunks[m] += 1
            else:
                dev = next(prior.parameters()).device  # the operators follow y's device (masks moved lazily)
                t0 = time.perf_counter()
                r = _solve(m, y_r.to(dev), op_r, prior, task, budget, hopts, lr)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                meta = {"seconds": time.perf_counter() - t0, "method": m}
                part = {
                    "x": r.x.detach().clamp(0, 1).cpu(),
                    "converged": r.converged.cpu().to(torch.uint8),
                    "iterations": r.iterations.cpu(),
                }
                if m == "pnp_hvae":
                    part["reconstruction"] = r.per_image["reconstruction"].detach().clamp(0, 1).cpu()
                if store is not None:
                    store.save(key, part, meta)
            run.seconds[m] += float(meta["seconds"])
            parts.append(part)
        cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        run.x[m] = cat["x"]
        run.scores[m] = mb.score(cat["x"], x_true, with_lpips=with_lpips)
        run.residual[m] = _residual_ratio(op, cat["x"], y, task.sigma)
        run.iterations[m] = cat["iterations"]
        run.converged[m] = cat["converged"].bool()
        if m == "pnp_hvae":
            run.reconstruction = cat["reconstruction"]
            run.reconstruction_scores = mb.score(cat["reconstruction"], x_true, with_lpips=False)
    return run


# ------------------------------------------------------------------------------------------------
# Table 1, claims
# ------------------------------------------------------------------------------------------------
def _mean_se(v: Tensor) -> tuple[float | None, float | None]:
    v = v.double()
    if not bool(torch.isfinite(v).all()):
        return None, None
    se = float(v.std(unbiased=True) / math.sqrt(v.numel())) if v.numel() > 1 else None
    return float(v.mean()), se


def table_rows(runs: Sequence[TaskRun]) -> list[dict[str, Any]]:
    """One row per (dataset, task, method): :data:`TABLE_KEYS`. ``*_se`` is the standard error ``std / sqrt(n)``
    (``None`` for one face); ``lpips_mean`` is ``None`` where LPIPS was not computed. Every method is scored on the
    estimate it returns (PnP-HVAE: Algorithm 2's last iterate ``x_n``); PnP-HVAE's rows also hold the scores of
    ``HVAE(x_n, tau)``, the image the official code saves (``*_reconstruction_mean``; ``None`` for other methods)."""
    rows = []
    for run in runs:
        for m in run.x:
            s = run.scores[m]
            p, pse = _mean_se(s["psnr"])
            q, qse = _mean_se(s["ssim"])
            rows.append({
                "dataset": run.dataset, "task": run.task.key, "method": m, "n_images": run.n_images,
                "psnr_mean": p, "psnr_se": pse, "ssim_mean": q, "ssim_se": qse, "lpips_mean": _mean_se(s["lpips"])[0],
                "seconds_per_image": run.seconds[m] / run.n_images,
                "residual_ratio_mean": float(run.residual[m].double().mean()),
                "iterations_mean": float(run.iterations[m].double().mean()),
                "converged_fraction": float(run.converged[m].double().mean()),
                "psnr_reconstruction_mean": None, "ssim_reconstruction_mean": None,
            })  # fmt: skip
            if m == "pnp_hvae" and run.reconstruction_scores:
                rows[-1]["psnr_reconstruction_mean"] = _mean_se(run.reconstruction_scores["psnr"])[0]
                rows[-1]["ssim_reconstruction_mean"] = _mean_se(run.reconstruction_scores["ssim"])[0]
    return rows


def win_counts(run: TaskRun, method: str = "pnp_hvae", metric: str = "psnr") -> dict[str, int]:
    """Faces on which ``method`` scores strictly higher than each other method (``metric``: psnr or ssim)."""
    a = run.scores[method][metric]
    return {m: int((a > s[metric]).sum()) for m, s in run.scores.items() if m != method}


def claims(runs: Sequence[TaskRun], dataset: str = "celeba") -> dict[str, Any]:
    """The paper's claims (§6.1, Table 1), counted over the tasks of ``dataset``:

    * ``best_psnr_ssim``: PnP-HVAE has the highest mean PSNR **and** SSIM of the latent methods run here, per task;
    * ``more_consistent_than_adam``: its data-fit ratio ``||A x - y|| / (sigma sqrt(m))`` is closer to 1 (the noise
      level; the truth's is about 1) than Adam's, per task;
    * ``faster_than_adam``: fewer seconds per face than Adam, per task (same machine, same batching).

    Each holds ``{task: bool}``, and ``*_all`` whether it holds on every task.
    """
    out: dict[str, Any] = {"dataset": dataset}
    best, consistent, faster, details = {}, {}, {}, {}
    for run in runs:
        if run.dataset != dataset or "pnp_hvae" not in run.x:
            continue
        k = run.task.key
        mean = {m: {q: float(s[q].double().mean()) for q in ("psnr", "ssim")} for m, s in run.scores.items()}
        others = [m for m in mean if m != "pnp_hvae"]
        if others:
            best[k] = all(mean["pnp_hvae"][q] > mean[o][q] for o in others for q in ("psnr", "ssim"))
        if "adam_j1" in run.x:
            gap = {m: abs(float(run.residual[m].double().mean()) - 1.0) for m in ("pnp_hvae", "adam_j1")}
            consistent[k] = gap["pnp_hvae"] < gap["adam_j1"]
            faster[k] = run.seconds["pnp_hvae"] < run.seconds["adam_j1"]
        details[k] = {
            "psnr_wins": win_counts(run, "pnp_hvae", "psnr"),
            "ssim_wins": win_counts(run, "pnp_hvae", "ssim"),
            "n_images": run.n_images,
        }
    for name, d in (("best_psnr_ssim", best), ("more_consistent_than_adam", consistent), ("faster_than_adam", faster)):
        out[name] = d
        out[f"{name}_all"] = bool(d) and all(d.values())
    out["wins"] = details
    return out


def markdown_table(rows: Sequence[Mapping[str, Any]], dataset: str, tasks: Sequence[str]) -> str:
    """Table 1's layout for one dataset: per task and method PSNR ± se, SSIM, LPIPS, seconds per face, the data-fit
    ratio; the paper's PnP-HVAE and Adam values beside them (VDVAE on 256x256 faces, a V100 GPU)."""
    lines = [
        "| task | method | faces | PSNR (dB) | SSIM | LPIPS | s / face | $\\|Ax-y\\| / (\\sigma\\sqrt m)$ "
        "| paper PSNR / SSIM / LPIPS / s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in tasks:
        sel = [r for r in rows if r["dataset"] == dataset and r["task"] == t]
        if not sel:
            continue
        top = max(r["psnr_mean"] for r in sel)
        for r in sel:
            p = f"{r['psnr_mean']:.2f}" + ("" if r["psnr_se"] is None else f" ± {r['psnr_se']:.2f}")
            p = f"**{p}**" if r["psnr_mean"] == top else p
            lp = "n/a" if r["lpips_mean"] is None else f"{r['lpips_mean']:.3f}"
            ref = PAPER_TABLE1.get((t, r["method"]))
            ref_s = "" if ref is None else " / ".join(str(v) for v in ref)
            lines.append(
                f"| {PAPER_TASKS[t].label if t in PAPER_TASKS else t} | {LABELS.get(r['method'], r['method'])} | "
                f"{r['n_images']} | {p} | {r['ssim_mean']:.3f} | {lp} | {r['seconds_per_image']:.2f} | "
                f"{r['residual_ratio_mean']:.2f} | {ref_s} |"
            )
        for name in UNAVAILABLE:
            lines.append(f"| | {name.upper()} | — | not run: weights unavailable | | | | | |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Fig. 3
# ------------------------------------------------------------------------------------------------
def median_face(run: TaskRun, method: str = "pnp_hvae") -> int:
    """The face whose ``method`` PSNR is the median of the run (lower median): a typical face, by a rule."""
    v = run.scores[method]["psnr"]
    return int(torch.argsort(v, stable=True)[(v.numel() - 1) // 2])


def _rows_labels(run: TaskRun) -> tuple[list[Tensor], list[str]]:
    rows = [run.x_true, run.observation] + [run.x[m] for m in run.x]
    labels = [r"$x^*$", "$y$"] + [LABELS.get(m, m) for m in run.x]
    return rows, labels


def task_grid(run: TaskRun, columns: Sequence[int], *, title: str | None = None):
    """Rows ``x*``, ``y`` (super-resolution: upsampled by pixel replication), then each method, for the faces
    ``columns``; each restoration's PSNR (dB) above it."""
    from ..plotting import image_grid

    idx = torch.as_tensor(list(columns), dtype=torch.long)
    if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= run.n_images:
        raise ValueError(f"columns must be face indices in [0, {run.n_images - 1}], got {list(columns)}")
    rows, labels = _rows_labels(run)
    fig = image_grid([r[idx] for r in rows], labels, scale=1.15)
    ncol = idx.numel()
    for r, m in enumerate(run.x, start=2):
        for j, i in enumerate(idx.tolist()):
            fig.axes[r * ncol + j].set_title(f"{float(run.scores[m]['psnr'][i]):.1f}", fontsize=7, pad=1)
    fig.subplots_adjust(hspace=0.28, top=0.92)
    if title:
        fig.suptitle(title, fontsize=10, y=0.98)
    return fig


def figure3(runs: Sequence[TaskRun], faces: Sequence[int] | None = None, *, title: str | None = None):
    """Fig. 3's layout: one row per task, columns ``x*``, ``y`` and each method, for one face per task
    (``faces``; default :func:`median_face` of PnP-HVAE in each task), PSNR above each restoration."""
    import matplotlib.pyplot as plt

    from ..plotting import setup_style

    setup_style()
    if not runs:
        raise ValueError("figure3 needs at least one TaskRun")
    faces = [median_face(r) for r in runs] if faces is None else list(faces)
    if len(faces) != len(runs):
        raise ValueError(f"faces has {len(faces)} entries for {len(runs)} tasks")
    ncol = 2 + max(len(r.x) for r in runs)
    fig, axes = plt.subplots(len(runs), ncol, figsize=(1.5 * ncol, 1.7 * len(runs)), squeeze=False)
    for i, (run, f) in enumerate(zip(runs, faces, strict=True)):
        rows, labels = _rows_labels(run)
        for j, ax in enumerate(axes[i]):
            ax.set_axis_off()
            if j >= len(rows):
                continue
            ax.imshow(rows[j][f].clamp(0, 1).permute(1, 2, 0).numpy())
            head = labels[j] if j < 2 else f"{labels[j]}\n{float(run.scores[list(run.x)[j - 2]]['psnr'][f]):.2f} dB"
            ax.set_title(head if i == 0 or j >= 2 else "", fontsize=7)
        axes[i][0].set_axis_on()
        axes[i][0].set_xticks([])
        axes[i][0].set_yticks([])
        axes[i][0].set_ylabel(f"({'abcdefgh'[i]}) {run.task.key}\nface {run.names[f]}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
