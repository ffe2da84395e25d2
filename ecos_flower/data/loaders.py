"""Domain loaders: each reads one source into an ImageSet of a single domain.

All loaders return float32 (N, channels, image_size, image_size) images in [0, 1], int64 labels
and a one-name domain table. The registry LOADERS also tells scenario validation which loaders
need a path and which options each accepts.

`image-folder` with option `lazy = true` reads only the file list: its ImageSet holds a
`lazy.LazyImages` (decoded row by row when indexed, streamed through a DataLoader for features),
so the domain costs memory for its labels and indices, not its pixels.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .embedded import VARIANTS, embedded_digits, sklearn_digits
from .errors import DataError
from .idx import read_idx
from .image_tree import decode_image, folder_class_names, folder_classes
from .imageops import standardize, to_float_images
from .types import ImageSet

# A reader gets (name, path, options) and returns images (N, C, H, W) float32 in [0, 1] at any
# size, plus int64 labels; load_domain resizes, converts channels and subsamples.
Reader = Callable[[str, Path | None, dict[str, Any], int], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class OptionSpec:
    """One loader option: accepted Python types, allowed values (if a closed set), default, doc."""

    types: tuple[type, ...]
    default: Any
    doc: str
    choices: tuple[Any, ...] | None = None
    minimum: int | None = None


@dataclass(frozen=True)
class LoaderInfo:
    """A loader: its reader, whether it needs a `path`, the options it accepts, a one-line doc."""

    read: Reader
    needs_path: bool
    doc: str
    options: dict[str, OptionSpec] = field(default_factory=dict)


MAX_SAMPLES = OptionSpec(
    (int,),
    None,
    "keep at most this many samples (a deterministic random subset by seed)",
    minimum=1,
)


LAZY = OptionSpec(
    (bool,),
    False,
    "decode images on demand instead of loading the domain as float32 (for pools larger than "
    "memory; the run's extractor must then be a pretrained one: efficientnet-lite0 or "
    "torchvision:<arch>)",
)


# --- readers -----------------------------------------------------------------------------------


def _require(path: Path | None, name: str, kind: str) -> Path:
    """The path, checked to exist and be a folder/file; DataError naming it otherwise."""
    if path is None:
        raise DataError(f"domain {name!r}: this loader needs a path")
    path = Path(path)
    if not path.exists():
        raise DataError(f"domain {name!r}: {kind} {path} does not exist")
    if kind == "folder" and not path.is_dir():
        raise DataError(f"domain {name!r}: {path} is not a folder")
    return path


def _read_sklearn(name, path, options, size):
    return sklearn_digits(size)


def _read_embedded(name, path, options, size):
    return embedded_digits(options["variant"], size)


_IDX_IMAGES = re.compile(r"^(?P<prefix>.+)-images-idx3-ubyte(?P<gz>\.gz)?$")


def _idx_pairs(folder: Path, prefix: str) -> list[tuple[Path, Path]]:
    """(images, labels) idx file pairs in `folder`, sorted; a non-empty `prefix` filters."""
    pairs = []
    for images in sorted(folder.iterdir()):
        m = _IDX_IMAGES.match(images.name)
        if not m or (prefix and m["prefix"] != prefix):
            continue
        candidates = [folder / f"{m['prefix']}-labels-idx1-ubyte{ext}" for ext in (".gz", "")]
        labels = next((c for c in candidates if c.is_file()), None)
        if labels is None:
            raise DataError(
                f"{images}: no matching labels file ({candidates[0].name} or {candidates[1].name}) "
                f"in {folder}"
            )
        pairs.append((images, labels))
    return pairs


def _read_mnist_idx(name, path, options, size):
    folder = _require(path, name, "folder")
    pairs = _idx_pairs(folder, options["prefix"])
    if not pairs:
        what = (
            f"{options['prefix']}-images-idx3-ubyte[.gz]"
            if options["prefix"]
            else ("*-images-idx3-ubyte[.gz]")
        )
        raise DataError(f"domain {name!r}: no {what} file in folder {folder}")
    xs, ys = [], []
    for images_file, labels_file in pairs:
        images = read_idx(images_file, ndim=3)
        labels = read_idx(labels_file, ndim=1)
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{labels_file}: {labels.shape[0]} labels for {images.shape[0]} images in "
                f"{images_file.name}"
            )
        if labels.size and (labels.min() < 0 or not np.all(labels == np.round(labels))):
            raise DataError(f"{labels_file}: labels must be non-negative integers")
        if xs and images.shape[1:] != xs[0].shape[1:]:
            raise DataError(f"{images_file}: image size {images.shape[1:]} differs from the others")
        xs.append(images)
        ys.append(labels.astype(np.int64))
    x = np.concatenate(xs)
    scale = 255.0 if x.dtype == np.uint8 else max(float(x.max()), 1.0)
    return to_float_images(x, scale), torch.from_numpy(np.concatenate(ys))


@lru_cache(maxsize=8)
def _usps_split(root: str, train: bool, mtime_ns: int) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's USPS parse (slow: seconds), cached per process by file and mtime."""
    from torchvision.datasets import USPS

    ds = USPS(root, train=train, download=False)
    return np.asarray(ds.data), np.asarray(ds.targets, dtype=np.int64)


