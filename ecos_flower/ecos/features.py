"""Feature maps phi for ECOS: image batches -> float32, L2-normalised (n, d) numpy features.

The server fits an extractor, ships it to clients as plain arrays (`to_arrays()` + `config()`),
and clients rebuild it with `extractor_from_arrays`. This module holds the registry of kinds, the
SmallCNN and PCA kinds, the extractor digest and the on-disk feature cache; the interface is in
`extractor_base`, the pretrained kinds in `pretrained`. Kinds:

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

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ecos_flower.ecos.extractor_base import (
    Allocate,
    FeatureExtractor,
    ImageBatch,
    Shapes,
    TorchExtractor,
    as_image_tensor,
    check_arrays_fit,
    config_int,
    l2_normalise,
    meta_state,
    state_to_arrays,
)
from ecos_flower.ecos.pretrained import (
    EfficientNetLite0Extractor,
    TorchvisionExtractor,
)
from ecos_flower.models import backbones
from ecos_flower.models.nets import SmallCNN
from ecos_flower.models.training import train_epochs

EXTRACTOR_KINDS = ("supervised", "random", "pca", "torchvision", "efficientnet-lite0")


class _SmallCNNExtractor(TorchExtractor):
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
        arrays = state_to_arrays(self._require_module())
        return {k: v for k, v in arrays.items() if k.startswith("features.")}

    def config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "in_channels": self.in_channels,
            "embedding_dim": self.embedding_dim,
        }

    @staticmethod
    def _architecture(config: Mapping[str, Any]) -> tuple[int, int]:
        channels = config_int(config, "in_channels")
        embedding = config_int(config, "embedding_dim")
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
        return meta_state(module.features, "features.")

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
        tensor = as_image_tensor(images)
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
            self.in_channels = int(as_image_tensor(images).shape[1])
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

        flat = as_image_tensor(images).flatten(1).numpy()
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
        tensor = as_image_tensor(images)
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
        n_components = config_int(config, "n_components")
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
    data = images if lazy else as_image_tensor(images)

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
