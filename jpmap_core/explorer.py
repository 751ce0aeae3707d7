"""One explorer for every method: pick a prior, a test image (or your own), a degradation, a method of
:data:`jpmap_core.solvers.SOLVERS` and its hyperparameters; see the restoration, its PSNR / SSIM and its energy
trace; pin results to compare them side by side. ``notebooks/explorer.ipynb`` shows it (``make explorer`` serves that
notebook as a web page with Voila); any notebook can show it with ``display(explorer())``.

The logic is plain functions, tested directly; the widget only wires them to controls:

* tables -- :data:`DATASETS` (test images by data set), :data:`DEGRADATIONS` (the problems and their level),
  :data:`METHOD_TABLE` (per-method options, their labels and explorer defaults, the label of the objective);
  :func:`method_spec` adds any solver registered later from its signature, :func:`prior_problem` says why a method
  does not accept a prior (from the type of the solver's prior argument), :func:`shipped_priors` lists the shipped
  priors that fit an image shape.
* callbacks -- :func:`run` degrades the image and restores it (:class:`Outcome`: images, PSNR, SSIM, the objective
  trace, the posterior std map); it can report progress and be stopped (:class:`Stopped`); :func:`new_sample` draws
  one more posterior sample; :func:`render` draws an outcome as one figure; :func:`image_from_bytes` turns an
  uploaded file into an image of the prior's shape; :func:`settings_from_query` reads settings from a URL's query
  string (Voila passes it to the kernel as ``$QUERY_STRING``).
* widget -- :class:`Explorer` (controls, Run / Stop / Pin / New sample, the current result and the pinned ones) and
  :func:`explorer`, which returns the box to display.

Bad settings raise ``ValueError`` / ``TypeError`` whose message says what was wrong; the widget shows that message in
the page (never a traceback).
"""

from __future__ import annotations

import dataclasses
import functools
import html
import inspect
import io
import math
import threading
import time
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import torch
from torch import Tensor

from .metrics import psnr, ssim
from .operators import BlurFFT, Inpainting, Problem, SuperResolution, check_level, make_problem
from .solvers import SOLVERS, Restoration, posterior_samples

__all__ = [
    "DATASETS",
    "DEGRADATIONS",
    "METHOD_TABLE",
    "DataSpec",
    "Degradation",
    "Explorer",
    "MethodSpec",
    "Option",
    "Outcome",
    "Settings",
    "Stopped",
    "explorer",
    "image_from_bytes",
    "method_spec",
    "methods",
    "new_sample",
    "prior_problem",
    "render",
    "run",
    "settings_from_query",
    "shipped_priors",
]

N_IMAGES = 100  # test images offered per data set: the first N_IMAGES of its test split


