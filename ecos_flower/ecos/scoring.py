"""Client-side coverage scores: how much of the local data lies near each centroid.

Distances use ||a||^2 - 2 a.b + ||b||^2 with one matrix product per chunk of samples, so memory
stays at chunk x K (never n x K x d) and the cost is essentially that of the matmul.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ecos_flower.ecos.compress import check_features

SCORE_MODES = ("nearest", "radius")
_CHUNK_ELEMENTS = 1 << 22  # chunk x K floats per distance block (16 MiB in float32)


def score_sensitivity(mode: str = "nearest", max_per_sample: int = 1) -> float:
    """L2 sensitivity of the scores: 1 for "nearest", sqrt(m) for "radius" (m centroids/sample)."""
    if mode == "nearest":
        return 1.0
    if mode == "radius":
        if int(max_per_sample) != max_per_sample or max_per_sample < 1:
            raise ValueError(f"max_per_sample must be a positive integer, got {max_per_sample!r}")
        return math.sqrt(int(max_per_sample))
    raise ValueError(f"unknown score mode {mode!r}; choose one of {SCORE_MODES}")


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
    """
    sensitivity = score_sensitivity(mode, max_per_sample)  # validates mode and m
    del sensitivity
    x = check_features(features, "features")
    c = check_features(centroids, "centroids")
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
        chunk_size = max(256, _CHUNK_ELEMENTS // max(num_clusters, 1))
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    m = min(int(max_per_sample), num_clusters)

    xt = torch.from_numpy(x)
    ct = torch.from_numpy(c)
    ct_t = ct.t()
    c_sq = (ct * ct).sum(dim=1)  # (K,)
    counts = torch.zeros(num_clusters, dtype=torch.float64)
    for start in range(0, x.shape[0], chunk_size):
        chunk = xt[start : start + chunk_size]
        # ||c||^2 - 2 x.c: the per-row ||x||^2 does not change the ranking of centroids.
        partial = torch.addmm(c_sq, chunk, ct_t, beta=1.0, alpha=-2.0)
        if mode == "nearest":
            nearest = partial.argmin(dim=1)
            counts += torch.bincount(nearest, minlength=num_clusters).to(torch.float64)
            continue
        x_sq = (chunk * chunk).sum(dim=1, keepdim=True)
        if m == 1:
            values, idx = partial.min(dim=1, keepdim=True)
        else:
            values, idx = torch.topk(partial, m, dim=1, largest=False, sorted=False)
        within = (values + x_sq) <= radius * radius
        counts += torch.bincount(idx[within], minlength=num_clusters).to(torch.float64)
    return counts.numpy()
