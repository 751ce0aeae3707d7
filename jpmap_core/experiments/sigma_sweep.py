"""The sigma_DVAE sweep of JPMAP §3.2 (Figures 1 and 2): how the denoising criterion of the VAE's training affects
the prior (Fig. 1) and the encoder's usefulness to JPMAP (Fig. 2).

For each prior (an MNIST MLP DVAE trained with noise ``sigma_DVAE`` added to the encoder's input, eq. 3.1-3.2) and
each of the paper's three problems -- denoising (``sigma = 150``), compressed sensing (``m = 80`` measurements,
about 10.2% of ``d = 784``, ``sigma = 10``) and inpainting (80% missing pixels, ``sigma = 10``) -- CSGM (eq. 1.3)
and JPMAP (Alg. 2.3, ``beta = 1/gamma^2``) restore the same batch of test images from the same noisy measurements:

* **Figure 1** (quality of the generative model): both initialised at the ground truth ``x*``: CSGM from
  ``z0 = mu_phi(x*)``, JPMAP from ``x0 = x*`` and ``z0 = mu_phi(x*)``;
* **Figure 2** (effectiveness of the encoder): both from their standard initialisations: CSGM from ``z0 = 0``,
  JPMAP from ``x0 = A_dagger(y)`` (§3.4).

:func:`make_problems` draws the measurements once (one seeded generator), :func:`sweep_prior` runs the 12 batched
solves of one prior, :func:`table_rows` and :func:`claims` turn per-image PSNRs into the notebook's metrics, and
:func:`plot_figure1` / :func:`plot_figure2` draw the figures. Noise levels are on the 0-255 scale.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..metrics import psnr, summarize
from ..models import GaussianVAE
from ..operators import LinearOperator, make_problem
from ..solvers import Restoration, solve

PROBLEMS = ("denoising", "compressed_sensing", "inpainting")
METHODS = ("csgm", "jpmap")
FIGURES = (1, 2)
INITS = {1: "ground truth (x0 = x*, z0 = mu_phi(x*))", 2: "standard (CSGM z0 = 0, JPMAP x0 = A_dagger(y))"}
TITLES = {"denoising": "Denoising", "compressed_sensing": "Compressed sensing", "inpainting": "Inpainting"}
#: the two families of swept priors, by training length: same recipe (Adam 1e-4, batch 128, seed 0, full MNIST train)
#: except sigma_DVAE; 200 epochs is the paper's recipe
PRIOR_PREFIXES = {200: "mnist_mlp_dvae", 50: "mnist_mlp_e50_dvae"}

Key = tuple[int, str, float, str]  # (figure, problem, sigma_dvae, method)


def prior_name(sigma_dvae: float, epochs: int = 200) -> str:
    """Name of the swept prior trained with ``sigma_dvae`` for ``epochs`` (200: the paper's recipe, or 50):
    (0, 200) -> ``mnist_mlp_dvae0``, (2.5, 200) -> ``mnist_mlp_dvae2p5``, (15, 50) -> ``mnist_mlp_e50_dvae15``."""
    if epochs not in PRIOR_PREFIXES:
        raise ValueError(
            f"no family of swept priors trained for {epochs!r} epochs; "
            f"the families have {sorted(PRIOR_PREFIXES)} epochs"
        )
    try:
        s = float(sigma_dvae)
    except (TypeError, ValueError):
        raise TypeError(f"sigma_dvae must be a number (0-255 scale), got {sigma_dvae!r}") from None
    if not math.isfinite(s) or s < 0:
        raise ValueError(f"sigma_dvae must be a finite number >= 0 (0-255 scale), got {sigma_dvae!r}")
    text = f"{s:g}"
    if "e" in text:
        raise ValueError(f"sigma_dvae = {sigma_dvae!r} has no prior name; the sweep uses values like 0, 2.5, 15")
    return PRIOR_PREFIXES[epochs] + text.replace(".", "p")


@dataclass
class Problem:
    """One degradation of the test batch: operator, measurements ``y`` and noise level (0-255 scale)."""

    name: str
    op: LinearOperator
    y: Tensor
    sigma: float
    params: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"operator": self.name, "sigma": self.sigma, **self.params}


def make_problems(
    x_true: Tensor,
    *,
    seed: int,
    denoising_sigma: float = 150.0,
    cs_m: int = 80,
    cs_sigma: float = 10.0,
    missing: float = 0.8,
    inpainting_sigma: float = 10.0,
    device: str | torch.device = "cpu",
) -> dict[str, Problem]:
    """The three problems of Figs. 1-2 on ``x_true`` ``(B, 1, 28, 28)``, every draw from one generator seeded with
    ``seed`` (in this order: denoising noise; CS matrix, CS noise; inpainting masks, inpainting noise), so every
    prior and method sees the same measurements. Each image gets its own inpainting mask."""
    x = x_true.detach().cpu()
    g = torch.Generator().manual_seed(int(seed))
    den = make_problem("denoising", x, sigma=denoising_sigma, generator=g)
    cs = make_problem("compressed_sensing", x, sigma=cs_sigma, level=int(cs_m), generator=g)
    inp = make_problem("inpainting", x, sigma=inpainting_sigma, level=missing, generator=g)
    d = math.prod(x.shape[1:])
    return {
        "denoising": Problem("denoising", den.op, den.y.to(device), float(denoising_sigma)),
        "compressed_sensing": Problem(
            "compressed_sensing", cs.op, cs.y.to(device), float(cs_sigma), {"m": int(cs_m), "fraction": cs_m / d}
        ),
        "inpainting": Problem(
            "inpainting",
            inp.op,
            inp.y.to(device),
            float(inpainting_sigma),
            {"missing": float(missing), "observed_fraction": float(inp.op.mask.mean())},
        ),
    }


def restore(
    problem: Problem,
    vae: GaussianVAE,
    method: str,
    figure: int,
    x_true: Tensor,
    *,
    n1: int = 25,
    n2: int = 150,
    n_max: int = 300,
    adam_max_iters: int = 3000,
    csgm_max_iters: int = 5000,
) -> Restoration:
    """Restore the whole batch with ``method`` ("csgm" or "jpmap") from the initialisation of ``figure``:
    1 = at the ground truth (CSGM ``z0 = mu_phi(x*)``; JPMAP ``x0 = x*``, ``z0 = mu_phi(x*)``), 2 = standard
    (CSGM ``z0 = 0``; JPMAP ``x0 = A_dagger(y)``). CSGM uses ``lambda = sigma^2``, JPMAP fixed ``beta = 1/gamma^2``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if figure not in FIGURES:
        raise ValueError(f"figure must be 1 (ground-truth initialisation) or 2 (standard), got {figure!r}")
    y, sigma = problem.y, problem.sigma
    x_true = x_true.to(y.device)
    if figure == 1:
        with torch.no_grad():
            z_true = vae.encode(x_true)[0]
    if method == "csgm":
        options = {"z0": z_true if figure == 1 else None, "max_iters": csgm_max_iters}
    else:
        options = {"n1": n1, "n2": n2, "n_max": n_max, "adam_max_iters": adam_max_iters}
        if figure == 1:
            options.update(x0=x_true, z0=z_true)
    return solve(method, y, problem.op, vae, sigma=sigma, **options)


@dataclass
class SweepResult:
    """Per-image PSNRs ``psnr[(figure, problem, sigma_dvae, method)]`` ``(B,)``, the seconds of each batched solve
    and the Adam steps each digit took in total (:func:`adam_steps`)."""

    psnr: dict[Key, Tensor] = field(default_factory=dict)
    seconds: dict[Key, float] = field(default_factory=dict)
    adam_steps: dict[Key, Tensor] = field(default_factory=dict)

    def update(self, other: SweepResult) -> None:
        self.psnr.update(other.psnr)
        self.seconds.update(other.seconds)
        self.adam_steps.update(other.adam_steps)


def adam_steps(r: Restoration) -> Tensor:
    """Adam steps (decoder gradient evaluations) each digit took in total: CSGM's single descent, or the sum of all
    of JPMAP's z-steps over its alternations."""
    if r.info.get("method") == "jpmap":
        return r.history["adam_steps"].clamp(min=0).sum(0).cpu()
    return r.iterations.detach().cpu()


def budget(result: SweepResult) -> dict[str, dict[str, float]]:
    """Per figure and method: seconds of all batched solves, median and max Adam steps per digit."""
    out = {}
    for f in FIGURES:
        for m in METHODS:
            keys = [k for k in result.seconds if k[0] == f and k[3] == m]
            if not keys:
                continue
            steps = torch.cat([result.adam_steps[k].double() for k in keys])
            out[f"fig{f}_{m}"] = {
                "seconds": sum(result.seconds[k] for k in keys),
                "adam_steps_median": float(steps.median()),
                "adam_steps_max": float(steps.max()),
            }
    return out


def score(x: Tensor, x_true: Tensor, *, clip: bool) -> Tensor:
    """Per-image PSNR of an estimate; ``clip=True`` clamps it to [0, 1] first (the same rule for every method)."""
    return psnr(x.clamp(0, 1) if clip else x, x_true.to(x.device)).detach().cpu()


def sweep_prior(
    vae: GaussianVAE,
    sigma_dvae: float,
    problems: Mapping[str, Problem],
    x_true: Tensor,
    *,
    clip: bool = False,
    figures: Iterable[int] = FIGURES,
    methods: Iterable[str] = METHODS,
    **solver: Any,
) -> SweepResult:
    """Every (figure, problem, method) for one prior: one batched solve each (all images at once)."""
    out = SweepResult()
    s = float(sigma_dvae)
    for figure in figures:
        for name, problem in problems.items():
            for method in methods:
                t0 = time.perf_counter()
                r = restore(problem, vae, method, figure, x_true, **solver)
                key = (int(figure), name, s, method)
                out.seconds[key] = time.perf_counter() - t0
                out.psnr[key] = score(r.x, x_true, clip=clip)
                out.adam_steps[key] = adam_steps(r)
    return out


def table_rows(result: SweepResult) -> list[dict[str, Any]]:
    """One row per (figure, problem, sigma_dvae, method), sorted: the ``table`` of the notebook's metrics.json."""
    rows = []
    for (figure, problem, s, method), values in result.psnr.items():
        st = summarize(values)
        rows.append(
            {
                "figure": figure, "problem": problem, "sigma_dvae": s, "method": method,
                "n_images": int(values.numel()),
                "psnr_mean": st["mean"], "psnr_q25": st["q25"], "psnr_q75": st["q75"],
            }
        )  # fmt: skip
    order = {p: i for i, p in enumerate(PROBLEMS)}
    rows.sort(key=lambda r: (r["figure"], order.get(r["problem"], 99), r["sigma_dvae"], METHODS.index(r["method"])))
    return rows


def _lookup(rows: Sequence[Mapping[str, Any]], figure: int, problem: str, method: str) -> dict[float, float]:
    return {
        float(r["sigma_dvae"]): float(r["psnr_mean"])
        for r in rows
        if r["figure"] == figure and r["problem"] == problem and r["method"] == method
    }


def claims(
    rows: Sequence[Mapping[str, Any]],
    result: SweepResult | None = None,
    *,
    moderate_max: float = 20.0,
    encoder_min: float = 5.0,
) -> dict[str, Any]:
    """Summary numbers for the paper's claims, per problem (means over images, in dB).

    ``fig1[problem][method]`` (ground-truth initialisation): ``spread_moderate`` = max - min of the mean PSNR over
    ``0 <= sigma_DVAE <= moderate_max``, ``max_drop_moderate`` = PSNR at sigma_DVAE = 0 minus the worst PSNR over
    ``0 < sigma_DVAE <= moderate_max`` (> 0: the denoising criterion cost that much), reached at
    ``worst_sigma_moderate``; ``sigmas_moderate``.

    ``fig2[problem]`` (standard initialisation), with gap = JPMAP - CSGM: ``gap_at_0``, ``gaps`` per sigma_DVAE,
    ``gap_min_ge5`` (at ``worst_sigma_ge5``) / ``gap_mean_ge5`` over ``sigma_DVAE >= encoder_min``,
    ``advantage_ge5_minus_0`` = ``gap_mean_ge5 - gap_at_0`` (> 0: JPMAP's advantage grows once the VAE is trained
    with noise); each method's own change ``jpmap_ge5_minus_0`` / ``csgm_ge5_minus_0`` (mean PSNR over
    ``sigma_DVAE >= encoder_min`` minus that at 0: CSGM does not use the encoder, so its change tells how much of
    the gap's change comes from the decoder alone) and, when ``result`` (the per-image PSNRs) is given,
    ``win_frac_at_0`` / ``win_frac_ge5``: the fraction of images on which JPMAP is better.
    Values that the swept sigma_DVAE do not allow (e.g. no sigma_DVAE = 0) are NaN.
    """
    nan = math.nan
    fig1: dict[str, Any] = {}
    fig2: dict[str, Any] = {}
    for problem in PROBLEMS:
        per_method = {}
        for method in METHODS:
            m = _lookup(rows, 1, problem, method)
            mod = {s: v for s, v in m.items() if s <= moderate_max}
            pos = [v for s, v in mod.items() if s > 0]
            if not mod:
                continue
            worst = min((v, s) for s, v in mod.items() if s > 0)[1] if pos else nan
            per_method[method] = {
                "sigmas_moderate": sorted(mod),
                "spread_moderate": max(mod.values()) - min(mod.values()),
                "max_drop_moderate": (mod[0.0] - mod[worst]) if 0.0 in mod and pos else nan,
                "worst_sigma_moderate": worst,
            }
        if per_method:
            fig1[problem] = per_method
        c, j = _lookup(rows, 2, problem, "csgm"), _lookup(rows, 2, problem, "jpmap")
        gaps = {s: j[s] - c[s] for s in sorted(set(c) & set(j))}
        if not gaps:
            continue
        ge = {s: g for s, g in gaps.items() if s >= encoder_min}
        entry = {
            "gaps": {f"{s:g}": g for s, g in gaps.items()},
            "gap_at_0": gaps.get(0.0, nan),
            "gap_min_ge5": min(ge.values()) if ge else nan,
            "gap_mean_ge5": sum(ge.values()) / len(ge) if ge else nan,
            "worst_sigma_ge5": min(ge, key=ge.get) if ge else nan,
        }
        entry["advantage_ge5_minus_0"] = entry["gap_mean_ge5"] - entry["gap_at_0"]
        for name, m in (("jpmap", j), ("csgm", c)):
            mge = [v for s, v in m.items() if s >= encoder_min]
            entry[f"{name}_ge5_minus_0"] = (sum(mge) / len(mge) - m[0.0]) if mge and 0.0 in m else nan
        if result is not None:
            wins = {
                s: float((result.psnr[(2, problem, s, "jpmap")] > result.psnr[(2, problem, s, "csgm")]).float().mean())
                for s in gaps
            }
            ws = [w for s, w in wins.items() if s >= encoder_min]
            entry["win_frac_at_0"] = wins.get(0.0, nan)
            entry["win_frac_ge5"] = sum(ws) / len(ws) if ws else nan
        fig2[problem] = entry
    return {"moderate_max": moderate_max, "encoder_min": encoder_min, "fig1": fig1, "fig2": fig2}


def describe_claims(summary: Mapping[str, Any], *, drop_tol: float = 1.0) -> str:
    """Plain-language verdict on each claim of §3.2, from :func:`claims` (``drop_tol``: the PSNR drop, in dB, that
    still counts as "not degraded" for Fig. 1)."""

    def ok(flag: bool) -> str:
        return "holds" if flag else "DOES NOT HOLD"

    mod, enc = summary["moderate_max"], summary["encoder_min"]
    lines = [
        f"Fig. 1 -- training with sigma_DVAE in (0, {mod:g}] does not degrade the prior (ground-truth init.; "
        f"drop = mean PSNR at sigma_DVAE = 0 minus the worst over that range, at most {drop_tol:g} dB):"
    ]
    for problem, per in summary["fig1"].items():
        for method, v in per.items():
            drop = v["max_drop_moderate"]
            if not math.isfinite(drop):
                verdict = "cannot tell (needs sigma_DVAE = 0 and a moderate sigma_DVAE > 0)"
            else:
                verdict = (
                    f"{ok(drop <= drop_tol)}: drop {drop:+.2f} dB (worst at sigma_DVAE = "
                    f"{v['worst_sigma_moderate']:g}), spread of the means {v['spread_moderate']:.2f} dB"
                )
            lines.append(f"  {problem:<19s} {method:<6s} {verdict}")
    lines.append(
        f"Fig. 2 -- from the standard initialisations JPMAP beats CSGM for sigma_DVAE >= {enc:g} and loses "
        f"(part of) its advantage at sigma_DVAE = 0 (gap = mean PSNR JPMAP - CSGM):"
    )
    for problem, v in summary["fig2"].items():
        g_min, g0, g_mean = v["gap_min_ge5"], v["gap_at_0"], v["gap_mean_ge5"]
        wins = ""
        if math.isfinite(v.get("win_frac_at_0", math.nan)) and math.isfinite(v.get("win_frac_ge5", math.nan)):
            wins = (
                f"; JPMAP better on {v['win_frac_at_0']:.0%} of the digits at 0, {v['win_frac_ge5']:.0%} at >= {enc:g}"
            )
        beats = (
            f"beats CSGM at every sigma_DVAE >= {enc:g}: {ok(g_min > 0)} (smallest gap {g_min:+.2f} dB at "
            f"{v['worst_sigma_ge5']:g}, mean {g_mean:+.2f} dB)"
            if math.isfinite(g_min)
            else f"beats CSGM at sigma_DVAE >= {enc:g}: cannot tell (no such prior in the sweep)"
        )
        loses = (
            f"smaller advantage at sigma_DVAE = 0: {ok(g0 < g_mean)} (gap {g0:+.2f} dB)"
            if math.isfinite(g0) and math.isfinite(g_mean)
            else "advantage at sigma_DVAE = 0: cannot tell (needs sigma_DVAE = 0 and one >= 5)"
        )
        pad = " " * 22
        lines += [f"  {problem:<19s} {beats}", f"{pad}{loses}{wins}"]
        dj, dc = v.get("jpmap_ge5_minus_0", math.nan), v.get("csgm_ge5_minus_0", math.nan)
        if math.isfinite(dj) and math.isfinite(dc):
            lines.append(
                f"{pad}mean PSNR change from sigma_DVAE = 0 to >= {enc:g}: JPMAP {dj:+.2f} dB, CSGM {dc:+.2f} dB"
            )
    return "\n".join(lines)


# ---- figures --------------------------------------------------------------------------------------
STYLE = {
    "csgm": {"color": "C0", "marker": "o", "label": "CSGM"},
    "jpmap": {"color": "C1", "marker": "s", "label": "JPMAP"},
}
LETTERS = "abcdefghijklmnop"


def _sigma_ticks(ax, sigmas) -> None:
    """Ticks at the swept sigma_DVAE values."""
    ticks = sorted(set(sigmas))
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize=8)


