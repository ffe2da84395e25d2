"""ImageSet: the one in-memory format every loader returns and every algorithm consumes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


def _as_index(indices) -> torch.Tensor:
    """Turn a sequence / numpy array / tensor of ints into an int64 index tensor."""
    if isinstance(indices, torch.Tensor):
        idx = indices
    else:
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64).reshape(-1))
    if idx.dtype == torch.bool:
        raise TypeError("ImageSet.subset takes integer indices, not a boolean mask")
    return idx.to(torch.int64).reshape(-1)


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Labelled images of one or more domains.

    images: float32 (N, C, S, S) in [0, 1]; labels: int64 (N,); domains: int64 (N,) indexing
    domain_names; sample_ids: int64 (N,), each sample's index in its domain as loaded (defaults to
    0..N-1), so (domain, sample_id) identifies a source sample across subsets and concatenations.
    """

    images: torch.Tensor
    labels: torch.Tensor
    domains: torch.Tensor
    domain_names: tuple[str, ...]
    sample_ids: torch.Tensor | None = field(default=None)

    def __post_init__(self) -> None:
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
    def image_shape(self) -> tuple[int, int, int]:
        """(C, S, S) of every image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices) -> ImageSet:
        """The samples at `indices` (in that order), keeping domain names and sample ids."""
        idx = _as_index(indices)
        return ImageSet(
            images=self.images[idx],
            labels=self.labels[idx],
            domains=self.domains[idx],
            domain_names=self.domain_names,
            sample_ids=self.sample_ids[idx],
        )

    @staticmethod
    def concat(sets: Sequence[ImageSet]) -> ImageSet:
        """Stack sets in order; domain_names merged (first appearance first), ids remapped."""
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
            images=torch.cat([s.images for s in sets]),
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