def _read_usps(name, path, options, size):
    folder = _require(path, name, "folder")
    split = options["split"]
    wanted = {"train": [True], "test": [False], "all": [True, False]}[split]
    xs, ys = [], []
    for train in wanted:
        file = folder / ("usps.bz2" if train else "usps.t.bz2")
        if not file.is_file():
            raise DataError(f"domain {name!r}: USPS file {file} not found (split {split!r})")
        try:
            x, y = _usps_split(str(folder), train, file.stat().st_mtime_ns)
        except (OSError, EOFError, ValueError, IndexError) as exc:
            raise DataError(f"{file}: cannot parse as USPS (LIBSVM bz2): {exc}") from None
        xs.append(x)
        ys.append(y)
    # torchvision already maps USPS's [-1, 1] values to uint8 0..255: divide by 255 for [0, 1].
    return to_float_images(np.concatenate(xs), 255.0), torch.from_numpy(np.concatenate(ys))


def read_image_tree(
    root: Path, size: int, allow_empty: bool = False
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every image of an ImageFolder tree: (images float32 (N, C, H, W) in [0, 1], int64 index of
    each image's class folder into the returned sorted folder names, those names). Images of
    mixed sizes or modes are each brought to RGB `size` squares. An empty class folder is a
    DataError unless `allow_empty`; a tree without any image always is."""
    from torchvision.datasets import ImageFolder

    root = Path(root)
    ds = ImageFolder(str(root), allow_empty=True)
    if not allow_empty:
        counts = {c: 0 for c in ds.classes}
        for _, idx in ds.samples:
            counts[ds.classes[idx]] += 1
        for cls, count in counts.items():
            if count == 0:
                raise DataError(f"{root / cls}: empty class folder (no image files)")
    if not ds.samples:
        raise DataError(f"{root}: no image files in any class folder")
    arrays, labels = [], []
    for file, idx in ds.samples:
        arrays.append(decode_image(file))
        labels.append(idx)
    y = torch.tensor(labels, dtype=torch.int64)
    if len({a.shape for a in arrays}) == 1:
        return to_float_images(np.stack(arrays), 255.0), y, list(ds.classes)
    # Mixed sizes or modes: bring each image to a common form one by one (RGB, `size` square).
    one = [standardize(to_float_images(a[None], 255.0), size, 3) for a in arrays]
    return torch.cat(one), y, list(ds.classes)


def _read_image_folder(name, path, options, size):
    root = _require(path, name, "folder")
    if not any(p.is_dir() for p in root.iterdir()):
        raise DataError(f"domain {name!r}: folder {root} has no class sub-folders")
    labels_of = folder_classes(root)
    x, idx, classes = read_image_tree(root, size)
    table = torch.tensor([labels_of[c] for c in classes], dtype=torch.int64)
    return x, table[idx]


def _lazy_image_folder(name, path, size, channels):
    """An image-folder domain as (LazyImages, labels): the file list and the eager reader's
    labels (`folder_classes`), no image decoded."""
    from .lazy import ImageFolderDataset, LazyImages

    root = _require(path, name, "folder")
    if not any(p.is_dir() for p in root.iterdir()):
        raise DataError(f"domain {name!r}: folder {root} has no class sub-folders")
    data = ImageFolderDataset(root, image_size=size, channels=channels)
    # The eager reader refuses an empty class folder; so does the lazy one (same data, same
    # verdict), from the file list.
    present = set(data.labels.tolist())
    for folder, label in folder_classes(root).items():
        if label not in present:
            raise DataError(f"{root / folder}: empty class folder (no image files)")
    return LazyImages([data]), data.labels.clone()


def domain_class_names(loader: str, path: Path | None) -> dict[int, str]:
    """Label -> class name a domain's source defines (an image-folder tree's folder names);
    empty for the loaders whose labels are digits (their names are the labels' text)."""
    if loader == "image-folder" and path is not None and Path(path).is_dir():
        return folder_class_names(Path(path))
    return {}


LOADERS: dict[str, LoaderInfo] = {
    "sklearn-digits": LoaderInfo(
        _read_sklearn,
        False,
        "scikit-learn's load_digits (1,797 8x8 images, values / 16)",
        {"max-samples": MAX_SAMPLES},
    ),
    "embedded": LoaderInfo(
        _read_embedded,
        False,
        "a styled variant of load_digits (no external files)",
        {
            "variant": OptionSpec((str,), "plain", "which style", choices=tuple(VARIANTS)),
            "max-samples": MAX_SAMPLES,
        },
    ),
    "mnist-idx": LoaderInfo(
        _read_mnist_idx,
        True,
        "a folder of PREFIX-images-idx3-ubyte[.gz] + PREFIX-labels-idx1-ubyte[.gz] pairs",
        {
            "prefix": OptionSpec(
                (str,), "", "only this pair, e.g. 't10k' or 'train' (empty: all pairs, sorted)"
            ),
            "max-samples": MAX_SAMPLES,
        },
    ),
    "usps": LoaderInfo(
        _read_usps,
        True,
        "a folder with usps.bz2 / usps.t.bz2 for torchvision.datasets.USPS",
        {
            "split": OptionSpec(
                (str,),
                "all",
                "train, test or all (both, train first)",
                choices=("train", "test", "all"),
            ),
            "max-samples": MAX_SAMPLES,
        },
    ),
    "image-folder": LoaderInfo(
        _read_image_folder,
        True,
        "an ImageFolder tree of images, grey or RGB: integer-named class folders (0/, 1/, ...) "
        "are those labels, class-named ones (cat/, dog/) their sorted rank",
        {"max-samples": MAX_SAMPLES, "lazy": LAZY},
    ),
}


# --- public API --------------------------------------------------------------------------------


def option_problems(loader: str, options: dict[str, Any]) -> list[tuple[str, str]]:
    """(option, problem) pairs for options a loader does not accept; empty when all is well."""
    if loader not in LOADERS:
        return [("loader", f"unknown loader {loader!r}; known: {', '.join(LOADERS)}")]
    specs = LOADERS[loader].options
    problems = []
    for key, value in options.items():
        spec = specs.get(key)
        if spec is None:
            known = ", ".join(specs) or "none"
            problems.append((key, f"unknown option for loader {loader!r} (accepted: {known})"))
        elif (isinstance(value, bool) and bool not in spec.types) or not isinstance(
            value, spec.types
        ):
            want = " or ".join(t.__name__ for t in spec.types)
            problems.append((key, f"must be {want}, got {type(value).__name__} {value!r}"))
        elif spec.choices is not None and value not in spec.choices:
            problems.append(
                (key, f"must be one of {', '.join(map(str, spec.choices))}, got {value!r}")
            )
        elif spec.minimum is not None and value < spec.minimum:
            problems.append((key, f"must be >= {spec.minimum}, got {value!r}"))
    return problems


def with_defaults(loader: str, options: dict[str, Any]) -> dict[str, Any]:
    """The loader's options with its defaults filled in."""
    full = {k: spec.default for k, spec in LOADERS[loader].options.items()}
    full.update(options)
    return full


def subsample_indices(n: int, max_samples: int | None, seed: int, name: str) -> np.ndarray | None:
    """Sorted deterministic random subset of range(n) of size max_samples (None: keep all)."""
    if max_samples is None or max_samples >= n:
        return None
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return np.sort(rng.choice(n, size=max_samples, replace=False))


def load_domain(
    loader: str,
    *,
    name: str,
    path: Path | None,
    image_size: int,
    channels: int,
    options: dict[str, Any],
    seed: int = 0,
) -> ImageSet:
    """Load one domain as an ImageSet (domain_names == (name,)), resized and channel-converted.

    Raises DataError naming the file/folder for bad data, ValueError for a bad loader or option.
    `seed` only matters for the `max-samples` subsample; sample_ids are indices into the full load.
    """
    problems = option_problems(loader, options)
    if problems:
        raise ValueError(f"domain {name!r}: " + "; ".join(f"{k}: {msg}" for k, msg in problems))
    if image_size < 1 or channels not in (1, 3):
        raise ValueError(
            f"image_size must be >= 1 and channels 1 or 3, got {image_size}, {channels}"
        )
    info = LOADERS[loader]
    opts = with_defaults(loader, options)
    where = None if path is None else Path(path)
    if opts.get("lazy"):
        x, y = _lazy_image_folder(name, where, image_size, channels)
    else:
        x, y = info.read(name, where, opts, image_size)
    ids = torch.arange(len(y), dtype=torch.int64)
    keep = subsample_indices(len(y), opts.get("max-samples"), seed, name)
    if keep is not None:
        k = torch.from_numpy(keep)
        x = x.take(k) if opts.get("lazy") else x[k]
        y, ids = y[k], ids[k]
    if len(y) == 0:
        raise DataError(f"domain {name!r}: no samples found at {path}")
    return ImageSet(
        # A lazy domain's rows are brought to the size and channels as they are decoded.
        images=x if opts.get("lazy") else standardize(x, image_size, channels),
        labels=y.to(torch.int64),
        domains=torch.zeros(len(y), dtype=torch.int64),
        domain_names=(name,),
        sample_ids=ids,
    )
