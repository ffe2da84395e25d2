"""Client-side coverage scores: how much of the local data lies near each centroid.

The scores are a *total* mechanism (DESIGN 2.4): a non-finite feature row is dropped (a
per-sample filter, so adding or removing one sample still changes at most what one sample can
change), an empty local set scores zeros, and nothing about the private data ever raises. Only
properties of the server's message (centroids, mode, radius) are validated with ValueError.

Distances are exact float64 sums of squared coordinate differences, each computed by the same
sequence of IEEE operations (`pairwise_squared_distances`), so a sample's distances depend on
that sample and the centroids only: never on its position, on the other samples or on the chunk
it falls in (a BLAS matrix product gives no such guarantee). Ties go to the lowest centroid
index. Memory stays at chunk x K per block (never n x K x d).
"""

from __future__ import annotations

import math

import numpy as np

SCORE_MODES = ("nearest", "radius")
_CHUNK_ELEMENTS = 1 << 21  # chunk x K float64 per distance block (16 MiB)


def score_sensitivity(mode: str = "nearest", max_per_sample: int = 1) -> float:
    """L2 sensitivity of the scores: 1 for "nearest", sqrt(m) for "radius" (m centroids/sample)."""
    if mode == "nearest":
        return 1.0
    if mode == "radius":
        if int(max_per_sample) != max_per_sample or max_per_sample < 1:
            raise ValueError(f"max_per_sample must be a positive integer, got {max_per_sample!r}")
        return math.sqrt(int(max_per_sample))
    raise ValueError(f"unknown score mode {mode!r}; choose one of {SCORE_MODES}")


def pairwise_squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) float64 squared Euclidean distances of finite rows.

    Entry (i, j) is sum over coordinates t, in order, of (a[i, t] - b[j, t])^2: elementwise,
    correctly rounded operations only (no BLAS, no reassociation), so it is a function of the
    two rows alone, bit for bit. Overflow gives +inf (never NaN, since the inputs are finite)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    out = np.zeros((a.shape[0], b.shape[0]), dtype=np.float64)
    a_cols = np.ascontiguousarray(a.T)
    b_cols = np.ascontiguousarray(b.T)
    with np.errstate(over="ignore"):
        for t in range(a.shape[1]):
            diff = np.subtract.outer(a_cols[t], b_cols[t])
            np.multiply(diff, diff, out=diff)
            out += diff
    return out


def finite_rows(x: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows of the 2-D array `x` whose entries are all finite."""
    return np.isfinite(x).all(axis=1)


def _check_centroids(centroids: np.ndarray) -> np.ndarray:
    """The server's centroids as float64 (K, d); ValueError (message-only) if malformed."""
    c = np.asarray(centroids, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError(f"centroids must be a 2-D (K, d) array, got shape {c.shape}")
    if c.shape[0] == 0 or c.shape[1] == 0:
        raise ValueError(f"centroids is empty: shape {c.shape}")
    if not np.isfinite(c).all():
        raise ValueError("centroids contains NaN or infinite values")
    return c


def coverage_scores(
    features: np.ndarray,
    centroids: np.ndarray,
    mode: str = "nearest",
    radius: float | None = None,
    max_per_sample: int = 1,
    chunk_size: int | None = None,
) -> np.ndarray:
    """Per-centroid counts (float64, shape (K,)) of the local `features`.

    "nearest": s_j = number of samples whose nearest centroid is c_j (sensitivity 1).
    "radius": s_j = number of samples within Euclidean distance `radius` of c_j, each sample counted
    for at most its `max_per_sample` nearest such centroids (sensitivity sqrt(max_per_sample)).
    Rows of `features` with a NaN or infinite entry are dropped; an empty `features` (0, d)
    scores zeros.
    """
    score_sensitivity(mode, max_per_sample)  # validates mode and m
    c = _check_centroids(centroids)
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D (n, d) array, got shape {x.shape}")
    if x.shape[1] != c.shape[1]:
        raise ValueError(
            f"feature dimension mismatch: features have d={x.shape[1]}, centroids d={c.shape[1]}"
        )
    if mode == "radius":
        if radius is None or not math.isfinite(radius) or radius < 0:
            raise ValueError(f"radius mode needs a finite radius >= 0, got {radius!r}")
    elif radius is not None:
        raise ValueError("radius is only used with mode='radius'")
    num_clusters = c.shape[0]
    if chunk_size is None:
        chunk_size = max(256, _CHUNK_ELEMENTS // num_clusters)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    m = min(int(max_per_sample), num_clusters)
    limit = float(radius) ** 2 if mode == "radius" else math.inf

    x = x[finite_rows(x)]  # a per-sample filter: one sample still changes one sample's counts
    counts = np.zeros(num_clusters, dtype=np.int64)
    for start in range(0, x.shape[0], chunk_size):
        dist = pairwise_squared_distances(x[start : start + chunk_size], c)
        if mode == "nearest":
            nearest = dist.argmin(axis=1)  # first (lowest) index on ties
            counts += np.bincount(nearest, minlength=num_clusters)
            continue
        order = np.argsort(dist, axis=1, kind="stable")[:, :m]  # (distance, index) order
        within = np.take_along_axis(dist, order, axis=1) <= limit
        counts += np.bincount(order[within], minlength=num_clusters)
    return counts.astype(np.float64)
