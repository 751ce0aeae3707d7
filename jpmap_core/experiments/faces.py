"""Faces (JPMAP §3.4, Fig. 8): CSGM against JPMAP with the CelebA 64x64 convolutional prior, on CelebA and FFHQ.

Fig. 8 (a): inpainting with 80% of the pixels missing and noise std ``sigma = 10`` (0-255 scale), restored by CSGM
(eq. 1.3, ``lambda = sigma^2``) and by JPMAP (Algorithm 2.3, ``beta = 1/gamma^2``) with the same prior, the same
degraded images and the same iteration caps. Fig. 8 (b): reconstructions ``mu_theta(mu_phi(x))`` of test images, the
over-regularisation the paper discusses ("the learned manifold perhaps only contains low-frequency approximations").

The degradation, the solver calls and the scores are those of the MNIST benchmark
(:mod:`jpmap_core.experiments.mnist_benchmark`: :func:`~jpmap_core.experiments.mnist_benchmark.degrade` draws one
random mask per image from a generator seeded by the seed and the level only,
:func:`~jpmap_core.experiments.mnist_benchmark.solve` runs a method under a
:class:`~jpmap_core.experiments.mnist_benchmark.Budget`, restorations are clamped to [0, 1] before every metric). One
solver call restores a whole test set at once (batched, each image with its own state).

The paper's observation to check (§3.4): on CelebA "the restorations ... are very similar to each other, but blurry",
"both algorithms impressively find a solution z* very close to the code mu_phi(x) of the ground truth image x, except
for the third column where CSGM converges to a local minimum". :func:`compare` reports the per-image PSNR
differences, how often each method wins and by how much, and the distances ``||z - mu_phi(x*)||`` of both solutions.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..cache import CallCache
from ..metrics import psnr, ssim
from ..operators import Inpainting
from . import mnist_benchmark as mb

__all__ = [
    "FaceRun",
    "METHODS",
    "MISSING",
    "SIGMA",
    "compare",
    "image_panel",
    "largest_differences",
    "plot_psnr_pairs",
    "reconstruct",
    "reconstruction_grid",
    "restoration_grid",
    "restore_faces",
    "summary",
]

MISSING = 0.8  # Fig. 8 (a): fraction of missing pixels
SIGMA = 10.0  # Fig. 8 (a): noise std on the 0-255 scale (= MEASUREMENT_SIGMA of the MNIST benchmark)
METHODS = ("csgm", "jpmap_fixed_beta")
LABELS = {"csgm": "CSGM", "jpmap_fixed_beta": "JPMAP"}
#: a PSNR difference below this (dB) counts as a tie in :func:`compare` ("very similar" restorations)
TIE_DB = 0.1


@dataclass
class FaceRun:
    """Everything :func:`restore_faces` computed for one test set (all tensors on the CPU, per image)."""

    dataset: str
    source: str
    names: list[str]
    x_true: Tensor
    observation: Tensor  # A^T y: the observed pixels, missing ones black
    missing: float
    sigma: float
    budget: mb.Budget
    x: dict[str, Tensor] = field(default_factory=dict)  # method -> restoration, clamped to [0, 1]
    x_decoded: dict[str, Tensor] = field(default_factory=dict)  # method -> mu_theta(z_hat), clamped (CSGM: = x)
    decoded_psnr: dict[str, Tensor] = field(default_factory=dict)  # method -> PSNR of mu_theta(z_hat)
    scores: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # method -> {psnr, ssim, lpips}
    z_distance: dict[str, Tensor] = field(default_factory=dict)  # method -> ||z - mu_phi(x*)||
    converged: dict[str, Tensor] = field(default_factory=dict)
    iterations: dict[str, Tensor] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # method -> seconds of its (batched) solver calls
    cached_chunks: dict[str, int] = field(default_factory=dict)  # method -> chunks loaded from the cache
    z_true_norm: Tensor | None = None  # ||mu_phi(x*)||, the scale of z_distance
    recon: Tensor | None = None  # mu_theta(mu_phi(x*))
    recon_psnr: Tensor | None = None
    recon_ssim: Tensor | None = None
    lpips_available: bool = False

    @property
    def n_images(self) -> int:
        return int(self.x_true.shape[0])


@torch.no_grad()
def reconstruct(vae, x: Tensor, *, batch_size: int = 256) -> Tensor:
    """``mu_theta(mu_phi(x))`` (Fig. 8 b) on the model's device, returned on the CPU like ``x``."""
    dev = next(vae.parameters()).device
    out = [vae.decode(vae.encode(x[i : i + batch_size].to(dev))[0]).cpu() for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out)


