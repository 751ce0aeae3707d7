"""What every notebook writes at the end: ``metrics.json`` with the numbers its figures show and what produced them.

Every metrics file carries ``profile``, ``device``, ``data_source``, ``n_images``, ``seconds`` and, for each prior
used, its ``weights_sha256`` -- so a figure can always be traced to its data, weights and run size.
"""

from __future__ import annotations

import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from . import __version__
from ._io import atomic_write_json

REQUIRED = ("profile", "device", "data_source", "n_images", "seconds")


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if hasattr(v, "item") and callable(v.item):  # numpy scalars
        return _jsonable(v.item())
    return v


def save_metrics(out_dir: str | os.PathLike, metrics: dict[str, Any], *, priors: list[str] | None = None) -> Path:
    """Write ``out_dir/metrics.json`` atomically.

    ``metrics`` must hold the run description keys ``profile``, ``device``, ``data_source``, ``n_images``,
    ``seconds`` (a clear error otherwise); ``priors`` adds ``weights_sha256`` per shipped prior. NaN values
    become ``null`` (JSON has no NaN), so an unavailable quantity is recorded as missing, never as a number.
    """
    missing = [k for k in REQUIRED if k not in metrics]
    if missing:
        raise ValueError(f"metrics must record {', '.join(REQUIRED)}; missing: {', '.join(missing)}")
    out = dict(metrics)
    if priors:
        from .pretrained import weights_sha256

        out["weights_sha256"] = {name: weights_sha256(name) for name in priors}
    out.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    out.setdefault(
        "versions", {"jpmap_core": __version__, "torch": torch.__version__, "python": platform.python_version()}
    )
    return atomic_write_json(Path(out_dir) / "metrics.json", _jsonable(out))
