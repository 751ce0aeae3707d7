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


def shared_data_dir() -> Path | None:
    """``$JPMAP_DATA_DIR`` or ``../shared/data`` next to the repository, when it exists."""
    for cand in (os.environ.get("JPMAP_DATA_DIR"), ROOT.parent / "shared" / "data"):
        if cand and Path(cand).is_dir():
            return Path(cand)
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = shared_data_dir()
    if d is None:
        pytest.skip("no dataset folder: set JPMAP_DATA_DIR (CI sets it to ../shared/data)")
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
