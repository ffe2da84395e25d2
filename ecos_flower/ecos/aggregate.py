"""Server-side aggregation of the clients' noisy score vectors, with noise-aware thresholding."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

DEFAULT_THRESHOLD_MULTIPLE = 2.0


def aggregate_noise_std(sigma: float | Sequence[float], num_clients: int) -> float:
    """Std of the summed noise: sqrt(sum sigma_i^2) (a scalar sigma is used for every client)."""
    if isinstance(sigma, int | float | np.floating | np.integer):
        sigmas = [float(sigma)] * num_clients
    else:
        sigmas = [float(s) for s in sigma]
        if len(sigmas) != num_clients:
            raise ValueError(f"{len(sigmas)} sigmas for {num_clients} score vectors")
    if any(not math.isfinite(s) or s < 0 for s in sigmas):
        raise ValueError(f"sigmas must be finite and >= 0, got {sigmas}")
    return math.sqrt(sum(s * s for s in sigmas))


def aggregate_scores(
    noisy_scores: Sequence[np.ndarray],
    sigma: float | Sequence[float],
    threshold_multiple: float = DEFAULT_THRESHOLD_MULTIPLE,
    *,
    cluster_sizes: np.ndarray | None = None,
) -> np.ndarray:
    """Sum the clients' noisy scores, clip negatives, and zero clusters that noise alone explains.

    A cluster is kept only if its sum reaches `threshold_multiple` * sqrt(sum sigma_i^2), the std
    of the aggregate noise: with K clusters and few client samples, clipping alone would leave
    every empty cluster ~0.4 sigma of fake mass. 0 disables thresholding. If nothing survives, the
    result falls back to uniform over the pool (`cluster_sizes`, so the selection behaves like
    Random) or, without sizes, to equal scores per cluster.
    """
    if len(noisy_scores) == 0:
        raise ValueError("no score vectors to aggregate")
    vectors = [np.asarray(v, dtype=np.float64) for v in noisy_scores]
    shape = vectors[0].shape
    if len(shape) != 1 or shape[0] == 0:
        raise ValueError(f"score vectors must be non-empty 1-D arrays, got shape {shape}")
    for i, v in enumerate(vectors):
        if v.shape != shape:
            raise ValueError(f"score vector {i} has shape {v.shape}, expected {shape}")
        if not np.isfinite(v).all():
            raise ValueError(f"score vector {i} contains NaN or infinite values")
    threshold_multiple = float(threshold_multiple)
    if not math.isfinite(threshold_multiple) or threshold_multiple < 0:
        raise ValueError(f"threshold_multiple must be finite and >= 0, got {threshold_multiple}")
    if cluster_sizes is not None:
        cluster_sizes = np.asarray(cluster_sizes)
        if cluster_sizes.shape != shape:
            raise ValueError(f"cluster_sizes has shape {cluster_sizes.shape}, expected {shape}")
    noise_std = aggregate_noise_std(sigma, len(vectors))

    total = np.clip(np.sum(vectors, axis=0), 0.0, None)
    if threshold_multiple > 0:
        total[total < threshold_multiple * noise_std] = 0.0
    if total.sum() > 0:
        return total
    if cluster_sizes is not None and cluster_sizes.sum() > 0:
        return cluster_sizes.astype(np.float64)
    return np.ones(shape, dtype=np.float64)
