"""Lazy image data: a torch `Dataset` over an ImageFolder tree, decoded on demand.

The eager loaders (`loaders.read_image_tree`) hold a whole domain as float32 tensors: 10^5 RGB
images at 128 px are 19.7 GB. `ImageFolderDataset` holds only the file list; an item is decoded
and brought to the run's size and channels when it is read, so a `DataLoader` (with workers)
streams a pool through a feature extractor with one batch in memory at a time
(`FeatureExtractor.transform_dataset`, `cached_features`).

Labels follow the class-name rules of the eager loaders: class folders named by class name
(ranked in sorted order, as torchvision's ImageFolder) or all by integer, and, given a label
space (`class_names`, e.g. the server's), mapped into it by name (`node_data.label_mapping`:
an unknown name is a `LabelSpaceError` naming both lists).

`fingerprint()` identifies the data from the file list alone (relative paths, sizes, mtimes,
labels and the transform), never by decoding an image: the feature cache's key.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .errors import DataError
from .imageops import standardize, to_float_images
from .loaders import decode_image, folder_class_names, folder_classes
from .node_data import label_mapping


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
        them. Default: the tree's own classes (`loaders.folder_class_names`).

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
