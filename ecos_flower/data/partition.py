"""Deterministic index partitions (pure numpy): IID shards, Dirichlet label skew, fractional splits.

Hand-written rather than flwr-datasets: its partitioners operate on HuggingFace `datasets`
objects, which would pull in datasets + pyarrow for a few lines of numpy over in-memory tensors.
All functions return sorted int64 index arrays; the parts are disjoint and together complete.
"""

from __future__ import annotations

import numpy as np

from .errors import DataError


def iid_partition(num_samples: int, num_parts: int, seed: int) -> list[np.ndarray]:
    """Shuffle range(num_samples) by seed; cut into num_parts shards whose sizes differ <= 1."""
    if num_parts < 1:
        raise DataError(f"iid partition: num_parts must be >= 1, got {num_parts}")
    if num_samples < num_parts:
        raise DataError(
            f"iid partition: {num_samples} samples cannot fill {num_parts} parts "
            f"(part {num_samples} would be empty)"
        )
    order = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, num_parts)]


def dirichlet_partition(
    labels: np.ndarray,
    num_parts: int,
    alpha: float,
    seed: int,
    min_size: int = 1,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Label-skewed shards: each class is spread over parts by proportions ~ Dirichlet(alpha).

    Small alpha: each part sees few classes; large alpha: close to IID. Redraws (deterministically)
    until every part holds at least min_size samples; raises DataError after max_tries draws.
    """
    labels = np.asarray(labels).reshape(-1)
    n = labels.shape[0]
    if num_parts < 1:
        raise DataError(f"dirichlet partition: num_parts must be >= 1, got {num_parts}")
    if not alpha > 0:
        raise DataError(f"dirichlet partition: alpha must be > 0, got {alpha}")
    if n < num_parts * min_size:
        raise DataError(
            f"dirichlet partition: {n} samples cannot give {num_parts} parts at least "
            f"{min_size} samples each"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_parts)]
        for idx in by_class:
            shares = rng.dirichlet(np.full(num_parts, float(alpha)))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).round().astype(int)
            for p, chunk in enumerate(np.split(idx, cuts)):
                parts[p].append(chunk)
        out = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise DataError(
        f"dirichlet partition: no draw in {max_tries} gave all {num_parts} parts at least "
        f"{min_size} samples (alpha={alpha}, {n} samples): raise alpha, or lower the number of "
        "parts or min_size"
    )


def split_fraction(
    indices: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Randomly split indices into (rest, part): `part` holds ~fraction of them, `rest` the others.

    len(part) = round(fraction * n), but for 0 < fraction < 1 and n >= 2 it is clamped to
    1..n-1, so neither side is silently empty; with n == 1 one side must be empty (callers check).
    fraction 0 gives an empty part, fraction 1 an empty rest.
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if not 0.0 <= fraction <= 1.0:
        raise DataError(f"split fraction must be in [0, 1], got {fraction}")
    n = indices.shape[0]
    k = int(np.floor(fraction * n + 0.5))
    if 0.0 < fraction < 1.0 and n >= 2:
        k = min(max(k, 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    part, rest = indices[order[:k]], indices[order[k:]]
    return np.sort(rest), np.sort(part)
