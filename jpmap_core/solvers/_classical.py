"""Pieces shared by the classical baselines of PnP-HVAE's Tables 2-3 (:func:`~jpmap_core.solvers.wiener`,
:func:`~jpmap_core.solvers.tv`, :func:`~jpmap_core.solvers.epll`): input checks, the image-by-image runner that
builds the :class:`~jpmap_core.solvers.Restoration`, and the image-gradient statistics their priors are fitted to.

These methods have no latent: ``Restoration.z`` is an empty ``(B, 0)`` tensor and ``x_decoded`` is ``x``. Every image
is solved on its own (its own operator rows and noise level), so a batch gives exactly the per-image results.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._checks import check_tensor4d
from ..energy import Sigma, check_sigma, sigma_info, sigma_rows
from ._common import Clock, Restoration

#: statistics of the finite differences ``x[i, j+1] - x[i, j]``, ``x[i+1, j] - x[i, j]`` (each colour channel, pixels in
#: [0, 1]) of the 48 CBSD68 training images of :func:`~jpmap_core.data.bsd_split` (those of ``bsd_patch_hvae``), as
#: :func:`gradient_statistics` computes them: ``mean_square`` = E[d^2] over both directions (the variance ``s^2`` of
#: the Gaussian gradient prior of :func:`~jpmap_core.solvers.wiener`), ``mean_magnitude`` = E[sqrt(dh^2 + dv^2)] (the
#: Laplace-type prior of :func:`~jpmap_core.solvers.tv` has ``lambda = 2 / mean_magnitude``, scaled down). Tested
#: against the data.
BSD_TRAIN_GRADIENTS = {"mean_square": 0.0055365556, "mean_magnitude": 0.0630900665}


def gradient_statistics(images: Sequence[Tensor]) -> dict[str, float]:
    """``mean_square`` and ``mean_magnitude`` of the forward differences of ``(1|B, C, H, W)`` images (the pixels of the
    last row and column, which have no forward neighbour, left out), in float64: see :data:`BSD_TRAIN_GRADIENTS`."""
    sq = mag = 0.0
    n = 0
    for x in images:
        x = check_tensor4d(x, "image").double()
        dh = x[..., :-1, 1:] - x[..., :-1, :-1]
        dv = x[..., 1:, :-1] - x[..., :-1, :-1]
        sq += float(dh.pow(2).sum() + dv.pow(2).sum())
        mag += float(torch.sqrt(dh.pow(2) + dv.pow(2)).sum())
        n += dh.numel()
    if n == 0:
        raise ValueError("gradient_statistics needs images of at least 2x2 pixels")
    return {"mean_square": sq / (2 * n), "mean_magnitude": mag / n}


def check_classical(
    y: object, op: Any, prior: object, sigma: Sigma, method: str, prior_type: type | None = None
) -> tuple[Tensor, Tensor, Sigma]:
    """Validate ``(y, op, prior, sigma)`` of a classical method; returns ``(y, A^T y, sigma)``.

    ``prior`` must be ``None`` (``prior_type=None``: Wiener, TV) or an instance of ``prior_type`` (EPLL's
    :class:`~jpmap_core.models.PatchGMM`); ``sigma`` > 0 on the 0-255 scale, a number or one per image.
    """
    if prior_type is None and prior is not None:
        raise TypeError(
            f"{method} uses no learned prior (pass prior=None); {type(prior).__name__} is not a prior it can use"
        )
    if prior_type is not None and not isinstance(prior, prior_type):
        raise TypeError(
            f"{method} needs a {prior_type.__name__} (e.g. load_pretrained('bsd_patch_gmm')); "
            f"{type(prior).__name__} is not a prior it can use"
        )
    if not isinstance(sigma, Tensor):
        check_sigma(sigma)
    if not isinstance(y, Tensor) or not torch.is_floating_point(y):
        raise TypeError(f"y must be a floating torch.Tensor, got {type(y).__name__}")
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"y contains {int((~torch.isfinite(y)).sum())} NaN or infinite values")
    for name in ("A", "A_adjoint"):
        if not callable(getattr(op, name, None)):
            raise TypeError(f"op must provide {name}() (a jpmap_core.operators operator); got {type(op).__name__}")
    aty = check_tensor4d(op.A_adjoint(y), "A^T y")
    if op.A(aty).shape != y.shape:
        raise ValueError(
            f"y has shape {tuple(y.shape)} but {type(op).__name__} produces {tuple(op.A(aty).shape)} for images of "
            f"shape {tuple(aty.shape)}"
        )
    sigma = check_sigma(sigma, y.shape[0])
    return y, aty, sigma


@dataclass
class OneImage:
    """What a classical method returns for one image: the estimate ``(1, C, H, W)``, its objective values (one per
    iteration, the method's own definition), the iterations run and whether its stopping test fired."""

    x: Tensor
    objective: list[float]
    iterations: int
    converged: bool


def run_per_image(
    y: Tensor, op: Any, sigma: Sigma, solve_one: Callable[[Tensor, Any, float, int], OneImage], info: dict[str, Any]
) -> Restoration:
    """Solve every image alone (``solve_one(y_b, op_b, sigma_b, b)`` with ``op_b = op.rows([b])`` and its own
    ``sigma``) and gather a :class:`Restoration` (``z`` empty)."""
    clock = Clock()
    B = y.shape[0]
    results = []
    for b in range(B):
        idx = torch.tensor([b], device=y.device)
        op_b = op.rows(idx) if hasattr(op, "rows") else None
        if op_b is None:
            if B > 1:
                raise ValueError(
                    f"{type(op).__name__} cannot be restricted to one image of the batch (rows() gave None): "
                    "restore its images one at a time"
                )
            op_b = op
        results.append(solve_one(y[b : b + 1], op_b, float(sigma_rows(sigma, idx)), b))
    T = max(len(r.objective) for r in results)
    objective = torch.full((T, B), float("nan"), dtype=torch.float64)
    for b, r in enumerate(results):
        objective[: len(r.objective), b] = torch.tensor(r.objective, dtype=torch.float64)
    x = torch.cat([r.x for r in results])
    info = dict(info, sigma=sigma_info(sigma), seconds=clock())
    return Restoration(
        x=x,
        z=x.new_zeros(B, 0),
        x_decoded=x,
        converged=torch.tensor([r.converged for r in results], dtype=torch.bool),
        iterations=torch.tensor([r.iterations for r in results], dtype=torch.long),
        history={"objective": objective},
        info=info,
    )
