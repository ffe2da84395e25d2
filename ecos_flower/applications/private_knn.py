"""Automated client labelling by private kNN: each client votes labels for the selected public
samples with its own labelled data, in the shared feature space, and releases the vote histograms
through the Gaussian mechanism; the server sums them and takes the argmax.

Two ways to vote (`mode`), with their L2 sensitivities to adding or removing one private sample:

- "query": each of the n selected samples gets the labels of its k nearest private samples
  (textbook kNN). One private sample can enter (or leave) the k nearest of every query, moving one
  vote per histogram from one class to another: sensitivity sqrt(2 n). The cost grows with the
  number of samples to label, which is why a small, relevant selection matters.
- "capped": each private sample gives its label to its k nearest selected samples (reverse kNN,
  like ECOS's capped coverage score). One private sample is k votes, one per histogram:
  sensitivity sqrt(k), whatever n is; selected samples near no private data get no votes.
"""

from __future__ import annotations

import math

import numpy as np

from ecos_flower.ecos.scoring import finite_rows, pairwise_squared_distances

KNN_MODES = ("query", "capped")


def knn_sensitivity(mode: str, k: int, num_queries: int) -> float:
    """L2 sensitivity of the whole (n x classes) vote matrix to one private sample."""
    if mode == "query":
        return math.sqrt(2.0 * num_queries)
    if mode == "capped":
        return math.sqrt(float(k))
    raise ValueError(f"unknown kNN mode {mode!r}; choose one of {', '.join(KNN_MODES)}")


def valid_labels(labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(mask, int64 labels): which labels are integers in 0..num_classes-1 (NaN, fractional,
    negative or too large ones are not; their int64 value is then 0 and must not be used)."""
    raw = np.asarray(labels)
    if raw.dtype.kind in "iub":
        wide = raw.astype(np.int64)
        ok = (wide >= 0) & (wide < num_classes)
        return ok, np.where(ok, wide, 0)
    values = np.asarray(raw, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(values) & (values == np.round(values))
        ok &= (values >= 0) & (values < num_classes)
    return ok, np.where(ok, values, 0).astype(np.int64)


def _nearest(a: np.ndarray, b: np.ndarray, k: int, chunk: int = 512) -> np.ndarray:
    """Indices (len(a), min(k, len(b))) of each row of `a`'s k nearest rows of `b`, ordered by
    (exact float64 distance, row index of `b`): a total order in which one row of `b` never
    changes how two other rows compare, so removing a row of `b` only removes it from the
    neighbour lists (and lets the next row in)."""
    k = min(k, len(b))
    out = np.empty((len(a), k), dtype=np.int64)
    if k == 0:
        return out
    for start in range(0, len(a), chunk):
        dist = pairwise_squared_distances(a[start : start + chunk], b)
        out[start : start + len(dist)] = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return out


def knn_votes(
    private_features: np.ndarray,
    private_labels: np.ndarray,
    query_features: np.ndarray,
    k: int,
    num_classes: int,
    mode: str = "query",
    private_ids: np.ndarray | None = None,
) -> np.ndarray:
    """Exact vote counts (n_queries, num_classes) of one client's labelled data.

    Total (DESIGN 2.4): private rows with a non-finite feature or a label outside
    0..num_classes-1 are dropped (a per-sample filter), never raise. Ties are broken by
    `private_ids` (unique per private row, stable under the removal of another row; default the
    row position, which removal preserves the order of) in "query" mode and by query index in
    "capped" mode. Only the query (the server's message) and the call's shape are validated."""
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k}")
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes}")
    if mode not in KNN_MODES:
        raise ValueError(f"unknown kNN mode {mode!r}; choose one of {', '.join(KNN_MODES)}")
    k, num_classes = int(k), int(num_classes)
    private = np.asarray(private_features, dtype=np.float64)
    queries = np.asarray(query_features, dtype=np.float64)
    if private.ndim != 2 or queries.ndim != 2:
        raise ValueError(f"features must be 2-D: private {private.shape}, queries {queries.shape}")
    if private.shape[1] != queries.shape[1]:
        raise ValueError(
            f"feature dims differ: private {private.shape[1]}, queries {queries.shape[1]}"
        )
    if not np.isfinite(queries).all():
        raise ValueError("query features contain NaN or infinite values")
    labels = np.asarray(private_labels).reshape(-1)
    if len(labels) != len(private):
        raise ValueError(f"{len(private)} private rows but {len(labels)} labels")
    ids = np.arange(len(private)) if private_ids is None else np.asarray(private_ids).reshape(-1)
    if len(ids) != len(private) or len(np.unique(ids)) != len(ids):
        raise ValueError("private_ids must hold one unique id per private row")
    ok, labels = valid_labels(labels, num_classes)
    keep = ok & finite_rows(private)
    by_id = np.argsort(ids[keep], kind="stable")  # rows in id order: ties go to the lower id
    private, labels = private[keep][by_id], labels[keep][by_id]

    votes = np.zeros((len(queries), num_classes), dtype=np.float64)
    if len(private) == 0 or len(queries) == 0:
        return votes
    if mode == "query":
        neighbours = _nearest(queries, private, k)
        rows = np.repeat(np.arange(len(queries)), neighbours.shape[1])
        np.add.at(votes, (rows, labels[neighbours].ravel()), 1.0)
    else:
        neighbours = _nearest(private, queries, k)
        cols = np.repeat(labels, neighbours.shape[1])
        np.add.at(votes, (neighbours.ravel(), cols), 1.0)
    return votes


def noisy_votes(votes: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """The Gaussian mechanism on the vote matrix: votes + N(0, sigma^2) per entry."""
    return votes + rng.normal(0.0, sigma, size=votes.shape)


def aggregate_votes(
    noisy: list[np.ndarray], sigmas: list[float], threshold_multiple: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Sum the clients' noisy votes; returns (labels = argmax, kept mask). A sample is kept when
    its top summed vote reaches `threshold_multiple` times the aggregate noise's std (samples
    near no client's data carry only noise); if none would be kept, all are."""
    if not noisy:
        raise ValueError("no vote matrices to aggregate")
    total = np.sum(noisy, axis=0)
    labels = total.argmax(axis=1)
    std = math.sqrt(sum(s * s for s in sigmas))
    kept = total.max(axis=1) >= threshold_multiple * std
    if not kept.any():
        kept = np.ones(len(labels), dtype=bool)
    return labels, kept
