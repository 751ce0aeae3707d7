"""A folder of finished solver calls, so that a long run (a paper profile) resumes where it stopped.

Each entry is a safetensors file (tensors + string metadata), written atomically, named by a key: the sha256 of
everything that decides the call's result, **by value** -- the arguments given to :meth:`CallCache.key` (methods,
caps, measurements, sigma, operators with their masks and matrices), the prior's weights and the source of the code
that computes it (``solvers/``, ``models/``, ``energy.py``, ``operators.py``: any change gives new keys). The same
call gets the same key in every process and every run; an unreadable entry is recomputed, never trusted.

``python -m jpmap_core.cache FOLDER`` lists what a folder holds (calls, images and seconds per method).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._io import atomic_write
from .operators import LinearOperator

__all__ = ["CallCache", "code_fingerprint", "describe", "fingerprint"]

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


def describe(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """What a cache folder holds, read from the files' headers (the tensors are not loaded): one dict per entry,
    oldest first, with its ``key``, ``written`` (UTC), ``rows`` (images in its result ``x``), its metadata
    (``method``, ``seconds``, ...) and ``unreadable: True`` for a damaged entry (which a run recomputes).

    The keys cannot be traced back to their calls: an entry left by other code or another prior is listed too (and
    never used by a run). Resuming a run is what tells how much of *it* is done."""
    from safetensors import safe_open

    out = []
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"), key=lambda f: (f.stat().st_mtime, f.name)) if folder.is_dir() else []
    for f in files:
        row: dict[str, Any] = {
            "key": f.stem,
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(f.stat().st_mtime)),
        }
        try:
            with safe_open(str(f), framework="pt") as sf:
                meta = {k: json.loads(v) for k, v in (sf.metadata() or {}).items()}
                row["rows"] = sf.get_slice("x").get_shape()[0] if "x" in sf.keys() else None  # noqa: SIM118
        except Exception:  # noqa: BLE001 - reported, like load() does, never trusted
            row["unreadable"] = True
            out.append(row)
            continue
        row.update(meta)
        out.append(row)
    return out


def _method_name(m: Any) -> str:
    return "+".join(m) if isinstance(m, list) else str(m)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jpmap_core.cache FOLDER``: the finished calls of a resumable run, per method."""
    p = argparse.ArgumentParser(prog="python -m jpmap_core.cache", description=main.__doc__)
    p.add_argument("folder", help="a CACHE_DIR, e.g. runs/cache/06_mnist_benchmark")
    p.add_argument("--json", action="store_true", help="print every entry as JSON instead of the summary")
    a = p.parse_args(argv)
    if not Path(a.folder).is_dir():
        p.error(f"{a.folder} is not a folder (a run creates its CACHE_DIR when it saves its first call)")
    entries = describe(a.folder)
    if a.json:
        print(json.dumps(entries, indent=1))
        return 0
    per: dict[str, list[float]] = {}
    bad = 0
    for e in entries:
        if e.get("unreadable"):
            bad += 1
            continue
        calls_rows_seconds = per.setdefault(_method_name(e.get("method")), [0, 0, 0.0])
        calls_rows_seconds[0] += 1
        calls_rows_seconds[1] += e.get("rows") or 0
        calls_rows_seconds[2] += float(e.get("seconds", 0.0))
    print(f"{a.folder}: {len(entries)} entries" + (f", {bad} unreadable (a run recomputes them)" if bad else ""))
    if entries:
        print(f"written {entries[0]['written']} ... {entries[-1]['written']}")
    print(f"{'method':<44} {'calls':>5} {'rows':>6} {'seconds':>9}")
    for m, (n, rows, sec) in sorted(per.items()):
        print(f"{m:<44} {n:>5} {rows:>6} {sec:>9.0f}")
    total = sum(v[2] for v in per.values())
    print(f"{'all':<44} {sum(v[0] for v in per.values()):>5} {sum(v[1] for v in per.values()):>6} {total:>9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