def _band(ax, xs, mid, lo, hi, **style) -> None:
    ax.fill_between(xs, lo, hi, color=style["color"], alpha=0.2, lw=0)
    ax.plot(xs, mid, marker=style["marker"], color=style["color"], label=style["label"], ms=4, lw=1.3)


def _psnr_row(axes, rows, figure: int, problems: Sequence[Problem] | Mapping[str, Problem], first: int = 0) -> None:
    probs = problems.values() if isinstance(problems, Mapping) else problems
    for k, (ax, problem) in enumerate(zip(axes, probs, strict=True)):
        for method in METHODS:
            sel = [r for r in rows if r["figure"] == figure and r["problem"] == problem.name and r["method"] == method]
            sel.sort(key=lambda r: r["sigma_dvae"])
            if not sel:
                continue
            xs = [r["sigma_dvae"] for r in sel]
            _band(ax, xs, [r["psnr_mean"] for r in sel], [r["psnr_q25"] for r in sel], [r["psnr_q75"] for r in sel],
                  **STYLE[method])  # fmt: skip
            _sigma_ticks(ax, xs)
        ax.set_title(f"({LETTERS[first + k]}) {_problem_title(problem)}", loc="left")
        ax.set_xlabel(r"$\sigma_\mathrm{DVAE}$ of the prior (0-255 scale)")
        ax.set_ylabel("PSNR (dB)")
    axes[0].legend(title="mean, band q25-q75", fontsize=8, title_fontsize=8)


