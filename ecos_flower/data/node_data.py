"""A node's own data: an ImageFolder tree or an `.npz` file the data owner points its node at.

In a real deployment each SuperNode holds its own images and reads nothing else: no scenario,
no other client's data, no public pool. The node is given (by its node config) a path and splits
the data into train and test itself, with its own seed; the server only tells it the run's label
space (class names, in the server's order) and the image size and channels its models expect.

Formats:

* an ImageFolder tree: one sub-folder per class, named by the class (`cat/`, `dog/`, or `0/` ...
  `9/` for digits), holding image files of any size, grey or colour (anything Pillow reads with
  an extension torchvision's ImageFolder accepts: .png, .jpg, ...);
* an `.npz` file with `images` (N, C, H, W) or (N, H, W) (uint8 0..255, or floats in [0, 1]),
  integer `labels` (N,) and optionally `class_names` (the name of each label value). Without
  `class_names` the labels are taken as indices into the server's class order.

Labels are mapped into the server's order by name. Whether the node accepts the server's label
space depends only on its class names (the folder listing, or the npz's `class_names`), which
are node-owned metadata, not on any record: a node missing a class (an empty or absent class
folder) is fine when its names are a subset of the server's; a name the server does not know is
refused (`LabelSpaceError`, naming both lists).

Pure: no Flower; loads are cached per process by file signature and parameters.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .federation import ClientShard, derive_seed
from .image_tree import LabelSpaceError as LabelSpaceError  # re-exported: the node's refusal
from .image_tree import label_mapping
from .imageops import standardize, to_float_images
from .loaders import read_image_tree
from .partition import split_fraction
from .types import ImageSet

NODE_DOMAIN = "node"
"""The one domain name of a node's own ImageSets."""

MAX_CLASSES = 100_000
"""The most class names a node accepts from a server (a bound before it allocates anything)."""


def parse_class_names(value: object) -> tuple[str, ...]:
    """The server's class names from a message: a JSON list of strings, or comma-joined text.
    ValueError for anything else, for empty or duplicate names, or for more than MAX_CLASSES."""
    if not isinstance(value, str):
        raise ValueError(f"class-names must be text, got {type(value).__name__}")
    text = value.strip()
    if len(text) > 64 * MAX_CLASSES:
        raise ValueError(f"class-names text is too long ({len(text)} characters)")
    if text.startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"class-names is not valid JSON: {exc}") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError("class-names JSON must be a list of strings")
    else:
        names = [n.strip() for n in text.split(",")] if text else []
    if not names:
        raise ValueError("class-names is empty")
    if len(names) > MAX_CLASSES:
        raise ValueError(f"class-names lists {len(names)} classes (at most {MAX_CLASSES})")
    if any(not n for n in names):
        raise ValueError("class-names holds an empty name")
    if len(set(names)) != len(names):
        raise ValueError("class-names holds a name twice")
    return tuple(names)


def format_class_names(names: Sequence[str]) -> str:
    """The message form of class names (JSON, so a name may hold a comma)."""
    return json.dumps(list(names))


def _check_path(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"node data {path} does not exist")
    if path.is_dir():
        return path
    if path.suffix.lower() != ".npz":
        raise DataError(f"node data {path}: expected an ImageFolder tree (a folder) or an .npz")
    return path


def _npz_class_names(path: Path) -> tuple[str, ...] | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "class_names" not in npz.files:
                return None
            names = npz["class_names"]
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read as .npz: {exc}") from None
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise DataError(f"{path}: class_names must be a 1-D array of strings")
    result = tuple(str(n) for n in names.tolist())
    if len(set(result)) != len(result):
        raise DataError(f"{path}: class_names holds a name twice")
    return result


def node_class_names(path: str | Path) -> tuple[str, ...] | None:
    """The class names a node's data defines, from metadata only (never a record): an
    ImageFolder tree's class folder names (sorted), an npz's `class_names`; None for an npz
    without `class_names` (its labels index the server's classes)."""
    path = _check_path(path)
    if path.is_dir():
        names = tuple(sorted(p.name for p in path.iterdir() if p.is_dir()))
        if not names:
            raise DataError(f"node data {path}: no class sub-folders")
        return names
    return _npz_class_names(path)


def check_node_data(path: str | Path, server_names: Sequence[str]) -> None:
    """Raise unless the node's data exists and its class names fit the server's (metadata only:
    the folder listing or the npz's `class_names`; no image is read)."""
    label_mapping(node_class_names(path), server_names, f"node data {path}")


def _signature(path: Path) -> tuple:
    """What a cached load depends on: the file's or every class folder's mtime and size."""
    if path.is_dir():
        dirs = sorted(p for p in path.iterdir() if p.is_dir())
        return (path.stat().st_mtime_ns, *((d.name, d.stat().st_mtime_ns) for d in dirs))
    stat = path.stat()
    return (stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=4)
