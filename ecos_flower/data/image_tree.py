"""Image folders at the bottom of the data layer: their class folders, one image file's pixels,
and a folder's class names mapped into a label space given by name.

Below `loaders`, `node_data` and `lazy` (each imports from here, this imports none of them), so
the eager loaders, a node's own data and the lazy datasets share one reading of a folder.
Pure: numpy and Pillow, no torch or Flower.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import DataError

_GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def _integer_name(name: str) -> int | None:
    """The non-negative integer a folder name spells (`"7"`), else None."""
    try:
        value = int(name)
    except ValueError:
        return None
    return value if value >= 0 and name.strip() == name else None


def folder_classes(root: Path) -> dict[str, int]:
    """Class folder name -> label of an ImageFolder tree. Integer-named folders (0/, 1/, 10/) are
    their integers; class-named folders (cat/, dog/) are their rank in sorted name order (as
    torchvision's ImageFolder). A mix of both is refused (is `3/` label 3 or a name?)."""
    names = sorted(p.name for p in Path(root).iterdir() if p.is_dir())
    ints = {name: _integer_name(name) for name in names}
    if all(v is not None for v in ints.values()):
        labels: dict[str, int] = {n: int(v) for n, v in ints.items() if v is not None}
        seen: dict[int, str] = {}
        for name, label in labels.items():
            if label in seen:
                raise DataError(
                    f"{root}: class folders {seen[label]!r} and {name!r} both mean label {label}"
                )
            seen[label] = name
        return labels
    if any(v is not None for v in ints.values()):
        bad = next(n for n, v in ints.items() if v is None)
        raise DataError(
            f"{Path(root) / bad}: class folder names must be either all non-negative integer "
            "labels (0, 1, ..., 9) or all class names (cat, dog, ...), not a mix"
        )
    return {name: rank for rank, name in enumerate(names)}


def folder_class_names(root: Path) -> dict[int, str]:
    """Label -> class name of an ImageFolder tree (integer folders: the integer's text)."""
    return {
        label: str(label) if _integer_name(name) is not None else name
        for name, label in folder_classes(root).items()
    }


def decode_image(file: str | Path) -> np.ndarray:
    """One image file as a uint8 array: (H, W) for grey modes, (H, W, 3) otherwise (RGBA,
    palette, CMYK... become RGB). DataError naming the file if Pillow cannot read it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as img:
            img = img.convert("L") if img.mode in _GREY_MODES else img.convert("RGB")
            return np.array(img)  # writable: torch.as_tensor warns on read-only arrays
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{file}: cannot read image: {exc}") from None


class LabelSpaceError(ValueError):
    """The node's class names are not a subset of the server's (the message names both)."""


def label_mapping(
    node_names: Sequence[str] | None, server_names: Sequence[str], where: str = "node data"
) -> dict[str, int] | None:
    """Node class name -> the server's label for it; None when the node has no names (its
    labels already are the server's). LabelSpaceError naming both lists if the node holds a
    class the server does not know."""
    if node_names is None:
        return None
    server = {name: i for i, name in enumerate(server_names)}
    unknown = [n for n in node_names if n not in server]
    if unknown:
        raise LabelSpaceError(
            f"{where}: class(es) {unknown} not in the server's label space: this node has "
            f"{list(node_names)}, the server has {list(server_names)}"
        )
    return {n: server[n] for n in node_names}