def _problem_title(problem: Problem) -> str:
    extra = {
        "compressed_sensing": f", m = {problem.params.get('m', '?')}",
        "inpainting": f", {problem.params.get('missing', math.nan):.0%} missing",
    }.get(problem.name, "")
    return f"{TITLES.get(problem.name, problem.name)}{extra}, $\\sigma$ = {problem.sigma:g}"


def plot_figure1(rows: Sequence[Mapping[str, Any]], problems: Mapping[str, Problem]):
    """Fig. 1: PSNR against sigma_DVAE, both methods initialised at the ground truth, one panel per problem."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(problems), figsize=(4.2 * len(problems), 3.4), squeeze=False)
    _psnr_row(axes[0], rows, 1, problems)
    fig.tight_layout()
    return fig


def plot_figure2(rows: Sequence[Mapping[str, Any]], problems: Mapping[str, Problem], result: SweepResult):
    """Fig. 2: top, PSNR against sigma_DVAE from the standard initialisations (mean, q25-q75 band); bottom, the
    per-image gain JPMAP - CSGM (median and q25-q75 band over images; above 0: JPMAP better)."""
    import matplotlib.pyplot as plt

    n = len(problems)
    fig, axes = plt.subplots(2, n, figsize=(4.2 * n, 6.4), squeeze=False, sharex="col")
    _psnr_row(axes[0], rows, 2, problems)
    for ax in axes[0]:
        ax.set_xlabel("")  # shared with the row below
    for k, (ax, problem) in enumerate(zip(axes[1], problems.values(), strict=True)):
        sigmas = sorted({s for (f, p, s, _m) in result.psnr if f == 2 and p == problem.name})
        stats = [summarize(gain_per_image(result, problem.name, s)) for s in sigmas]
        ax.axhline(0.0, color="0.4", lw=0.8, ls=":")
        ax.fill_between(sigmas, [t["q25"] for t in stats], [t["q75"] for t in stats], color="C2", alpha=0.25, lw=0)
        ax.plot(sigmas, [t["median"] for t in stats], color="C2", marker="D", ms=4, lw=1.3, label="median")
        _sigma_ticks(ax, sigmas)
        ax.set_title(f"({LETTERS[n + k]}) JPMAP $-$ CSGM, {TITLES[problem.name].lower()}", loc="left")
        ax.set_xlabel(r"$\sigma_\mathrm{DVAE}$ of the prior (0-255 scale)")
        ax.set_ylabel("PSNR gain per image (dB)")
    axes[1][0].legend(title="over images, band q25-q75", fontsize=8, title_fontsize=8)
    fig.tight_layout()
    return fig


def gain_per_image(result: SweepResult, problem: str, sigma_dvae: float, figure: int = 2) -> Tensor:
    """Per-image PSNR of JPMAP minus CSGM (same images, same measurements)."""
    s = float(sigma_dvae)
    return result.psnr[(figure, problem, s, "jpmap")] - result.psnr[(figure, problem, s, "csgm")]


# ---- the two training lengths side by side -------------------------------------------------------------
def family_gains(results: Mapping[int, SweepResult]) -> list[dict[str, Any]]:
    """Per family (training epochs), problem and sigma_DVAE: the per-image gain PSNR(JPMAP) - PSNR(CSGM) from the
    standard initialisations (Fig. 2), summarised (mean, median, quartiles) with the fraction of images on which
    JPMAP is better. ``results`` maps epochs to the family's :class:`SweepResult` (its Fig. 2 solves)."""
    rows = []
    for epochs in sorted(results):
        result = results[epochs]
        keys = sorted({(p, s) for (f, p, s, m) in result.psnr if f == 2 and m == "jpmap"})
        for problem, s in keys:
            if (2, problem, s, "csgm") not in result.psnr:
                continue
            g = gain_per_image(result, problem, s)
            st = summarize(g)
            rows.append(
                {
                    "epochs": int(epochs), "problem": problem, "sigma_dvae": float(s), "n_images": int(g.numel()),
                    "gain_mean": st["mean"], "gain_median": st["median"], "gain_q25": st["q25"],
                    "gain_q75": st["q75"], "win_frac": float((g > 0).float().mean()),
                }
            )  # fmt: skip
    order = {p: i for i, p in enumerate(PROBLEMS)}
    rows.sort(key=lambda r: (-r["epochs"], order.get(r["problem"], 99), r["sigma_dvae"]))
    return rows


