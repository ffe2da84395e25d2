"""Feature space: images mapped once through a frozen pretrained extractor, for task heads.

A task model that is a head (`linear-head`, `mlp-head`) trains and is evaluated on the run
extractor's features, the same vectors ECOS clusters. Every party computes them on its own data:
the cloud on the public pool, each client on its own shard; no feature leaves a client. A feature
vector is stored as a 1x1 "image" with D channels, (N, D, 1, 1) float32, so `ImageSet`, the
training loops and every federated code path take features unchanged.

`features_of` is the one way features are computed here: extractor.transform, memoised per image
in this process (a simulated client answers many messages on the same shard, and the pool and the
shards of several runs share images; one EfficientNet pass over a few hundred images costs tens
of seconds on a CPU) and, with a cache folder, kept on disk as `.npy` (keyed by extractor digest
and data).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ecos_flower.data import ClientShard, ImageSet
from ecos_flower.data.lazy import LazyImages
from ecos_flower.ecos.features import (
    FeatureExtractor,
    ImageBatch,
    cached_features,
    extractor_class,
    extractor_digest,
    feature_cache_path,
)

HEAD_EXTRACTOR_KEY = "head-extractor"
"""Message config key: the JSON config of the extractor a head model's features come from."""
_MEMO_BYTES = 512 * 2**20  # per-process memo of feature rows; a PACS-sized run needs ~30 MB


class _RowMemo:
    """Feature rows by (extractor digest, image bytes): each distinct image is featurised once
    per process, whichever subset (pool, a client's shard, another scenario's split) holds it.
    Bounded: when full it is cleared (a long sweep then recomputes, never grows without end)."""

    def __init__(self, max_bytes: int = _MEMO_BYTES) -> None:
        self.max_bytes = max_bytes
        self.rows: dict[tuple[str, bytes], np.ndarray] = {}
        self.bytes = 0

    def clear(self) -> None:
        self.rows.clear()
        self.bytes = 0

    def add(self, digest: str, keys: list[bytes], features: np.ndarray) -> None:
        new = [(key, row) for key, row in zip(keys, features, strict=True)]
        new = [(key, row) for key, row in new if (digest, key) not in self.rows]
        size = sum(row.nbytes for _, row in new)  # only rows not held yet count
        if self.bytes + size > self.max_bytes:
            self.clear()
            new = list(zip(keys, features, strict=True))
            size = features.nbytes
        for key, row in new:
            row = np.array(row)
            row.setflags(write=False)
            self.rows[(digest, key)] = row
        self.bytes += size


_MEMO = _RowMemo()


def _row_keys(images: torch.Tensor) -> list[bytes]:
    flat = images.detach().to(torch.float32).contiguous().reshape(len(images), -1).numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]


def features_of(
    extractor: FeatureExtractor,
    images: ImageBatch | LazyImages,
    cache_dir: str | os.PathLike[str] | None = None,
    key: str = "features",
    *,
    progress: bool = False,
    num_workers: int = 0,
) -> np.ndarray:
    """`extractor.transform(images)`, float32 (N, D), computing only the images this process
    has not featurised with this extractor before (a per-row memo), and, with `cache_dir`,
    reading/writing the whole batch's `.npy` (`feature_cache_path`: keyed by extractor digest
    and data) so another process reuses it. Read-only result.

    `LazyImages` (a lazy pool) skip the memo, which would hash every decoded image: they are
    streamed through a DataLoader (`num_workers` decoding processes) by `cached_features`,
    into a memmap'd `.npy` under `cache_dir` keyed by the files' fingerprint (no decoding on
    a cache hit); without `cache_dir` they are decoded again on every call."""
    if isinstance(images, LazyImages):
        lazy = cached_features(
            extractor,
            images.as_dataset(),
            cache_dir,
            key,
            num_workers=num_workers,
            progress=progress,
        )
        lazy = np.asarray(lazy, dtype=np.float32)  # a view of the memmap, not a copy
        lazy.setflags(write=False)
        return lazy
    tensor = images if isinstance(images, torch.Tensor) else torch.as_tensor(images)
    path = None if cache_dir is None else feature_cache_path(extractor, tensor, cache_dir, key)
    digest = extractor_digest(extractor)
    keys = _row_keys(tensor)
    if path is not None and path.is_file():
        features = np.load(path)
    else:
        rows = {i: _MEMO.rows.get((digest, k)) for i, k in enumerate(keys)}
        missing = [i for i, row in rows.items() if row is None]
        if missing:
            computed = np.asarray(extractor.transform(tensor[missing], progress=progress))
            rows.update(zip(missing, computed, strict=True))
        features = (
            np.stack([rows[i] for i in range(len(keys))])
            if keys
            else np.asarray(extractor.transform(tensor, progress=False))
        )
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, features)
            os.replace(tmp, path)  # a reader never sees a half-written file
    _MEMO.add(digest, keys, features)
    features = np.asarray(features, dtype=np.float32)
    features.setflags(write=False)
    return features


def as_feature_images(features: np.ndarray) -> torch.Tensor:
    """(N, D) features as the (N, D, 1, 1) float32 tensor an `ImageSet` holds."""
    array = np.asarray(features, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {array.shape}")
    return torch.from_numpy(np.array(array)).reshape(array.shape[0], array.shape[1], 1, 1)


def in_feature_space(
    images: ImageSet,
    extractor: FeatureExtractor,
    cache_dir: str | os.PathLike[str] | None = None,
    key: str = "features",
    *,
    progress: bool = False,
) -> ImageSet:
    """`images` with each image replaced by its feature vector (labels, domains, ids kept)."""
    return ImageSet(
        images=as_feature_images(
            features_of(extractor, images.images, cache_dir, key, progress=progress)
        ),
        labels=images.labels,
        domains=images.domains,
        domain_names=images.domain_names,
        sample_ids=images.sample_ids,
    )


def shard_in_feature_space(
    shard: ClientShard,
    extractor: FeatureExtractor,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ClientShard:
    """A client's train and test splits in feature space."""
    return ClientShard(
        shard.client_id,
        in_feature_space(shard.train, extractor, cache_dir, key="train"),
        in_feature_space(shard.test, extractor, cache_dir, key="test"),
    )


def head_extractor_text(extractor: FeatureExtractor) -> str:
    """What the server sends as `head-extractor`: the extractor's config, by name and digest
    only (no weights: only kinds a node builds from its own files may back a head)."""
    if not extractor.ships_by_name:
        raise ValueError(
            f"a head model needs an extractor every node holds itself (efficientnet-lite0); "
            f"{extractor.kind!r} would have to be shipped as weights"
        )
    return json.dumps(extractor.config(), sort_keys=True)


def local_head_extractor(config: Mapping[str, Any]) -> FeatureExtractor:
    """The head's extractor built from this node's own files, as the message's `head-extractor`
    names it (ValueError if absent, malformed, not a by-name kind, or not the node's file)."""
    text = config.get(HEAD_EXTRACTOR_KEY)
    if not isinstance(text, str):
        raise ValueError(
            f"a head model's message must name its extractor ({HEAD_EXTRACTOR_KEY}); got {text!r}"
        )
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"{HEAD_EXTRACTOR_KEY} is not JSON") from None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("kind"), str):
        raise ValueError(f"{HEAD_EXTRACTOR_KEY} must be a JSON object with a 'kind'")
    cls = extractor_class(parsed["kind"], parsed)
    if not cls.ships_by_name:
        raise ValueError(f"{HEAD_EXTRACTOR_KEY} kind {parsed['kind']!r} is never built by name")
    return cls.from_local(parsed)
