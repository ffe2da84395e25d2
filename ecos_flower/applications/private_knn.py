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

KNN_MODES = ("query", "capped")


def knn_sensitivity(mode: str, k: int, num_queries: int) -> float:
    """L2 sensitivity of the whole (n x classes) vote matrix to one private sample."""
    if mode == "query":
        return math.sqrt(2.0 * num_queries)
    if mode == "capped":
        return math.sqrt(float(k))
    raise ValueError(f"unknown kNN mode {mode!r}; choose one of {', '.join(KNN_MODES)}")


def _nearest(a: np.ndarray, b: np.ndarray, k: int, chunk: int = 2048) -> np.ndarray:
    """Indices (len(a), k) of each row of `a`'s k nearest rows of `b` (Euclidean)."""
    k = min(k, len(b))
    b_sq = np.einsum("ij,ij->i", b, b)
    out = np.empty((len(a), k), dtype=np.int64)
    for start in range(0, len(a), chunk):
        block = a[start : start + chunk]
        dist = b_sq[None, :] - 2.0 * block @ b.T  # + |a|^2, constant per row
        part = (
            np.argpartition(dist, k - 1, axis=1)[:, :k]
            if k < len(b)
            else np.tile(np.arange(len(b)), (len(block), 1))
        )
        out[start : start + len(block)] = part
    return out


def knn_votes(
    private_features: np.ndarray,
    private_labels: np.ndarray,
    query_features: np.ndarray,
    k: int,
    num_classes: int,
    mode: str = "query",
) -> np.ndarray:
    """Exact vote counts (n_queries, num_classes) of one client's labelled data."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    private_features = np.asarray(private_features, dtype=np.float64)
    query_features = np.asarray(query_features, dtype=np.float64)
    labels = np.asarray(private_labels, dtype=np.int64)
    if private_features.shape[1] != query_features.shape[1]:
        raise ValueError(
            f"feature dims differ: private {private_features.shape[1]}, "
            f"queries {query_features.shape[1]}"
        )
    votes = np.zeros((len(query_features), num_classes), dtype=np.float64)
    if len(private_features) == 0 or len(query_features) == 0:
        return votes
    if mode == "query":
        neighbours = _nearest(query_features, private_features, k)
        rows = np.repeat(np.arange(len(query_features)), neighbours.shape[1])
        np.add.at(votes, (rows, labels[neighbours].ravel()), 1.0)
    elif mode == "capped":
        neighbours = _nearest(private_features, query_features, k)
        cols = np.repeat(labels, neighbours.shape[1])
        np.add.at(votes, (neighbours.ravel(), cols), 1.0)
    else:
        raise ValueError(f"unknown kNN mode {mode!r}; choose one of {', '.join(KNN_MODES)}")
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