def compare_families(rows: Sequence[Mapping[str, Any]], *, encoder_min: float = 5.0) -> dict[str, Any]:
    """Per problem and family, from :func:`family_gains`: the mean gain at sigma_DVAE = 0, its mean over
    sigma_DVAE >= ``encoder_min``, their difference (``advantage_ge5_minus_0``: what the denoising criterion buys
    JPMAP against CSGM) and whether sigma_DVAE = 0 has the smallest mean gain of the family (``zero_is_worst``).
    NaN where the family lacks sigma_DVAE = 0 or one >= ``encoder_min``."""
    nan = math.nan
    out: dict[str, Any] = {}
    for problem in PROBLEMS:
        per: dict[str, Any] = {}
        for epochs in sorted({int(r["epochs"]) for r in rows}, reverse=True):
            g = {r["sigma_dvae"]: r["gain_mean"] for r in rows if r["problem"] == problem and r["epochs"] == epochs}
            if not g:
                continue
            ge = [v for s, v in g.items() if s >= encoder_min]
            at0 = g.get(0.0, nan)
            mean_ge = sum(ge) / len(ge) if ge else nan
            per[str(epochs)] = {
                "gain_at_0": at0,
                "gain_mean_ge5": mean_ge,
                "advantage_ge5_minus_0": mean_ge - at0,
                "zero_is_worst": bool(0.0 in g and at0 <= min(g.values())),
                "win_frac_at_0": next(
                    (r["win_frac"] for r in rows if r["problem"] == problem and r["epochs"] == epochs
                     and r["sigma_dvae"] == 0.0), nan),
            }  # fmt: skip
        if per:
            out[problem] = per
    return {"encoder_min": encoder_min, "problems": out}


