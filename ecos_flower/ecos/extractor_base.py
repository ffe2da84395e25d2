"""What every feature map phi shares: the `FeatureExtractor` interface (fit, transform in
batches or from a lazy Dataset, ship as arrays, rebuild and size-check from a peer's arrays), the
torch-module base the CNN and pretrained extractors build on, and the helpers they use.

The kinds themselves live in `features` (SmallCNN, PCA, the registry) and `pretrained`
(torchvision backbones, EfficientNet-Lite0).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

ImageBatch = np.ndarray | torch.Tensor
Shapes = Mapping[str, tuple[int, ...]]
"""Array name -> shape: what a peer's arrays declare (their .npy headers), before decoding."""
Allocate = Callable[[int, int], np.ndarray]
"""(rows, dim) -> a writable float32 array (e.g. a memmap) that `transform_dataset` fills."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def as_image_tensor(images: ImageBatch) -> torch.Tensor:
    """Validate an (N, C, H, W) image batch; return it as a float32 CPU tensor."""
    tensor = torch.as_tensor(images)
    if tensor.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(tensor.shape)}")
    if tensor.shape[0] == 0:
        raise ValueError("images is empty")
    if not tensor.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got dtype {tensor.dtype}")
    return tensor.to(dtype=torch.float32)


def empty_features(rows: int, dim: int) -> np.ndarray:
    return np.empty((rows, dim), dtype=np.float32)


def imagenet_input(batch: torch.Tensor, image_size: int | None) -> torch.Tensor:
    """What an ImageNet backbone expects: 3 channels (grey replicated), `image_size` squares
    (bilinear, antialiased when shrinking; None: as given), ImageNet mean/std normalised."""
    if batch.shape[1] == 1:
        batch = batch.repeat(1, 3, 1, 1)
    if image_size is not None and tuple(batch.shape[-2:]) != (image_size, image_size):
        shrink = max(batch.shape[-2:]) > image_size
        batch = nn.functional.interpolate(
            batch,
            size=(image_size, image_size),
            mode="bilinear",
            align_corners=False,
            antialias=shrink,
        )
    mean = torch.tensor(IMAGENET_MEAN, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=batch.device).view(1, 3, 1, 1)
    return (batch - mean) / std


def l2_normalise(features: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation in float32 (all-zero rows stay zero)."""
    features = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


def state_to_arrays(module: nn.Module) -> dict[str, np.ndarray]:
    return {name: t.detach().cpu().numpy().copy() for name, t in module.state_dict().items()}


