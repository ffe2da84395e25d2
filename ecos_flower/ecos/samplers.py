"""Selection strategies over the public pool, all with `select(budget) -> pool indices`.

EcosSampler (and OracleSampler, its noise-free upper reference), Random, K-Center over the whole
pool, and InDomain (uniform from the clients' own domain: the domain-precision upper bound).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ecos_flower.ecos.allocation import allocate_budget
from ecos_flower.ecos.compress import Compression, check_features
from ecos_flower.ecos.kcenter import greedy_k_center

WITHIN_CLUSTER = ("kcenter", "random")


def _check_budget(budget: int) -> int:
    if int(budget) != budget or budget < 0:
        raise ValueError(f"budget must be a non-negative integer, got {budget!r}")
    return int(budget)


def _domain_ids(client_domain_id: int | Iterable[int]) -> np.ndarray:
    if isinstance(client_domain_id, int | np.integer):
        return np.asarray([int(client_domain_id)], dtype=np.int64)
    ids = np.asarray(list(client_domain_id), dtype=np.int64)
    if ids.size == 0:
        raise ValueError("client_domain_id is empty")
    return ids


class EcosSampler:
    """ECOS decompression: split the budget over clusters by score, then k-center in each cluster.

    Inside a cluster the first pick is the member nearest the centroid (not a random member, so a
    cluster with a small share yields typical samples, not outliers), then farthest-first.
    `within_cluster="random"` draws the cluster's share uniformly instead (for ablations).
    """

    def __init__(
        self,
        pool_features: np.ndarray,
        compression: Compression,
        aggregated_scores: np.ndarray,
        seed: int = 0,
        *,
        within_cluster: str = "kcenter",
    ) -> None:
        self.features = check_features(pool_features, "pool_features")
        n = self.features.shape[0]
        if compression.assignments.shape != (n,):
            raise ValueError(
                f"compression covers {compression.assignments.shape[0]} samples, pool has {n}"
            )
        if compression.centroids.shape[1] != self.features.shape[1]:
            raise ValueError("compression centroids and pool features differ in dimension")
        scores = np.asarray(aggregated_scores, dtype=np.float64)
        if scores.shape != (compression.num_clusters,):
            raise ValueError(
                f"scores have shape {scores.shape}, expected ({compression.num_clusters},)"
            )
        if within_cluster not in WITHIN_CLUSTER:
            raise ValueError(
                f"within_cluster must be one of {WITHIN_CLUSTER}, got {within_cluster!r}"
            )
        self.compression = compression
        self.scores = scores
        self.seed = seed
        self.within_cluster = within_cluster

    def allocation(self, budget: int) -> np.ndarray:
        """Samples per cluster for `budget`."""
        return allocate_budget(self.scores, self.compression.cluster_sizes, _check_budget(budget))

    def select(self, budget: int) -> np.ndarray:
        alloc = self.allocation(budget)
        rng = np.random.default_rng(self.seed)
        chosen: list[np.ndarray] = []
        # Group the pool by cluster once (one stable sort), not one scan of the pool per cluster.
        order = np.argsort(self.compression.assignments, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(self.compression.cluster_sizes)])
        for cluster in np.flatnonzero(alloc):
            members = order[bounds[cluster] : bounds[cluster + 1]]
            share = int(alloc[cluster])
            if self.within_cluster == "random":
                chosen.append(rng.choice(members, size=share, replace=False))
                continue
            feats = self.features[members]
            centroid = self.compression.centroids[cluster]
            first = int(np.argmin(((feats - centroid) ** 2).sum(axis=1)))
            chosen.append(members[greedy_k_center(feats, share, first=first)])
        if not chosen:
            return np.empty(0, dtype=np.int64)
        return np.concatenate(chosen).astype(np.int64)


class OracleSampler(EcosSampler):
    """ECOS with exact, noise-free scores (the true summed counts): the no-privacy reference."""

    def __init__(
        self,
        pool_features: np.ndarray,
        compression: Compression,
        true_scores: np.ndarray,
        seed: int = 0,
        *,
        within_cluster: str = "kcenter",
    ) -> None:
        super().__init__(
            pool_features, compression, true_scores, seed, within_cluster=within_cluster
        )


class RandomSampler:
    """Uniform sample of the pool without replacement."""

    def __init__(self, pool_size: int, seed: int = 0) -> None:
        if int(pool_size) != pool_size or pool_size <= 0:
            raise ValueError(f"pool_size must be a positive integer, got {pool_size!r}")
        self.pool_size = int(pool_size)
        self.seed = seed

    def select(self, budget: int) -> np.ndarray:
        budget = min(_check_budget(budget), self.pool_size)
        rng = np.random.default_rng(self.seed)
        return rng.choice(self.pool_size, size=budget, replace=False).astype(np.int64)


class KCenterSampler:
    """Greedy k-center over the whole pool (diverse but blind to the clients)."""

    def __init__(self, pool_features: np.ndarray, seed: int = 0) -> None:
        self.features = check_features(pool_features, "pool_features")
        self.seed = seed

    def select(self, budget: int) -> np.ndarray:
        return greedy_k_center(self.features, _check_budget(budget), seed=self.seed)


class InDomainSampler:
    """Uniform from the pool's part in the clients' domain(s): the domain-precision upper bound.

    If the budget exceeds that part, all of it is taken and the rest is filled uniformly from the
    other domains, so every sampler returns min(budget, pool size) indices.
    """

    def __init__(
        self, pool_domains: np.ndarray, client_domain_id: int | Iterable[int], seed: int = 0
    ) -> None:
        self.domains = np.asarray(pool_domains)
        if self.domains.ndim != 1 or self.domains.size == 0:
            raise ValueError("pool_domains must be a non-empty 1-D array")
        self.client_domains = _domain_ids(client_domain_id)
        self.seed = seed

    def select(self, budget: int) -> np.ndarray:
        budget = min(_check_budget(budget), self.domains.size)
        rng = np.random.default_rng(self.seed)
        inside = np.isin(self.domains, self.client_domains)
        in_idx, out_idx = np.flatnonzero(inside), np.flatnonzero(~inside)
        take = min(budget, in_idx.size)
        picked = rng.choice(in_idx, size=take, replace=False)
        fill = rng.choice(out_idx, size=budget - take, replace=False)
        return np.concatenate([picked, fill]).astype(np.int64)


def domain_precision(
    selected: np.ndarray, pool_domains: np.ndarray, client_domain_id: int | Iterable[int]
) -> float:
    """Fraction of the selected pool samples that come from the clients' domain(s)."""
    idx = np.asarray(selected, dtype=np.int64)
    domains = np.asarray(pool_domains)
    if idx.ndim != 1 or idx.size == 0:
        raise ValueError("selected must be a non-empty 1-D array of pool indices")
    if idx.min() < 0 or idx.max() >= domains.size:
        raise ValueError("selected contains indices outside the pool")
    return float(np.isin(domains[idx], _domain_ids(client_domain_id)).mean())
