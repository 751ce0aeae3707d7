"""Pieces shared by every solver: the result object, per-image histories, batched Adam, input checks."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._checks import check_positive, check_tensor4d
from ..models import GaussianVAE


@dataclass
class Restoration:
    """What every solver returns.

    ``x``: the estimate ``(B, C, H, W)``; ``z``: the latent codes ``(B, l)``; ``x_decoded = mu_theta(z)``;
    ``converged`` and ``iterations`` per image; ``history``: per-iteration tensors of shape ``(T, B)``
    (``NaN`` / ``-1`` where an image had already stopped), e.g. ``J1``, ``istar``, ``beta``, ``coupling``
    (``||x - G(z)||^2``), ``adam_steps``, ``seconds``; ``info``: the parameters that were used.
    """

    x: Tensor
    z: Tensor
    x_decoded: Tensor
    converged: Tensor
    iterations: Tensor
    history: dict[str, Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.x.shape[0])


class History:
    """Collects one ``(B,)`` row per iteration for each named quantity; :meth:`stack` gives ``(T, B)``."""

    def __init__(self) -> None:
        self._rows: dict[str, list[Tensor]] = {}

    def record(self, **values: Tensor) -> None:
        for k, v in values.items():
            self._rows.setdefault(k, []).append(v.detach().clone().cpu())

    def stack(self) -> dict[str, Tensor]:
        return {k: torch.stack(v) for k, v in self._rows.items() if v}


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
    """Batched Adam where each image has its own moments, step count and stopping rule.

    ``loss_fn(z_rows, idx)`` returns the per-image losses ``(len(idx),)`` of the images ``idx`` (only images
    still running are evaluated, so the cost shrinks as images stop). An image stops when
    ``||grad||_2 / l < tol`` (the official JPMAP criterion) or after ``max_iters`` gradient evaluations.
    The update is the same as ``torch.optim.Adam`` applied to that image alone. Returned ``z`` is the best
    iterate seen (lowest loss), so the result never has a higher loss than ``z0`` -- the descent property
    ``J1(x, z+) <= J1(x, z0)`` that Algorithms 2.2-2.3 require of ``gd_z``. ``record=True`` also returns the
    per-evaluation loss of every image (``trace``, NaN after it stopped) and the elapsed seconds.
    """
    clock = Clock()
    rows: list[Tensor] = []
    times: list[float] = []
    b1, b2 = betas
    z = z0.detach().clone()
    bsz, ldim = z.shape
    run = torch.ones(bsz, dtype=torch.bool, device=z.device) if active is None else active.clone()
    m = torch.zeros_like(z)
    v = torch.zeros_like(z)
    t = torch.zeros(bsz, dtype=z.dtype, device=z.device)
    steps = torch.zeros(bsz, dtype=torch.long, device=z.device)
    conv = torch.zeros(bsz, dtype=torch.bool, device=z.device)
    best_z = z.clone()
    best_loss = torch.full((bsz,), math.inf, dtype=z.dtype, device=z.device)
    for _ in range(int(max_iters)):
        idx = run.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        with torch.enable_grad():
            zi = z[idx].requires_grad_(True)
            loss = loss_fn(zi, idx)
            (g,) = torch.autograd.grad(loss.sum(), zi)
        loss = loss.detach()
        if record:
            row = torch.full((bsz,), math.nan, dtype=z.dtype)
            row[idx.cpu()] = loss.cpu()
            rows.append(row)
            times.append(clock())
        better = loss < best_loss[idx]
        if bool(better.any()):
            ib = idx[better]
            best_loss[ib] = loss[better]
            best_z[ib] = zi.detach()[better]
        done = g.norm(dim=1) / ldim < tol
        if bool(done.any()):
            conv[idx[done]] = True
            run[idx[done]] = False
        keep = ~done
        iu, gu = idx[keep], g[keep]
        if iu.numel() == 0:
            continue
        tu = t[iu] + 1
        t[iu] = tu
        mu = b1 * m[iu] + (1 - b1) * gu
        vu = b2 * v[iu] + (1 - b2) * gu * gu
        m[iu], v[iu] = mu, vu
        bc1 = (1 - b1**tu)[:, None]
        bc2 = (1 - b2**tu)[:, None]
        z[iu] = z[iu] - lr * (mu / bc1) / ((vu / bc2).sqrt() + eps)
        steps[iu] += 1
    # images that hit max_iters: evaluate the final iterate too
    idx = (run & (steps > 0)).nonzero().squeeze(1)
    if idx.numel():
        with torch.no_grad():
            loss = loss_fn(z[idx], idx)
        if record:
            row = torch.full((bsz,), math.nan, dtype=z.dtype)
            row[idx.cpu()] = loss.cpu()
            rows.append(row)
            times.append(clock())
        better = loss < best_loss[idx]
        best_loss[idx[better]] = loss[better]
        best_z[idx[better]] = z[idx[better]]
    trace = torch.stack(rows) if record and rows else None
    return AdamResult(best_z, best_loss, steps, conv, trace, torch.tensor(times) if record else None)


def check_problem(y: object, op: Any, vae: GaussianVAE, sigma: float, x0: Tensor | None, init: str, eps: float):
    """Validate ``(y, op, vae, sigma)`` and return ``(y, x0)``: shapes must agree, no NaN/inf, ``sigma > 0``."""
    check_positive(sigma, "sigma")
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
        raise ValueError(
            f"the operator's images have shape (C, H, W) = {tuple(x0.shape[1:])} but the prior expects "
            f"{tuple(vae.image_shape)}"
        )
    ax = op.A(x0)
    if ax.shape != y.shape:
        raise ValueError(
            f"y has shape {tuple(y.shape)} but {type(op).__name__} produces {tuple(ax.shape)} for images of "
            f"shape {tuple(x0.shape)}"
        )
    return y, x0.detach()


class Clock:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0