def load_arrays(module: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    state = {name: torch.from_numpy(np.asarray(value)) for name, value in arrays.items()}
    module.load_state_dict(state)


def meta_state(module: nn.Module, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Names and shapes of `module`'s state dict (a module built on the meta device)."""
    return {prefix + name: tuple(t.shape) for name, t in module.state_dict().items()}


def config_int(config: Mapping[str, Any], key: str, *, optional: bool = False) -> int | None:
    """A positive integer setting of an extractor config (a peer's JSON: checked, not trusted)."""
    value = config.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"extractor config {key}={value!r} must be a positive integer")
    return value


def check_arrays_fit(declared: Shapes, shapes: Shapes) -> None:
    """Refuse (ValueError naming the first difference) arrays whose names and shapes are not
    exactly the architecture's `declared` state dict."""
    missing = sorted(set(declared) - set(shapes))
    extra = sorted(set(shapes) - set(declared))
    if missing or extra:
        raise ValueError(
            f"extractor arrays do not fit the architecture: missing {missing[:5]}, "
            f"unexpected {extra[:5]}"
        )
    for name, shape in declared.items():
        if tuple(shapes[name]) != tuple(shape):
            raise ValueError(
                f"extractor array {name!r} has shape {tuple(shapes[name])}, the architecture "
                f"needs {tuple(shape)}"
            )


class FeatureExtractor:
    """Base class: fit once on the pool (server), transform anywhere, ship as arrays + config."""

    kind: str = ""
    ships_by_name: ClassVar[bool] = False
    """Whether a node may build this extractor from a file of its own (`from_local`) when a
    query names it without weights."""

    def fit(self, images: ImageBatch, labels: ImageBatch | None = None) -> FeatureExtractor:
        """Fit on the public pool; returns self."""
        raise NotImplementedError

    @classmethod
    def from_local(cls, config: Mapping[str, Any]) -> FeatureExtractor:
        """The extractor `config` names, built from this node's own files (kinds that
        `ships_by_name`). ValueError if the node lacks them or they differ from `config`."""
        raise ValueError(f"the {cls.kind!r} extractor is never sent by name: it needs weights")

    def transform_dataset(
        self,
        dataset: torch.utils.data.Dataset,
        *,
        batch_size: int = 256,
        num_workers: int = 0,
        allocate: Allocate | None = None,
        progress: bool = False,
    ) -> np.ndarray:
        """Features of a map-style `dataset` of (image, label) items (or images), read in
        batches through a DataLoader (`num_workers` decoding processes) so at most one batch
        of images is held at a time; the features go into one float32 (n, d) array from
        `allocate(n, d)` (a memmap for large pools; default: np.empty)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        n = len(dataset)
        if n == 0:
            raise ValueError("dataset is empty")
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers
        )
        out: np.ndarray | None = None
        position = 0
        for batch in tqdm(loader, desc=f"features ({self.kind})", disable=not progress):
            images = batch[0] if isinstance(batch, list | tuple) else batch
            features = self.transform(images, batch_size=batch_size)
            if out is None:
                out = (allocate or empty_features)(n, int(features.shape[1]))
            out[position : position + len(features)] = features
            position += len(features)
        assert out is not None and position == n, (position, n)
        return out

    def transform(
        self, images: ImageBatch, *, batch_size: int = 256, progress: bool = False
    ) -> np.ndarray:
        """Features of `images` as a float32, L2-normalised (n, d) array."""
        raise NotImplementedError

    def fit_transform(
        self,
        images: ImageBatch,
        labels: ImageBatch | None = None,
        *,
        batch_size: int = 256,
        progress: bool = False,
    ) -> np.ndarray:
        """`fit` then `transform` the same images."""
        return self.fit(images, labels).transform(images, batch_size=batch_size, progress=progress)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The fitted parameters as named numpy arrays (what the server sends)."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """JSON-serialisable settings needed to rebuild the extractor from its arrays."""
        raise NotImplementedError

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], config: dict[str, Any]) -> FeatureExtractor:
        """Rebuild a fitted extractor from `to_arrays()` and `config()`."""
        raise NotImplementedError

    def output_dim(self) -> int | None:
        """The feature dimension this extractor gives, known from its weights and config alone
        (None where it is not): lets a client check a query before it reads any data."""
        return None

    @classmethod
    def declared_size(cls, config: Mapping[str, Any], shapes: Shapes) -> tuple[int, int | None]:
        """(parameters, output dimension or None) of the extractor `config` and the shipped
        arrays' declared `shapes` describe, computed without building or allocating anything,
        so a client can hold them against its limits first. ValueError if `config` describes no
        extractor of this kind."""
        raise NotImplementedError

    @classmethod
    def declared_arrays(cls, config: Mapping[str, Any], shapes: Shapes) -> dict[str, tuple]:
        """The names and shapes of the arrays `from_arrays(arrays, config)` loads (the
        architecture's state dict, from a module on the meta device: no memory). Call it only
        once `declared_size` passed the limits."""
        raise NotImplementedError

    def num_bytes(self) -> int:
        """Bytes of the shipped arrays (the one-time cost of sending phi to a client)."""
        return int(sum(a.nbytes for a in self.to_arrays().values()))


class TorchExtractor(FeatureExtractor):
    """Shared batching/normalisation for extractors backed by a torch module."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self._module: nn.Module | None = None

    def _embed(self, batch: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _require_module(self) -> nn.Module:
        if self._module is None:
            raise ValueError(f"the {self.kind!r} extractor is not fitted; call fit() first")
        return self._module

    @torch.no_grad()
    def transform(
        self, images: ImageBatch, *, batch_size: int = 256, progress: bool = False
    ) -> np.ndarray:
        module = self._require_module()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        tensor = as_image_tensor(images)
        self._check_input(tensor)
        module.to(self.device).eval()
        outputs = []
        starts = range(0, len(tensor), batch_size)
        for start in tqdm(starts, desc=f"features ({self.kind})", disable=not progress):
            batch = tensor[start : start + batch_size].to(self.device)
            outputs.append(self._embed(batch).flatten(1).float().cpu().numpy())
        return l2_normalise(np.concatenate(outputs, axis=0))

    def _check_input(self, tensor: torch.Tensor) -> None:
        """Hook for input-shape validation."""
