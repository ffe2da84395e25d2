"""ImageSet: the one in-memory format every loader returns and every algorithm consumes.

Its `images` are a float32 tensor, or, for a lazy domain (`image-folder` with `lazy = true`), a
`ecos_flower.data.lazy.LazyImages` of the same shape and dtype whose rows are decoded when
indexed: `subset` and `concat` keep it lazy, so a pool of any size is never held as pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # lazy.py imports the loaders, which import this module
    from .lazy import LazyImages

MIXED_DECODE_LIMIT = 64 * 2**20
"""Bytes of float32 pixels up to which `ImageSet.concat` decodes the lazy parts of a mix of lazy
and eager parts (a small lazy domain next to eager ones: 64 MiB is ~1,000 RGB images at 128 px);
above it the mix stays lazy, the eager parts joining as in-memory sources."""


def _lazy_type() -> type:
    from .lazy import LazyImages

    return LazyImages


def _as_index(indices) -> torch.Tensor:
    """Turn a sequence / numpy array / tensor of ints into an int64 index tensor."""
    if isinstance(indices, torch.Tensor):
        idx = indices
    else:
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64).reshape(-1))
    if idx.dtype == torch.bool:
        raise TypeError("ImageSet.subset takes integer indices, not a boolean mask")
    return idx.to(torch.int64).reshape(-1)


def _concat_images(parts: list) -> torch.Tensor | LazyImages:
    """`torch.cat` of image tensors, or one `LazyImages` view when any part is lazy (see
    `ImageSet.concat`)."""
    lazy_type = _lazy_type()
    lazy = [isinstance(p, lazy_type) for p in parts]
    if not any(lazy):
        return torch.cat(parts)
    if all(lazy):
        return lazy_type.concat(parts)
    lazy_bytes = sum(
        4 * int(np.prod(p.shape)) for p, is_lazy in zip(parts, lazy, strict=True) if is_lazy
    )
    if lazy_bytes <= MIXED_DECODE_LIMIT:
        # A small lazy domain among eager ones: decoding it costs less than it saves.
        return torch.cat(
            [p.decode() if is_lazy else p for p, is_lazy in zip(parts, lazy, strict=True)]
        )
    from .lazy import TensorSource

    # The eager parts are in memory already: wrapped as sources they join the view uncopied.
    return lazy_type.concat(
        [
            p if is_lazy else lazy_type([TensorSource(p)])
            for p, is_lazy in zip(parts, lazy, strict=True)
        ]
    )


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Labelled images of one or more domains.

    images: float32 (N, C, S, S) in [0, 1], a tensor or a `LazyImages` (decoded when indexed);
    labels: int64 (N,); domains: int64 (N,) indexing domain_names; sample_ids: int64 (N,), each
    sample's index in its domain as loaded (defaults to 0..N-1), so (domain, sample_id)
    identifies a source sample across subsets and concatenations.
    """

    images: torch.Tensor | LazyImages
    labels: torch.Tensor
    domains: torch.Tensor
    domain_names: tuple[str, ...]
    sample_ids: torch.Tensor | None = field(default=None)

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor | _lazy_type()):
            raise ValueError(
                f"ImageSet.images must be a tensor or LazyImages, got {type(self.images).__name__}"
            )
        n = self.images.shape[0]
        if self.images.dim() != 4 or self.images.dtype != torch.float32:
            raise ValueError(
                f"ImageSet.images must be float32 (N, C, S, S), got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        for name in ("labels", "domains"):
            t = getattr(self, name)
            if t.dtype != torch.int64 or tuple(t.shape) != (n,):
                raise ValueError(
                    f"ImageSet.{name} must be int64 ({n},), got {t.dtype} {tuple(t.shape)}"
                )
        object.__setattr__(self, "domain_names", tuple(self.domain_names))
        if self.sample_ids is None:
            object.__setattr__(self, "sample_ids", torch.arange(n, dtype=torch.int64))
        elif self.sample_ids.dtype != torch.int64 or tuple(self.sample_ids.shape) != (n,):
            raise ValueError(f"ImageSet.sample_ids must be int64 ({n},)")
        if n and (int(self.domains.min()) < 0 or int(self.domains.max()) >= len(self.domain_names)):
            raise ValueError(
                f"ImageSet.domains must index domain_names {self.domain_names}, "
                f"got ids {int(self.domains.min())}..{int(self.domains.max())}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def is_lazy(self) -> bool:
        """Whether `images` is a `LazyImages` (decoded when indexed)."""
        return not isinstance(self.images, torch.Tensor)

    def decoded(self) -> ImageSet:
        """This set with its images as a tensor (self if they already are): decodes every
        lazy row, so only for a small set (a client's shard, a selection)."""
        if not self.is_lazy:
            return self
        return ImageSet(
            images=self.images.decode(),
            labels=self.labels,
            domains=self.domains,
            domain_names=self.domain_names,
            sample_ids=self.sample_ids,
        )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, S, S) of every image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices) -> ImageSet:
        """The samples at `indices` (in that order), keeping domain names and sample ids."""
        idx = _as_index(indices)
        return ImageSet(
            images=self.images.take(idx) if self.is_lazy else self.images[idx],
            labels=self.labels[idx],
            domains=self.domains[idx],
            domain_names=self.domain_names,
            sample_ids=self.sample_ids[idx],
        )

    @staticmethod
    def concat(sets: Sequence[ImageSet]) -> ImageSet:
        """Stack sets in order; domain_names merged (first appearance first), ids remapped.

        Lazy parts stay lazy: when every part is lazy the result is one `LazyImages` view; a
        mix of lazy and eager parts is lazy too when the lazy parts are larger than
        `MIXED_DECODE_LIMIT` bytes of pixels (the eager parts join as in-memory sources, not
        copied), and eager (the lazy parts decoded) when they are smaller.
        """
        sets = list(sets)
        if not sets:
            raise ValueError("ImageSet.concat needs at least one set")
        shapes = {s.image_shape for s in sets}
        if len(shapes) > 1:
            raise ValueError(f"ImageSet.concat: image shapes differ: {sorted(shapes)}")
        names: list[str] = []
        for s in sets:
            names.extend(n for n in s.domain_names if n not in names)
        remapped = []
        for s in sets:
            table = torch.tensor([names.index(n) for n in s.domain_names], dtype=torch.int64)
            remapped.append(table[s.domains] if len(s) else s.domains)
        return ImageSet(
            images=_concat_images([s.images for s in sets]),
            labels=torch.cat([s.labels for s in sets]),
            domains=torch.cat(remapped),
            domain_names=tuple(names),
            sample_ids=torch.cat([s.sample_ids for s in sets]),
        )

    def domain_mask(self, name: str) -> torch.Tensor:
        """Bool (N,): which samples come from domain `name` (all False if it is not present)."""
        if name not in self.domain_names:
            return torch.zeros(len(self), dtype=torch.bool)
        return self.domains == self.domain_names.index(name)

    def label_set(self) -> frozenset[int]:
        """The distinct labels present."""
        return frozenset(int(v) for v in torch.unique(self.labels).tolist())
