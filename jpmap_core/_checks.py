"""Input validation shared by every module: clear errors that say what was wrong and what was expected."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_tensor4d(x: object, name: str = "x") -> Tensor:
    """Require a floating ``(B, C, H, W)`` tensor with finite values."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"{name} must have shape (B, C, H, W) (4 dimensions), got shape {tuple(x.shape)}; "
            f"add the batch dimension with {name}[None] for a single image"
        )
    if not torch.is_floating_point(x):
        raise TypeError(
            f"{name} must be a floating tensor with values in [0, 1], got dtype {x.dtype}; "
            f"convert uint8 images with {name}.float() / 255"
        )
    if not bool(torch.isfinite(x).all()):
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} contains {n_bad} NaN or infinite values")
    return x


def check_images(
    x: object,
    name: str = "x",
    *,
    shape: tuple[int, int, int] | None = None,
    check_range: bool = True,
    atol: float = 1e-6,
) -> Tensor:
    """Require images ``(B, C, H, W)`` in [0, 1] (optionally of a given ``(C, H, W)``)."""
    x = check_tensor4d(x, name)
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        raise ValueError(
            f"{name} has image shape (C, H, W) = {tuple(x.shape[1:])} but {tuple(shape)} was expected "
            f"(full shape {tuple(x.shape)})"
        )
    if check_range and x.numel() > 0:
        lo, hi = float(x.detach().min()), float(x.detach().max())
        if lo < -atol or hi > 1 + atol:
            hint = " (it looks like the 0-255 scale: divide by 255)" if hi > 2 else ""
            raise ValueError(f"{name} must have values in [0, 1], got range [{lo:.4g}, {hi:.4g}]{hint}")
    return x


def check_positive(value: object, name: str) -> float:
    """Require a finite number > 0."""
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a positive number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def check_nonnegative(value: object, name: str) -> float:
    """Require a finite number >= 0."""
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number >= 0, got {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def check_choice(value: str, name: str, choices: tuple[str, ...]) -> str:
    """Require ``value`` to be one of ``choices``."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}")
    return value
