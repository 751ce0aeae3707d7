r"""AIPO: amortized optimisation of the MAP loss with a normalizing-flow prior (Liu, Yang, Zhang, Lei, ICML 2023).

The MAP loss (§3.1, eq. 3 with Gaussian noise, constants and ``1/(2 sigma^2)`` dropped as the paper does):

.. math::

    \mathcal{L}_{MAP}(x; \lambda) = \|y - f(x)\|^2 - \lambda \log p_G(x),

with ``log p_G`` the flow's exact log-density (:meth:`jpmap_core.models.Flow.log_prob`, nats, on [0, 1]^n). The
paper optimises ``x`` directly (§3.1: "we directly optimize x"; §4.1: "we optimize x by Adam"), so do we; the flow
latent ``z = G^{-1}(x)`` of the result is returned beside it.

* :func:`mle_start` -- the start ``x*(0)`` of eq. (4): ``argmax p_G(x)`` subject to ``f(x) = y``, by projected
  gradient (Appendix A, 500 iterations in §4.1). The projection onto ``{A x = y}`` is taken from the operator,
  generically: ``P(x) = x - A^+ (A x - y)`` with ``A^+ r = A_dagger(r, eps)`` (``(A^T A + eps I)^{-1} A^T r``, which
  tends to the pseudo-inverse ``A^T (A A^T)^{-1} r`` as ``eps -> 0``; ``eps = 1e-6`` in float32, ``1e-12`` in
  float64). For inpainting it is ``M y + (I - M) x`` and for compressed sensing ``x - A^T (A A^T)^{-1} (A x - y)``,
  Appendix A's two formulas. Each step is then clipped to [0, 1] (Appendix A's ``Proj_[0,1]``). Denoising: the
  constraint set is the single point ``y``, so ``x*(0) = clip(y)`` with no gradient evaluation (Remark 3.1).
* :func:`aipo` -- Algorithm 2 (Appendix C, "Alternative AIPO algorithm"): from ``lambda = 0`` and ``x_0 = x*(0)``,
  rounds of ``K`` gradient steps of size ``alpha`` on ``L_MAP(x; lambda)``, then ``lambda <- lambda + delta`` with

  .. math::

      \delta = \max\Big(r \Big|\frac{\log p_e(e)}{\log p_G(x_K)} + \lambda\Big|, \delta_{min}\Big),
      \qquad e = y - f(x_K),

  (step 8: the ``delta`` for which ``L_MAP`` changes by the relative amount ``r``), ``delta_min`` updated from the
  relative decrease of ``L_MAP`` over the round (steps 9-10), ``K <- 1.1 K`` and ``alpha <- 0.99 alpha``
  (step 12), until ``lambda`` reaches ``Lambda``. Defaults: Table 4.
* :func:`aipo_baseline` -- the paper's three baselines (§4.1): Adam on ``L_MAP(x; Lambda)`` at a **fixed**
  ``lambda = Lambda`` from the MLE start, from a random start ``G(z0)``, ``z0 ~ N(0, I)``, or from ``G(0)``, with an
  equal computing budget in gradient evaluations (the 500 MLE steps count; the random and zero starts get them as
  extra Adam steps, as in the paper).
* :func:`aipo_latent` -- our extension (the paper does not do it): Algorithm 2's schedule on CSGM's latent energy
  ``||A G(z) - y||^2 + lambda ||z||^2`` (JPMAP eq. 1.3) for a VAE prior, from the ``lambda = 0`` fit of ``z``.

Reading of Algorithm 2 where the printed text is ambiguous (each choice is stated in the code too):

* ``log p_e(e)`` is ``-||e||^2``, the data term of the ``L_MAP`` being optimised, so that step 8 is exactly
  ``delta = r |L_MAP(x_K; lambda) / log p_G(x_K)|``, the relative-change rule it is derived from.
* The paper writes ``a ∧ b`` for the max and ``a ∨ b`` for the min (its ``clip(x, a, b) = (x ∧ a) ∨ b`` and the
  input condition ``1 >= delta_min,h``): step 8 is ``delta = max(delta, delta_min)`` ("satisfying
  delta >= delta_min") and Table 4's bounds are ``delta_min,l = Lambda/80``, ``delta_min,h = min(Lambda/5, 1)``.
* Step 10 as printed (``delta_min = clip(Delta'/Delta, ...)``) drops the base that Remark C.1 describes ("we
  decrease delta_min by raising it to power Delta'/Delta"): we use ``delta_min <- clip(delta_min^(Delta'/Delta),
  delta_min,l, delta_min,h)``, which lowers ``delta_min`` (it is <= 1) when this round's relative decrease of
  ``L_MAP`` is larger than the previous one's, and raises it otherwise.
* The loop "until lambda >= Lambda" would return an ``x`` optimised at the last ``lambda < Lambda``; we clip the
  last increase to ``Lambda`` and end with a round at ``lambda = Lambda`` (as Algorithm 1, whose last round is at
  ``Lambda``), so every image's schedule ends exactly at its ``Lambda``.
* The inner steps use Adam with learning rate ``alpha`` (§4.1, "we optimize x by Adam"; ``optimizer="gd"`` gives
  the plain gradient steps of step 5), its moments kept from round to round, each step followed by clipping to
  [0, 1] (valid images, Appendix A). ``K`` is rounded to the nearest integer each round.

Batched: every image has its own ``Lambda``, ``lambda``, ``delta_min`` and stopping round; the rounds of all images
run in lockstep (so ``K`` and ``alpha`` are shared), and an image that reached its ``Lambda`` stops being evaluated.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..energy import Sigma, noise_std, sigma_info
from ..models import Prior
from ..operators import Denoising
from ._common import Clock, History, Restoration, check_problem

__all__ = [
    "MLEStart",
    "aipo",
    "aipo_baseline",
    "aipo_latent",
    "lambda_update",
    "latent_energy",
    "map_loss",
    "mle_start",
    "project_affine",
]

Terms = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


# ------------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------------
def require_flow(prior: object, method: str) -> None:
    """AIPO needs the exact ``log p_G(x)`` of a normalizing flow (:meth:`~jpmap_core.models.Flow.log_prob`)."""
    if not callable(getattr(prior, "log_prob", None)):
        raise TypeError(
            f"{method} needs a prior with an exact log-density log_prob(x) (a normalizing flow, e.g. "
            f"jpmap_core.models.RealNVP or Glow); {type(prior).__name__} has none"
        )


def _per_image(value: object, batch: int, like: Tensor, name: str = "lam (Lambda)") -> Tensor:
    """A number > 0 or one value > 0 per image, as a ``(B,)`` tensor."""
    if isinstance(value, Tensor):
        if value.dim() == 0:
            value = float(value)
        elif value.shape != (batch,):
            raise ValueError(f"{name} must be a number or a (B,) = ({batch},) tensor, got shape {tuple(value.shape)}")
        else:
            v = value.detach().to(dtype=like.dtype, device=like.device)
            if not bool((torch.isfinite(v) & (v > 0)).all()):
                raise ValueError(f"{name} must be finite and > 0 for every image, got {v.tolist()}")
            return v
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number > 0 or a (B,) tensor, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return torch.full((batch,), number, dtype=like.dtype, device=like.device)


def _check_int(value: object, name: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return value


def _check_float(value: object, name: str, lo: float, hi: float = math.inf, *, lo_open: bool = True) -> float:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return v


# ------------------------------------------------------------------------------------------------
# The loss and its terms
# ------------------------------------------------------------------------------------------------
def _make_terms(
    y: Tensor,
    op,
    to_image: Callable[[Tensor], Tensor],
    log_prior: Callable[[Tensor], Tensor],
    *,
    like: Tensor,
) -> Terms:
    """``terms(v_rows, idx) -> (||y - f(to_image(v))||^2, log_prior(v))`` per image for the images ``idx`` of the
    batch (``v`` an image for AIPO, a latent code for :func:`aipo_latent`; ``like``: an image batch ``(B, C, H, W)``).

    The operator is restricted to the rows (``op.rows(idx)``) where it can be; otherwise it is applied to the whole
    batch with the other rows held at their last values (so an image's numbers never depend on the others).
    """
    last = torch.zeros_like(like)

    def terms(v_rows: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        x_rows = to_image(v_rows)
        sub = op.rows(idx) if callable(getattr(op, "rows", None)) else None
        if sub is not None:
            res = sub.A(x_rows) - y[idx]
        else:
            full = last.clone()
            full[idx] = x_rows
            last[idx] = x_rows.detach()
            res = (op.A(full) - y)[idx]
        return res.flatten(1).pow(2).sum(1), log_prior(v_rows)

    return terms


def _flow_terms(y: Tensor, op, prior: Prior) -> Terms:
    """``terms(x_rows, idx) -> (||y - f(x)||^2, log p_G(x))``: AIPO's ``L_MAP`` over images."""
    return _make_terms(y, op, lambda x: x, lambda x: prior.log_prob(x, check=False), like=op.A_adjoint(y))


def map_loss(x: Tensor, y: Tensor, op, prior: Prior, lam: float | Tensor) -> Tensor:
    """``L_MAP(x; lambda) = ||y - f(x)||^2 - lambda log p_G(x)`` per image ``(B,)`` (AIPO §3.1, the loss of the
    paper's Tables 1-3)."""
    require_flow(prior, "map_loss")
    lam_t = lam if isinstance(lam, Tensor) else torch.full((x.shape[0],), float(lam), dtype=x.dtype)
    data, logp = _flow_terms(y, op, prior)(x, torch.arange(x.shape[0], device=x.device))
    return data - lam_t.to(dtype=x.dtype, device=x.device) * logp


class _Adam:
    """Adam (or plain gradient descent) on rows of an image batch: each row has its own moments and step count,
    the update of ``torch.optim.Adam`` applied to that row alone."""

    def __init__(self, like: Tensor, kind: str, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.kind, self.betas, self.eps = kind, betas, eps
        self.m = torch.zeros_like(like)
        self.v = torch.zeros_like(like)
        self.t = torch.zeros(like.shape[0], dtype=like.dtype, device=like.device)

    def step(self, idx: Tensor, x: Tensor, g: Tensor, lr: float) -> Tensor:
        if self.kind == "gd":
            return x - lr * g
        b1, b2 = self.betas
        t = self.t[idx] + 1
        self.t[idx] = t
        m = b1 * self.m[idx] + (1 - b1) * g
        v = b2 * self.v[idx] + (1 - b2) * g * g
        self.m[idx], self.v[idx] = m, v
        shape = (-1,) + (1,) * (x.dim() - 1)
        bc1, bc2 = (1 - b1**t).view(shape), (1 - b2**t).view(shape)
        return x - lr * (m / bc1) / ((v / bc2).sqrt() + self.eps)


def _descend(
    x: Tensor,
    terms: Terms,
    lam: Tensor,
    n_steps: Tensor,
    opt: _Adam,
    lr: float,
    clip: bool,
    on_step: Callable[[Tensor, Tensor], None] | None = None,
) -> Tensor:
    """``n_steps[b]`` optimiser steps on ``L_MAP(x_b; lam_b)`` for every image ``b`` (in place on ``x``); returns the
    loss at each image's first iterate (``NaN`` for images with no step). ``on_step(idx, loss)`` sees every
    gradient evaluation."""
    first = torch.full_like(lam, math.nan)
    t = 0
    while True:
        idx = (n_steps > t).nonzero().squeeze(1)
        if idx.numel() == 0:
            return first
        with torch.enable_grad():
            xr = x[idx].detach().requires_grad_(True)
            data, logp = terms(xr, idx)
            loss = data - lam[idx] * logp
            (g,) = torch.autograd.grad(loss.sum(), xr)
        loss = loss.detach()
        if not bool(torch.isfinite(loss).all()):
            raise FloatingPointError(
                f"L_MAP became {loss[~torch.isfinite(loss)][:3].tolist()} at step {t + 1}: x left the domain of the "
                "flow's preprocessing (use clip=True) or the step size is too large"
            )
        if t == 0:
            first[idx] = loss
        if on_step is not None:
            on_step(idx, loss)
        xn = opt.step(idx, xr.detach(), g, lr)
        x[idx] = xn.clamp(0, 1) if clip else xn
        t += 1


# ------------------------------------------------------------------------------------------------
# The maximum-likelihood start x*(0), eq. (4) and Appendix A
# ------------------------------------------------------------------------------------------------
def project_affine(x: Tensor, y: Tensor, op, eps: float | None = None) -> Tensor:
    """Projection onto ``{x : A x = y}``: ``x - A^+ (A x - y)`` with ``A^+ = A_dagger(., eps)`` (module docstring;
    exact in the limit ``eps -> 0``, relative error about ``eps`` otherwise; for a noisy inpainting ``y`` it keeps
    the observed pixels ``M y``)."""
    if eps is None:
        eps = 1e-12 if x.dtype == torch.float64 else 1e-6
    return x - op.A_dagger(op.A(x) - y, eps)


@dataclass
class MLEStart:
    """The start ``x*(0)`` of eq. (4): ``x`` ``(B, C, H, W)``, the gradient evaluations it took (the same for every
    image: 0 for denoising), and ``-log p_G`` of every iterate ``neg_log_prior`` ``(steps + 1, B)``."""

    x: Tensor
    grad_evals: int
    neg_log_prior: Tensor


def mle_start(
    y: Tensor,
    op,
    prior: Prior,
    *,
    steps: int = 500,
    lr: float = 0.01,
    x_init: float | Tensor = 0.5,
    clip: bool = True,
    eps: float | None = None,
) -> MLEStart:
    """``x*(0) in argmax_x p_G(x) s.t. f(x) = y`` (AIPO eq. 4) by projected gradient (Appendix A).

    ``steps`` (500, §4.1) projected steps from ``P(x_init)`` (``x_init = 1/2``: unobserved pixels start mid-grey):
    an Adam step of size ``lr`` on ``-log p_G(x)`` (the paper gives no step size; §4.1 optimises with Adam), then the
    projection :func:`project_affine` onto ``{A x = y}``, then (``clip=True``) clipping to [0, 1] (Appendix A's
    ``Proj_[0,1]``). Denoising: ``clip(y)`` with no gradient evaluation (Remark 3.1). ``clip=False`` solves eq. (4)
    without the box (the iterates then satisfy ``A x = y`` to the projection's precision).
    """
    require_flow(prior, "mle_start")
    steps = _check_int(steps, "steps (projected gradient steps of the MLE start)", 0)
    lr = _check_float(lr, "lr (MLE start step size)", 0.0)
    box = (lambda v: v.clamp(0, 1)) if clip else (lambda v: v)
    if isinstance(op, Denoising):
        x = box(y.detach().clone())
        with torch.no_grad():
            nlp = -prior.log_prob(x, check=False)
        return MLEStart(x, 0, nlp[None].cpu())
    like = op.A_adjoint(y)
    x0 = x_init.to(like) if isinstance(x_init, Tensor) else torch.full_like(like, float(x_init))
    x = box(project_affine(x0.expand_as(like).clone(), y, op, eps)).detach()
    opt = _Adam(x, "adam")
    idx = torch.arange(x.shape[0], device=x.device)
    trace = []
    for _ in range(steps):
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            nlp = -prior.log_prob(xr, check=False)
            (g,) = torch.autograd.grad(nlp.sum(), xr)
        if not bool(torch.isfinite(nlp).all()):
            raise FloatingPointError("-log p_G became non-finite in the MLE start: x left the flow's domain")
        trace.append(nlp.detach().cpu())
        x = box(project_affine(opt.step(idx, xr.detach(), g, lr), y, op, eps)).detach()
    with torch.no_grad():
        trace.append((-prior.log_prob(x, check=False)).cpu())
    return MLEStart(x, steps, torch.stack(trace))


# ------------------------------------------------------------------------------------------------
# Algorithm 2
# ------------------------------------------------------------------------------------------------
def lambda_update(
    lam: Tensor,
    target: Tensor,
    loss_start: Tensor,
    loss_end: Tensor,
    log_prior: Tensor,
    delta_min: Tensor,
    prev_change: Tensor,
    *,
    r: float,
    lo: Tensor,
    hi: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Steps 7-13 of Algorithm 2 for each image, after the round at ``lam`` went from ``loss_start = L_MAP(x_0;
    lam)`` to ``loss_end = L_MAP(x_K; lam)``. Returns ``(new lambda, new delta_min, Delta_L, delta)``.

    * step 8: ``delta = max(r |log p_e(e) / log p_G(x_K) + lam|, delta_min) = max(r |loss_end / log_prior|,
      delta_min)`` (``log p_e(e) = -||e||^2``);
    * steps 9-10: ``Delta'_L = |(loss_start - loss_end) / loss_start|``; when the previous round's ``Delta_L`` exists
      (``prev_change`` not NaN), ``delta_min <- clip(delta_min^(Delta'_L / Delta_L), lo, hi)`` (Remark C.1);
    * step 13: ``lambda <- min(lam + delta, target)`` (clipped: the last round runs at ``Lambda`` exactly).
    """
    tiny = torch.finfo(lam.dtype).tiny
    delta = torch.maximum(r * (loss_end / log_prior.abs().clamp_min(tiny)).abs(), delta_min)
    change = ((loss_start - loss_end) / loss_start.abs().clamp_min(tiny)).abs()
    has_prev = torch.isfinite(prev_change)
    ratio = change / prev_change.clamp_min(tiny)
    adapted = torch.minimum(torch.maximum(delta_min.pow(torch.where(has_prev, ratio, 1.0)), lo), hi)
    new_delta_min = torch.where(has_prev, adapted, delta_min)
    return torch.minimum(lam + delta, target), new_delta_min, change, delta


@dataclass
class _Schedule:
    """Algorithm 2's settings, checked (:func:`_schedule_settings`): per image ``delta_min`` and its bounds."""

    K: int
    alpha: float
    r: float
    k_growth: float
    alpha_decay: float
    optimizer: str
    max_rounds: int | None
    reset_moments: bool
    delta_min0: Tensor
    lo: Tensor
    hi: Tensor

    def info(self) -> dict:
        return {
            "K": self.K,
            "alpha": self.alpha,
            "r": self.r,
            "k_growth": self.k_growth,
            "alpha_decay": self.alpha_decay,
            "delta_min0": sigma_info(self.delta_min0),
            "delta_min_bounds": (sigma_info(self.lo), sigma_info(self.hi)),
            "optimizer": self.optimizer,
            "max_rounds": self.max_rounds,
        }


def _schedule_settings(
    target: Tensor,
    *,
    K: int,
    alpha: float,
    r: float,
    delta_min0: float | Tensor | None,
    delta_min_bounds: tuple[float, float] | None,
    k_growth: float,
    alpha_decay: float,
    optimizer: str,
    max_rounds: int | None,
    reset_moments: bool,
) -> _Schedule:
    """Check Algorithm 2's settings; ``None`` gives Table 4's per-image ``delta_min0 = Lambda/20`` and bounds
    ``(Lambda/80, min(Lambda/5, 1))``."""
    B = target.shape[0]
    K = _check_int(K, "K (inner steps of the first round)", 1)
    alpha = _check_float(alpha, "alpha (step size)", 0.0)
    r = _check_float(r, "r (target change rate)", 0.0, 1.0)
    k_growth = _check_float(k_growth, "k_growth", 1.0, lo_open=False)
    alpha_decay = _check_float(alpha_decay, "alpha_decay", 0.0, 1.0)
    if optimizer not in ("adam", "gd"):
        raise ValueError(f"optimizer must be 'adam' (§4.1) or 'gd' (Algorithm 2, step 5), got {optimizer!r}")
    if max_rounds is not None:
        max_rounds = _check_int(max_rounds, "max_rounds", 1)
    dmin = target / 20 if delta_min0 is None else _per_image(delta_min0, B, target, "delta_min0")
    if delta_min_bounds is None:
        lo, hi = target / 80, torch.clamp(target / 5, max=1.0)
    else:
        if len(delta_min_bounds) != 2:
            raise ValueError(f"delta_min_bounds must be (low, high), got {delta_min_bounds!r}")
        lo = _per_image(delta_min_bounds[0], B, target, "delta_min_bounds[0]")
        hi = _per_image(delta_min_bounds[1], B, target, "delta_min_bounds[1]")
        if not bool((lo <= hi).all()):
            raise ValueError(f"delta_min_bounds must have low <= high, got {delta_min_bounds!r}")
    lo = torch.minimum(lo, hi)  # Table 4's Lambda/80 exceeds min(Lambda/5, 1) only for Lambda > 80
    return _Schedule(K, alpha, r, k_growth, alpha_decay, optimizer, max_rounds, bool(reset_moments), dmin, lo, hi)


@dataclass
class _Continuation:
    """Where every image's schedule ended: ``lam`` (its last lambda), ``done`` (reached its Lambda), inner ``steps``,
    ``rounds``, ``objective`` (``L(v; Lambda)`` at the end), the batched inner steps and the per-round history."""

    lam: Tensor
    done: Tensor
    steps: Tensor
    rounds: Tensor
    objective: Tensor
    batched_steps: int
    history: dict[str, Tensor]


def _continuation(v: Tensor, terms: Terms, target: Tensor, s: _Schedule, *, offset: int, clip: bool) -> _Continuation:
    """Algorithm 2's rounds from ``lambda = 0`` on the variable ``v`` (in place): ``K`` inner steps on
    ``data(v) - lambda log_prior(v)`` (``terms``), then :func:`lambda_update`, ``K <- k_growth K``,
    ``alpha <- alpha_decay alpha``, until every image's round at its ``Lambda`` is done (or ``max_rounds``).
    ``offset``: gradient evaluations spent before (the start), added to ``history["grad_evals"]``."""
    B = target.shape[0]
    dev = target.device
    dmin = s.delta_min0.clone()
    lam_now = torch.zeros_like(target)
    prev_change = torch.full_like(target, math.nan)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    steps = torch.zeros(B, dtype=torch.long, device=dev)
    rounds = torch.zeros(B, dtype=torch.long, device=dev)
    final_obj = torch.full_like(target, math.nan)
    opt = _Adam(v, s.optimizer)
    history = History(B)
    k_float, a, batched = float(s.K), s.alpha, 0
    while not bool(done.all()) and (s.max_rounds is None or int(rounds.max()) < s.max_rounds):
        idx = (~done).nonzero().squeeze(1)
        k_round = max(1, round(k_float))
        n_steps = torch.zeros(B, dtype=torch.long, device=dev)
        n_steps[idx] = k_round
        if s.reset_moments:
            opt = _Adam(v, s.optimizer)
        loss_start = _descend(v, terms, lam_now, n_steps, opt, a, clip)[idx]
        batched += k_round
        steps[idx] += k_round
        rounds[idx] += 1
        with torch.no_grad():
            data, logp = terms(v[idx], idx)
        loss_end = data - lam_now[idx] * logp
        history.record(
            idx, objective=loss_end, **{"lambda": lam_now[idx]}, delta_min=dmin[idx], data_fit=data,
            log_prior=logp, grad_evals=offset + steps[idx],
        )  # fmt: skip
        at_target = lam_now[idx] >= target[idx]
        final_obj[idx[at_target]] = loss_end[at_target]
        done[idx[at_target]] = True
        go = ~at_target
        if bool(go.any()):
            iu = idx[go]
            lam_now[iu], dmin[iu], prev_change[iu], _ = lambda_update(
                lam_now[iu], target[iu], loss_start[go], loss_end[go], logp[go], dmin[iu], prev_change[iu],
                r=s.r, lo=s.lo[iu], hi=s.hi[iu],
            )  # fmt: skip
        k_float *= s.k_growth  # step 12
        a *= s.alpha_decay
    with torch.no_grad():
        left = (~done).nonzero().squeeze(1)
        if left.numel():  # stopped by max_rounds: report the loss at Lambda
            data, logp = terms(v[left], left)
            final_obj[left] = data - target[left] * logp
    return _Continuation(lam_now, done, steps, rounds, final_obj, batched, history.stack())


def aipo(
    y: Tensor,
    op,
    prior: Prior,
    *,
    sigma: Sigma,
    lam: float | Tensor = 0.5,
    K: int = 40,
    alpha: float = 0.05,
    r: float = 0.05,
    delta_min0: float | Tensor | None = None,
    delta_min_bounds: tuple[float, float] | None = None,
    k_growth: float = 1.1,
    alpha_decay: float = 0.99,
    n_mle: int = 500,
    mle_lr: float = 0.01,
    optimizer: str = "adam",
    clip: bool = True,
    max_rounds: int | None = None,
    reset_moments: bool = False,
) -> Restoration:
    """AIPO, Algorithm 2 of the paper (module docstring), batched with a ``lambda`` schedule per image.

    ``lam``: the target ``Lambda`` > 0, a number or one per image (default 0.5, the ``lambda`` of Figs. 1, 2, 5, 7
    and 8; the paper sweeps 0.3, 0.5, 1.0, 1.5, 2.0). ``sigma`` (0-255 scale) is checked and recorded but does
    not enter ``L_MAP`` (the paper's loss has no ``1/(2 sigma^2)``). Table 4's values: ``K = 40``, ``alpha = 0.05``,
    ``r = 0.05``, ``delta_min0 = Lambda/20``, ``delta_min_bounds = (Lambda/80, min(Lambda/5, 1))`` (per image);
    step 12: ``k_growth = 1.1``, ``alpha_decay = 0.99``. ``n_mle``, ``mle_lr``: the MLE start (:func:`mle_start`,
    500 steps as §4.1). ``max_rounds`` caps the rounds (images stopped by it are not ``converged``).
    ``reset_moments=True`` restarts Adam's moments at every round (the paper does not say; by default they carry
    over, so the first steps of a round are not full-size sign steps).

    ``history`` (one row per round, ``(T, B)``): ``objective`` ``L_MAP(x_K; lambda)`` at the round's ``lambda``,
    ``lambda``, ``delta_min``, ``data_fit`` ``||y - f(x_K)||^2``, ``log_prior`` ``log p_G(x_K)``, ``grad_evals``
    (cumulative, MLE steps included). ``per_image``: the final ``lambda``, ``grad_evals`` (MLE steps + inner steps:
    the budget :func:`aipo_baseline` should get), ``rounds``, the final ``objective`` (``L_MAP(x; Lambda)``),
    ``x_mle`` (the start). ``iterations``: inner gradient steps; ``z``: ``G^{-1}(x)``.
    """
    y, _, sigma = check_problem(y, op, prior, sigma, None, "adjoint", None)
    require_flow(prior, "aipo")
    target = _per_image(lam, y.shape[0], op.A_adjoint(y))
    s = _schedule_settings(
        target, K=K, alpha=alpha, r=r, delta_min0=delta_min0, delta_min_bounds=delta_min_bounds, k_growth=k_growth,
        alpha_decay=alpha_decay, optimizer=optimizer, max_rounds=max_rounds, reset_moments=reset_moments,
    )  # fmt: skip
    clock = Clock()
    start = mle_start(y, op, prior, steps=n_mle, lr=mle_lr, clip=clip)
    x = start.x.clone()
    run = _continuation(x, _flow_terms(y, op, prior), target, s, offset=start.grad_evals, clip=clip)
    with torch.no_grad():
        z = prior.encode(x, allow_out_of_range=True)[0]
        x_dec = prior.decode(z, check=False)
    return Restoration(
        x=x,
        z=z,
        x_decoded=x_dec,
        converged=run.done.cpu(),
        iterations=run.steps.cpu(),
        history=run.history,
        info={
            "method": "aipo",
            "algorithm": "AIPO Algorithm 2 (Appendix C), Adam inner steps"
            if s.optimizer == "adam"
            else "AIPO Algorithm 2 (Appendix C), gradient-descent inner steps",
            "lam": sigma_info(target),
            "sigma": sigma_info(sigma),
            **s.info(),
            "clip": clip,
            "mle_steps": start.grad_evals,
            "mle_lr": mle_lr,
            "batched_grad_evals": start.grad_evals + run.batched_steps,
            "seconds": clock(),
        },  # fmt: skip
        per_image={
            "lambda": run.lam.cpu(),
            "grad_evals": (start.grad_evals + run.steps).cpu(),
            "rounds": run.rounds.cpu(),
            "objective": run.objective.cpu(),
            "x_mle": start.x.cpu(),
        },
    )


# ------------------------------------------------------------------------------------------------
# Algorithm 2 on CSGM's latent problem (our extension; the paper does not do this)
# ------------------------------------------------------------------------------------------------
Z_INITS = ("zero", "encoder")


def latent_energy(z: Tensor, y: Tensor, op, prior: Prior, lam: float | Tensor) -> Tensor:
    """CSGM's latent energy ``||A G(z) - y||^2 + lambda ||z||^2`` per image ``(B,)`` (JPMAP eq. 1.3; ``||z||^2 =
    2 neg_log_prior(z)``, exact for a Gaussian VAE's ``N(0, I)``)."""
    lam_t = lam if isinstance(lam, Tensor) else torch.full((z.shape[0],), float(lam), dtype=z.dtype)
    data, logp = _latent_terms(y, op, prior)(z, torch.arange(z.shape[0], device=z.device))
    return data - lam_t.to(dtype=z.dtype, device=z.device) * logp


def _latent_terms(y: Tensor, op, prior: Prior) -> Terms:
    """``terms(z_rows, idx) -> (||A G(z) - y||^2, -||z||^2)``: the latent problem in Algorithm 2's form ``data -
    lambda log_prior`` (``-||z||^2 = -2 neg_log_prior(z)``)."""
    return _make_terms(
        y, op, lambda v: prior.decode(v, check=False), lambda v: -2 * prior.neg_log_prior(v), like=op.A_adjoint(y)
    )


def aipo_latent(
    y: Tensor,
    op,
    prior: Prior,
    *,
    sigma: Sigma,
    lam: float | Tensor | None = None,
    z_init: str | Tensor = "zero",
    K: int = 40,
    alpha: float = 0.05,
    r: float = 0.05,
    delta_min0: float | Tensor | None = None,
    delta_min_bounds: tuple[float, float] | None = None,
    k_growth: float = 1.1,
    alpha_decay: float = 0.99,
    n_mle: int = 500,
    mle_lr: float = 0.01,
    max_rounds: int | None = None,
    reset_moments: bool = False,
) -> Restoration:
    r"""Latent continuation: AIPO's Algorithm 2 (Appendix C) on CSGM's latent problem (JPMAP eq. 1.3)

    .. math::

        E(z; \lambda) = \|A G(z) - y\|^2 + \lambda \|z\|^2,

    ``G`` the decoder mean, instead of AIPO's ``L_MAP(x; lambda)`` over images (§3.1). The paper does not do this
    (its priors are flows); it asks whether the amortisation over ``lambda`` also helps a VAE prior. The schedule is
    :func:`aipo`'s, with ``log p`` read as ``-||z||^2`` in step 8 (``delta = max(r |E / ||z||^2|, delta_min)``):

    * **start** (``lambda = 0``): the latent problem at ``lambda = 0`` is the maximum-likelihood fit
      ``min_z ||A G(z) - y||^2`` (eq. 4 in the latent, no constraint since ``G(z)`` rarely fits ``y`` exactly):
      ``n_mle`` Adam steps (lr ``mle_lr``, CSGM's 0.01) on it from ``z_init``: ``"zero"`` (``z = 0``, CSGM's default
      start, default) or ``"encoder"`` (``mu_phi(A^T y)``, the encoder's code of the back-projected measurements),
      or a ``(B, *latent_shape)`` tensor;
    * **rounds**: ``K`` Adam steps (lr ``alpha``, moments carried over) on ``E(z; lambda)``, no clipping (``z`` is
      unconstrained), then :func:`lambda_update`, ``K <- 1.1 K``, ``alpha <- 0.99 alpha``, until ``lambda`` reaches
      ``Lambda`` (the last increase clipped: every schedule ends exactly at its ``Lambda``).

    ``lam``: ``Lambda``, a number > 0 or one per image; default ``sigma^2`` (the [0, 1] scale), CSGM's weight
    (:func:`~jpmap_core.solvers.csgm`), so that the final energy compares with CSGM's. Schedule defaults: Table 4.
    ``history`` as :func:`aipo` (``objective`` = ``E(z_K; lambda)``, ``log_prior`` = ``-||z_K||^2``, ``grad_evals``
    counting the start's steps); ``per_image``: ``lambda``, ``grad_evals``, ``rounds``, ``objective`` (``E(z;
    Lambda)``), ``z_mle`` (the start). ``x = x_decoded = G(z)`` (eq. 1.4).
    """
    y, x0, sigma = check_problem(y, op, prior, sigma, None, "adjoint", None)
    B = y.shape[0]
    if lam is None:
        s_ = noise_std(sigma, y)
        lam = s_ * s_ if isinstance(s_, Tensor) else float(s_) ** 2
    target = _per_image(lam, B, x0)
    s = _schedule_settings(
        target, K=K, alpha=alpha, r=r, delta_min0=delta_min0, delta_min_bounds=delta_min_bounds, k_growth=k_growth,
        alpha_decay=alpha_decay, optimizer="adam", max_rounds=max_rounds, reset_moments=reset_moments,
    )  # fmt: skip
    n_mle = _check_int(n_mle, "n_mle (Adam steps on ||A G(z) - y||^2 before the schedule)", 0)
    mle_lr = _check_float(mle_lr, "mle_lr (step size of the lambda = 0 start)", 0.0)
    shape = (B, *prior.latent_shape)
    if isinstance(z_init, Tensor):
        if tuple(z_init.shape) != shape or not bool(torch.isfinite(z_init).all()):
            raise ValueError(f"z_init must be a finite (B, *latent_shape) = {shape} tensor, got {tuple(z_init.shape)}")
        z = z_init.detach().to(x0).clone()
    elif z_init == "zero":
        z = torch.zeros(shape, dtype=x0.dtype, device=x0.device)
    elif z_init == "encoder":
        with torch.no_grad():
            z = prior.encode(x0.clamp(0, 1))[0].detach().to(x0).clone()
    else:
        raise ValueError(f"z_init must be one of {', '.join(map(repr, Z_INITS))} or a tensor, got {z_init!r}")
    clock = Clock()
    terms = _latent_terms(y, op, prior)
    _descend(z, terms, torch.zeros_like(target), torch.full((B,), n_mle, device=y.device), _Adam(z, "adam"),
             mle_lr, False)  # fmt: skip
    z_mle = z.clone()
    run = _continuation(z, terms, target, s, offset=n_mle, clip=False)
    with torch.no_grad():
        x = prior.decode(z)
    return Restoration(
        x=x,
        z=z,
        x_decoded=x,
        converged=run.done.cpu(),
        iterations=run.steps.cpu(),
        history=run.history,
        info={
            "method": "aipo_latent",
            "algorithm": "AIPO Algorithm 2 (Appendix C) on CSGM's latent energy ||A G(z) - y||^2 + lambda ||z||^2",
            "lam": sigma_info(target),
            "sigma": sigma_info(sigma),
            "z_init": z_init if isinstance(z_init, str) else "tensor",
            **s.info(),
            "mle_steps": n_mle,
            "mle_lr": mle_lr,
            "batched_grad_evals": n_mle + run.batched_steps,
            "seconds": clock(),
        },
        per_image={
            "lambda": run.lam.cpu(),
            "grad_evals": (n_mle + run.steps).cpu(),
            "rounds": run.rounds.cpu(),
            "objective": run.objective.cpu(),
            "z_mle": z_mle.cpu(),
        },
    )


# ------------------------------------------------------------------------------------------------
# The baselines of §4.1: fixed lambda, equal budget
# ------------------------------------------------------------------------------------------------
INITS = ("mle", "random", "zero")


def aipo_baseline(
    y: Tensor,
    op,
    prior: Prior,
    *,
    sigma: Sigma,
    lam: float | Tensor = 0.5,
    init: str = "mle",
    budget: int | Tensor = 1500,
    lr: float = 0.05,
    n_mle: int = 500,
    mle_lr: float = 0.01,
    generator: torch.Generator | None = None,
    clip: bool = True,
) -> Restoration:
    """The baselines of AIPO §4.1: Adam on ``L_MAP(x; Lambda)`` with ``lambda = Lambda`` fixed, from

    * ``init="mle"``: the MLE start :func:`mle_start` (``n_mle`` projected steps, 0 for denoising), then
      ``budget - n_mle`` Adam steps;
    * ``init="random"``: ``x_0 = G(z_0)``, ``z_0 ~ N(0, I)`` from ``generator``, clipped to [0, 1], then ``budget``
      Adam steps (the MLE's steps as extra steps, as in the paper);
    * ``init="zero"``: ``x_0 = G(0)``, clipped, then ``budget`` Adam steps.

    ``budget``: gradient evaluations per image, a number or a ``(B,)`` tensor; give AIPO's
    ``per_image["grad_evals"]`` for the paper's equal computing budget. ``lr``: the paper does not state the
    baselines' step size; the default is Algorithm 2's ``alpha = 0.05``. Each step is clipped to [0, 1].

    ``history["objective"]`` ``(T, B)``: ``L_MAP(x_t; Lambda)`` at every Adam step ``t`` (the last row of each column
    is the final loss), ``history["grad_evals"]`` the matching budget spent. ``per_image``: ``grad_evals``,
    ``adam_steps``, the final ``objective``, ``x_start``.
    """
    y, _, sigma = check_problem(y, op, prior, sigma, None, "adjoint", None)
    require_flow(prior, "aipo_baseline")
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(map(repr, INITS))} (AIPO §4.1's baselines), got {init!r}")
    B = y.shape[0]
    like = op.A_adjoint(y)
    target = _per_image(lam, B, like)
    lr = _check_float(lr, "lr (Adam step size)", 0.0)
    n_mle = _check_int(n_mle, "n_mle", 0)
    mle_steps = 0 if isinstance(op, Denoising) else n_mle
    if isinstance(budget, Tensor):
        if budget.shape != (B,) or budget.is_floating_point() and not bool((budget == budget.round()).all()):
            raise ValueError(f"budget must be an integer or a (B,) = ({B},) tensor of integers, got {budget!r}")
        total = budget.detach().to(device=y.device, dtype=torch.long)
    else:
        total = torch.full((B,), _check_int(budget, "budget (gradient evaluations per image)", 0), device=y.device)
    adam_steps = total - mle_steps if init == "mle" else total.clone()
    if bool((adam_steps < 0).any()):
        raise ValueError(
            f"budget {total.tolist()} is smaller than the {mle_steps} gradient evaluations of the MLE start "
            "(init='mle')"
        )
    clock = Clock()
    x_mle = None
    if init == "mle":
        x_mle = mle_start(y, op, prior, steps=n_mle, lr=mle_lr, clip=clip).x
        x0 = x_mle
    else:
        p = next(prior.parameters()) if hasattr(prior, "parameters") else like
        shape = (B, *prior.latent_shape)
        if init == "random":
            # drawn on the generator's device (a CPU generator gives the same z0 for a model on a GPU)
            dev = generator.device if generator is not None else p.device
            z0 = torch.randn(shape, generator=generator, device=dev, dtype=p.dtype).to(like)
        else:
            z0 = torch.zeros(shape, dtype=like.dtype, device=like.device)
        with torch.no_grad():
            x0 = prior.decode(z0, check=False)
        x0 = x0.clamp(0, 1) if clip else x0
    x = x0.detach().clone()
    terms = _flow_terms(y, op, prior)
    history = History(B)
    offset = total - adam_steps

    def record(idx: Tensor, loss: Tensor) -> None:
        history.record(idx, objective=loss, grad_evals=offset[idx] + history.count[idx.cpu()].to(idx.device) + 1)

    _descend(x, terms, target, adam_steps, _Adam(x, "adam"), lr, clip, on_step=record)
    with torch.no_grad():
        data, logp = terms(x, torch.arange(B, device=x.device))
        final = data - target * logp
        z = prior.encode(x, allow_out_of_range=True)[0]
        x_dec = prior.decode(z, check=False)
    hist = history.stack()
    if not hist:  # zero Adam steps everywhere: the start is the result
        hist = {"objective": final.cpu()[None], "grad_evals": total.cpu()[None]}
    else:  # each column ends with the loss of its final iterate
        n = history.count
        T = int(n.max()) + 1
        obj = torch.full((T, B), math.nan, dtype=final.dtype)
        ev = torch.full((T, B), -1, dtype=torch.long)
        obj[:-1], ev[:-1] = hist["objective"], hist["grad_evals"]
        obj[n, torch.arange(B)] = final.cpu()
        ev[n, torch.arange(B)] = total.cpu()
        hist = {"objective": obj, "grad_evals": ev}
    return Restoration(
        x=x,
        z=z,
        x_decoded=x_dec,
        converged=torch.ones(B, dtype=torch.bool),
        iterations=adam_steps.cpu(),
        history=hist,
        info={
            "method": "aipo_baseline",
            "init": init,
            "lam": sigma_info(target),
            "sigma": sigma_info(sigma),
            "lr": lr,
            "mle_steps": mle_steps if init == "mle" else 0,
            "budget": {
                "grad_evals": sigma_info(total.to(like.dtype)),
                "mle_steps": mle_steps if init == "mle" else 0,
                "adam_steps": sigma_info(adam_steps.to(like.dtype)),
                "rule": "equal gradient evaluations; the MLE start's steps count, and the random and zero starts "
                "get them as extra Adam steps (AIPO §4.1)",
            },
            "clip": clip,
            "seconds": clock(),
        },
        per_image={
            "grad_evals": total.cpu(),
            "adam_steps": adam_steps.cpu(),
            "objective": final.cpu(),
            "x_start": x0.detach().cpu(),
        },
    )
