"""ECOS on real digits (plain vs inverted domains), with privacy noise, against Random.

Includes the known weak spot: a small client (few samples relative to K * sigma) must not make
ECOS much worse than Random.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from ecos_flower.ecos import (
    EcosSampler,
    RandomSampler,
    aggregate_scores,
    compress,
    coverage_scores,
    domain_precision,
    make_extractor,
    score_sensitivity,
    suggest_num_clusters,
)
from ecos_flower.privacy import GaussianMechanism, NodeLedger, PrivacyEvent


@pytest.fixture(scope="module")
def digits_pool():
    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(images))
    client_half, pool_half = order[: len(order) // 2], order[len(order) // 2 :]
    pool = torch.cat([images[pool_half], 1.0 - images[pool_half]])
    domains = np.repeat([0, 1], len(pool_half))
    extractor = make_extractor("pca", n_components=32).fit(pool)
    pool_feats = extractor.transform(pool)
    client_feats = extractor.transform(1.0 - images[client_half])
    return pool_feats, domains, client_feats


def _run(pool_feats, domains, client_feats, client_size, k, seed, threshold=2.0):
    rng = np.random.default_rng(seed)
    client = client_feats[rng.choice(len(client_feats), client_size, replace=False)]
    comp = compress(pool_feats, k, seed=seed, n_init=1)
    mech = GaussianMechanism.calibrated(1.0, 1e-5, score_sensitivity("nearest"))
    ledger = NodeLedger(None, 2.0, 1e-5)
    ledger.charge(PrivacyEvent.gaussian(mech.noise_multiplier, note="ecos scores"))
    noisy = mech.release(coverage_scores(client, comp.centroids), rng)
    scores = aggregate_scores([noisy], mech.sigma, threshold, cluster_sizes=comp.cluster_sizes)
    ecos = EcosSampler(pool_feats, comp, scores, seed).select(200)
    rand = RandomSampler(len(pool_feats), seed).select(200)
    return domain_precision(ecos, domains, 1), domain_precision(rand, domains, 1)


def test_ecos_beats_random_on_a_moderate_client(digits_pool) -> None:
    results = [_run(*digits_pool, client_size=400, k=50, seed=s) for s in range(3)]
    ecos, rand = np.mean(results, axis=0)
    assert ecos > rand + 0.3


def test_ecos_never_much_worse_than_random_on_a_small_client(digits_pool) -> None:
    """The known weak spot: ~60 client samples, K = 100, epsilon = 1."""
    for seed in range(6):
        ecos, rand = _run(*digits_pool, client_size=60, k=100, seed=seed)
        assert ecos >= rand - 0.1, (seed, ecos, rand)


def test_k_chosen_for_the_client_size_rescues_the_small_client(digits_pool) -> None:
    """Same small client, but K from suggest_num_clusters (coarse clusters above the noise)."""
    pool_feats, domains, client_feats = digits_pool
    sigma = GaussianMechanism.calibrated(1.0, 1e-5).sigma
    k = suggest_num_clusters(60, sigma, len(pool_feats))
    assert k < 10
    for seed in range(3):
        ecos, rand = _run(pool_feats, domains, client_feats, client_size=60, k=k, seed=seed)
        assert ecos > 0.9 > rand + 0.3, (seed, ecos, rand)
