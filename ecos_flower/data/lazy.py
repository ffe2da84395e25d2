"""Lazy image data: a torch `Dataset` over an ImageFolder tree, decoded on demand.

The eager loaders (`loaders.read_image_tree`) hold a whole domain as float32 tensors: 10^5 RGB
images at 128 px are 19.7 GB. `ImageFolderDataset` holds only the file list; an item is decoded
and brought to the run's size and channels when it is read, so a `DataLoader` (with workers)
streams a pool through a feature extractor with one batch in memory at a time
(`FeatureExtractor.transform_dataset`, `cached_features`).

Labels follow the class-name rules of the eager loaders: class folders named by class name
(ranked in sorted order, as torchvision's ImageFolder) or all by integer, and, given a label
space (`class_names`, e.g. the server's), mapped into it by name (`image_tree.label_mapping`:
an unknown name is a `LabelSpaceError` naming both lists).

`fingerprint()` identifies the data from the file list alone (relative paths, sizes, mtimes,
labels and the transform), never by decoding an image: the feature cache's key.

`LazyImages` is what `ImageSet.images` holds for a lazy domain (loader option `lazy = true` of
`image-folder`): an (N, C, S, S) float32 "tensor" whose rows are decoded only when indexed.
Subsets (`take`) and concatenations (`concat`) are views (index arrays into the underlying
datasets), so a federation's pool of any size costs 16 bytes a sample until a row is read;
`as_dataset()` streams it through a DataLoader (`cached_features`), and the rows a run decodes
are the ones it trains on (the selection, the clients' shards).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from .errors import DataError
from .image_tree import decode_image, folder_class_names, folder_classes, label_mapping
from .imageops import standardize, to_float_images


class ImageFolderDataset(torch.utils.data.Dataset):
    """An ImageFolder tree read lazily: item i is (float32 (channels, size, size) in [0, 1],
    int64 label), decoded from its file when asked for.

    Parameters
    ----------
    root : path
        The tree: one sub-folder per class (`dog/`, `elephant/`, ... or `0/` ... `9/`).
    image_size : int
        Side of the square every image is resized to (bilinear, antialiased when shrinking).
    channels : int
        1 (grey) or 3 (RGB) channels per image.
    class_names : sequence of str, optional
        The label space (label i is `class_names[i]`); the tree's class names must be among
        them. Default: the tree's own classes (`image_tree.folder_class_names`).

    Raises
    ------
    DataError
        If `root` is not a folder, has no class folders or no image at all.
    LabelSpaceError
        If a class folder's name is not in `class_names` (naming both lists).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        image_size: int,
        channels: int = 3,
        class_names: Sequence[str] | None = None,
    ) -> None:
        from torchvision.datasets import ImageFolder

        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root} is not a folder")
        if not any(p.is_dir() for p in self.root.iterdir()):
            raise DataError(f"{self.root}: no class sub-folders")
        self.image_size = int(image_size)
        self.channels = int(channels)
        tree = ImageFolder(str(self.root), allow_empty=True)
        if not tree.samples:
            raise DataError(f"{self.root}: no image files in any class folder")
        # The eager loader's rules: folder -> label, label -> class name.
        folder_label = folder_classes(self.root)
        name_of = folder_class_names(self.root)
        if class_names is None:
            label_of = folder_label
            self.class_names = tuple(
                name_of.get(i, str(i)) for i in range(max(folder_label.values()) + 1)
            )
        else:
            self.class_names = tuple(class_names)
            names = [name_of[folder_label[folder]] for folder in tree.classes]
            mapping = label_mapping(names, self.class_names, f"image folder {self.root}")
            assert mapping is not None
            label_of = {f: mapping[name_of[folder_label[f]]] for f in tree.classes}
        self.files = [path for path, _ in tree.samples]
        self.labels = torch.tensor(
            [label_of[tree.classes[index]] for _, index in tree.samples], dtype=torch.int64
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        array = decode_image(self.files[index])
        image = to_float_images(array[None], 255.0)
        return standardize(image, self.image_size, self.channels)[0], self.labels[index]

    def fingerprint(self) -> str:
        """Hex SHA-256 of what an item depends on: every file's path (relative to the root),
        size and mtime, its label, and the transform (size, channels). A stat per file; no
        image is read."""
        digest = hashlib.sha256(f"{self.image_size}:{self.channels}".encode())
        for path, label in zip(self.files, self.labels.tolist(), strict=True):
            stat = os.stat(path)
            relative = os.path.relpath(path, self.root)
            digest.update(f"\0{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\0{label}".encode())
        return digest.hexdigest()


class ImageSource(Protocol):
    """What `LazyImages` reads rows from: item i is (float32 (C, S, S) image, label), and a
    `fingerprint()` that identifies every item without decoding it."""

    image_size: int
    channels: int

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]: ...

    def fingerprint(self) -> str: ...