def restore_faces(
    x_true: Tensor,
    vae,
    *,
    dataset: str,
    source: str,
    names: Sequence[str] | None = None,
    budget: mb.Budget,
    missing: float = MISSING,
    sigma: float = SIGMA,
    seed: int = 0,
    device: str | torch.device = "cpu",
    with_lpips: bool = False,
    methods: Sequence[str] = METHODS,
    chunk: int | None = None,
    cache: str | os.PathLike | None = None,
) -> FaceRun:
    """Degrade ``x_true`` (``(B, 3, 64, 64)`` on the CPU), restore it with every method in one batched call each, score.

    The mask and noise come from ``mb.degrade("inpainting", missing, x_true, seed)``; ``sigma`` must be the benchmark's
    ``MEASUREMENT_SIGMA`` (10, the paper's) since that function draws the noise with it. ``chunk``: restore at most
    ``chunk`` faces per call (default: all at once; each face keeps its own state, so chunks change no result beyond
    float32 rounding). ``cache``: a folder where every finished call is saved (:class:`~jpmap_core.cache.CallCache`),
    so that a long run (the paper profile on a CPU) that stops resumes with the calls it lacks; a cached call keeps
    the seconds it took.
    """
    if x_true.ndim != 4 or x_true.shape[1:] != tuple(vae.image_shape):
        raise ValueError(f"x_true must be (B, *{tuple(vae.image_shape)}) images, got shape {tuple(x_true.shape)}")
    if float(sigma) != mb.MEASUREMENT_SIGMA:
        raise ValueError(f"sigma must be {mb.MEASUREMENT_SIGMA:g} (the inpainting noise of the benchmark), got {sigma}")
    unknown = [m for m in methods if m not in mb.METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; expected some of {mb.METHODS}")
    device = torch.device(device)
    names = list(names) if names is not None else [str(i) for i in range(x_true.shape[0])]
    deg = mb.degrade("inpainting", missing, x_true, seed)
    run = FaceRun(dataset, source, names, x_true, deg.observation, float(missing), float(sigma), budget)
    run.lpips_available = bool(with_lpips)
    with torch.no_grad():
        z_true = vae.encode(x_true.to(device))[0]
    run.z_true_norm = z_true.norm(dim=1).cpu()
    n = x_true.shape[0]
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive number of faces per call, or None (all at once), got {chunk!r}")
    step = n if chunk is None else chunk
    store = None if cache is None else CallCache(cache, vae)
    for m in methods:
        parts: list[dict[str, Tensor]] = []
        run.seconds[m], run.cached_chunks[m] = 0.0, 0
        for lo in range(0, n, step):
            rows = slice(lo, min(lo + step, n))
            op = Inpainting(deg.op.mask[rows])
            key = hit = None
            if store is not None:
                key = store.key("faces", m, sorted(vars(budget).items()), deg.sigma, op, deg.y[rows])
                hit = store.load(key)
            if hit is not None:
                part, meta = hit
                run.cached_chunks[m] += 1
            else:
                t0 = time.perf_counter()
                r = mb.solve(m, deg.y[rows].to(device), Inpainting(op.mask.to(device)), vae, deg.sigma, budget)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                meta = {"seconds": time.perf_counter() - t0, "method": m}
                part = {
                    "x": r.x.detach().clamp(0, 1).cpu(),
                    "x_decoded": r.x_decoded.detach().clamp(0, 1).cpu(),
                    "z": r.z.detach().cpu(),
                    "converged": r.converged.cpu().to(torch.uint8),
                    "iterations": r.iterations.cpu(),
                }
                if store is not None:
                    store.save(key, part, meta)
            run.seconds[m] += float(meta["seconds"])
            parts.append(part)
        cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        run.x[m] = cat["x"]
        run.scores[m] = mb.score(cat["x"], x_true, with_lpips=with_lpips)
        run.x_decoded[m] = cat["x_decoded"]
        run.decoded_psnr[m] = psnr(run.x_decoded[m], x_true)
        run.z_distance[m] = (cat["z"].to(z_true) - z_true).norm(dim=1).cpu()
        run.converged[m] = cat["converged"].bool()
        run.iterations[m] = cat["iterations"]
    run.recon = reconstruct(vae, x_true).clamp(0, 1)
    run.recon_psnr = psnr(run.recon, x_true)
    run.recon_ssim = ssim(run.recon, x_true)
    return run


def _stats(v: Tensor) -> dict[str, float]:
    v = v.double()
    se = float(v.std(unbiased=True) / math.sqrt(v.numel())) if v.numel() > 1 else None
    q = torch.quantile(v, torch.tensor([0.25, 0.5, 0.75], dtype=v.dtype))
    return {"mean": float(v.mean()), "se": se, "q25": float(q[0]), "median": float(q[1]), "q75": float(q[2])}


def compare(run: FaceRun, method: str = "jpmap_fixed_beta", baseline: str = "csgm", *, tie_db: float = TIE_DB) -> dict:
    """Per-image PSNR differences ``method - baseline`` and who wins (§3.4: "very similar", CSGM sometimes stuck).

    ``wins``/``losses``: images where ``method`` is better/worse by more than ``tie_db`` dB; ``ties`` the rest.
    ``baseline_stuck``: images where the baseline is worse by more than 1 dB (a worse local minimum, like the third
    column of the paper's Fig. 8 a). ``z_distance``: mean ``||z - mu_phi(x*)||`` of each solution.
    ``decoded_psnr_diff`` compares the decoded images ``mu_theta(z_hat)`` of the two solutions: JPMAP returns the
    x-step ``x = prox(mu_theta(z_hat))`` (eq. 2.7), which also keeps the observed pixels of ``y``, CSGM returns
    ``mu_theta(z_hat)``; the decoded comparison separates the latent solutions from that data-consistency step.
    """
    d = (run.scores[method]["psnr"] - run.scores[baseline]["psnr"]).double()
    dd = (run.decoded_psnr[method] - run.decoded_psnr[baseline]).double() if run.decoded_psnr else None
    n = d.numel()
    wins, losses = int((d > tie_db).sum()), int((d < -tie_db).sum())
    return {
        "method": method,
        "baseline": baseline,
        "n_images": n,
        "psnr_diff": _stats(d),
        "psnr_diff_abs_mean": float(d.abs().mean()),
        "psnr_diff_per_image": [float(v) for v in d],
        "tie_db": tie_db,
        "wins": wins,
        "losses": losses,
        "ties": n - wins - losses,
        "win_fraction": float((d > 0).double().mean()),
        "baseline_stuck": int((d > 1.0).sum()),
        "method_stuck": int((d < -1.0).sum()),
        "decoded_psnr_diff": None if dd is None else _stats(dd),
        "decoded_wins": None if dd is None else int((dd > tie_db).sum()),
        "decoded_losses": None if dd is None else int((dd < -tie_db).sum()),
        "z_distance_mean": {m: float(run.z_distance[m].mean()) for m in (method, baseline)},
        "z_true_norm_mean": float(run.z_true_norm.mean()),
    }


def summary(run: FaceRun, prefix: str = "") -> dict[str, Any]:
    """Flat metrics of one test set: ``{prefix}psnr_csgm_mean``, ``{prefix}recon_psnr_mean``, ... (see the notebook)."""
    out: dict[str, Any] = {f"{prefix}n_images": run.n_images, f"{prefix}data_source": run.source}
    short = {"csgm": "csgm", "jpmap_fixed_beta": "jpmap"}
    for m, s in run.scores.items():
        k = short.get(m, m)
        for metric in ("psnr", "ssim", "lpips"):
            v = s[metric]
            ok = bool(torch.isfinite(v).all())
            out[f"{prefix}{metric}_{k}_mean"] = float(v.mean()) if ok else None
            out[f"{prefix}{metric}_{k}_se"] = _stats(v)["se"] if ok else None
        if m in run.decoded_psnr:
            out[f"{prefix}psnr_{k}_decoded_mean"] = float(run.decoded_psnr[m].mean())
        out[f"{prefix}{k}_converged_fraction"] = float(run.converged[m].double().mean())
        out[f"{prefix}{k}_seconds"] = run.seconds[m]
        out[f"{prefix}{k}_seconds_per_image"] = run.seconds[m] / run.n_images
    out[f"{prefix}recon_psnr_mean"] = float(run.recon_psnr.mean())
    out[f"{prefix}recon_ssim_mean"] = float(run.recon_ssim.mean())
    out[f"{prefix}per_image"] = [
        {
            "name": run.names[i],
            **{f"psnr_{short.get(m, m)}": float(s["psnr"][i]) for m, s in run.scores.items()},
            "recon_psnr": float(run.recon_psnr[i]),
        }
        for i in range(run.n_images)
    ]
    return out


def largest_differences(run: FaceRun, k: int, method: str = "jpmap_fixed_beta", baseline: str = "csgm") -> list[int]:
    """Indices of the ``k`` images with the largest ``|PSNR(method) - PSNR(baseline)|`` (a rule, not a hand pick)."""
    d = (run.scores[method]["psnr"] - run.scores[baseline]["psnr"]).abs()
    return [int(i) for i in torch.argsort(d, descending=True, stable=True)[: min(k, d.numel())]]


def restoration_grid(run: FaceRun, columns: Sequence[int], *, title: str | None = None, decoded: bool = True):
    """Fig. 8 (a): rows x*, y (A^T y), CSGM, JPMAP for the images ``columns``, each restoration's PSNR above it.

    ``decoded``: add a row with JPMAP's decoded image ``mu_theta(z_hat)`` (what CSGM returns for its own z_hat).
    """
    from ..plotting import image_grid

    idx = torch.as_tensor(list(columns), dtype=torch.long)
    shown = [(run.x[m], run.scores[m]["psnr"], LABELS.get(m, m)) for m in run.x]
    if decoded and "jpmap_fixed_beta" in run.x_decoded:
        shown.append(
            (
                run.x_decoded["jpmap_fixed_beta"],
                run.decoded_psnr["jpmap_fixed_beta"],
                "JPMAP\n" + r"$\mu_\theta(\hat z)$",
            )
        )
    rows = [run.x_true[idx], run.observation[idx]] + [images[idx] for images, _, _ in shown]
    labels = [r"$x^*$", f"$y$ ({100 * run.missing:g}%\nmissing)"] + [label for _, _, label in shown]
    fig = image_grid(rows, labels, scale=1.15)
    axes = fig.axes
    ncol = len(idx)
    for r, (_, values, _) in enumerate(shown, start=2):
        for j, i in enumerate(idx.tolist()):
            axes[r * ncol + j].set_title(f"{float(values[i]):.1f}", fontsize=7, pad=1)
    fig.subplots_adjust(hspace=0.28)  # room for the PSNR above each restoration (as the MNIST grids)
    if title:
        fig.suptitle(title, fontsize=10, y=0.95)
    return fig


def reconstruction_grid(run: FaceRun, columns: Sequence[int], *, title: str | None = None):
    """Fig. 8 (b): test images x (top) and their reconstructions mu_theta(mu_phi(x)) (bottom), with their PSNR."""
    from ..plotting import image_grid

    idx = torch.as_tensor(list(columns), dtype=torch.long)
    fig = image_grid([run.x_true[idx], run.recon[idx]], [r"$x$", r"$\mu_\theta(\mu_\phi(x))$"], scale=1.15)
    ncol = len(idx)
    for j, i in enumerate(idx.tolist()):
        fig.axes[ncol + j].set_title(f"{float(run.recon_psnr[i]):.1f}", fontsize=7, pad=1)
    fig.subplots_adjust(hspace=0.28)
    if title:
        fig.suptitle(title, fontsize=10, y=1.0)
    return fig


def plot_psnr_pairs(runs: Mapping[str, FaceRun], method: str = "jpmap_fixed_beta", baseline: str = "csgm"):
    """Per-image PSNR of ``method`` against ``baseline`` (one panel per test set), the diagonal = equal quality."""
    import matplotlib.pyplot as plt

    from ..plotting import setup_style

    setup_style()
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 4.0), squeeze=False)
    for ax, (tag, (name, run)) in zip(axes[0], zip("abcdefgh", runs.items(), strict=False), strict=False):
        a, b = run.scores[baseline]["psnr"].numpy(), run.scores[method]["psnr"].numpy()
        lo, hi = float(min(a.min(), b.min())) - 0.5, float(max(a.max(), b.max())) + 0.5
        ax.plot([lo, hi], [lo, hi], color="0.6", lw=1, zorder=0)
        ax.scatter(a, b, s=14, alpha=0.8)
        c = compare(run, method, baseline)
        ax.set_title(
            f"({tag}) {name}: {run.n_images} images\n{LABELS.get(method, method)} better on {c['wins']}, "
            f"worse on {c['losses']}, ties {c['ties']}",
            fontsize=9,
        )
        ax.set_xlabel(f"PSNR {LABELS.get(baseline, baseline)} (dB)")
        ax.set_ylabel(f"PSNR {LABELS.get(method, method)} (dB)")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
    fig.tight_layout()
    return fig


