"""A folder of finished solver calls, so that a long run (a paper profile) resumes where it stopped.

Each entry is a safetensors file (tensors + string metadata), written atomically, named by a key: the sha256 of
everything that decides the call's result, **by value** -- the arguments given to :meth:`CallCache.key` (methods,
caps, measurements, sigma, operators with their masks and matrices), the prior's weights and the source of the code
that computes it (``solvers/``, ``models/``, ``energy.py``, ``operators.py``: any change gives new keys). The same
call gets the same key in every process and every session; an unreadable entry is recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._io import atomic_write
from .operators import LinearOperator

__all__ = ["CallCache", "code_fingerprint", "fingerprint"]

VERSION = "jpmap-companion call cache v1"
#: the sources whose code decides a solver call's result
SOLVER_SOURCES = ("energy.py", "operators.py", "models", "solvers")


def _hash_tensor(h, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _feed(h, obj: Any) -> None:
    if isinstance(obj, Tensor):
        _hash_tensor(h, obj)
    elif isinstance(obj, LinearOperator):
        h.update(type(obj).__name__.encode())
        for k in sorted(vars(obj)):
            if not k.startswith("_"):  # caches, cached shapes and factorisations are derived data
                h.update(k.encode())
                _feed(h, vars(obj)[k])
    elif isinstance(obj, list | tuple):
        h.update(f"[{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, dict):
        _feed(h, sorted(obj.items()))
    elif obj is None or isinstance(obj, bool | int | float | str):
        h.update(f"{type(obj).__name__}:{obj!r}".encode())
    else:
        raise TypeError(f"cannot fingerprint a {type(obj).__name__}; give tensors, operators, numbers or strings")


def fingerprint(*parts: Any) -> str:
    """sha256 of ``parts`` by value (tensors by dtype, shape and bytes; operators by their public attributes)."""
    h = hashlib.sha256(VERSION.encode())
    for p in parts:
        _feed(h, p)
    return h.hexdigest()


def code_fingerprint() -> str:
    """sha256 of the solver code (:data:`SOLVER_SOURCES`)."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for name in SOLVER_SOURCES:
        path = root / name
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


class CallCache:
    """Finished calls of one prior in ``folder``: :meth:`key`, then :meth:`load` or compute and :meth:`save`."""

    def __init__(self, folder: str | os.PathLike, vae: torch.nn.Module) -> None:
        self.folder = Path(folder)
        self._base = fingerprint(sorted(vae.state_dict().items()), code_fingerprint())

    def key(self, *parts: Any) -> str:
        return fingerprint(self._base, *parts)[:32]

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def load(self, key: str) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        """``(tensors, metadata)`` of a finished call, or ``None`` (absent, or unreadable: compute it again)."""
        path = self.path(key)
        if not path.exists():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        except Exception:  # noqa: BLE001 - a damaged entry is recomputed, never trusted
            return None
        return tensors, meta

    def save(self, key: str, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
        """Write the call's tensors (on the CPU) and its JSON-able metadata, atomically."""
        from safetensors.torch import save_file

        t = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        m = {k: json.dumps(v) for k, v in meta.items()}
        return atomic_write(self.path(key), lambda tmp: save_file(t, tmp, metadata=m))
