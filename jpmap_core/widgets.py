"""The JPMAP explorer of ``notebooks/00_overview.ipynb``: plain callbacks (tested directly) and their widgets.

* :func:`explore` -- degrade one test image (denoising, inpainting or compressed sensing, JPMAP §3.4) and
  restore it with CSGM (eq. 1.3), JPMAP Alg. 2.3 (fixed ``beta = 1/gamma^2``) or Alg. 2.4 (``alpha``); returns an
  :class:`ExplorerResult` (images, PSNRs, the ``J1`` trace). Bad settings raise ``ValueError`` saying what was
  wrong and what is expected.
* :func:`render` -- one matplotlib figure of a result: (a) the images with their PSNR, (b) ``J1`` along the
  iterations.
* :func:`build_explorer` -- the ipywidgets front end: controls; on every change :func:`explore` and
  :func:`render` run again and the picture is replaced; a validation error is shown as text instead.

Everything random (mask, noise, compressed-sensing matrix) is drawn from a ``torch.Generator`` seeded with
``seed``: the same settings give the same picture.

The posterior explorer of ``notebooks/12_vble_posterior.ipynb``:

* :func:`posterior_explorer_frame` -- new samples of one image's VBLE / VBLE-xz posterior (drawn on demand with
  :func:`jpmap_core.solvers.posterior_samples`, seeded with ``seed``), their mean and std, beside the fitted MMSE
  estimate and std map; plain arrays.
* :func:`render_posterior_frame` -- one matplotlib figure of a frame.
"""

from __future__ import annotations

import io
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .metrics import psnr
from .models import GaussianVAE
from .operators import make_problem
from .solvers import Restoration, posterior_samples, solve

__all__ = [
    "ALGORITHMS",
    "PROBLEMS",
    "ExplorerResult",
    "ExplorerWidget",
    "build_explorer",
    "explore",
    "posterior_explorer_frame",
    "render",
    "render_posterior_frame",
    "solver_call",
]

#: the explorer's problems: names of :data:`jpmap_core.operators.PROBLEMS`, with the label the page shows
PROBLEMS = ("denoising", "inpainting", "compressed_sensing")
PROBLEM_LABELS = {"denoising": "denoising", "inpainting": "inpainting", "compressed_sensing": "compressed sensing"}
#: algorithm key -> label shown in the explorer and on figures
ALGORITHMS = {
    "csgm": "CSGM (eq. 1.3)",
    "2.3": "JPMAP, Alg. 2.3 (beta = 1/gamma^2)",
    "2.4": "JPMAP, Alg. 2.4 (alpha)",
}
#: what ``level`` means for each problem
LEVEL_MEANING = {
    "denoising": "unused",
    "inpainting": "fraction of missing pixels, in [0, 1)",
    "compressed_sensing": "number of measurements m",
}


@dataclass
class ExplorerResult:
    """One explorer run: the images, their PSNR (dB) and the energy trace.

    ``images`` maps a label to a ``(1, C, H, W)`` tensor, in display order: ``x*`` (ground truth), the
    measurements seen as an image (``A^T y`` for denoising and inpainting, ``A^dagger y`` for compressed
    sensing, whose ``y`` is a vector), the estimate ``x_hat`` and, for JPMAP, ``mu_theta(z_hat)``.
    ``psnr`` maps the same labels (but ``x*``) to dB. ``j1`` is ``J1(x_n, z_n)`` per JPMAP iteration
    (eq. 2.5 with the current ``beta``; empty for CSGM, which records only its final energy in ``energy``);
    ``beta`` and ``outer`` (Alg. 2.4's outer index ``k``) are aligned with ``j1``.
    """

    settings: dict[str, Any]
    images: dict[str, Tensor]
    psnr: dict[str, float]
    j1: Tensor
    beta: Tensor
    outer: Tensor
    energy: float
    converged: bool
    iterations: int
    seconds: float
    restoration: Restoration = field(repr=False)

    @property
    def psnr_estimate(self) -> float:
        """PSNR (dB) of the estimate ``x_hat`` against ``x*``."""
        return self.psnr["x_hat"]

    def summary(self) -> str:
        """One line: algorithm, PSNR, iterations, convergence, time."""
        s = self.settings
        what = ALGORITHMS[s["algorithm"]]
        unit = "Adam steps" if s["algorithm"] == "csgm" else "iterations"
        return (
            f"{what} on {PROBLEM_LABELS[s['problem']]} (sigma={s['sigma']:g}{_level_text(s)}), image #{s['index']}: "
            f"PSNR {self.psnr_estimate:.2f} dB, {self.iterations} {unit}, "
            f"{'converged' if self.converged else 'stopped at the iteration cap'}, {self.seconds:.1f} s"
        )