class TensorSource(torch.utils.data.Dataset):
    """Images already in memory as an `ImageSource`, so an eager domain (embedded digits, an
    `.npz`) joins a lazy pool without being copied (`ImageSet.concat` of mixed parts).

    Parameters
    ----------
    images : torch.Tensor
        float32 (N, C, S, S) in [0, 1]; held, not copied.
    """

    def __init__(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[-1] != images.shape[-2]:
            raise ValueError(f"TensorSource needs (N, C, S, S) images, got {tuple(images.shape)}")
        self.images = images
        self.image_size = int(images.shape[-1])
        self.channels = int(images.shape[1])
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], 0

    def fingerprint(self) -> str:
        """Hex SHA-256 of the shape and bytes (computed once: the tensor is never written)."""
        if self._fingerprint is None:
            digest = hashlib.sha256(str(tuple(self.images.shape)).encode())
            digest.update(self.images.detach().contiguous().numpy().tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint


def _is_integer_scalar(key: Any) -> bool:
    """Whether `key` is one integer index (a Python / numpy int or a 0-d integer array)."""
    if isinstance(key, bool | np.bool_):
        return False
    if isinstance(key, int | np.integer):
        return True
    if isinstance(key, torch.Tensor):
        return key.ndim == 0 and not key.is_floating_point() and key.dtype != torch.bool
    return isinstance(key, np.ndarray) and key.ndim == 0 and np.issubdtype(key.dtype, np.integer)


def _positions(key: Any, n: int) -> np.ndarray:
    """Row positions (int64, in order) that `key` (int, slice, bool mask or integer indices:
    list, numpy array, tensor) selects from n rows; negative indices count from the end."""
    if isinstance(key, slice):
        return np.arange(n, dtype=np.int64)[key]
    if isinstance(key, torch.Tensor):
        key = key.detach().cpu().numpy()
    array = np.asarray(key)
    if array.dtype == np.bool_:
        if array.shape != (n,):
            raise IndexError(f"boolean mask of shape {array.shape} for {n} rows")
        return np.flatnonzero(array).astype(np.int64)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise IndexError(f"LazyImages takes integer indices, got dtype {array.dtype}")
    positions = array.astype(np.int64).reshape(-1)
    if positions.size and (positions.min() < -n or positions.max() >= n):
        bad = positions[(positions < -n) | (positions >= n)][0]
        raise IndexError(f"index {int(bad)} is out of range for {n} rows")
    return np.where(positions < 0, positions + n, positions)


class LazyImages(torch.utils.data.Dataset):
    """float32 (N, C, S, S) images in [0, 1] decoded on demand: what `ImageSet.images` holds
    for a lazy domain.

    It answers what the code reads of an image tensor without decoding (`shape`, `dtype`,
    `dim()`, `len`), and indexing (`images[idx]`, an int, slice, integer list / array / tensor
    or boolean mask) decodes just those rows into a tensor. `take` and `concat` are views that
    decode nothing. As a map-style Dataset its item i is image i, so `cached_features` and a
    DataLoader read it directly; `as_dataset()` gives (image, 0) items.

    Parameters
    ----------
    sources : sequence of ImageSource
        The datasets rows are read from (`ImageFolderDataset`, `TensorSource`), all of one
        image size and channel count.
    source_of, index : array-like of int, optional
        Row r is item `index[r]` of `sources[source_of[r]]`. Default: every item of every
        source, in order.

    Raises
    ------
    ValueError
        If the sources disagree on the image shape or an index is out of range.
    """

    dtype = torch.float32

    def __init__(
        self,
        sources: Sequence[ImageSource],
        source_of: Any = None,
        index: Any = None,
    ) -> None:
        self.sources = tuple(sources)
        if not self.sources:
            raise ValueError("LazyImages needs at least one source")
        shapes = {(int(s.channels), int(s.image_size)) for s in self.sources}
        if len(shapes) > 1:
            raise ValueError(f"LazyImages: sources differ in (channels, size): {sorted(shapes)}")
        (self._channels, self._size) = shapes.pop()
        if source_of is None and index is None:
            lengths = [len(s) for s in self.sources]
            source_of = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
            index = np.concatenate([np.arange(k, dtype=np.int64) for k in lengths])
        elif source_of is None or index is None:
            raise ValueError("LazyImages: give both source_of and index, or neither")
        self.source_of = np.asarray(source_of, dtype=np.int64).reshape(-1)
        self.index = np.asarray(index, dtype=np.int64).reshape(-1)
        if self.source_of.shape != self.index.shape:
            raise ValueError("LazyImages: source_of and index differ in length")
        for s, source in enumerate(self.sources):
            rows = self.index[self.source_of == s]
            if rows.size and (rows.min() < 0 or rows.max() >= len(source)):
                raise ValueError(f"LazyImages: an index is out of range for source {s}")
        if self.source_of.size and (
            self.source_of.min() < 0 or self.source_of.max() >= len(self.sources)
        ):
            raise ValueError("LazyImages: source_of names a source that does not exist")
        # Views never write: shared safely between subsets, concatenations and processes.
        self.source_of.setflags(write=False)
        self.index.setflags(write=False)

    @property
    def shape(self) -> torch.Size:
        """(N, C, S, S), as an image tensor's."""
        return torch.Size((len(self.index), self._channels, self._size, self._size))

    def dim(self) -> int:
        """4, as an (N, C, S, S) tensor's."""
        return 4

    def __len__(self) -> int:
        return int(len(self.index))

    def __repr__(self) -> str:
        return f"LazyImages(shape={tuple(self.shape)}, sources={len(self.sources)})"

    def take(self, indices: Any) -> LazyImages:
        """The rows at `indices` (anything `__getitem__` takes), as a view: nothing decoded."""
        rows = _positions(indices, len(self))
        return LazyImages(self.sources, self.source_of[rows], self.index[rows])

    @staticmethod
    def concat(parts: Sequence[LazyImages]) -> LazyImages:
        """The rows of `parts` in order, as one view (shared sources merged): nothing decoded."""
        parts = list(parts)
        if not parts:
            raise ValueError("LazyImages.concat needs at least one part")
        sources: list[ImageSource] = []
        position: dict[int, int] = {}  # by identity: two parts of one domain share its dataset
        source_of, index = [], []
        for part in parts:
            table = []
            for source in part.sources:
                if id(source) not in position:
                    position[id(source)] = len(sources)
                    sources.append(source)
                table.append(position[id(source)])
            source_of.append(np.asarray(table, dtype=np.int64)[part.source_of])
            index.append(part.index)
        return LazyImages(sources, np.concatenate(source_of), np.concatenate(index))

    def __getitem__(self, key: Any) -> torch.Tensor:
        """Decode the rows `key` selects: an int gives (C, S, S), anything else (N, C, S, S)."""
        if _is_integer_scalar(key):
            row = int(key)
            if not -len(self) <= row < len(self):
                raise IndexError(f"index {row} is out of range for {len(self)} rows")
            row %= len(self)
            return self._read(int(self.source_of[row]), int(self.index[row]))
        rows = _positions(key, len(self))
        if not rows.size:
            return torch.empty((0, self._channels, self._size, self._size), dtype=torch.float32)
        return torch.stack(
            [self._read(int(self.source_of[r]), int(self.index[r])) for r in rows.tolist()]
        )

    def _read(self, source: int, item: int) -> torch.Tensor:
        image = self.sources[source][item][0]
        return torch.as_tensor(image, dtype=torch.float32)

    def decode(self) -> torch.Tensor:
        """Every row as one float32 (N, C, S, S) tensor: memory grows with N, so only for a
        small view (a selection, a client's shard)."""
        return self[np.arange(len(self))]

    def as_dataset(self) -> LazyImageDataset:
        """A map-style Dataset of (image, 0) items over these rows, for a DataLoader."""
        return LazyImageDataset(self)

    def fingerprint(self) -> str:
        """Hex SHA-256 of the underlying sources' fingerprints and this view's rows (no image
        is decoded): the feature cache's key."""
        digest = hashlib.sha256(f"lazy:{self._channels}:{self._size}".encode())
        for source in self.sources:
            digest.update(f"\0{source.fingerprint()}".encode())
        digest.update(np.ascontiguousarray(self.source_of).tobytes())
        digest.update(np.ascontiguousarray(self.index).tobytes())
        return digest.hexdigest()

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        # A silent whole-pool decode (np.asarray, torch.as_tensor) is what lazy data is for
        # avoiding: make it an error that names the explicit ways.
        raise TypeError(
            f"{self!r} is decoded on demand: index it (images[idx]), stream it "
            "(as_dataset() / cached_features) or call decode() for a small view"
        )


class LazyImageDataset(torch.utils.data.Dataset):
    """(image, 0) items over a `LazyImages` (the label is not the Dataset's concern: labels
    stay in the `ImageSet`), with its `fingerprint()` for `cached_features`.

    Parameters
    ----------
    images : LazyImages
        The rows, in order.
    """

    def __init__(self, images: LazyImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[int(index)], 0

    def fingerprint(self) -> str:
        """The rows' fingerprint (`LazyImages.fingerprint`)."""
        return self.images.fingerprint()