def image_panel(runs: Mapping[str, FaceRun], dataset: str, index: int):
    """One image of one test set side by side: x*, y, each restoration and mu_theta(mu_phi(x*)), with their PSNR.

    The callback of the notebook's image browser (``INTERACTIVE``); a wrong ``dataset`` or ``index`` is a
    ``ValueError`` naming what is available.
    """
    import matplotlib.pyplot as plt

    from ..plotting import setup_style

    if dataset not in runs:
        raise ValueError(f"unknown test set {dataset!r}; this run has {sorted(runs)}")
    run = runs[dataset]
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < run.n_images:
        raise ValueError(f"index must be an integer in [0, {run.n_images - 1}] for {dataset}, got {index!r}")
    setup_style()
    panels = [(run.x_true, r"$x^*$", None), (run.observation, "$y$", None)]
    panels += [(run.x[m], LABELS.get(m, m), float(run.scores[m]["psnr"][index])) for m in run.x]
    panels.append((run.recon, r"$\mu_\theta(\mu_\phi(x^*))$", float(run.recon_psnr[index])))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.0 * len(panels), 2.4))
    for ax, (images, label, value) in zip(axes, panels, strict=True):
        ax.imshow(images[index].clamp(0, 1).permute(1, 2, 0).numpy())
        ax.set_title(label if value is None else f"{label}\n{value:.2f} dB", fontsize=9)
        ax.set_axis_off()
    fig.suptitle(f"{dataset} image {index} ({run.names[index]})", fontsize=10)
    fig.tight_layout()
    return fig