def _load_raw(
    path: str, signature: tuple, image_size: int, channels: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...] | None]:
    """(images standardized, label index per image, the names those index or None)."""
    file = Path(path)
    if file.is_dir():
        x, idx, classes = read_image_tree(file, image_size, allow_empty=True)
        return standardize(x, image_size, channels), idx, tuple(classes)
    try:
        with np.load(file, allow_pickle=False) as npz:
            missing = [k for k in ("images", "labels") if k not in npz.files]
            if missing:
                raise DataError(f"{file}: .npz has no {' or '.join(missing)} array")
            images, labels = npz["images"], npz["labels"]
    except (OSError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{file}: cannot read as .npz: {exc}") from None
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[1] not in (1, 3, 4)):
        raise DataError(f"{file}: images must be (N, C, H, W) or (N, H, W), got {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"{file}: {labels.shape} labels for {images.shape[0]} images")
    if labels.dtype.kind not in "iu":
        raise DataError(f"{file}: labels must be integers, got {labels.dtype}")
    names = _npz_class_names(file)
    # One sample's bad label must not change what the node answers (mechanisms are total): such
    # samples are left out, never an error raised on the whole data set.
    usable = (labels >= 0) & (labels < len(names) if names is not None else True)
    images, labels = images[usable], labels[usable]
    if images.shape[0] == 0:
        raise DataError(f"{file}: no images")
    if images.dtype.kind not in "uif":
        raise DataError(f"{file}: images must be numbers, got {images.dtype}")
    scale = 255.0 if images.dtype == np.uint8 else max(float(images.max()), 1.0)
    x = to_float_images(images, scale)
    return standardize(x, image_size, channels), torch.from_numpy(labels.astype(np.int64)), names


def read_labelled(
    path: str | Path, image_size: int, channels: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...] | None]:
    """An ImageFolder tree or `.npz` read whole (cached): images at `image_size` with
    `channels`, each image's label index, and the names those index (a tree's sorted class
    folders, an npz's `class_names`; None for an npz without them: its labels are indices)."""
    file = _check_path(path)
    return _load_raw(str(file.resolve()), _signature(file), int(image_size), int(channels))


def load_node_data(
    path: str | Path,
    *,
    image_size: int,
    channels: int,
    class_names: Sequence[str],
    split_seed: int = 0,
    test_fraction: float = 0.25,
    client_id: int = 0,
) -> ClientShard:
    """The node's own data as a ClientShard: read, resized to `image_size` x `image_size` with
    `channels` channels, labels mapped into the server's `class_names` order by name, split
    into train/test by the node's own `split_seed` (`test_fraction` of it for testing)."""
    if not 1 <= int(image_size) <= 4096 or int(channels) not in (1, 3):
        raise ValueError(
            f"image size must be 1..4096 and channels 1 or 3, got {image_size}, {channels}"
        )
    if not 0.0 <= float(test_fraction) < 1.0:
        raise ValueError(f"test-fraction must be in [0, 1), got {test_fraction}")
    file = _check_path(path)
    mapping = label_mapping(node_class_names(file), class_names, f"node data {file}")
    x, idx, names = read_labelled(file, int(image_size), int(channels))
    if names is None:  # npz without class_names: labels are the server's indices already
        # A label outside the server's classes leaves that sample out (totality, as above).
        inside = idx < len(class_names)
        x, labels = x[inside], idx[inside]
    else:
        assert mapping is not None
        labels = torch.tensor([mapping[n] for n in names], dtype=torch.int64)[idx]
    data = ImageSet(
        images=x,
        labels=labels.to(torch.int64),
        domains=torch.zeros(len(labels), dtype=torch.int64),
        domain_names=(NODE_DOMAIN,),
    )
    train_idx, test_idx = split_fraction(
        np.arange(len(data)), float(test_fraction), derive_seed(int(split_seed), 3)
    )
    if len(train_idx) == 0:
        raise DataError(f"node data {file}: {len(data)} image(s) leave no training data")
    return ClientShard(int(client_id), data.subset(train_idx), data.subset(test_idx))


def _safe_class_folder(name: str) -> str:
    if not name or name in (".", "..") or any(c in name for c in "/\\\0") or name.startswith("."):
        raise DataError(f"class name {name!r} cannot be a folder name")
    return name


def export_shards(
    scenario: str | Path,
    out: str | Path,
    *,
    data_root: str | Path | None = None,
    train_only: bool = False,
) -> list[Path]:
    """Write every client shard of a scenario as a per-node ImageFolder tree
    `out/node-<i>/<class-name>/<n>.png` (8-bit grey or RGB PNGs at the scenario's image size;
    every class of the label space gets a folder, empty if the shard holds none); returns the
    node folders. By default a shard's train and test parts go together: a node splits its own
    data (its `split-seed` / `test-fraction`), so it should get the whole shard, as a data owner
    holds all its data; `train_only` keeps the simulation's test part out (a held-out check)."""
    from .federation import load_federation

    federation = load_federation(scenario, data_root=data_root)
    out = Path(out)
    folders = []
    for i, shard in enumerate(federation.clients):
        node = out / f"node-{i}"
        data = shard.train if train_only else ImageSet.concat([shard.train, shard.test])
        write_image_tree(data, node, federation.class_names)
        folders.append(node)
    return folders


def write_image_tree(data: ImageSet, folder: Path, class_names: Sequence[str]) -> Path:
    """Write `data` as the ImageFolder tree `folder/<class-name>/<n>.png` (8-bit grey or RGB
    PNGs at its image size; every class gets a folder, empty if `data` holds none of it).
    DataError if `folder` exists and is not empty."""
    from PIL import Image

    names = [_safe_class_folder(n) for n in class_names]
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise DataError(f"{folder} exists and is not empty: export into a new folder")
    for name in names:
        (folder / name).mkdir(parents=True, exist_ok=True)
    pixels = (data.images.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    counts = [0] * len(names)
    for image, label in zip(pixels, data.labels.tolist(), strict=True):
        array = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        Image.fromarray(array, "L" if image.shape[0] == 1 else "RGB").save(
            folder / names[label] / f"{counts[label]}.png"
        )
        counts[label] += 1
    return folder
