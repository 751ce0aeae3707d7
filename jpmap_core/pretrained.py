"""Registry of shipped priors: safetensors files checked against a sha256 manifest. Nothing is unpickled.

The manifest ``data/pretrained/manifest.json`` maps a name (e.g. ``mnist_mlp_dvae15``) to its file, sha256,
model config and training recipe (data, epochs, final test ELBO, gamma, seconds, command to retrain).
The folder is ``$JPMAP_PRETRAINED_DIR`` when set, else ``data/pretrained`` of this repository.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._io import atomic_write, atomic_write_json, sha256_file
from .models import build_model

MANIFEST = "manifest.json"


class PretrainedError(RuntimeError):
    """A shipped prior is unknown, missing or corrupted."""


def pretrained_dir() -> Path:
    env = os.environ.get("JPMAP_PRETRAINED_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "data" / "pretrained"


def load_manifest(directory: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    path = Path(directory or pretrained_dir()) / MANIFEST
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PretrainedError(f"{path} is not valid JSON ({exc}); restore it with `git checkout {path}`") from exc


def available() -> list[str]:
    """Names of the priors listed in the manifest."""
    return sorted(load_manifest())


def manifest_entry(name: str, directory: str | os.PathLike | None = None) -> dict[str, Any]:
    manifest = load_manifest(directory)
    if name not in manifest:
        known = ", ".join(sorted(manifest)) or "none"
        raise PretrainedError(f"unknown prior {name!r}; the manifest lists: {known}")
    return manifest[name]


def weights_sha256(name: str) -> str:
    """The manifest's sha256 of a prior (what figures and metrics record)."""
    return manifest_entry(name)["sha256"]


def load_pretrained(name: str, device: str | torch.device = "cpu", *, directory: str | None = None) -> nn.Module:
    """Load a shipped prior (any of :data:`~jpmap_core.models.ARCHITECTURES`) in eval mode with frozen parameters,
    after checking its sha256.

    Errors (:class:`PretrainedError`) say whether the name is unknown, the file missing or the checksum
    wrong, and how to get the file back (git, or the training command recorded in the manifest).
    """
    from safetensors.torch import load_file

    directory = Path(directory or pretrained_dir())
    entry = manifest_entry(name, directory)
    path = directory / entry["file"]
    retrain = entry.get("command", "python -m jpmap_core.train --name " + name)
    if not path.exists():
        raise PretrainedError(
            f"weights file {path} for prior {name!r} is missing; restore it with `git checkout -- {path}` "
            f"(it is committed) or retrain with `{retrain} --export {directory}`"
        )
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise PretrainedError(
            f"checksum mismatch for {path}: sha256 {digest} but the manifest expects {entry['sha256']}; "
            f"the file is corrupted or was replaced. Restore it with `git checkout -- {path}` or retrain with "
            f"`{retrain} --export {directory}`"
        )
    model = build_model(entry["model"])
    state = load_file(str(path), device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise PretrainedError(
            f"{path} does not match the architecture in the manifest: missing {missing}, unexpected {unexpected}"
        )
    model.eval().requires_grad_(False)
    return model.to(device)


def export_pretrained(
    model: nn.Module, name: str, entry: dict[str, Any], directory: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Write ``<name>.safetensors`` and its manifest entry (both atomically); returns the entry."""
    from safetensors.torch import save_file

    directory = Path(directory or pretrained_dir())
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"name": name}))
    entry = dict(entry, file=path.name, sha256=sha256_file(path), bytes=path.stat().st_size)
    # Read-modify-write under an exclusive lock: several trainings may export into one folder at once.
    with open(directory / ".manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = load_manifest(directory)
        manifest[name] = entry
        atomic_write_json(directory / MANIFEST, dict(sorted(manifest.items())))
    return entry