def _level_text(s: dict[str, Any]) -> str:
    if s["problem"] == "inpainting":
        return f", {100 * s['level']:.0f}% missing"
    if s["problem"] == "compressed_sensing":
        return f", m={s['level']}"
    return ""


# ---- validation ----------------------------------------------------------------------------------
def _is_int(v: object) -> bool:
    if isinstance(v, bool):
        return False
    return isinstance(v, numbers.Integral) or (isinstance(v, float) and v.is_integer())


def _number(v: object, name: str) -> float:
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {v!r}") from None
    if not math.isfinite(f):
        raise ValueError(f"{name} must be finite, got {v!r}")
    return f


def _int(v: object, name: str, lo: int, hi: int | None = None, hint: str = "") -> int:
    if not _is_int(v):
        raise ValueError(f"{name} must be an integer, got {v!r}{hint}")
    i = int(v)  # type: ignore[arg-type]
    if i < lo or (hi is not None and i > hi):
        rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an integer {rng}, got {i}{hint}")
    return i


def _check_settings(
    problem: str,
    sigma: float,
    level: float | int | None,
    algorithm: str,
    n1: int,
    n2: int,
    n_max: int,
    alpha: float | None,
    index: int,
    n_images: int,
    d: int,
    adam_max_iters: int,
    k_max: int,
) -> dict[str, Any]:
    """Normalised settings, or ``ValueError`` naming the bad one and what is expected."""
    if problem not in PROBLEMS:
        raise ValueError(f"problem must be one of {', '.join(map(repr, PROBLEMS))}; got {problem!r}")
    if algorithm not in ALGORITHMS:
        labels = ", ".join(f"{k!r} ({v})" for k, v in ALGORITHMS.items())
        raise ValueError(f"algorithm must be one of {labels}; got {algorithm!r}")
    sigma = _number(sigma, "sigma")
    if sigma <= 0:
        raise ValueError(
            f"sigma (noise std on the 0-255 scale) must be > 0, got {sigma:g}: the data term "
            f"||Ax - y||^2 / (2 sigma^2) of eq. 1.1 needs a positive noise level"
        )
    if problem == "inpainting":
        level = _number(level, "level (fraction of missing pixels)")
        if not 0 <= level < 1:
            raise ValueError(
                f"for inpainting, level is the fraction of missing pixels and must be in [0, 1), got {level:g}"
                + (" (a percentage? 80% missing is level=0.8)" if 1 <= level <= 100 else "")
            )
    elif problem == "compressed_sensing":
        hint = f" (the paper's Fig. 7c uses m = 140 of d = {d})" if isinstance(level, float) and level < 1 else ""
        level = _int(level, "for compressed sensing, level (the number of measurements m)", 1, d, hint)
    else:
        level = None
    n1 = _int(n1, "n1", 0)
    n2 = _int(n2, "n2", 0)
    n_max = _int(n_max, "n_max", 1)
    if algorithm != "csgm" and not n1 <= n2 <= n_max:
        raise ValueError(
            f"Alg. 2.3 needs n1 <= n2 <= n_max (encoder guesses for n < n1, encoder-initialised descent for "
            f"n < n2, plain descent after), got n1={n1}, n2={n2}, n_max={n_max}"
        )
    adam_max_iters = _int(adam_max_iters, "the Adam cap (adam_max_iters)", 1)
    k_max = _int(k_max, "k_max (outer iterations of Alg. 2.4)", 1)
    if algorithm == "2.4":
        if alpha is None:
            raise ValueError("Alg. 2.4 needs alpha > 0 (grey levels of RMSE allowed between x and G(z)); got None")
        alpha = _number(alpha, "alpha")
        if alpha <= 0:
            raise ValueError(
                f"Alg. 2.4 needs alpha > 0 (grey levels of RMSE allowed between x and G(z), "
                f"eps = (alpha/255)^2 d); got {alpha:g}"
            )
    else:
        alpha = None
    index = _int(index, "index", 0, n_images - 1, f" ({n_images} images loaded)")
    return {
        "problem": problem,
        "sigma": sigma,
        "level": level,
        "algorithm": algorithm,
        "n1": n1,
        "n2": n2,
        "n_max": n_max,
        "alpha": alpha,
        "index": index,
        "adam_max_iters": adam_max_iters,
        "k_max": k_max,
    }