# ---- options -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    """One control: a solver keyword (or a degradation's level) with its explorer default.

    ``kind``: ``"int"``, ``"float"``, ``"bool"``, ``"choice"`` (one of ``choices``), ``"text"`` or
    ``"optional_float"`` (a number, or empty for ``None``: the solver's own rule, said in ``help``).
    """

    name: str
    default: Any
    kind: str
    label: str = ""
    help: str = ""
    choices: tuple[Any, ...] = ()

    @property
    def title(self) -> str:
        return self.label or self.name

    def parse(self, value: object) -> Any:
        """``value`` (a control's value, or a string from a query string) as the solver expects it."""
        what = f"{self.title}"
        if self.kind == "int":
            try:
                f = float(value)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise ValueError(f"{what} must be an integer, got {value!r}") from None
            if isinstance(value, bool) or not math.isfinite(f) or f != int(f):
                raise ValueError(f"{what} must be an integer, got {value!r}")
            return int(f)
        if self.kind == "float":
            return _float(value, what)
        if self.kind == "optional_float":
            if value is None or (isinstance(value, str) and not value.strip()):
                return None
            try:
                return _float(value.strip() if isinstance(value, str) else value, what)
            except ValueError:
                raise ValueError(f"{what} must be a number or empty ({self.help}), got {value!r}") from None
        if self.kind == "bool":
            if isinstance(value, str):
                if value.strip().lower() in ("1", "true", "yes", "on"):
                    return True
                if value.strip().lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(f"{what} must be true or false, got {value!r}")
            return bool(value)
        if self.kind == "choice":
            if value not in self.choices:
                raise ValueError(f"{what} must be one of {', '.join(map(repr, self.choices))}; got {value!r}")
            return value
        return str(value)


def _float(value: object, what: str) -> float:
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(f):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return f


# ---- methods -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodSpec:
    """How the explorer shows one solver: its label, its options (in order) and the name of its objective."""

    name: str
    label: str
    options: tuple[Option, ...] = ()
    objective: str = "objective"
    note: str = ""


_ADAM_CAP = Option("adam_max_iters", 300, "int", "Adam cap / z-step", "steps of each Adam z-step (paper: 3000)")
_TAU = Option("tau", 0.8, "float", "tau (temperature)", "in (0, 1]; lambda_l = 1/tau^2 - 1 (PnP-HVAE eq. 18)")
_VBLE = (
    Option("n_samples", 1, "int", "samples / step", "reparameterised samples per Adam step (SGVB)"),
    Option("max_iters", 300, "int", "iteration cap", "Adam steps at most"),
    Option("lr", 0.1, "float", "learning rate", "Adam on (zbar, log a)"),
    Option("n_posterior_samples", 100, "int", "posterior samples", "draws for the MMSE estimate and the std map"),
)

#: per-method options shown by the explorer (explorer defaults: caps lower than the papers' so a run takes seconds).
#: A method registered in SOLVERS but not listed here gets its options from its signature (:func:`method_spec`).
METHOD_TABLE: dict[str, MethodSpec] = {
    "csgm": MethodSpec(
        "csgm",
        "CSGM (Bora et al.; JPMAP eq. 1.3)",
        (
            Option("max_iters", 1000, "int", "Adam cap", "Adam steps at most (paper: 5000)"),
            Option("restarts", 1, "int", "restarts", "random restarts; the lowest energy is kept"),
            Option("lr", 0.01, "float", "learning rate", "Adam on z"),
        ),
        objective="CSGM energy (eq. 1.3)",
    ),
    "jpmap": MethodSpec(
        "jpmap",
        "JPMAP (Alg. 2.3; Alg. 2.4 with alpha)",
        (
            Option("n1", 25, "int", "n1 (encoder)", "encoder guesses tried while n < n1"),
            Option("n2", 150, "int", "n2 (encoder + descent)", "encoder-initialised descent tried while n < n2"),
            Option("n_max", 300, "int", "n_max (iterations)", "alternations at most"),
            Option("beta", "", "optional_float", "beta", "empty: 1/gamma^2 of the prior"),
            Option("alpha", "", "optional_float", "alpha (Alg. 2.4)", "empty: Alg. 2.3; a number: Alg. 2.4"),
            Option("k_max", 20, "int", "k_max (Alg. 2.4)", "outer iterations of Alg. 2.4 at most (paper: 350)"),
            _ADAM_CAP,
        ),
        objective="J1 (eq. 2.5)",
    ),
    "mapz_splitting": MethodSpec(
        "mapz_splitting",
        "map-z splitting (JPMAP Alg. 1.1)",
        (Option("maxiter", 300, "int", "iterations / beta", "alternations per beta of the schedule"), _ADAM_CAP),
        objective="J1 at beta_k (Alg. 1.1)",
    ),
    "vble": MethodSpec("vble", "VBLE (latent posterior)", _VBLE, objective="ELBO per pixel (maximised)"),
    "vble_xz": MethodSpec(
        "vble_xz",
        "VBLE-xz (latent and image posterior)",
        (Option("b", "pixel", "choice", "b (x-noise)", "per pixel or one per image", ("pixel", "image")), *_VBLE),
        objective="ELBO per pixel (maximised)",
    ),
    "pnp_hvae": MethodSpec(
        "pnp_hvae",
        "PnP-HVAE (Alg. 2)",
        (_TAU, Option("max_iters", 50, "int", "iteration cap", "iterations at most")),
        objective="J1 (PnP-HVAE eq. 15)",
    ),
    "adam_j1": MethodSpec(
        "adam_j1",
        "Adam on PnP-HVAE's J1",
        (_TAU, Option("lr", 0.01, "float", "learning rate"), Option("max_iters", 50, "int", "iteration cap")),
        objective="J1 (PnP-HVAE eq. 15)",
    ),
}


def methods() -> list[str]:
    """Every registered solver (:data:`jpmap_core.solvers.SOLVERS`), in registration order."""
    return list(SOLVERS)


def _keyword_parameters(solver: Callable) -> tuple[dict[str, inspect.Parameter], bool]:
    params = inspect.signature(solver).parameters
    keywords = {n: p for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    return keywords, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def method_spec(name: str) -> MethodSpec:
    """The explorer's view of solver ``name``: its :data:`METHOD_TABLE` entry (without options the solver's signature
    does not accept), or, for a solver not in the table, one option per keyword with a number, bool or string
    default (its label is its name, its default the solver's)."""
    if name not in SOLVERS:
        raise ValueError(f"unknown method {name!r}; registered solvers: {', '.join(SOLVERS)}")
    keywords, var_keyword = _keyword_parameters(SOLVERS[name])
    if name in METHOD_TABLE:
        spec = METHOD_TABLE[name]
        kept = tuple(o for o in spec.options if var_keyword or o.name in keywords)
        return dataclasses.replace(spec, options=kept)
    options = []
    for p in keywords.values():
        d = p.default
        if p.name == "sigma" or d is inspect.Parameter.empty:
            continue
        if isinstance(d, bool):
            options.append(Option(p.name, d, "bool"))
        elif isinstance(d, int):
            options.append(Option(p.name, d, "int"))
        elif isinstance(d, float):
            options.append(Option(p.name, d, "float"))
        elif isinstance(d, str):
            options.append(Option(p.name, d, "text"))
    doc = (SOLVERS[name].__doc__ or "").strip().split("\n")[0]
    return MethodSpec(name, name, tuple(options), note=doc)


def _prior_types(solver: Callable) -> tuple[type, ...]:
    """The classes the solver's prior argument (its third parameter) is annotated with; () when unknown."""
    try:
        params = list(inspect.signature(solver).parameters.values())
        hint = typing.get_type_hints(solver).get(params[2].name) if len(params) > 2 else None
    except Exception:  # an annotation that does not resolve: no requirement known
        return ()
    if hint is None:
        return ()
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    args = typing.get_args(hint) if union else (hint,)
    return tuple(a for a in args if isinstance(a, type) and a not in (Any, type(None)))


def prior_problem(method: str, prior: object) -> str | None:
    """Why ``method`` cannot use ``prior`` (the class its solver's prior argument is annotated with), or ``None``."""
    wanted = _prior_types(SOLVERS[method])
    if not wanted:
        return None
    try:
        if isinstance(prior, wanted):
            return None
    except TypeError:  # a Protocol that is not runtime-checkable: no test possible
        return None
    names = " or ".join(t.__name__ for t in wanted)
    return f"{method} needs a prior of type {names}; {type(prior).__name__} is not one"


# ---- degradations ------------------------------------------------------------------------------------------------
def gaussian_kernel(std: float, image_shape: tuple[int, ...]) -> Tensor:
    """A normalised 2D Gaussian kernel of std ``std`` pixels, radius ``ceil(3 std)`` (at most what the image holds)."""
    std = _float(std, "kernel std (pixels)")
    if std <= 0:
        raise ValueError(f"the kernel std must be > 0 pixels, got {std:g}")
    radius = max(1, min(math.ceil(3 * std), (min(image_shape[-2:]) - 1) // 2))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-(t**2) / (2 * std**2))
    k = torch.outer(g, g)
    return k / k.sum()


def box_mask(image_shape: tuple[int, int, int], side: float) -> Tensor:
    """``(1, C, H, W)`` mask (1 = observed) with a centred missing box of ``side`` times the image's sides."""
    side = _float(side, "box side")
    if not 0 < side < 1:
        raise ValueError(f"the box side is a fraction of the image side, in (0, 1), got {side:g}")
    c, h, w = image_shape
    bh, bw = max(1, round(side * h)), max(1, round(side * w))
    top, left = (h - bh) // 2, (w - bw) // 2
    mask = torch.ones(1, c, h, w)
    mask[..., top : top + bh, left : left + bw] = 0
    return mask


@dataclass(frozen=True)
class Degradation:
    """A problem of the explorer: its label, its level (an :class:`Option`, or ``None``) and how it degrades ``x``."""

    name: str
    label: str
    level: Option | None
    build: Callable[[Tensor, Any, float, torch.Generator], Problem]


def _standard(name: str) -> Callable[[Tensor, Any, float, torch.Generator], Problem]:
    return lambda x, level, sigma, g: make_problem(name, x, sigma=sigma, level=level, generator=g)


def _box(x: Tensor, level: Any, sigma: float, g: torch.Generator) -> Problem:
    op = Inpainting(box_mask(tuple(x.shape[1:]), level))
    return Problem("inpainting", level, float(sigma), op, op.degrade(x, sigma, generator=g))


def _gaussian_blur(x: Tensor, level: Any, sigma: float, g: torch.Generator) -> Problem:
    op = BlurFFT(gaussian_kernel(level, tuple(x.shape[1:])), tuple(x.shape[1:]))
    return Problem("blur", None, float(sigma), op, op.degrade(x, sigma, generator=g))


def _motion_blur(x: Tensor, level: Any, sigma: float, g: torch.Generator) -> Problem:
    from .data import load_kernels

    kernels = load_kernels("levin09")
    if not 1 <= int(level) <= len(kernels):
        raise ValueError(f"Levin's kernels are numbered 1 to {len(kernels)}, got {level!r}")
    return make_problem("blur", x, sigma=sigma, kernel=kernels[int(level) - 1], generator=g)


def _super_resolution(x: Tensor, level: Any, sigma: float, g: torch.Generator) -> Problem:
    factor = check_level("super_resolution", level)
    op = SuperResolution(gaussian_kernel(0.5 * factor, tuple(x.shape[1:])), factor, tuple(x.shape[1:]))
    return Problem("super_resolution", factor, float(sigma), op, op.degrade(x, sigma, generator=g))


#: the explorer's degradations (operators of :mod:`jpmap_core.operators`); every random draw comes from the seed
DEGRADATIONS: dict[str, Degradation] = {
    d.name: d
    for d in (
        Degradation("denoising", "denoising", None, _standard("denoising")),
        Degradation(
            "inpainting",
            "inpainting, random mask",
            Option("level", 0.8, "float", "missing fraction", "fraction of missing pixels, in [0, 1)"),
            _standard("inpainting"),
        ),
        Degradation(
            "inpainting_box",
            "inpainting, box mask",
            Option("level", 0.5, "float", "box side", "side of the centred missing box / image side, in (0, 1)"),
            _box,
        ),
        Degradation(
            "compressed_sensing",
            "compressed sensing",
            Option("level", 140, "int", "m (measurements)", "rows of A, i.i.d. N(0, 1/m)"),
            _standard("compressed_sensing"),
        ),
        Degradation(
            "blur",
            "blur, Gaussian kernel",
            Option("level", 1.5, "float", "kernel std (px)", "std of the Gaussian kernel, in pixels"),
            _gaussian_blur,
        ),
        Degradation(
            "motion_blur",
            "blur, Levin motion kernel",
            Option("level", 1, "int", "kernel number", "1 to 8 (Levin et al. 2009); needs the kernels data"),
            _motion_blur,
        ),
        Degradation(
            "super_resolution",
            "super-resolution",
            Option("level", 2, "int", "factor", "decimation factor (divides the image size); Gaussian kernel std s/2"),
            _super_resolution,
        ),
    )
}


# ---- data and priors ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataSpec:
    """A data set of test images: its label, the shape of its images and how to load the first ``n``."""

    name: str
    label: str
    image_shape: tuple[int, int, int]
    load: Callable[[int], Tensor]


def _mnist(n: int) -> Tensor:
    from .data import load_mnist

    return load_mnist("test").images[:n]


def _celeba(n: int) -> Tensor:
    from .data import load_celeba64

    return load_celeba64("test", limit=n).images[:n]


def _ffhq(n: int) -> Tensor:
    from .data import load_ffhq

    return load_ffhq(size=64, limit=n).images[:n]


#: data sets of test images (never used to train the shipped priors); ``"upload"`` is the user's own image
DATASETS: dict[str, DataSpec] = {
    "mnist": DataSpec("mnist", "MNIST (test)", (1, 28, 28), _mnist),
    "celeba64": DataSpec("celeba64", "CelebA 64x64 (test)", (3, 64, 64), _celeba),
    "ffhq": DataSpec("ffhq", "FFHQ 64x64", (3, 64, 64), _ffhq),
}
UPLOAD = "upload"


@functools.lru_cache(maxsize=4)
def load_images(name: str, n: int = N_IMAGES) -> Tensor:
    """The first ``n`` test images of data set ``name`` (cached); ``DataNotFoundError`` says how to get them."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)} (or {UPLOAD!r})")
    return DATASETS[name].load(n)


def shipped_priors(image_shape: tuple[int, ...] | None = None) -> list[str]:
    """Names of the shipped image priors (``data/pretrained/manifest.json``) whose images have ``image_shape`` (all:
    None). Priors trained on whole images of a data set come first, in name order; patch priors of natural images
    (trained on ``bsd_patches``, fully convolutional, so they fit any shape they tile) come after them. Entries with
    no image shape (EPLL's patch mixture ``bsd_patch_gmm``, which no image solver takes as its prior) are left out."""
    from .pretrained import load_manifest

    out = []
    for name, entry in load_manifest().items():
        shape = tuple(entry.get("model", {}).get("image_shape", ()))
        if shape and (image_shape is None or shape == tuple(image_shape)):
            out.append((entry.get("data", {}).get("dataset") == "bsd_patches", name))
    return [name for _, name in sorted(out)]


def image_from_bytes(data: bytes, image_shape: tuple[int, int, int], *, invert: bool = False) -> Tensor:
    """An image file's bytes (PNG, JPEG, ...) as a ``(1, C, H, W)`` image of ``image_shape`` in [0, 1]: grey or RGB as
    ``C`` says, centre-cropped to the aspect ratio of ``(H, W)``, then resized (antialiased). ``invert`` gives
    ``1 - x`` (MNIST digits are white on black)."""
    from PIL import Image, UnidentifiedImageError

    c, h, w = image_shape
    try:
        img = Image.open(io.BytesIO(bytes(data)))
        img = img.convert("L" if c == 1 else "RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read the uploaded file as an image ({exc})") from None
    W, H = img.size
    if W * h > H * w:  # too wide: crop the width
        cw = round(H * w / h)
        img = img.crop(((W - cw) // 2, 0, (W - cw) // 2 + cw, H))
    else:
        ch = round(W * h / w)
        img = img.crop((0, (H - ch) // 2, W, (H - ch) // 2 + ch))
    img = img.resize((w, h), Image.Resampling.LANCZOS)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).float().div(255)
    x = x.view(h, w, c).permute(2, 0, 1).unsqueeze(0).contiguous()
    return 1 - x if invert else x


# ---- settings ----------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    """What one explorer run restores, and how. ``level`` ``None``: the degradation's default; ``options``: method
    keywords (a missing one takes the explorer's default, :func:`method_spec`); ``index``: the test image."""

    prior: str = "mnist_mlp_dvae15"
    data: str = "mnist"
    index: int = 0
    degradation: str = "inpainting"
    level: Any = None
    sigma: float = 10.0
    method: str = "jpmap"
    options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0


def settings_from_query(query: str | None, base: Settings | None = None) -> Settings:
    """:class:`Settings` from a URL query string (``method=vble&max_iters=50&seed=3``): the fields of
    :class:`Settings` by name, anything else a method option. Voila passes the page's query string to the kernel
    as ``$QUERY_STRING``, so a link can open the explorer on a given setting."""
    s = dataclasses.replace(base or Settings())
    s.options = dict(s.options)
    fields = {f.name for f in dataclasses.fields(Settings)} - {"options"}
    for key, value in parse_qsl(query or "", keep_blank_values=True):
        if key in ("index", "seed"):
            setattr(s, key, Option(key, 0, "int").parse(value))
        elif key == "sigma":
            s.sigma = _float(value, "sigma")
        elif key in fields:
            setattr(s, key, value)
        else:
            s.options[key] = value
    return s


def _check_choice(value: str, name: str, known: list[str] | dict) -> None:
    if value not in known:
        raise ValueError(f"unknown {name} {value!r}; known: {', '.join(known)}")


def _int_setting(value: object, name: str, lo: int, hi: int | None = None) -> int:
    i = Option(name, 0, "int").parse(value)
    if i < lo or (hi is not None and i > hi):
        rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an integer {rng}, got {i}")
    return i


def method_options(method: str, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """The keywords passed to solver ``method``: each option of :func:`method_spec` parsed from ``given`` (or its
    explorer default); a key of ``given`` that is not an option raises ``ValueError`` listing the options."""
    spec = method_spec(method)
    given = dict(given or {})
    known = {o.name for o in spec.options}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"{method} has no option {', '.join(unknown)}; its options: {', '.join(sorted(known))}")
    out = {}
    for o in spec.options:
        v = o.parse(given.get(o.name, o.default))
        if v is not None:
            out[o.name] = v
    return out


# ---- running -----------------------------------------------------------------------------------------------------
class Stopped(Exception):
    """Raised inside a run when its stop event is set (the Stop button)."""


@contextmanager
def watched(prior: object, stop: threading.Event | None, progress: Callable[[int, float], None] | None,
            every: float = 0.3) -> Iterator[dict[str, float]]:  # fmt: skip
    """While inside, every pass through the prior's networks (a forward pre-hook on each child module) checks
    ``stop`` (raises :class:`Stopped`) and calls ``progress(passes, seconds)`` at most every ``every`` seconds."""
    state = {"passes": 0, "t0": time.perf_counter(), "last": 0.0}

    def hook(module: torch.nn.Module, args: object) -> None:
        if stop is not None and stop.is_set():
            raise Stopped
        state["passes"] += 1
        now = time.perf_counter() - state["t0"]
        if progress is not None and now - state["last"] >= every:
            state["last"] = now
            progress(int(state["passes"]), now)

    handles = []
    if isinstance(prior, torch.nn.Module):
        for m in list(prior.children()) or [prior]:
            handles.append(m.register_forward_pre_hook(hook))
    try:
        yield state
    finally:
        for h in handles:
            h.remove()


@dataclass
class Outcome:
    """One explorer run. ``images`` maps a label to a ``(1, C, H, W)`` tensor in display order: ``x*``, the
    observation (``A^T y``; ``A^+ y`` for compressed sensing; ``y`` enlarged for super-resolution), ``x_hat``, the
    decoded latent where the method has one, and ``std`` (posterior methods). ``psnr`` / ``ssim`` (dB / no unit)
    are of the images clipped to [0, 1], against ``x*``. ``objective`` is the history's objective of this image
    (``NaN`` padding removed), labelled ``objective_label``."""

    settings: Settings
    spec: MethodSpec
    options: dict[str, Any]
    images: dict[str, Tensor]
    psnr: dict[str, float]
    ssim: dict[str, float]
    objective: Tensor
    objective_label: str
    iterations: int
    converged: bool
    seconds: float
    restoration: Restoration = field(repr=False)
    prior: Any = field(repr=False, default=None)
    samples: list[Tensor] = field(default_factory=list, repr=False)

    @property
    def posterior(self) -> bool:
        """True for posterior methods (a std map was returned): new samples can be drawn."""
        return "std" in self.images

    def summary(self) -> str:
        """One line: method, problem, PSNR / SSIM of the estimate, iterations, stopping, time."""
        s = self.settings
        deg = DEGRADATIONS[s.degradation]
        level = f", {deg.level.title} {s.level:g}" if deg.level is not None else ""
        stop = "converged" if self.converged else "stopped at its cap"
        return (
            f"{self.spec.label} | {deg.label}{level}, sigma {s.sigma:g} | {s.prior}, {s.data} #{s.index}, seed "
            f"{s.seed} | PSNR {self.psnr['x_hat']:.2f} dB, SSIM {self.ssim['x_hat']:.3f} | {self.iterations} "
            f"iterations, {stop}, {self.seconds:.1f} s"
        )


def _observation(problem: Problem) -> tuple[str, Tensor]:
    if problem.name == "compressed_sensing":
        return "A^+ y", problem.op.A_dagger(problem.y)
    if problem.name == "super_resolution":
        s = int(problem.level)
        return "y (enlarged)", problem.y.repeat_interleave(s, -2).repeat_interleave(s, -1)
    return "A^T y", problem.op.A_adjoint(problem.y)


def run(
    settings: Settings,
    *,
    prior: Any,
    image: Tensor,
    stop: threading.Event | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> Outcome:
    """Degrade ``image`` ``(1, C, H, W)`` as ``settings`` say and restore it with ``settings.method`` and ``prior``.

    The operator's random draws and the noise come from a generator seeded with ``settings.seed`` (then the solver's
    own draws, for the methods that take a ``generator``). ``stop`` / ``progress``: see :func:`watched`. Raises
    ``ValueError`` / ``TypeError`` saying what is wrong with a setting, :class:`Stopped` when stopped.
    """
    s = settings
    _check_choice(s.degradation, "degradation", DEGRADATIONS)
    _check_choice(s.method, "method", methods())
    if not isinstance(image, Tensor) or image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"image must be one (1, C, H, W) tensor, got {getattr(image, 'shape', type(image))}")
    if tuple(image.shape[1:]) != tuple(prior.image_shape):
        raise ValueError(
            f"the image has shape {tuple(image.shape[1:])} but the prior makes images of {tuple(prior.image_shape)}"
        )
    why = prior_problem(s.method, prior)
    if why:
        raise TypeError(why)
    sigma = _float(s.sigma, "sigma (noise std, 0-255)")
    if sigma <= 0:
        raise ValueError(f"sigma (noise std on the 0-255 scale) must be > 0, got {sigma:g}")
    seed = _int_setting(s.seed, "seed", 0)
    deg = DEGRADATIONS[s.degradation]
    level = None if deg.level is None else deg.level.parse(deg.level.default if s.level is None else s.level)
    s = dataclasses.replace(s, sigma=sigma, seed=seed, level=level)
    spec = method_spec(s.method)
    options = method_options(s.method, s.options)
    g = torch.Generator().manual_seed(seed)
    problem = deg.build(image, level, sigma, g)
    if "generator" in _keyword_parameters(SOLVERS[s.method])[0]:
        options["generator"] = g
    t0 = time.perf_counter()
    with watched(prior, stop, progress):
        if stop is not None and stop.is_set():
            raise Stopped
        r = SOLVERS[s.method](problem.y, problem.op, prior, sigma=sigma, **options)
    seconds = time.perf_counter() - t0
    options.pop("generator", None)
    obs_label, obs = _observation(problem)
    images = {"x*": image, obs_label: obs.detach(), "x_hat": r.x.detach()}
    if not torch.equal(r.x_decoded, r.x):
        images["decoded"] = r.x_decoded.detach()
    if "std" in r.per_image:
        images["std"] = r.per_image["std"].detach()
    scored = [k for k in images if k not in ("x*", "std")]
    clip = {k: images[k].clamp(0, 1) for k in scored}
    objective = r.history.get("objective", torch.empty(0, 1))
    objective = objective[:, 0].detach().float() if objective.dim() >= 2 else objective.reshape(-1).float()
    return Outcome(
        settings=s,
        spec=spec,
        options=options,
        images=images,
        psnr={k: float(psnr(v, image)[0]) for k, v in clip.items()},
        ssim={k: float(ssim(v, image)[0]) for k, v in clip.items()},
        objective=objective[~torch.isnan(objective)],
        objective_label=spec.objective,
        iterations=int(r.iterations[0]),
        converged=bool(r.converged[0]),
        seconds=seconds,
        restoration=r,
        prior=prior,
    )


def new_sample(outcome: Outcome, seed: int) -> Tensor:
    """One more posterior sample ``(1, C, H, W)`` of a posterior method's outcome (drawn by
    :func:`jpmap_core.solvers.posterior_samples` with a generator seeded with ``seed``), kept in ``outcome.samples``."""
    if not outcome.posterior:
        raise ValueError(f"{outcome.spec.label} gives no posterior to sample (only posterior methods have a std map)")
    g = torch.Generator().manual_seed(int(seed))
    x = posterior_samples(outcome.prior, outcome.restoration, 1, generator=g)[:, 0].detach()
    outcome.samples.append(x)
    return x


# ---- drawing -----------------------------------------------------------------------------------------------------
_TITLES = {"x*": r"$x^*$", "A^T y": r"$A^\top y$", "A^+ y": r"$A^+ y$", "x_hat": r"$\hat x$"}


def _show(ax: Any, t: Tensor, cmap: str = "gray", vmax: float = 1.0) -> None:
    img = t[0].detach().cpu().float()
    if img.shape[0] == 1 or cmap != "gray":
        ax.imshow(img.mean(0).numpy(), cmap=cmap, vmin=0, vmax=vmax)
    else:
        ax.imshow(img.clamp(0, 1).permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def render(outcome: Outcome, *, dpi: int = 80):
    """One figure (a :class:`matplotlib.figure.Figure`, no pyplot state: safe in a worker thread): (a) the images
    with PSNR / SSIM, the std map and the last posterior sample; (b) the objective along the iterations. The summary
    line is not repeated in the figure (the page shows it as text)."""
    from matplotlib.figure import Figure

    images = dict(outcome.images)
    if outcome.samples:
        images["sample"] = outcome.samples[-1]
    n = len(images)
    fig = Figure(figsize=(1.3 * n + 2.6, 2.2), dpi=dpi, layout="constrained")
    gs = fig.add_gridspec(1, n + 1, width_ratios=[1] * n + [1.9])
    for j, (label, t) in enumerate(images.items()):
        ax = fig.add_subplot(gs[0, j])
        if label == "std":
            _show(ax, t.clamp(min=0), cmap="magma", vmax=max(float(t.max()), 1e-6))
            title = f"posterior std\n(max {float(t.max()):.3f})"
        else:
            _show(ax, t.clamp(0, 1))
            title = _TITLES.get(label, label.replace("_", " "))
            if label in outcome.psnr:
                title += f"\n{outcome.psnr[label]:.1f} dB, {outcome.ssim[label]:.2f}"
        ax.set_title(("(a) " if j == 0 else "") + title, fontsize=8)
    ax = fig.add_subplot(gs[0, n])
    ax.set_title("(b) objective along the iterations", fontsize=8)
    y = outcome.objective
    if y.numel():
        first = 0 if y.numel() == outcome.iterations + 1 else 1  # a trace that records the start begins at 0
        ax.plot(range(first, first + y.numel()), y.numpy(), lw=1.2, marker="." if y.numel() < 60 else None, ms=3)
        if bool((y > 0).all()) and float(y.max()) > 20 * float(y.min()):
            ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no trace recorded", ha="center", va="center", transform=ax.transAxes, fontsize=8)
    ax.set_xlabel("iteration", fontsize=8)
    ax.set_ylabel(outcome.objective_label, fontsize=8)
    ax.tick_params(labelsize=7)
    return fig


def figure_png(fig: Any) -> bytes:
    """``fig`` as PNG bytes (through the Agg canvas, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _options_text(outcome: Outcome) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in outcome.options.items())


# ---- the widget --------------------------------------------------------------------------------------------------
def _error_text(exc: BaseException) -> str:
    """What the page shows for an error: its message, never a traceback."""
    from .data import DataNotFoundError
    from .pretrained import PretrainedError

    msg = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, ValueError | TypeError):
        return f"Invalid setting: {msg}"
    if isinstance(exc, DataNotFoundError | PretrainedError):
        return f"Missing data: {msg}"
    return f"Error ({type(exc).__name__}): {msg}"


class Explorer:
    """The explorer's widgets. ``widget`` is the box to display.

    ``priors`` / ``datasets`` add priors (name -> prior object) and image sets (name -> ``(N, C, H, W)`` tensor) to
    the shipped ones. ``background``: runs go to a worker thread (the page stays live: progress, Stop); ``False``
    runs them in the caller (tests). ``outcome`` is the last result (``None`` after an error), ``error`` the last
    message shown, ``pinned`` the pinned outcomes.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        priors: dict[str, Any] | None = None,
        datasets: dict[str, Tensor] | None = None,
        background: bool = True,
        n_images: int = N_IMAGES,
    ):
        import ipywidgets as w

        self.w = w
        self.background = background
        self.n_images = int(n_images)
        self.extra_priors = dict(priors or {})
        self.extra_data = dict(datasets or {})
        self._priors: dict[str, Any] = {}
        self._upload_bytes: bytes | None = None
        self._method_prior: Any = None  # the prior the method list was labelled for
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.outcome: Outcome | None = None
        self.error: str | None = None
        self.pinned: list[Outcome] = []
        s = settings or Settings()
        wide = {"description_width": "130px"}
        lay = lambda width="330px": w.Layout(width=width)

        data_options = [(spec.label, k) for k, spec in DATASETS.items()]
        data_options += [(f"{k} (given)", k) for k in self.extra_data] + [("your image (upload)", UPLOAD)]
        self.data = w.Dropdown(options=data_options, value=s.data, description="data", style=wide, layout=lay())
        self.upload = w.FileUpload(accept="image/*", multiple=False, description="image file")
        self.invert = w.Checkbox(value=False, description="invert (white on black)", indent=False)
        self.index = w.IntText(value=s.index, description="test image #", style=wide, layout=lay())
        self.prior = w.Dropdown(description="prior", style=wide, layout=lay())
        self.degradation = w.Dropdown(
            options=[(d.label, k) for k, d in DEGRADATIONS.items()],
            value=s.degradation,
            description="degradation",
            style=wide,
            layout=lay(),
        )
        self.levels = {
            k: self._control(d.level, d.level.default if (s.level is None or k != s.degradation) else s.level, wide)
            for k, d in DEGRADATIONS.items()
            if d.level is not None
        }
        for k, c in self.levels.items():
            c.add_class(f"jpmap-level-{k}")
        self.sigma = w.FloatText(value=s.sigma, description="sigma (0-255)", style=wide, layout=lay())
        self.seed = w.IntText(value=s.seed, description="seed", style=wide, layout=lay())
        self.method = w.Dropdown(description="method", style=wide, layout=lay("380px"))
        self.method_note = w.HTML()
        self.option_controls: dict[str, dict[str, Any]] = {}
        self.options_box = w.VBox()
        self.run_button = w.Button(description="Run", button_style="primary", icon="play")
        self.stop_button = w.Button(description="Stop", icon="stop", disabled=True)
        self.pin_button = w.Button(description="Pin", icon="thumb-tack", disabled=True, tooltip="keep this result")
        self.sample_button = w.Button(description="New sample", icon="random", disabled=True)
        self.clear_button = w.Button(description="Clear pins", icon="trash", disabled=True)
        self.progress = w.HTML()
        self.error_box = w.HTML()
        self.current = w.VBox()
        self.pins_box = w.HBox(layout=w.Layout(flex_flow="row wrap"))
        for widget, cls in [
            (self.data, "data"), (self.index, "index"), (self.prior, "prior"), (self.degradation, "degradation"),
            (self.sigma, "sigma"), (self.seed, "seed"), (self.method, "method"), (self.run_button, "run"),
            (self.stop_button, "stop"), (self.pin_button, "pin"), (self.sample_button, "sample"),
            (self.clear_button, "clear"), (self.progress, "progress"), (self.error_box, "error"),
            (self.current, "current"), (self.pins_box, "pins"), (self.upload, "upload"),
        ]:  # fmt: skip
            widget.add_class(f"jpmap-{cls}")
        self._sample_seed = 0
        self._fill_priors(s.prior)
        self._fill_methods(s.method)
        try:  # given options land in their controls; a bad one is said in the page
            self._set_options(s.method, s.options)
        except ValueError as exc:
            self._show_error(_error_text(exc))
        self._update_visibility()
        self.data.observe(self._on_data, names="value")
        self.upload.observe(self._on_upload, names="value")
        self.prior.observe(lambda _: self._fill_methods(self.method.value), names="value")
        self.degradation.observe(lambda _: self._update_visibility(), names="value")
        self.method.observe(lambda _: self._update_visibility(), names="value")
        self.run_button.on_click(lambda _: self.run())
        self.stop_button.on_click(lambda _: self.stop())
        self.pin_button.on_click(lambda _: self.pin())
        self.sample_button.on_click(lambda _: self.sample())
        self.clear_button.on_click(lambda _: self.clear_pins())
        problem = w.VBox(
            [w.HTML("<b>Problem</b>"), self.data, self.upload, self.invert, self.index, self.prior, self.degradation,
             *self.levels.values(), self.sigma, self.seed]
        )  # fmt: skip
        method = w.VBox([w.HTML("<b>Method</b>"), self.method, self.method_note, self.options_box])
        buttons = w.HBox([self.run_button, self.stop_button, self.pin_button, self.sample_button, self.clear_button])
        results = w.HBox([self.current, self.pins_box], layout=w.Layout(flex_flow="row wrap", align_items="flex-start"))
        self.widget = w.VBox([w.HBox([problem, method]), buttons, self.progress, self.error_box, results])
        self.widget.add_class("jpmap-explorer")
        self.widget.explorer = self  # reachable from the displayed box

    # -- controls
    def _control(self, o: Option, value: Any, style: dict) -> Any:
        w = self.w
        common = {"description": o.title, "style": style, "layout": w.Layout(width="330px"), "tooltip": o.help}
        if o.kind == "int":
            c = w.IntText(value=int(float(value)), **common)
        elif o.kind == "float":
            c = w.FloatText(value=float(value), **common)
        elif o.kind == "bool":
            c = w.Checkbox(value=bool(value), description=o.title, tooltip=o.help, indent=False)
        elif o.kind == "choice":
            c = w.Dropdown(options=list(o.choices), value=value, **common)
        else:
            c = w.Text(value="" if value is None else str(value), placeholder=o.help, **common)
        c.add_class(f"jpmap-opt-{o.name}")
        return c

    def _image_shape(self) -> tuple[int, ...] | None:
        if self.data.value == UPLOAD:
            return None
        if self.data.value in self.extra_data:
            return tuple(self.extra_data[self.data.value].shape[1:])
        return DATASETS[self.data.value].image_shape

    def _fill_priors(self, wanted: str | None = None) -> None:
        shape = self._image_shape()
        names = shipped_priors(shape)
        names += [k for k, p in self.extra_priors.items() if shape is None or tuple(p.image_shape) == shape]
        current = wanted if wanted is not None else self.prior.value
        self.prior.options = names
        if names:
            self.prior.value = current if current in names else names[0]

    def _prior_object(self) -> Any:
        name = self.prior.value
        if name is None:
            raise ValueError(f"no prior fits the images of {self.data.value!r}")
        if name in self.extra_priors:
            return self.extra_priors[name]
        if name not in self._priors:  # this explorer's own copy (the Stop hooks are put on it)
            from .pretrained import load_pretrained

            self._priors[name] = load_pretrained(name)
        return self._priors[name]

    def _method_label(self, name: str, prior: Any) -> str:
        why = prior_problem(name, prior) if prior is not None else None
        return method_spec(name).label + (" -- not for this prior" if why else "")

    def _fill_methods(self, wanted: str) -> None:
        try:
            prior = self._prior_object()
        except Exception as exc:  # e.g. a missing weights file: said in the page; the method list stays usable
            self._show_error(_error_text(exc))
            prior = None
        names = methods()
        if wanted not in names:
            raise ValueError(f"unknown method {wanted!r}; registered solvers: {', '.join(names)}")
        for name in names:
            if name not in self.option_controls:
                self.option_controls[name] = {
                    o.name: self._control(o, o.default, {"description_width": "170px"})
                    for o in method_spec(name).options
                }
        self._method_prior = prior
        self.method.options = [(self._method_label(n, prior), n) for n in names]
        self.method.value = wanted
        self._update_visibility()

    def _update_visibility(self) -> None:
        for k, c in self.levels.items():
            c.layout.display = None if k == self.degradation.value else "none"
        upload = self.data.value == UPLOAD
        self.upload.layout.display = self.invert.layout.display = None if upload else "none"
        self.index.layout.display = "none" if upload else None
        name = self.method.value
        if name is None:
            return
        self.options_box.children = list(self.option_controls[name].values())
        why = self._blocked()
        spec = method_spec(name)
        note = html.escape(spec.note) if spec.note else ""
        if why:
            note = f"<span style='color:#b00'>Not available: {html.escape(why)}</span>"
        self.method_note.value = f"<small>{note}</small>" if note else ""
        self.run_button.disabled = bool(why) or self._running()

    def _blocked(self) -> str | None:
        """Why the chosen method cannot run on the chosen prior, or None."""
        prior = self._method_prior
        return prior_problem(self.method.value, prior) if prior is not None and self.method.value else None

    def _on_data(self, _: Any) -> None:
        self._fill_priors()
        self._fill_methods(self.method.value)
        self._update_visibility()

    def _on_upload(self, _: Any) -> None:
        if self.upload.value:
            self._upload_bytes = bytes(self.upload.value[0]["content"])

    def _set_options(self, method: str, given: dict[str, Any]) -> None:
        controls = self.option_controls[method]
        for k, v in given.items():
            if k not in controls:
                raise ValueError(f"{method} has no option {k!r}; its options: {', '.join(controls)}")
            o = next(o for o in method_spec(method).options if o.name == k)
            value = o.parse(v)
            controls[k].value = "" if value is None else (str(value) if o.kind == "optional_float" else value)

    # -- settings and image
    def settings(self) -> Settings:
        """The current control values."""
        deg = self.degradation.value
        opts = {k: c.value for k, c in self.option_controls[self.method.value].items()}
        return Settings(
            prior=self.prior.value,
            data=self.data.value,
            index=self.index.value,
            degradation=deg,
            level=self.levels[deg].value if deg in self.levels else None,
            sigma=self.sigma.value,
            method=self.method.value,
            options=opts,
            seed=self.seed.value,
        )

    def _image(self, prior: Any) -> Tensor:
        if self.data.value == UPLOAD:
            raw = self._upload_bytes
            if raw is None:
                raise ValueError("choose an image file to upload first (data: your image)")
            return image_from_bytes(raw, tuple(prior.image_shape), invert=self.invert.value)
        images = self.extra_data.get(self.data.value)
        if images is None:
            images = load_images(self.data.value, self.n_images)
        i = _int_setting(self.index.value, "test image #", 0, int(images.shape[0]) - 1)
        return images[i : i + 1]

    # -- actions
    def _running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _show_error(self, text: str | None) -> None:
        self.error = text
        self.error_box.value = "" if text is None else f"<div style='color:#b00'><b>{html.escape(text)}</b></div>"

    def _progress(self, passes: int, seconds: float) -> None:
        self.progress.value = f"<i>running: {seconds:.1f} s, {passes} network passes</i>"

    def run(self) -> Outcome | None:
        """Run with the current settings: in a worker thread (``background``), else here. Returns the outcome when
        run here (``None`` after an error, whose message is in ``error`` and in the page)."""
        if self._running():
            return None
        self._stop.clear()
        self._show_error(None)
        self.run_button.disabled = self.pin_button.disabled = self.sample_button.disabled = True
        self.stop_button.disabled = False
        self.progress.value = "<i>running...</i>"
        if self.background:
            self._thread = threading.Thread(target=self._work, daemon=True)
            self._thread.start()
            return None
        return self._work()

    def wait(self, timeout: float | None = None) -> Outcome | None:
        """Wait for a background run to end; the last outcome."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.outcome

    def _work(self) -> Outcome | None:
        t0 = time.perf_counter()
        try:
            settings = self.settings()
            prior = self._prior_object()
            outcome = run(settings, prior=prior, image=self._image(prior), stop=self._stop, progress=self._progress)
            self._show_card(self.current, outcome, current=True)
        except Stopped:
            self.progress.value = ""
            self._show_error(f"Stopped after {time.perf_counter() - t0:.1f} s (the result below is the previous one).")
            self.pin_button.disabled = self.outcome is None or (bool(self.pinned) and self.pinned[-1] is self.outcome)
            self.sample_button.disabled = self.outcome is None or not self.outcome.posterior
            return None
        except Exception as exc:  # every failure is shown in the page, never as a traceback
            self.outcome = None
            self.progress.value = ""
            self._show_error(_error_text(exc))
            return None
        finally:
            self.stop_button.disabled = True
            self.run_button.disabled = bool(self._blocked())  # the method may have been changed meanwhile
        self.outcome = outcome
        self.progress.value = ""
        self.pin_button.disabled = False
        self.sample_button.disabled = not outcome.posterior
        return outcome

    def stop(self) -> None:
        """Ask the running computation to stop (at its next pass through the prior's networks)."""
        self._stop.set()

    def _card(self, outcome: Outcome, current: bool) -> Any:
        w = self.w
        head = (
            f"<div class='jpmap-summary' style='font-size:12px;line-height:1.35;max-width:700px'>"
            f"<b>{'Current' if current else 'Pinned'}:</b> {html.escape(outcome.summary())}<br>"
            f"<small>options: {html.escape(_options_text(outcome))}</small></div>"
        )
        picture = w.Image(value=figure_png(render(outcome)), format="png", layout=w.Layout(max_width="720px"))
        picture.add_class("jpmap-picture")
        return [w.HTML(head), picture]

    def _show_card(self, box: Any, outcome: Outcome, current: bool) -> None:
        box.children = self._card(outcome, current)

    def pin(self) -> None:
        """Keep the current result on screen, beside the next ones."""
        if self.outcome is None:
            return
        self.pinned.append(self.outcome)
        card = self.w.VBox(self._card(self.outcome, current=False), layout=self.w.Layout(border="1px solid #ccc"))
        card.add_class("jpmap-pinned")
        self.pins_box.children = (card, *self.pins_box.children)
        self.clear_button.disabled = False
        self.pin_button.disabled = True

    def clear_pins(self) -> None:
        self.pinned.clear()
        self.pins_box.children = ()
        self.clear_button.disabled = True

    def sample(self) -> Tensor | None:
        """Draw one more posterior sample of the current result and show it."""
        if self.outcome is None:
            return None
        try:
            self._sample_seed += 1
            x = new_sample(self.outcome, self._sample_seed)
        except Exception as exc:
            self._show_error(_error_text(exc))
            return None
        self._show_card(self.current, self.outcome, current=True)
        return x


def explorer(settings: Settings | None = None, *, query: str | None = None, run: bool = True, **kwargs: Any) -> Any:
    """The explorer as a displayable ipywidgets box (``display(explorer())`` in any notebook).

    ``settings``: the initial controls (:class:`Settings`), updated by ``query``, a URL query string
    (:func:`settings_from_query`; a bad one is reported in the page and the defaults are used); ``run``: compute the
    first result now (in the caller, so that the page opens with a result). Other keywords go to
    :class:`Explorer`. The box's ``explorer`` attribute is the :class:`Explorer`.
    """
    problem = None
    try:
        ex = Explorer(settings_from_query(query, settings) if query else settings, **kwargs)
    except Exception as exc:  # a bad query string (a dropdown refuses an unknown name with a TraitError)
        if not query:
            raise
        problem = f"Ignored the page's query string {query!r}: {' '.join(str(exc).split())}"
        ex = Explorer(settings, **kwargs)
    if problem:
        ex._show_error(problem)
        run = False
    if run:
        background, ex.background = ex.background, False
        ex.run()
        ex.background = background
    return ex.widget
