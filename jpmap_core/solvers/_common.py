"""Pieces shared by every solver: the result object, per-image histories, batched Adam, input checks."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._checks import check_tensor4d
from ..energy import Sigma, check_sigma
from ..models import GaussianVAE, Prior, check_prior


@dataclass
class Restoration:
    """What every solver returns (the contract of :data:`jpmap_core.solvers.SOLVERS`). Everything is batch-first.

    * ``x`` ``(B, C, H, W)``: the estimate (for a posterior method, the MMSE estimate);
    * ``z`` ``(B, *latent_shape)``: the latent solution, in the prior's layout (a flat ``(B, l)`` code; the packed
      groups of a hierarchical VAE; a flow's image-shaped code; a variational posterior's mean, its scale in
      ``per_image["z_scale"]``);
    * ``x_decoded`` ``(B, C, H, W)``: the decoded latent ``mu_theta(z)`` (equal to ``x`` for CSGM, eq. 1.4);
    * ``converged`` ``(B,)`` bool and ``iterations`` ``(B,)``: each image's stopping state and iteration count (the
      unit is the solver's: Adam steps for CSGM, alternations for JPMAP);
    * ``history``: per-iteration tensors ``(T, B, ...)``, row ``t`` of column ``b`` being image ``b``'s ``t``-th
      record, padded with ``NaN`` / ``-1`` after it stopped; every solver records its objective as
      ``history["objective"]`` (the paper's definition: JPMAP's ``J1``, CSGM's eq. 1.3 energy; see each solver);
    * ``per_image``: other per-image outputs ``(B, ...)``, e.g. ``best_restart`` (CSGM), ``outer_iterations``
      (Alg. 2.4), posterior std maps and samples;
    * ``info``: what was run (method, parameters, batched steps, seconds), not per-image.
    """

    x: Tensor
    z: Tensor
    x_decoded: Tensor
    converged: Tensor
    iterations: Tensor
    history: dict[str, Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    per_image: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.x.shape[0])


class History:
    """Per-image histories: each image appends its own rows (its own iterations, whenever it makes them).

    ``record(rows, name=values, ...)`` appends one row for each image in ``rows`` (``values`` has ``len(rows)``
    entries, possibly with trailing dimensions); :meth:`stack` gives ``(T, B, ...)`` tensors in which row ``t``
    of column ``b`` is image ``b``'s ``t``-th record, padded with ``NaN`` (floats) or ``-1`` (integers) after it
    stopped. An image's column is therefore the same whether it was solved alone or in a batch.
    """

    def __init__(self, batch_size: int) -> None:
        self.count = torch.zeros(batch_size, dtype=torch.long)
        self._entries: list[tuple[Tensor, Tensor, dict[str, Tensor]]] = []

    def record(self, rows: Tensor, **values: Tensor) -> None:
        rows = rows.cpu()
        t = self.count[rows].clone()
        self.count[rows] += 1
        self._entries.append((rows, t, {k: v.detach().cpu() for k, v in values.items()}))

    def stack(self) -> dict[str, Tensor]:
        if not self._entries:
            return {}
        T, B = int(self.count.max()), self.count.shape[0]
        out: dict[str, Tensor] = {}
        for name, v in self._entries[0][2].items():
            fill = math.nan if v.is_floating_point() else -1
            out[name] = torch.full((T, B, *v.shape[1:]), fill, dtype=v.dtype)
        for rows, t, values in self._entries:
            for name, v in values.items():
                out[name][t, rows] = v
        return out


def masked(values: Tensor, mask: Tensor, fill: float = math.nan) -> Tensor:
    """``values`` where ``mask`` else ``fill`` (for histories of images that already stopped)."""
    out = torch.full_like(values, fill) if values.is_floating_point() else torch.full_like(values, int(fill))
    out[mask] = values[mask]
    return out


@dataclass
class AdamResult:
    z: Tensor  # (B, l) best iterate per image
    loss: Tensor  # (B,) loss at z
    steps: Tensor  # (B,) Adam steps taken
    converged: Tensor  # (B,) gradient-norm criterion met
    trace: Tensor | None = None  # (T, B) loss at every gradient evaluation (NaN once an image stopped)
    trace_seconds: Tensor | None = None  # (T,) elapsed seconds at each evaluation
    batched_steps: int = 0  # gradient evaluations of the whole batch, one after the other (AdamPool.calls)
    evals: Tensor | None = None  # (B,) decoder evaluations of each row (Adam: gradients; LM: Jacobians)


class AdamPool:
    """Batched Adam over a pool of rows that start and stop independently (one row = one image's descent).

    Each row has its own moments, step count and stopping rule: it stops when ``||grad||_2 / l < tol`` (the
    official JPMAP criterion) or after ``max_iters`` gradient evaluations (then its final iterate is evaluated
    too). The update is that of ``torch.optim.Adam`` applied to that row alone, so a row's trajectory does not
    depend on which other rows share the step. ``loss_fn(z_rows, idx)`` returns the losses ``(len(idx),)`` of
    rows ``idx``; only running rows are evaluated. :meth:`start` (re)starts rows at any time, :meth:`step`
    advances every running row by one evaluation and returns the rows that finished. ``best_z`` / ``best_loss``
    hold each row's best iterate (so a descent never ends above its start: the property ``J1(x, z+) <=
    J1(x, z0)`` that Algorithms 2.2-2.3 require of ``gd_z``), ``steps`` its number of Adam updates.
    """

    def __init__(
        self,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        like: Tensor,
        *,
        lr: float = 0.01,
        tol: float = 1e-4,
        max_iters: int = 3000,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.loss_fn, self.lr, self.tol, self.max_iters = loss_fn, lr, tol, int(max_iters)
        self.betas, self.eps = betas, eps
        bsz = like.shape[0]
        dev = like.device
        self.z = torch.zeros_like(like)
        self.m = torch.zeros_like(like)
        self.v = torch.zeros_like(like)
        self.t = torch.zeros(bsz, dtype=like.dtype, device=dev)
        self.steps = torch.zeros(bsz, dtype=torch.long, device=dev)
        self.evals = torch.zeros(bsz, dtype=torch.long, device=dev)
        self.evals_total = torch.zeros(bsz, dtype=torch.long, device=dev)  # over every (re)start
        self.converged = torch.zeros(bsz, dtype=torch.bool, device=dev)
        self.running = torch.zeros(bsz, dtype=torch.bool, device=dev)
        self.best_z = torch.zeros_like(like)
        self.best_loss = torch.full((bsz,), math.inf, dtype=like.dtype, device=dev)
        self._instant = torch.zeros(bsz, dtype=torch.bool, device=dev)  # started with max_iters = 0
        self.last: tuple[Tensor, Tensor] | None = None  # (rows, losses) of the last gradient evaluation
        self.last_final: tuple[Tensor, Tensor] | None = None  # (rows, losses) of the last final evaluations
        #: batched gradient evaluations so far: the sequential length of the work, whatever the batch size (on a
        #: GPU, where one step of a small network costs about the same for 1 or 1000 rows, it sets the time)
        self.calls = 0

    def start(self, rows: Tensor, z0: Tensor) -> None:
        """(Re)start the descents of ``rows`` from ``z0`` (fresh moments and counters)."""
        z0 = z0.detach()
        self.z[rows] = z0
        self.best_z[rows] = z0
        for buf in (self.m, self.v, self.t):
            buf[rows] = 0
        self.steps[rows] = 0
        self.evals[rows] = 0
        self.converged[rows] = False
        self.best_loss[rows] = math.inf
        if self.max_iters > 0:
            self.running[rows] = True
        else:
            self._instant[rows] = True

    def busy(self) -> bool:
        return bool(self.running.any()) or bool(self._instant.any())

    def stop(self, rows: Tensor) -> None:
        """End the descents of ``rows`` now (a stopping rule of the caller's); they keep their current iterate."""
        self.running[rows] = False
        self._instant[rows] = False

    def _keep_best(self, idx: Tensor, loss: Tensor, z: Tensor) -> None:
        better = loss < self.best_loss[idx]
        if bool(better.any()):
            ib = idx[better]
            self.best_loss[ib] = loss[better]
            self.best_z[ib] = z[better]

    def step(self) -> Tensor:
        """One gradient evaluation (and Adam update) for every running row; returns the rows that finished."""
        finished = [self._instant.nonzero().squeeze(1)]
        self._instant.zero_()
        self.last = self.last_final = None
        idx = self.running.nonzero().squeeze(1)
        if idx.numel():
            self.calls += 1
            b1, b2 = self.betas
            with torch.enable_grad():
                zi = self.z[idx].requires_grad_(True)
                loss = self.loss_fn(zi, idx)
                (g,) = torch.autograd.grad(loss.sum(), zi)
            loss = loss.detach()
            self.last = (idx, loss)
            self._keep_best(idx, loss, zi.detach())
            self.evals[idx] += 1
            self.evals_total[idx] += 1
            done = g.norm(dim=1) / g.shape[1] < self.tol
            if bool(done.any()):
                self.converged[idx[done]] = True
                self.running[idx[done]] = False
                finished.append(idx[done])
            keep = ~done
            iu, gu = idx[keep], g[keep]
            if iu.numel():
                tu = self.t[iu] + 1
                self.t[iu] = tu
                mu = b1 * self.m[iu] + (1 - b1) * gu
                vu = b2 * self.v[iu] + (1 - b2) * gu * gu
                self.m[iu], self.v[iu] = mu, vu
                bc1, bc2 = (1 - b1**tu)[:, None], (1 - b2**tu)[:, None]
                zu = self.z[iu] - self.lr * (mu / bc1) / ((vu / bc2).sqrt() + self.eps)
                self.z[iu] = zu
                self.steps[iu] += 1
                capped = self.evals[iu] >= self.max_iters
                if bool(capped.any()):  # out of evaluations: evaluate the final iterate too
                    ic = iu[capped]
                    with torch.no_grad():
                        lc = self.loss_fn(zu[capped], ic).detach()
                    self.last_final = (ic, lc)
                    self._keep_best(ic, lc, zu[capped])
                    self.running[ic] = False
                    finished.append(ic)
        return torch.cat(finished)


def adam_minimize(
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    z0: Tensor,
    *,
    active: Tensor | None = None,
    lr: float = 0.01,
    tol: float = 1e-4,
    max_iters: int = 3000,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    record: bool = False,
) -> AdamResult:
    """Batched Adam where each image has its own moments, step count and stopping rule (:class:`AdamPool` with
    every row started at once from ``z0``; rows outside ``active`` stay at ``z0`` with loss ``inf``).

    ``loss_fn(z_rows, idx)`` returns the per-image losses ``(len(idx),)`` of the images ``idx`` (only images
    still running are evaluated, so the cost shrinks as images stop). An image stops when
    ``||grad||_2 / l < tol`` (the official JPMAP criterion) or after ``max_iters`` gradient evaluations.
    Returned ``z`` is the best iterate seen (lowest loss), so the result never has a higher loss than ``z0``.
    ``record=True`` also returns the per-evaluation loss of every image (``trace``, NaN after it stopped) and
    the elapsed seconds.
    """
    clock = Clock()
    rows: list[Tensor] = []
    times: list[float] = []
    bsz = z0.shape[0]
    pool = AdamPool(loss_fn, z0, lr=lr, tol=tol, max_iters=max_iters, betas=betas, eps=eps)
    pool.best_z.copy_(z0.detach())
    start = torch.arange(bsz, device=z0.device) if active is None else active.nonzero().squeeze(1)
    pool.start(start, z0.detach()[start])
    pool._instant.zero_()  # max_iters = 0: nothing to evaluate
    while pool.running.any():
        pool.step()
        if record:
            for ev in (pool.last, pool.last_final):
                if ev is not None:
                    row = torch.full((bsz,), math.nan, dtype=z0.dtype)
                    row[ev[0].cpu()] = ev[1].cpu()
                    rows.append(row)
                    times.append(clock())
    trace = torch.stack(rows) if record and rows else None
    return AdamResult(
        pool.best_z, pool.best_loss, pool.steps, pool.converged, trace, torch.tensor(times) if record else None,
        pool.calls, pool.evals_total.clone(),
    )  # fmt: skip


def check_problem(y: object, op: Any, vae: Prior, sigma: Sigma, x0: Tensor | None, init: str, eps: float):
    """Validate ``(y, op, vae, sigma)`` and return ``(y, x0, sigma)``: shapes must agree, no NaN/inf, ``sigma > 0``
    (a number, or a ``(B,)`` tensor of per-image noise stds, returned on ``y``'s device and dtype)."""
    check_prior(vae)
    if not isinstance(sigma, Tensor):
        check_sigma(sigma)
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
    if not torch.is_floating_point(y):
        raise TypeError(f"y must be a floating tensor, got dtype {y.dtype}")
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"y contains {int((~torch.isfinite(y)).sum())} NaN or infinite values")
    for name in ("A", "A_adjoint", "prox_l2"):
        if not callable(getattr(op, name, None)):
            raise TypeError(f"op must provide {name}() (a jpmap_core.operators operator); got {type(op).__name__}")
    if x0 is None:
        if init == "dagger":
            x0 = op.A_dagger(y, eps) if eps is not None else op.A_dagger(y)
        elif init == "adjoint":
            x0 = op.A_adjoint(y)
        else:
            raise ValueError(f"unknown init {init!r}; expected 'dagger' (paper §3.4) or 'adjoint' (official code)")
    check_tensor4d(x0, "x0")
    if tuple(x0.shape[1:]) != tuple(vae.image_shape):
        hint = " (for a hierarchical VAE, pass hvae.at_size(H, W))" if hasattr(vae, "at_size") else ""
        raise ValueError(
            f"the operator's images have shape (C, H, W) = {tuple(x0.shape[1:])} but the prior expects "
            f"{tuple(vae.image_shape)}{hint}"
        )
    ax = op.A(x0)
    if ax.shape != y.shape:
        raise ValueError(
            f"y has shape {tuple(y.shape)} but {type(op).__name__} produces {tuple(ax.shape)} for images of "
            f"shape {tuple(x0.shape)}"
        )
    sigma = check_sigma(sigma, y.shape[0])
    if isinstance(sigma, Tensor):
        sigma = sigma.to(dtype=y.dtype, device=y.device)
    return y, x0.detach(), sigma


def require_gaussian_decoder(prior: object, method: str) -> None:
    """JPMAP's coupling ``beta/2 ||x - mu_theta(z)||^2`` needs a Gaussian decoder ``N(mu_theta(z), gamma^2 I)``:
    a prior with ``beta = 1/gamma^2`` (a :class:`~jpmap_core.models.GaussianVAE`)."""
    check_prior(prior)
    if not isinstance(getattr(prior, "beta", None), float):
        raise TypeError(
            f"{method} needs a prior with a Gaussian decoder N(mu_theta(z), gamma^2 I) and its beta = 1/gamma^2 "
            f"(a GaussianVAE); {type(prior).__name__} has none"
        )


def require_lm_prior(prior: object, method: str) -> None:
    """The Levenberg-Marquardt latent step (:mod:`._lm`) needs a least-squares latent problem: a flat latent with the
    prior ``N(0, I)`` (``-log p_Z = 1/2 ||z||^2``) and the decoder's Jacobian (a
    :class:`~jpmap_core.models.GaussianVAE`)."""
    if not isinstance(prior, GaussianVAE):
        raise TypeError(
            f"{method} needs a Gaussian VAE (flat latent, N(0, I) prior, decode_jacobian): the Levenberg-Marquardt "
            f"z-step solves a least-squares problem; {type(prior).__name__} is not one (use z_optimizer='adam')"
        )


class Clock:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0