# ---- callbacks -----------------------------------------------------------------------------------
def solver_call(s: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The registry name (:data:`jpmap_core.solvers.SOLVERS`) and options of the explorer's algorithm ``s``."""
    if s["algorithm"] == "csgm":
        return "csgm", {"max_iters": s["adam_max_iters"]}
    options = {"n1": s["n1"], "n2": s["n2"], "n_max": s["n_max"], "adam_max_iters": s["adam_max_iters"]}
    if s["algorithm"] == "2.4":
        options.update(alpha=s["alpha"], k_max=s["k_max"])
    return "jpmap", options


def explore(
    problem: str,
    sigma: float,
    level: float | int | None,
    algorithm: str,
    n1: int,
    n2: int,
    n_max: int,
    alpha: float | None,
    index: int,
    *,
    vae: GaussianVAE,
    images: Tensor,
    seed: int = 0,
    adam_max_iters: int = 3000,
    k_max: int = 20,
) -> ExplorerResult:
    """Degrade ``images[index]`` and restore it with one algorithm; the explorer's callback.

    ``problem``: ``"denoising"``, ``"inpainting"`` or ``"compressed_sensing"``; ``sigma``: noise std (0-255
    scale); ``level``: missing fraction (inpainting) or ``m`` (compressed sensing), ignored for denoising.
    ``algorithm``: ``"csgm"``, ``"2.3"`` (JPMAP with fixed ``beta = 1/gamma^2``) or ``"2.4"`` (JPMAP with the
    exponential multiplier on ``||G(z) - x||^2 <= (alpha/255)^2 d``, at most ``k_max`` outer iterations).
    ``n1 <= n2 <= n_max``: Alg. 2.3's iteration counts (ignored by CSGM). ``adam_max_iters`` caps every Adam
    run: CSGM's whole descent, each JPMAP z-step. Raises ``ValueError`` with a clear message on bad settings.
    """
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (N, C, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    d = math.prod(images.shape[1:])
    s = _check_settings(
        problem, sigma, level, algorithm, n1, n2, n_max, alpha, index, images.shape[0], d, adam_max_iters, k_max
    )
    s["seed"] = int(seed)
    x = images[s["index"] : s["index"] + 1]
    g = torch.Generator().manual_seed(int(seed))
    problem = make_problem(s["problem"], x, sigma=s["sigma"], level=s["level"], generator=g)
    op, y = problem.op, problem.y
    t0 = time.perf_counter()
    method, options = solver_call(s)
    r = solve(method, y, op, vae, sigma=s["sigma"], **options)
    objective = r.history["objective"][:, 0]
    if s["algorithm"] == "csgm":
        energy = float(objective[-1])
        j1 = beta = outer = torch.empty(0)
    else:
        j1, beta, outer = objective, r.history["beta"][:, 0], r.history["outer"][:, 0]
        keep = ~torch.isnan(j1)
        j1, beta, outer = j1[keep], beta[keep], outer[keep]
        energy = float(j1[-1]) if j1.numel() else math.nan
    seconds = time.perf_counter() - t0
    y_label = "A^T y" if s["problem"] != "compressed_sensing" else "A^dagger y"
    y_img = op.A_adjoint(y) if s["problem"] != "compressed_sensing" else op.A_dagger(y)
    imgs = {"x*": x, y_label: y_img.detach(), "x_hat": r.x.detach()}
    if s["algorithm"] != "csgm":
        imgs["mu_theta(z_hat)"] = r.x_decoded.detach()
    scores = {k: float(psnr(v.clamp(-1, 2), x)[0]) for k, v in imgs.items() if k != "x*"}
    return ExplorerResult(
        settings=s,
        images=imgs,
        psnr=scores,
        j1=j1,
        beta=beta,
        outer=outer,
        energy=energy,
        converged=bool(r.converged[0]),
        iterations=int(r.iterations[0]),
        seconds=seconds,
        restoration=r,
    )


_TITLES = {
    "x*": r"$x^*$",
    "A^T y": r"$A^\top y$",
    "A^dagger y": r"$A^\dagger y$",
    "x_hat": r"$\hat x$",
    "mu_theta(z_hat)": r"$\mu_\theta(\hat z)$",
}


def render(result: ExplorerResult, *, summary: bool = True):
    """Figure of one explorer run: (a) the images with PSNR; (b) ``J1(x_n, z_n)`` along the iterations; with
    ``summary``, the summary line as its title (the widget prints it as text instead, so it is shown once)."""
    import matplotlib.pyplot as plt

    from .plotting import setup_style

    setup_style()
    imgs = result.images
    n = len(imgs)
    fig = plt.figure(figsize=(1.5 * n + 5.0, 2.9))
    gs = fig.add_gridspec(1, n + 2, width_ratios=[1] * n + [0.9, 3.0], wspace=0.08)
    for j, (label, img) in enumerate(imgs.items()):
        ax = fig.add_subplot(gs[0, j])
        ax.imshow(img[0].detach().cpu().clamp(0, 1).permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
        title = _TITLES.get(label, label)
        if label in result.psnr:
            title += f"\n{result.psnr[label]:.1f} dB"
        ax.set_title(title, fontsize=9)
        if j == 0:
            ax.text(-0.15, 1.25, "(a)", transform=ax.transAxes, fontweight="bold", va="bottom")
    ax = fig.add_subplot(gs[0, n + 1])
    ax.text(-0.02, 1.07, "(b)", transform=ax.transAxes, fontweight="bold", ha="right", va="bottom")
    s = result.settings
    if s["algorithm"] == "csgm" or result.j1.numel() == 0:
        ax.text(
            0.5, 0.5,
            f"CSGM descends on z only (eq. 1.3)\nfinal energy {result.energy:.4g}\n({result.iterations} Adam steps)",
            ha="center", va="center", transform=ax.transAxes,
        )  # fmt: skip
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
    else:
        it = torch.arange(1, result.j1.numel() + 1)
        ax.plot(it.numpy(), result.j1.numpy(), marker=".", ms=3, lw=1.2, label=r"$J_1$")
        if bool((result.j1 > 0).all()):
            ax.set_yscale("log")
        ax.set_xlabel("iteration $n$")
        ax.set_ylabel(r"$J_1(x_n, z_n)$ (eq. 2.5)")
        if s["algorithm"] == "2.4":
            starts = (torch.nonzero(result.outer[1:] != result.outer[:-1]).squeeze(1) + 1.5).tolist()
            for k, xv in enumerate(starts):
                ax.axvline(xv, color="0.7", lw=0.6, ls=":", label="new $\\beta_k$" if k == 0 else None)
            ax2 = ax.twinx()
            ax2.plot(it.numpy(), result.beta.numpy(), color="C1", lw=1.0, label=r"$\beta$")
            ax2.set_yscale("log")
            ax2.set_ylabel(r"$\beta$ (Alg. 2.4)", color="C1")
            ax2.grid(False)
        ax.legend(loc="upper right", fontsize=8)
    if summary:
        fig.suptitle(result.summary(), fontsize=9, y=1.1)
    return fig


# ---- widgets -------------------------------------------------------------------------------------
DEFAULTS: dict[str, Any] = {
    "problem": "inpainting",
    "sigma": 10.0,
    "missing": 0.8,
    "m": 140,
    "algorithm": "2.3",
    "n1": 25,
    "n2": 150,
    "n_max": 300,
    "alpha": 3.0,
    "index": 0,
    "adam_max_iters": 300,
    "k_max": 20,
}


class ExplorerWidget:
    """Controls + picture + status line. ``widget`` is the ipywidgets box to display.

    ``result`` is the last :class:`ExplorerResult` (``None`` after an error) and ``error`` the last validation
    message (``None`` after a success); :meth:`refresh` recomputes with the current control values.
    """

    def __init__(self, vae: GaussianVAE, images: Tensor, *, seed: int = 0, defaults: dict[str, Any] | None = None):
        import ipywidgets as w

        unknown = set(defaults or {}) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown explorer defaults {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        v = dict(DEFAULTS, **(defaults or {}))
        self.vae, self.images, self.seed = vae, images, int(seed)
        d = math.prod(images.shape[1:])
        style = {"description_width": "150px"}

        def slider() -> dict[str, Any]:  # one Layout per control: visibility is toggled per control
            return {"continuous_update": False, "style": style, "layout": w.Layout(width="420px")}

        self.controls: dict[str, w.ValueWidget] = {
            "problem": w.Dropdown(
                options=[(PROBLEM_LABELS[k], k) for k in PROBLEMS],
                value=v["problem"],
                description="problem",
                style=style,
            ),
            "sigma": w.FloatSlider(value=v["sigma"], min=1, max=150, step=1, description="sigma (0-255)", **slider()),
            "missing": w.FloatSlider(
                value=v["missing"], min=0.0, max=0.95, step=0.05, description="missing fraction", **slider()
            ),
            "m": w.IntSlider(value=v["m"], min=10, max=d, step=10, description="m (measurements)", **slider()),
            "algorithm": w.Dropdown(
                options=[(label, key) for key, label in ALGORITHMS.items()],
                value=v["algorithm"],
                description="algorithm",
                style=style,
                layout=w.Layout(width="420px"),
            ),
            "n1": w.IntSlider(value=v["n1"], min=0, max=300, description="n1 (encoder)", **slider()),
            "n2": w.IntSlider(value=v["n2"], min=0, max=300, description="n2 (encoder + descent)", **slider()),
            "n_max": w.IntSlider(value=v["n_max"], min=1, max=500, description="n_max (iterations)", **slider()),
            "adam_max_iters": w.IntSlider(
                value=v["adam_max_iters"], min=10, max=5000, step=10, description="Adam cap (steps)", **slider()
            ),
            "alpha": w.FloatSlider(
                value=v["alpha"], min=0.0, max=30.0, step=0.5, description="alpha (Alg. 2.4)", **slider()
            ),
            "k_max": w.IntSlider(value=v["k_max"], min=1, max=350, description="k_max (Alg. 2.4)", **slider()),
            "index": w.IntSlider(
                value=v["index"], min=0, max=int(images.shape[0]) - 1, description="image index", **slider()
            ),
        }
        self.picture = w.Image(format="png", layout=w.Layout(max_width="100%"))
        self.status = w.HTML()
        self.result: ExplorerResult | None = None
        self.error: str | None = None
        for c in self.controls.values():
            c.observe(self._on_change, names="value")
        c = self.controls
        left = w.VBox([c["problem"], c["sigma"], c["missing"], c["m"], c["index"]])
        right = w.VBox([c["algorithm"], c["n1"], c["n2"], c["n_max"], c["adam_max_iters"], c["alpha"], c["k_max"]])
        self.widget = w.VBox([w.HBox([left, right]), self.status, self.picture])
        self.widget.explorer = self  # reachable from the displayed box
        self._update_visibility()

    def settings(self) -> dict[str, Any]:
        """The current control values as :func:`explore` arguments."""
        c = {k: ctl.value for k, ctl in self.controls.items()}
        level = {"inpainting": c["missing"], "compressed_sensing": c["m"]}.get(c["problem"])
        return {
            "problem": c["problem"],
            "sigma": c["sigma"],
            "level": level,
            "algorithm": c["algorithm"],
            "n1": c["n1"],
            "n2": c["n2"],
            "n_max": c["n_max"],
            "alpha": c["alpha"],
            "index": c["index"],
            "adam_max_iters": c["adam_max_iters"],
            "k_max": c["k_max"],
        }

    def _update_visibility(self) -> None:
        c = self.controls
        show = {
            "missing": c["problem"].value == "inpainting",
            "m": c["problem"].value == "compressed_sensing",
            "n1": c["algorithm"].value != "csgm",
            "n2": c["algorithm"].value != "csgm",
            "n_max": c["algorithm"].value != "csgm",
            "alpha": c["algorithm"].value == "2.4",
            "k_max": c["algorithm"].value == "2.4",
        }
        for k, visible in show.items():
            c[k].layout.display = None if visible else "none"

    def _on_change(self, change: dict) -> None:
        self._update_visibility()
        self.refresh()

    def refresh(self) -> ExplorerResult | None:
        """Run :func:`explore` with the current settings; show the figure, or the error as text."""
        import html

        import matplotlib.pyplot as plt

        self.status.value = "<i>running...</i>"
        try:
            result = explore(**self.settings(), vae=self.vae, images=self.images, seed=self.seed)
        except ValueError as e:
            self.result, self.error = None, str(e)
            self.status.value = f"<b style='color:#b00'>Invalid setting:</b> {html.escape(str(e))}"
            return None
        fig = render(result, summary=False)  # the summary is the status line
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        self.picture.value = buf.getvalue()
        self.result, self.error = result, None
        self.status.value = html.escape(result.summary())
        return result


def build_explorer(
    vae: GaussianVAE,
    images: Tensor,
    *,
    seed: int = 0,
    defaults: dict[str, Any] | None = None,
    run: bool = True,
):
    """The explorer as an ipywidgets box: controls for problem, sigma, missing fraction or ``m``, algorithm,
    ``n1``, ``n2``, ``n_max``, Adam cap, ``alpha`` and ``k_max`` (Alg. 2.4), image index. Every change reruns
    :func:`explore` and :func:`render`; invalid settings show their message instead of a picture.

    ``defaults`` overrides the initial values (keys of :data:`DEFAULTS`); ``run`` computes the first picture
    now. The returned box has an ``explorer`` attribute (:class:`ExplorerWidget`) with the controls, the last
    result and the last error.
    """
    ex = ExplorerWidget(vae, images, seed=seed, defaults=defaults)
    if run:
        ex.refresh()
    return ex.widget


# ---- the posterior explorer (notebook 12) ------------------------------------------------------------------------
def _hwc(t: Tensor) -> np.ndarray:
    """``(C, H, W)`` -> ``(H, W)`` (one channel) or ``(H, W, C)`` float32 array."""
    t = t.detach().cpu().float()
    return t[0].numpy() if t.shape[0] == 1 else t.permute(1, 2, 0).numpy()


def posterior_explorer_frame(
    prior: Any, restoration: Restoration, index: int, n: int = 4, seed: int = 0
) -> dict[str, np.ndarray]:
    """``n`` new posterior samples of image ``index`` of a :func:`~jpmap_core.solvers.vble` or
    :func:`~jpmap_core.solvers.vble_xz` restoration, the explorer's callback (the "draw" button).

    The samples come from :func:`~jpmap_core.solvers.posterior_samples` on that image alone, with a generator
    seeded with ``seed`` (the same ``seed`` gives the same samples; the image's draws do not depend on the rest of
    the batch). Returns float32 arrays, images as ``(H, W)`` (grey) or ``(H, W, 3)``, maps as ``(H, W)`` (channel
    means): ``"samples"`` ``(n, *image)``, ``"sample_mean"`` and ``"sample_std"`` (pixelwise, over the ``n`` new
    samples, unbiased), ``"mmse"`` (the restoration's MMSE estimate ``x``), ``"fitted_std"`` (its
    ``per_image["std"]``, over the samples of the fit) and ``"index"``, ``"n"``, ``"seed"`` as 0-d arrays.
    """
    if not isinstance(restoration, Restoration) or restoration.info.get("method") not in ("vble", "vble_xz"):
        got = restoration.info.get("method") if isinstance(restoration, Restoration) else type(restoration).__name__
        raise ValueError(f"the posterior explorer needs a vble or vble_xz Restoration, got {got!r}")
    B = len(restoration)
    index = _int(index, "index", 0, B - 1, f" ({B} images in the restoration)")
    n = _int(n, "n (samples to draw)", 2, None, " (a std needs 2)")
    seed = _int(seed, "seed", 0)
    rows = slice(index, index + 1)
    keep = ("z_scale", "b", "std")
    one = Restoration(
        x=restoration.x[rows], z=restoration.z[rows], x_decoded=restoration.x_decoded[rows],
        converged=restoration.converged[rows], iterations=restoration.iterations[rows], info=dict(restoration.info),
        per_image={k: v[rows] for k, v in restoration.per_image.items() if k in keep},
    )  # fmt: skip
    g = torch.Generator(device=one.z.device).manual_seed(seed)
    s = posterior_samples(prior, one, n, generator=g)[0]  # (n, C, H, W)
    return {
        "samples": np.stack([_hwc(v) for v in s]),
        "sample_mean": _hwc(s.mean(0)),
        "sample_std": s.std(0, unbiased=True).mean(0).cpu().float().numpy(),
        "mmse": _hwc(one.x[0]),
        "fitted_std": one.per_image["std"][0].mean(0).detach().cpu().float().numpy(),
        "index": np.array(index),
        "n": np.array(n),
        "seed": np.array(seed),
    }


def render_posterior_frame(frame: dict[str, np.ndarray], *, title: str = "", max_samples: int = 6):
    """A frame of :func:`posterior_explorer_frame` as one figure: the MMSE estimate, up to ``max_samples`` of the new
    samples, the std of the new samples and the fitted std (one colour scale for both std maps)."""
    import matplotlib.pyplot as plt

    from .plotting import setup_style

    setup_style()
    samples = frame["samples"][:max_samples]
    panels = [("MMSE (fit)", frame["mmse"], None)] + [(f"sample {k + 1}", v, None) for k, v in enumerate(samples)]
    vmax = float(max(np.percentile(frame["sample_std"], 99), np.percentile(frame["fitted_std"], 99), 1e-6))
    panels += [(f"std of the {int(frame['n'])} samples", frame["sample_std"], vmax),
               ("std (fit)", frame["fitted_std"], vmax)]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(1.6 * len(panels), 2.0), squeeze=False)
    for ax, (label, img, vm) in zip(axes[0], panels, strict=True):
        if vm is not None:
            ax.imshow(img, cmap="magma", vmin=0, vmax=vm)
        elif img.ndim == 2:
            ax.imshow(np.clip(img, 0, 1), cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(np.clip(img, 0, 1))
        ax.set_title(label, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
