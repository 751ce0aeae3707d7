r"""AIPO's Tables 1-3 and Figs. 1-4 (notebook 13): the MAP loss reached by AIPO and its three baselines.

Liu, Yang, Zhang, Lei, *Optimization for Amortized Inverse Problems*, ICML 2023 (``aipo_icml2023.txt``). For a flow
prior ``p_G`` the paper compares, at a fixed target ``Lambda``, the MAP loss (§3.1, eq. 3)

.. math::

    \mathcal{L}_{MAP}(x; \Lambda) = \|y - f(x)\|^2 - \Lambda \log p_G(x)

reached by

* ``aipo``: Algorithm 2 (continuation in ``lambda`` from the maximum-likelihood start ``x*(0)`` of eq. 4;
  :func:`jpmap_core.solvers.aipo`);
* ``mle_init``, ``random_init``, ``zero_init``: Adam at ``lambda = Lambda`` from ``x*(0)``, from ``G(z0)``,
  ``z0 ~ N(0, I)``, and from ``G(0)`` (§4.1; :func:`jpmap_core.solvers.aipo_baseline`), each with AIPO's
  per-image budget of gradient evaluations (the 500 MLE steps count; the random and zero starts get them as extra
  steps).

:func:`run_flow_task` runs the four methods on one task for a list of ``Lambda`` values at once (every image is
repeated once per ``Lambda``; AIPO and the baselines take one ``Lambda`` per image, so one batched call covers the
whole row of a table). :func:`table_rows` gives the ``metrics.json`` rows (MAP loss mean and standard error, PSNR,
gradient evaluations), :func:`claims` checks the paper's three claims on them, :func:`paper_table` prints them in
the layout of Tables 1-3, :func:`margin_figure` and :func:`reconstruction_grid` draw them.

The VAE part (our extension): :func:`run_latent_task` compares :func:`jpmap_core.solvers.aipo_latent` (Algorithm
2's schedule on CSGM's latent energy ``||A G(z) - y||^2 + lambda ||z||^2``) with CSGM (Adam at fixed ``lambda``,
the same start and budget) and JPMAP on the same measurements; :func:`latent_rows` gives their rows.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..metrics import psnr
from ..operators import Problem, make_problem
from ..solvers import Restoration, solve
from ..solvers.aipo import latent_energy

__all__ = [
    "LABELS",
    "LATENT_METHODS",
    "METHODS",
    "PAPER_TASKS",
    "TABLE_KEYS",
    "FlowRun",
    "LatentRun",
    "Task",
    "budgets_equal",
    "claims",
    "latent_markdown",
    "latent_rows",
    "margin_figure",
    "margins",
    "mle_start_check",
    "paper_table",
    "reconstruction_grid",
    "resize_images",
    "run_flow_task",
    "run_latent_task",
    "schedule_options",
    "table_rows",
    "task_seed",
]

#: the four methods of Tables 1-3, in the paper's column order
METHODS = ("aipo", "mle_init", "random_init", "zero_init")
LABELS = {"aipo": "AIPO (ours)", "mle_init": "MLE init.", "random_init": "Random init.", "zero_init": "Zero init."}
#: the keys of a table row (issue 17's list, plus the image set and the noise level)
TABLE_KEYS = (
    "prior", "set", "task", "level", "sigma", "lambda", "method", "n_images", "map_loss_mean", "map_loss_se",
    "psnr_mean", "gradient_evaluations",
)  # fmt: skip
#: the methods of the latent comparison
LATENT_METHODS = ("aipo_latent", "csgm", "jpmap")


@dataclass(frozen=True)
class Task:
    """One degradation of Tables 1-3: ``name`` (``denoising``, ``compressed_sensing``, ``inpainting``), the noise std
    ``sigma`` on the 0-255 scale (AIPO's std 0.1 is 25.5, 0.02 is 5.1), the ``level`` (``m`` for compressed sensing,
    the missing fraction for inpainting) and the inpainting ``block`` size."""

    name: str
    sigma: float
    level: float | int | None = None
    block: int | None = None

    @property
    def key(self) -> str:
        """A short name: ``denoising``, ``cs500``, ``inpainting``."""
        return f"cs{self.level}" if self.name == "compressed_sensing" else self.name

    @property
    def label(self) -> str:
        if self.name == "compressed_sensing":
            return f"compressed sensing, m = {self.level}, noise std {self.sigma / 255:g}"
        if self.name == "inpainting":
            blocks = f"{self.block}x{self.block} blocks" if self.block else "pixels"
            return f"inpainting, {self.level:.0%} missing {blocks}, noise std {self.sigma / 255:g}"
        return f"denoising, noise std {self.sigma / 255:g}"

    def degrade(self, x: Tensor, seed: int) -> Problem:
        """``make_problem`` with a generator seeded by :func:`task_seed`: the same ``y`` for every method."""
        g = torch.Generator().manual_seed(task_seed(seed, self.key))
        return make_problem(self.name, x, sigma=self.sigma, level=self.level, generator=g, block=self.block)


#: the paper's tasks (§4.2-4.4) scaled to 32x32x3 = 3072 dimensions: noise std 0.1 (25.5 on the 0-255 scale) for
#: denoising and compressed sensing with m = 500 and 1000 (about 16% and 33%, as the paper's 2000 and 4000 of 12,288),
#: 25% missing 4x4 blocks with noise std 0.02 (5.1) for inpainting
PAPER_TASKS = {
    "denoising": Task("denoising", 25.5),
    "cs500": Task("compressed_sensing", 25.5, 500),
    "cs1000": Task("compressed_sensing", 25.5, 1000),
    "inpainting": Task("inpainting", 5.1, 0.25, 4),
}


def task_seed(seed: int, *names: str) -> int:
    """A seed per (notebook seed, names): stable across runs and Python versions (crc32, not ``hash``)."""
    return (int(seed) * 1_000_003 + zlib.crc32("/".join(names).encode())) % (2**31 - 1)


def schedule_options(lams: Tensor, n_rounds: int | None = None) -> dict[str, Any]:
    """Algorithm 2's ``delta_min`` settings per image. ``None``: Table 4's (``delta_min0 = Lambda/20``, bounds
    ``(Lambda/80, min(Lambda/5, 1))``: up to ~80 rounds). ``n_rounds``: our CPU shortcut, the lower bound raised to
    ``Lambda / n_rounds`` (so every increase of ``lambda`` is at least that and the schedule has at most
    ``n_rounds + 1`` rounds; step 8's rule is otherwise unchanged)."""
    if n_rounds is None:
        return {}
    if isinstance(n_rounds, bool) or not isinstance(n_rounds, int) or n_rounds < 1:
        raise ValueError(f"n_rounds must be None (Table 4) or an integer >= 1, got {n_rounds!r}")
    lo = lams / n_rounds
    return {"delta_min0": lo, "delta_min_bounds": (lo, torch.maximum(lo, torch.clamp(lams / 5, max=1.0)))}


def resize_images(x: Tensor, size: int) -> Tensor:
    """Antialiased bilinear resize of ``(N, C, H, W)`` to ``size x size``, re-quantised to 8 bits (values ``k/255``,
    as the 32x32 CelebA faces the flows were trained on)."""
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return torch.round(x.clamp(0, 1) * 255) / 255


# ------------------------------------------------------------------------------------------------
# Tables 1-3: AIPO and its three baselines
# ------------------------------------------------------------------------------------------------
@dataclass
class FlowRun:
    """The four methods on one task: images of several sets, each repeated once per ``Lambda``.

    Row ``l * N + i`` of every ``(L * N, ...)`` tensor is image ``i`` (of the ``N`` images of all sets, in the order
    of ``sets``) at ``lambdas[l]``. ``loss``: the final ``L_MAP(x; Lambda)``; ``grad_evals``: gradient evaluations
    per image; ``x``: the estimates; ``x_mle``: AIPO's start ``x*(0)``."""

    prior: str
    task: Task
    sets: dict[str, slice]
    lambdas: tuple[float, ...]
    x_true: Tensor
    problem: Problem
    x: dict[str, Tensor] = field(default_factory=dict)
    loss: dict[str, Tensor] = field(default_factory=dict)
    psnr: dict[str, Tensor] = field(default_factory=dict)
    grad_evals: dict[str, Tensor] = field(default_factory=dict)
    x_mle: Tensor | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def n_images(self) -> int:
        return int(self.x_true.shape[0])

    def rows_of(self, set_name: str, lam: float) -> Tensor:
        """Batch rows of the images of ``set_name`` at ``lam``."""
        s = self.sets[set_name]
        base = self.lambdas.index(lam) * self.n_images
        return torch.arange(base + s.start, base + s.stop)


def run_flow_task(
    flow: Any,
    prior: str,
    task: Task,
    images: Mapping[str, Tensor],
    lambdas: Sequence[float],
    *,
    seed: int = 0,
    aipo_options: Mapping[str, Any] | None = None,
    n_rounds: int | None = None,
    baseline_lr: float = 0.05,
    device: str | torch.device = "cpu",
    methods: Sequence[str] = METHODS,
) -> FlowRun:
    """AIPO and the three baselines on ``task`` for every image of ``images`` (``{set name: (n, C, H, W)}``) and
    every ``Lambda`` of ``lambdas``: one batched call per method (``L * N`` rows, one ``Lambda`` per row).

    ``aipo_options``: keywords of :func:`~jpmap_core.solvers.aipo` (``K``, ``alpha``, ``n_mle``, ...; Table 4's
    defaults otherwise); the baselines take the same ``n_mle`` and ``mle_lr``, learning rate ``baseline_lr``
    (Algorithm 2's ``alpha``; the paper does not state theirs) and, per image, AIPO's gradient evaluations as their
    budget. ``n_rounds``: :func:`schedule_options`. The measurements are drawn once per image (seed
    :func:`task_seed`), so every method and ``Lambda`` sees the same ``y``; the random starts come from a generator
    seeded by ``(seed, prior, task)``.
    """
    if not images:
        raise ValueError("images must name at least one set of images, e.g. {'test': faces}")
    lambdas = tuple(float(v) for v in lambdas)
    if not lambdas or any(not math.isfinite(v) or v <= 0 for v in lambdas) or len(set(lambdas)) != len(lambdas):
        raise ValueError(f"lambdas must be distinct finite numbers > 0, got {lambdas!r}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or "aipo" not in methods:
        raise ValueError(f"methods must include 'aipo' (it sets the budget) and be among {METHODS}, got {methods!r}")
    sets, parts, start = {}, [], 0
    for name, x in images.items():
        if x.dim() != 4 or tuple(x.shape[1:]) != tuple(flow.image_shape):
            raise ValueError(f"images[{name!r}] must be (n, *{tuple(flow.image_shape)}), got {tuple(x.shape)}")
        sets[name] = slice(start, start + x.shape[0])
        start += x.shape[0]
        parts.append(x)
    x_true = torch.cat(parts)
    N, L = x_true.shape[0], len(lambdas)
    problem = task.degrade(x_true, seed)
    rep = torch.arange(N).repeat(L)
    op = problem.op.rows(rep)
    y = problem.y[rep].to(device)
    lam = torch.tensor(lambdas, dtype=y.dtype).repeat_interleave(N).to(device)
    truth = x_true[rep]
    run = FlowRun(prior, task, sets, lambdas, x_true, problem)
    opts = {**(aipo_options or {}), **schedule_options(lam, n_rounds)}
    res: dict[str, Restoration] = {"aipo": solve("aipo", y, op, flow, sigma=task.sigma, lam=lam, **opts)}
    budget = res["aipo"].per_image["grad_evals"]
    mle = {k: opts[k] for k in ("n_mle", "mle_lr", "clip") if k in opts}
    gen = torch.Generator().manual_seed(task_seed(seed, prior, task.key, "random_init"))
    for m in methods:
        if m == "aipo":
            continue
        res[m] = solve("aipo_baseline", y, op, flow, sigma=task.sigma, lam=lam, init=m.removesuffix("_init"),
                       budget=budget, lr=baseline_lr, generator=gen, **mle)  # fmt: skip
    for m, r in res.items():
        run.x[m] = r.x.detach().cpu()
        run.loss[m] = r.per_image["objective"].detach().cpu().double()
        run.psnr[m] = psnr(run.x[m].clamp(0, 1), truth).double()
        run.grad_evals[m] = r.per_image["grad_evals"].cpu()
        run.seconds[m] = float(r.info["seconds"])
    run.x_mle = res["aipo"].per_image["x_mle"][:N].cpu()
    return run


def _mean_se(v: Tensor) -> tuple[float, float]:
    v = v.double()
    n = v.numel()
    return float(v.mean()), float(v.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan


def table_rows(runs: Sequence[FlowRun]) -> list[dict[str, Any]]:
    """One row per (prior, set, task, Lambda, method): :data:`TABLE_KEYS`. ``map_loss_se`` is the standard error
    ``std / sqrt(n)`` (Tables 1-3's "se"; ``None`` for one image); ``gradient_evaluations`` the mean per image."""
    rows = []
    for run in runs:
        for set_name in run.sets:
            for lam in run.lambdas:
                idx = run.rows_of(set_name, lam)
                for m in run.loss:
                    mean, se = _mean_se(run.loss[m][idx])
                    rows.append({
                        "prior": run.prior, "set": set_name, "task": run.task.key, "level": run.task.level,
                        "sigma": run.task.sigma, "lambda": lam, "method": m, "n_images": int(idx.numel()),
                        "map_loss_mean": mean, "map_loss_se": se, "psnr_mean": float(run.psnr[m][idx].mean()),
                        "gradient_evaluations": float(run.grad_evals[m][idx].double().mean()),
                    })  # fmt: skip
    return rows


def budgets_equal(runs: Sequence[FlowRun]) -> bool:
    """Every image had the same gradient evaluations under every method (the paper's equal computing budget)."""
    return all(torch.equal(r.grad_evals[m], r.grad_evals["aipo"]) for r in runs for m in r.grad_evals)


def mle_start_check(run: FlowRun) -> dict[str, float]:
    """How well AIPO's start satisfies ``f(x) = y`` (eq. 4): ``relative_residual = ||A x*(0) - y|| / ||y||``, beside
    the clipped measurements' own ``||A clip(A^T y) - y|| / ||y||`` for inpainting and denoising (the start is
    clipped to [0, 1], so the noise outside [0, 1] is not matched) and the truth's ``||A x* - y|| / ||y||`` (the
    noise)."""
    p = run.problem
    n = float(p.y.flatten(1).norm(dim=1).mean())
    out = {
        "relative_residual": float((p.op.A(run.x_mle) - p.y).flatten(1).norm(dim=1).mean()) / n,
        "truth_relative_residual": float((p.op.A(run.x_true) - p.y).flatten(1).norm(dim=1).mean()) / n,
    }
    if run.task.name != "compressed_sensing":
        clipped = p.op.A(p.op.A_adjoint(p.y).clamp(0, 1))
        out["clipped_y_relative_residual"] = float((clipped - p.y).flatten(1).norm(dim=1).mean()) / n
    return out


def margins(rows: Sequence[Mapping[str, Any]], set_name: str = "test") -> dict[tuple[str, str], dict[float, float]]:
    """``{(prior, task): {Lambda: margin}}``, margin = (lowest baseline mean MAP loss) - (AIPO's mean MAP loss):
    positive where AIPO is lowest."""
    table: dict[tuple[str, str, float], dict[str, float]] = {}
    for r in rows:
        if r["set"] == set_name:
            table.setdefault((r["prior"], r["task"], r["lambda"]), {})[r["method"]] = r["map_loss_mean"]
    out: dict[tuple[str, str], dict[float, float]] = {}
    for (prior, task, lam), by_method in sorted(table.items()):
        others = [v for m, v in by_method.items() if m != "aipo"]
        if "aipo" in by_method and others:
            out.setdefault((prior, task), {})[lam] = min(others) - by_method["aipo"]
    return out


def claims(rows: Sequence[Mapping[str, Any]], set_name: str = "test") -> dict[str, Any]:
    """The paper's claims, counted on the rows of one image set:

    * §4.2-4.4: AIPO has the lowest mean MAP loss in every setting (prior, task, Lambda): ``aipo_lowest`` of
      ``settings``;
    * "the larger lambda is, the more apparent outperformance AIPO exhibits": per (prior, task) curve, the margin
      (:func:`margins`) is non-decreasing in Lambda (``margin_nondecreasing``) or at least larger at the largest
      Lambda than at the smallest (``margin_larger_at_largest_lambda``), of ``curves``;
    * §4.3: "the success of AIPO does not solely rely on the MLE initialization": AIPO below ``mle_init``
      (``aipo_below_mle_init``) and ``mle_init`` not consistently the best baseline (``mle_init_best_baseline``).
    """
    table: dict[tuple[str, str, float], dict[str, float]] = {}
    for r in rows:
        if r["set"] == set_name:
            table.setdefault((r["prior"], r["task"], r["lambda"]), {})[r["method"]] = r["map_loss_mean"]
    settings = [v for v in table.values() if "aipo" in v and len(v) > 1]
    lowest = sum(all(v["aipo"] < w for m, w in v.items() if m != "aipo") for v in settings)
    with_mle = [v for v in settings if "mle_init" in v]
    below_mle = sum(v["aipo"] < v["mle_init"] for v in with_mle)
    base = [v for v in with_mle if len(v) > 2]
    mle_best = sum(v["mle_init"] <= min(w for m, w in v.items() if m != "aipo") for v in base)
    curves = {k: [c[lam] for lam in sorted(c)] for k, c in margins(rows, set_name).items() if len(c) > 1}
    nondecreasing = sum(all(b >= a for a, b in zip(v[:-1], v[1:], strict=True)) for v in curves.values())
    larger = sum(v[-1] > v[0] for v in curves.values())
    return {
        "set": set_name,
        "settings": len(settings),
        "aipo_lowest": lowest,
        "aipo_lowest_every_setting": bool(settings) and lowest == len(settings),
        "curves": len(curves),
        "margin_nondecreasing": nondecreasing,
        "margin_larger_at_largest_lambda": larger,
        "margin_grows_every_curve": bool(curves) and larger == len(curves),
        "aipo_below_mle_init": below_mle,
        "settings_with_mle_init": len(with_mle),
        "mle_init_best_baseline": mle_best,
        "settings_with_three_baselines": len(base),
    }


def paper_table(rows: Sequence[Mapping[str, Any]], task: str, value: str = "map_loss") -> str:
    """Markdown in the layout of Tables 1-3 (``value="map_loss"``: mean ± se, the lowest in bold) or of Tables
    5-6 (``value="psnr"``: mean PSNR in dB, the highest in bold) for one task key: one line per (prior, set,
    Lambda), one column per method."""
    lines: dict[tuple[str, str, float], dict[str, Mapping[str, Any]]] = {}
    for r in rows:
        if r["task"] == task:
            lines.setdefault((r["prior"], r["set"], r["lambda"]), {})[r["method"]] = r
    methods = [m for m in METHODS if any(m in v for v in lines.values())]
    out = [
        "| prior | set | λ | " + " | ".join(LABELS[m] for m in methods) + " |",
        "|---|---|---:|" + "---:|" * len(methods),
    ]
    for (prior, set_name, lam), by_method in lines.items():
        cells = []
        if value == "psnr":
            vals = {m: by_method[m]["psnr_mean"] for m in methods if m in by_method}
            best = max(vals.values())
            for m in methods:
                cell = f"{vals[m]:.2f}" if m in vals else ""
                cells.append(f"**{cell}**" if m in vals and vals[m] == best else cell)
        else:
            vals = {m: by_method[m]["map_loss_mean"] for m in methods if m in by_method}
            best = min(vals.values())
            for m in methods:
                if m not in vals:
                    cells.append("")
                    continue
                se = by_method[m]["map_loss_se"]
                cell = f"{vals[m]:.0f}" + ("" if se is None or not math.isfinite(se) else f" ± {se:.0f}")
                cells.append(f"**{cell}**" if vals[m] == best else cell)
        out.append(f"| {prior} | {set_name} | {lam:g} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def margin_figure(rows: Sequence[Mapping[str, Any]], set_name: str = "test"):
    """One panel per prior: the margin (lowest baseline minus AIPO, mean MAP loss) against Lambda, one line per
    task; above zero AIPO is lowest."""
    import matplotlib.pyplot as plt

    curves = margins(rows, set_name)
    priors = sorted({p for p, _ in curves})
    fig, axes = plt.subplots(1, max(1, len(priors)), figsize=(4.2 * max(1, len(priors)), 3.2), squeeze=False)
    for k, (ax, prior) in enumerate(zip(axes[0], priors, strict=False)):
        for (p, task), c in curves.items():
            if p == prior:
                lams = sorted(c)
                ax.plot(lams, [c[v] for v in lams], marker="o", label=task)
        ax.axhline(0, color="0.5", lw=0.8)
        ax.set_xlabel("λ (target prior weight Λ)")
        ax.set_ylabel("margin: best baseline − AIPO (MAP loss, nats)")
        ax.set_title(f"({chr(97 + k)}) {prior}, {set_name} images")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def reconstruction_grid(run: FlowRun, lam: float, set_name: str | None = None, n_show: int = 6):
    """Figs. 1-4's layout: rows clean, observation (``A^T y`` for denoising and inpainting, missing pixels black;
    compressed sensing has none), AIPO, MLE init., Random init., Zero init., at ``lam``; the first ``n_show`` images
    of ``set_name`` (all sets when ``None``)."""
    from ..plotting import image_grid

    names = [set_name] if set_name is not None else list(run.sets)
    idx = torch.cat([run.rows_of(s, lam)[:n_show] for s in names])
    base = idx % run.n_images
    rows, labels = [run.x_true[base]], ["clean"]
    obs = run.problem.observation
    if obs is not None:
        rows.append(obs[base].cpu())
        labels.append("observed")
    for m in METHODS:
        if m in run.x:
            rows.append(run.x[m][idx])
            labels.append(LABELS[m])
    return image_grid(rows, labels, scale=1.0)


# ------------------------------------------------------------------------------------------------
# The VAE part: Algorithm 2's schedule on CSGM's latent problem
# ------------------------------------------------------------------------------------------------
@dataclass
class LatentRun:
    """:func:`run_latent_task`'s result: the task, ``lambda`` (CSGM's weight), the truth and, per method, the
    Restoration, the latent energy ``E(z; lambda)``, PSNR and decoder evaluations per image."""

    prior: str
    task: Task
    lam: float
    x_true: Tensor
    results: dict[str, Restoration] = field(default_factory=dict)
    energy: dict[str, Tensor] = field(default_factory=dict)
    psnr: dict[str, Tensor] = field(default_factory=dict)
    evals: dict[str, Tensor] = field(default_factory=dict)


def run_latent_task(
    vae: Any,
    prior: str,
    task: Task,
    x: Tensor,
    *,
    seed: int = 0,
    lam: float | None = None,
    latent_options: Mapping[str, Any] | None = None,
    jpmap_options: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> LatentRun:
    """``aipo_latent`` against CSGM and JPMAP on one task, the same ``y``.

    ``lam``: the weight of ``||z||^2`` (default ``sigma^2`` on the [0, 1] scale, CSGM's); both latent methods start
    at ``z = 0`` (``latent_options`` may change ``aipo_latent``'s ``z_init``). CSGM runs Adam (lr 0.01) at fixed
    ``lam`` with ``max_iters`` = the largest per-image budget of ``aipo_latent`` and ``tol = 0`` (so it spends it);
    JPMAP (Alg. 2.3 with ``jpmap_options``) is scored on the same latent energy at its ``z`` (its own objective is
    ``J1``, eq. 2.5) and by the PSNR of its ``x``.
    """
    problem = task.degrade(x, seed)
    y = problem.y.to(device)
    lam = (task.sigma / 255) ** 2 if lam is None else float(lam)
    run = LatentRun(prior, task, lam, x)
    r = solve("aipo_latent", y, problem.op, vae, sigma=task.sigma, lam=lam, **(latent_options or {}))
    run.results["aipo_latent"] = r
    budget = int(r.per_image["grad_evals"].max())
    run.results["csgm"] = solve(
        "csgm", y, problem.op, vae, sigma=task.sigma, lam=lam, max_iters=max(1, budget), tol=0.0
    )
    run.results["jpmap"] = solve("jpmap", y, problem.op, vae, sigma=task.sigma, **(jpmap_options or {}))
    for m, res in run.results.items():
        with torch.no_grad():
            run.energy[m] = latent_energy(res.z, y, problem.op, vae, lam).detach().cpu().double()
        run.psnr[m] = psnr(res.x.detach().cpu().clamp(0, 1), x).double()
        evals = res.per_image.get("grad_evals", res.per_image.get("decoder_evals"))
        run.evals[m] = evals.cpu() if evals is not None else torch.full((x.shape[0],), -1)
    return run


def latent_rows(runs: Sequence[LatentRun]) -> list[dict[str, Any]]:
    """One row per (prior, task, method): ``{prior, task, level, sigma, lambda, method, n_images, energy_mean,
    energy_se, psnr_mean, gradient_evaluations}``; ``energy`` is CSGM's ``||A G(z) - y||^2 + lambda ||z||^2`` at each
    method's ``z`` (lower is better for the latent problem), ``gradient_evaluations`` the mean decoder gradient
    evaluations per image."""
    rows = []
    for run in runs:
        for m in run.results:
            mean, se = _mean_se(run.energy[m])
            rows.append({
                "prior": run.prior, "task": run.task.key, "level": run.task.level, "sigma": run.task.sigma,
                "lambda": run.lam, "method": m, "n_images": int(run.x_true.shape[0]), "energy_mean": mean,
                "energy_se": se, "psnr_mean": float(run.psnr[m].mean()),
                "gradient_evaluations": float(run.evals[m].double().mean()),
            })  # fmt: skip
    return rows


def latent_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """:func:`latent_rows` as a markdown table: per (task, lambda), each method's energy (mean ± se, the lowest in
    bold), PSNR and gradient evaluations per image."""
    groups: dict[tuple[str, float], list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["lambda"]), []).append(r)
    out = ["| task | λ | method | E(z; λ) | PSNR (dB) | gradient evaluations |", "|---|---:|---|---:|---:|---:|"]
    for (task, lam), group in groups.items():
        best = min(r["energy_mean"] for r in group)
        for r in group:
            se = r["energy_se"]
            cell = f"{r['energy_mean']:.3f}" + ("" if se is None or not math.isfinite(se) else f" ± {se:.3f}")
            cell = f"**{cell}**" if r["energy_mean"] == best else cell
            evals = r["gradient_evaluations"]
            out.append(f"| {task} | {lam:.4g} | {r['method']} | {cell} | {r['psnr_mean']:.2f} | {evals:.0f} |")
    return "\n".join(out)
