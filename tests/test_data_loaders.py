"""Loaders on the real digit domains (skipped where absent) and their error messages."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ecos_flower.data import DataError, load_domain, read_idx


def load(loader: str, path, size: int = 28, channels: int = 1, **options):
    return load_domain(
        loader,
        name=f"{loader}-test",
        path=path,
        image_size=size,
        channels=channels,
        options=options,
    )


def check(data, n: int, size: int = 28, channels: int = 1) -> None:
    assert data.images.shape == (n, channels, size, size)
    assert data.images.dtype == torch.float32 and data.labels.dtype == torch.int64
    assert float(data.images.min()) >= 0.0 and float(data.images.max()) <= 1.0
    assert float(data.images.max()) > 0.9  # really scaled to [0, 1], not to [0, 1/255]
    assert sorted(data.label_set()) == list(range(10))
    assert data.domains.eq(0).all()


def write_image_folder(root: Path, classes: dict[str, int], mode: str = "L") -> Path:
    """A tiny ImageFolder tree: `count` random 12x12 images per class folder."""
    rng = np.random.default_rng(0)
    for cls, count in classes.items():
        (root / cls).mkdir(parents=True)
        for i in range(count):
            shape = (12, 12) if mode == "L" else (12, 12, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
                root / cls / f"{i}.png"
            )
    return root


def write_idx(path: Path, array: np.ndarray, code: int = 0x08) -> Path:
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


# --- real data --------------------------------------------------------------------------------


def test_mnist_idx(shared_digits):
    data = load("mnist-idx", shared_digits / "mnist" / "raw")
    check(data, 10_000)
    assert data.images.mean() < 0.25  # white digits on black


def test_mnist_idx_prefix_and_max_samples(shared_digits):
    data = load(
        "mnist-idx", shared_digits / "mnist" / "raw", size=16, prefix="t10k", **{"max-samples": 500}
    )
    check(data, 500, size=16)
    again = load("mnist-idx", shared_digits / "mnist" / "raw", size=16, **{"max-samples": 500})
    assert torch.equal(data.sample_ids, again.sample_ids)
    assert data.sample_ids.unique().numel() == 500 and int(data.sample_ids.max()) < 10_000
    with pytest.raises(DataError, match="no train-images-idx3-ubyte"):
        load("mnist-idx", shared_digits / "mnist" / "raw", prefix="train")


def test_usps(shared_digits):
    every = load("usps", shared_digits / "usps", size=16)
    check(every, 7291 + 2007, size=16)
    test = load("usps", shared_digits / "usps", size=16, split="test")
    check(test, 2007, size=16)
    assert torch.equal(every.images[7291:], test.images)  # all = train then test
    assert float(every.images.min()) == 0.0


def test_optdigits_image_folder(shared_digits):
    data = load("image-folder", shared_digits / "optdigits", size=32, channels=3)
    check(data, 3731, size=32, channels=3)
    assert set(np.unique(data.images.numpy())) == {0.0, 1.0}  # binary bitmaps at native size


# --- any user folder --------------------------------------------------------------------------


def test_image_folder_rgb_to_grey_and_integer_labels(tmp_path):
    root = write_image_folder(tmp_path / "rgb", {"0": 2, "2": 3, "10": 1}, mode="RGB")
    data = load("image-folder", root, size=8)
    assert data.images.shape == (6, 1, 8, 8)
    assert sorted(data.labels.tolist()) == [0, 0, 2, 2, 2, 10]  # folder names, not sort ranks


def test_image_folder_empty_class_folder_is_named(tmp_path):
    root = write_image_folder(tmp_path / "tree", {"0": 2, "1": 0})
    with pytest.raises(DataError, match=r"tree/1: empty class folder"):
        load("image-folder", root)


def test_image_folder_non_integer_class_is_named(tmp_path):
    root = write_image_folder(tmp_path / "tree", {"0": 1, "cat": 1})
    with pytest.raises(DataError, match=r"tree/cat: class folder names must be"):
        load("image-folder", root)


def test_image_folder_corrupt_image_is_named(tmp_path):
    root = write_image_folder(tmp_path / "tree", {"0": 1})
    (root / "0" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"bad\.png: cannot read image"):
        load("image-folder", root)


@pytest.mark.parametrize("loader", ["image-folder", "mnist-idx", "usps"])
def test_missing_path_is_named(tmp_path, loader):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=rf"folder {missing} does not exist"):
        load(loader, missing)


def test_usps_missing_file_is_named(tmp_path):
    (tmp_path / "usps").mkdir()
    with pytest.raises(DataError, match=r"usps/usps\.bz2 not found"):
        load("usps", tmp_path / "usps", split="train")


# --- idx format -------------------------------------------------------------------------------


def idx_pair(folder: Path, n: int = 4, gz: bool = True) -> tuple[Path, Path]:
    folder.mkdir(exist_ok=True)
    ext = ".gz" if gz else ""
    rng = np.random.default_rng(1)
    images = write_idx(folder / f"t-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 5, 5)))
    labels = write_idx(folder / f"t-labels-idx1-ubyte{ext}", np.arange(n) % 10)
    return images, labels


def test_idx_roundtrip_plain_and_gz(tmp_path):
    for gz in (True, False):
        folder = tmp_path / f"gz{gz}"
        images, _ = idx_pair(folder, gz=gz)
        assert read_idx(images).shape == (4, 5, 5)
        data = load("mnist-idx", folder, size=5)
        assert data.labels.tolist() == [0, 1, 2, 3]


def test_truncated_idx_copy_is_named(tmp_path, shared_digits):
    folder = tmp_path / "raw"
    folder.mkdir()
    src = shared_digits / "mnist" / "raw"
    shutil.copy(src / "t10k-labels-idx1-ubyte.gz", folder)
    raw = gzip.decompress((src / "t10k-images-idx3-ubyte.gz").read_bytes())
    (folder / "t10k-images-idx3-ubyte").write_bytes(raw[: len(raw) // 2])  # ungzipped, cut
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: idx file truncated"):
        load("mnist-idx", folder)


def test_truncated_gzip_is_named(tmp_path):
    images, _ = idx_pair(tmp_path / "raw")
    images.write_bytes(images.read_bytes()[:-12])
    with pytest.raises(DataError, match=r"t-images-idx3-ubyte\.gz: .*truncated"):
        load("mnist-idx", tmp_path / "raw")


def test_bad_magic_is_named(tmp_path):
    images, _ = idx_pair(tmp_path / "raw", gz=False)
    raw = bytearray(images.read_bytes())
    raw[0:4] = b"\x12\x34\x08\x03"
    images.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"t-images-idx3-ubyte: bad idx magic number 0x12340803"):
        load("mnist-idx", tmp_path / "raw")


def test_wrong_dims_trailing_bytes_and_count_mismatch(tmp_path):
    folder = tmp_path / "raw"
    images, labels = idx_pair(folder, gz=False)
    write_idx(labels, np.zeros((4, 2)))
    with pytest.raises(DataError, match=r"t-labels-idx1-ubyte: idx file has 2 dimensions"):
        load("mnist-idx", folder)
    write_idx(labels, np.arange(3))
    with pytest.raises(DataError, match=r"t-labels-idx1-ubyte: 3 labels for 4 images"):
        load("mnist-idx", folder)
    write_idx(labels, np.arange(4))
    images.write_bytes(images.read_bytes() + b"\0")
    with pytest.raises(DataError, match=r"t-images-idx3-ubyte: idx file has trailing bytes"):
        load("mnist-idx", folder)


def test_missing_labels_partner_is_named(tmp_path):
    _, labels = idx_pair(tmp_path / "raw")
    labels.unlink()
    with pytest.raises(DataError, match=r"t-images-idx3-ubyte\.gz: no matching labels file"):
        load("mnist-idx", tmp_path / "raw")


def test_bad_loader_and_option_are_named():
    with pytest.raises(ValueError, match="unknown loader 'nope'"):
        load("nope", None)
    with pytest.raises(ValueError, match="split: must be one of train, test, all"):
        load("usps", None, split="both")
    with pytest.raises(ValueError, match="colour: unknown option"):
        load("sklearn-digits", None, colour=1)
