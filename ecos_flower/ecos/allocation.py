"""Integer split of the selection budget over clusters (proportional, largest remainder, capped)."""

from __future__ import annotations

import numpy as np


def _fill(alloc: np.ndarray, sizes: np.ndarray, weights: np.ndarray, remaining: int) -> int:
    """Water-fill `remaining` units over clusters with weight > 0 and room, in proportion to the
    weights (largest remainder, ties to the lower index); returns what could not be placed."""
    while remaining > 0:
        room = sizes - alloc
        active = np.flatnonzero((weights > 0) & (room > 0))
        if active.size == 0:
            return remaining
        w = weights[active]
        quota = remaining * (w / w.sum())
        full = quota >= room[active]
        if full.any():
            # Clusters whose share exceeds their room take everything; the rest is re-split.
            taken = active[full]
            remaining -= int(room[taken].sum())
            alloc[taken] = sizes[taken]
            continue
        base = np.floor(quota).astype(np.int64)
        extra = int(remaining - base.sum())
        extra = min(max(extra, 0), active.size)
        order = np.argsort(-(quota - base), kind="stable")
        base[order[:extra]] += 1
        alloc[active] += base
        remaining -= int(base.sum())
        if extra == 0 and base.sum() == 0:  # cannot happen with remaining > 0; guard loops
            break
    return remaining


def allocate_budget(scores: np.ndarray, cluster_sizes: np.ndarray, budget: int) -> np.ndarray:
    """Per-cluster sample counts (int64, shape (K,)) summing to min(budget, pool size).

    Shares follow the scores (largest-remainder rounding), each capped at its cluster's size; the
    overflow goes to scored clusters with room, and only when every scored cluster is full, to the
    others in proportion to their remaining capacity (so zero-score clusters get nothing unless
    the budget cannot be met otherwise).
    """
    s = np.asarray(scores, dtype=np.float64)
    sizes = np.asarray(cluster_sizes)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"scores must be a non-empty 1-D array, got shape {s.shape}")
    if sizes.shape != s.shape:
        raise ValueError(f"cluster_sizes has shape {sizes.shape}, scores {s.shape}")
    if not np.isfinite(s).all() or (s < 0).any():
        raise ValueError("scores must be finite and >= 0 (aggregate and clip them first)")
    if not np.issubdtype(sizes.dtype, np.integer) and not np.all(
        np.asarray(sizes, dtype=np.float64) % 1 == 0
    ):
        raise ValueError("cluster_sizes must be integers")
    sizes = sizes.astype(np.int64)
    if (sizes < 0).any():
        raise ValueError("cluster_sizes must be >= 0")
    if int(budget) != budget or budget < 0:
        raise ValueError(f"budget must be a non-negative integer, got {budget!r}")
    total = min(int(budget), int(sizes.sum()))
    alloc = np.zeros(s.shape, dtype=np.int64)
    remaining = _fill(alloc, sizes, s, total)
    if remaining > 0:
        remaining = _fill(alloc, sizes, (sizes - alloc).astype(np.float64), remaining)
    if remaining != 0 or alloc.sum() != total:  # pragma: no cover - internal invariant
        raise RuntimeError("allocation failed to place the whole budget")
    return alloc
