"""Samplers (ECOS, Oracle, Random, K-Center, InDomain), compression and domain precision."""

from __future__ import annotations

import numpy as np
import pytest

from ecos_flower.ecos import (
    Compression,
    EcosSampler,
    InDomainSampler,
    KCenterSampler,
    OracleSampler,
    RandomSampler,
    compress,
    coverage_scores,
    domain_precision,
    suggest_num_clusters,
)


@pytest.fixture(scope="module")
def blobs():
    """Two well-separated domains of 300 points each, 3 sub-clusters per domain."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 16)) * 4
    labels = np.repeat(np.arange(6), 100)
    feats = (centres[labels] + rng.normal(size=(600, 16))).astype(np.float32)
    domains = (labels >= 3).astype(np.int64)
    return feats, domains


def test_compress(blobs) -> None:
    feats, _ = blobs
    comp = compress(feats, 6, seed=0)
    assert comp.centroids.shape == (6, 16) and comp.centroids.dtype == np.float32
    assert comp.assignments.shape == (600,) and comp.assignments.dtype == np.int64
    assert comp.cluster_sizes.sum() == 600 and comp.num_clusters == 6
    assert np.array_equal(np.sort(comp.cluster_sizes), [100] * 6)
    again = compress(feats, 6, seed=0)
    assert np.array_equal(again.assignments, comp.assignments)
    mini = compress(feats, 6, seed=0, minibatch_threshold=100)
    assert mini.cluster_sizes.sum() == 600
    assert set(mini.members(int(mini.assignments[0]))) >= {0}
    with pytest.raises(ValueError):
        compress(feats, 0)
    with pytest.raises(ValueError):
        compress(feats[:5], 6)
    with pytest.raises(ValueError):
        compress(feats[0], 2)


def test_suggest_num_clusters() -> None:
    assert suggest_num_clusters(100, 3.73, 5000) == 6
    assert suggest_num_clusters(10_000, 3.73, 5000) == 670
    assert suggest_num_clusters(5, 3.73, 5000) == 2
    assert suggest_num_clusters(10_000, 0.0, 300) == 300
    with pytest.raises(ValueError):
        suggest_num_clusters(0, 1.0, 10)


def _all_samplers(feats, domains, seed=0):
    comp = compress(feats, 6, seed=0)
    client = feats[domains == 1][::3]
    scores = coverage_scores(client, comp.centroids)
    return comp, {
        "ecos": EcosSampler(feats, comp, scores, seed),
        "ecos-random": EcosSampler(feats, comp, scores, seed, within_cluster="random"),
        "oracle": OracleSampler(feats, comp, scores, seed),
        "random": RandomSampler(len(feats), seed),
        "kcenter": KCenterSampler(feats, seed),
        "indomain": InDomainSampler(domains, 1, seed),
    }


@pytest.mark.parametrize("budget", [0, 1, 120, 650])
def test_every_sampler_returns_distinct_pool_indices(blobs, budget: int) -> None:
    feats, domains = blobs
    _, samplers = _all_samplers(feats, domains)
    for name, sampler in samplers.items():
        picked = sampler.select(budget)
        assert picked.dtype == np.int64, name
        assert len(picked) == min(budget, len(feats)), name
        assert len(np.unique(picked)) == len(picked), name
        if len(picked):
            assert picked.min() >= 0 and picked.max() < len(feats), name
        assert np.array_equal(picked, sampler.select(budget)), name  # deterministic


def test_ecos_finds_the_client_domain(blobs) -> None:
    feats, domains = blobs
    _, samplers = _all_samplers(feats, domains)
    precision = {n: domain_precision(s.select(120), domains, 1) for n, s in samplers.items()}
    assert precision["ecos"] == 1.0 and precision["oracle"] == 1.0
    assert precision["indomain"] == 1.0
    assert 0.35 < precision["random"] < 0.65
    # Within a cluster the picks are spread out: the share of each cluster follows the scores.
    ecos = samplers["ecos"]
    alloc = ecos.allocation(120)
    assert alloc.sum() == 120 and np.all(alloc[ecos.scores == 0] == 0)


def test_ecos_picks_are_diverse_within_clusters(blobs) -> None:
    feats, domains = blobs
    comp, samplers = _all_samplers(feats, domains)
    kc = samplers["ecos"].select(30)
    rnd = samplers["ecos-random"].select(30)

    def min_pairwise(idx):
        d = np.linalg.norm(feats[idx][:, None] - feats[idx][None], axis=-1)
        return d[np.triu_indices(len(idx), 1)].min()

    assert min_pairwise(kc) > min_pairwise(rnd)


def test_in_domain_fills_beyond_the_domain_and_accepts_several_ids(blobs) -> None:
    _, domains = blobs
    picked = InDomainSampler(domains, 1, seed=0).select(400)
    assert domain_precision(picked, domains, 1) == pytest.approx(300 / 400)
    assert domain_precision(picked, domains, [0, 1]) == 1.0


def test_validation(blobs) -> None:
    feats, domains = blobs
    comp = compress(feats, 6, seed=0)
    with pytest.raises(ValueError):
        EcosSampler(feats, comp, np.ones(5))
    with pytest.raises(ValueError):
        EcosSampler(feats[:10], comp, np.ones(6))
    with pytest.raises(ValueError):
        EcosSampler(feats, comp, np.ones(6), within_cluster="median")
    bad = Compression(comp.centroids[:, :3], comp.assignments, comp.cluster_sizes)
    with pytest.raises(ValueError):
        EcosSampler(feats, bad, np.ones(6))
    with pytest.raises(ValueError):
        RandomSampler(0)
    with pytest.raises(ValueError):
        RandomSampler(10).select(-1)
    with pytest.raises(ValueError):
        domain_precision(np.array([], dtype=np.int64), domains, 1)
    with pytest.raises(ValueError):
        domain_precision(np.array([600]), domains, 1)
    with pytest.raises(ValueError):
        InDomainSampler(domains, [])
