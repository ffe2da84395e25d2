"""Non-private DSSGD upload selection and clipping.

The selections pick the theta_u fraction of a local update; `clip` bounds values to [-gamma, gamma].
"""

from __future__ import annotations

import numpy as np

from ecos_flower.dssgd.server import fraction_count
from ecos_flower.dssgd.sparse import SparseUpdate

__all__ = ["clip", "fraction_count", "select_largest", "select_threshold", "upload_count"]


def upload_count(theta_u: float, size: int) -> int:
    """Entries to upload: ceil(theta_u * size), at least 1 if theta_u > 0, at most size."""
    return fraction_count(theta_u, size)


def clip(values: np.ndarray, gamma: float | None) -> np.ndarray:
    """Clip to [-gamma, gamma] (a new array); gamma None means no clipping."""
    if gamma is None:
        return np.array(values, copy=True)
    if gamma <= 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    return np.clip(values, -gamma, gamma)


def select_largest(delta: np.ndarray, theta_u: float) -> SparseUpdate:
    """The upload_count(theta_u) entries of largest |delta| (ties: lower index), sorted by index."""
    delta = np.asarray(delta, dtype=np.float32)
    count = upload_count(theta_u, delta.shape[0])
    if count == 0:
        return SparseUpdate.empty()
    if count >= delta.shape[0]:
        idx = np.arange(delta.shape[0], dtype=np.int64)
    else:
        # Stable ordering for ties: sort by (-|delta|, index) among a partitioned candidate set.
        mag = np.abs(delta)
        kth = np.partition(mag, delta.shape[0] - count)[delta.shape[0] - count]
        above = np.flatnonzero(mag > kth)
        at = np.flatnonzero(mag == kth)[: count - above.shape[0]]
        idx = np.sort(np.concatenate([above, at])).astype(np.int64)
    return SparseUpdate(idx, delta[idx].copy())


def select_threshold(
    delta: np.ndarray, theta_u: float, tau: float, rng: np.random.Generator
) -> SparseUpdate:
    """Up to upload_count(theta_u) entries, uniformly at random among those with |delta| > tau."""
    delta = np.asarray(delta, dtype=np.float32)
    count = upload_count(theta_u, delta.shape[0])
    candidates = np.flatnonzero(np.abs(delta) > tau)
    if count == 0 or candidates.shape[0] == 0:
        return SparseUpdate.empty()
    if candidates.shape[0] > count:
        candidates = rng.choice(candidates, size=count, replace=False)
    idx = np.sort(candidates).astype(np.int64)
    return SparseUpdate(idx, delta[idx].copy())
