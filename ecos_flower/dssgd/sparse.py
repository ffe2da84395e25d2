"""Sparse parameter updates (index, value pairs): all DSSGD participants and the server exchange."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class InvalidUpdateError(ValueError):
    """An update the server must refuse: bad dtype, shape or range, duplicates, NaN, too many."""


@dataclass(frozen=True)
class SparseUpdate:
    """Entries `indices` (int64, distinct) of a flat parameter vector with `values` (float32)."""

    indices: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes on the wire: indices plus values."""
        return int(self.indices.nbytes + self.values.nbytes)

    def to_dense(self, size: int) -> np.ndarray:
        """A float32 vector of length `size`: zeros except at `indices`."""
        dense = np.zeros(size, dtype=np.float32)
        dense[self.indices] = self.values
        return dense

    @classmethod
    def empty(cls) -> SparseUpdate:
        """An update with no entries."""
        return cls(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))


def validate_sparse_update(
    indices: np.ndarray, values: np.ndarray, num_params: int, max_count: int | None = None
) -> SparseUpdate:
    """Check an untrusted (indices, values) pair and return a fresh `SparseUpdate` (copies).

    The inputs are never mutated. Raises `InvalidUpdateError` naming the reason: non-integer
    indices or non-floating values, arrays that are not 1-D or differ in length, an index outside
    [0, num_params), duplicate indices, a non-finite value, or more than `max_count` entries (None:
    at most `num_params`).
    """
    indices = np.asarray(indices)
    values = np.asarray(values)
    if not np.issubdtype(indices.dtype, np.integer):
        raise InvalidUpdateError(f"indices must be integers, got dtype {indices.dtype}")
    if not np.issubdtype(values.dtype, np.floating):
        raise InvalidUpdateError(f"values must be floating point, got dtype {values.dtype}")
    if indices.ndim != 1 or values.ndim != 1:
        raise InvalidUpdateError(
            f"indices and values must be 1-D, got shapes {indices.shape} and {values.shape}"
        )
    if indices.shape[0] != values.shape[0]:
        raise InvalidUpdateError(
            f"{indices.shape[0]} indices but {values.shape[0]} values: lengths must match"
        )
    limit = num_params if max_count is None else max_count
    if indices.shape[0] > limit:
        raise InvalidUpdateError(f"{indices.shape[0]} entries exceed the maximum of {limit}")
    if indices.size:
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= num_params:
            bad = low if low < 0 else high
            raise InvalidUpdateError(f"index {bad} out of range [0, {num_params})")
        ordered = np.sort(indices)  # np.unique is much slower here (numpy 2.4)
        if np.any(ordered[1:] == ordered[:-1]):
            raise InvalidUpdateError("duplicate indices")
        if not np.all(np.isfinite(values)):
            raise InvalidUpdateError("values must be finite (found NaN or infinity)")
    return SparseUpdate(indices.astype(np.int64, copy=True), values.astype(np.float32, copy=True))