def describe_families(summary: Mapping[str, Any]) -> str:
    """Plain-language comparison of the families from :func:`compare_families`."""
    enc = summary["encoder_min"]
    lines = [f"Mean gain JPMAP - CSGM (standard initialisations) at sigma_DVAE = 0 and over sigma_DVAE >= {enc:g}:"]
    for problem, per in summary["problems"].items():
        for epochs, v in per.items():
            lines.append(
                f"  {problem:<19s} {epochs:>3s} epochs: at 0 {v['gain_at_0']:+.2f} dB (JPMAP better on "
                f"{v['win_frac_at_0']:.0%}), >= {enc:g} {v['gain_mean_ge5']:+.2f} dB; the denoising criterion adds "
                f"{v['advantage_ge5_minus_0']:+.2f} dB; sigma_DVAE = 0 is the family's worst: {v['zero_is_worst']}"
            )
    return "\n".join(lines)


FAMILY_STYLE = {200: {"color": "C3", "marker": "s", "ls": "-"}, 50: {"color": "C7", "marker": "o", "ls": "--"}}


def plot_family_gains(rows: Sequence[Mapping[str, Any]], problems: Mapping[str, Problem]):
    """The gain PSNR(JPMAP) - PSNR(CSGM) per image against sigma_DVAE (median, q25-q75 band), one line per training
    length, one panel per problem: does the denoising criterion matter more when the prior is trained longer?"""
    import matplotlib.pyplot as plt

    n = len(problems)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    for k, (ax, problem) in enumerate(zip(axes[0], problems.values(), strict=True)):
        ax.axhline(0.0, color="0.4", lw=0.8, ls=":")
        for epochs in sorted({int(r["epochs"]) for r in rows}, reverse=True):
            sel = sorted((r for r in rows if r["problem"] == problem.name and r["epochs"] == epochs),
                         key=lambda r: r["sigma_dvae"])  # fmt: skip
            if not sel:
                continue
            st = FAMILY_STYLE.get(epochs, {"color": "C4", "marker": "^", "ls": "-."})
            xs = [r["sigma_dvae"] for r in sel]
            ax.fill_between(xs, [r["gain_q25"] for r in sel], [r["gain_q75"] for r in sel], color=st["color"],
                            alpha=0.15, lw=0)  # fmt: skip
            ax.plot(xs, [r["gain_median"] for r in sel], color=st["color"], marker=st["marker"], ls=st["ls"], ms=4,
                    lw=1.3, label=f"{epochs} epochs")  # fmt: skip
            _sigma_ticks(ax, xs)
        ax.set_title(f"({LETTERS[k]}) JPMAP $-$ CSGM, {TITLES[problem.name].lower()}", loc="left")
        ax.set_xlabel(r"$\sigma_\mathrm{DVAE}$ of the prior (0-255 scale)")
        ax.set_ylabel("PSNR gain per image (dB)")
    axes[0][0].legend(title="priors trained for; median, q25-q75", fontsize=8, title_fontsize=8)
    fig.tight_layout()
    return fig
