"""Coverage scores, their sensitivity, and noise-aware aggregation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ecos_flower.ecos import (
    aggregate_noise_std,
    aggregate_scores,
    coverage_scores,
    score_sensitivity,
)


def _brute_force(x: np.ndarray, c: np.ndarray, mode: str, radius=None, m=1) -> np.ndarray:
    d = np.sqrt(((x[:, None, :].astype(np.float64) - c[None, :, :]) ** 2).sum(-1))
    counts = np.zeros(len(c))
    for row in d:
        if mode == "nearest":
            counts[np.argmin(row)] += 1
        else:
            order = np.argsort(row)[:m]
            for j in order:
                if row[j] <= radius:
                    counts[j] += 1
    return counts


def _data(seed: int, n: int = 300, k: int = 17, d: int = 8):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(k, d)).astype(np.float32)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, None])
def test_nearest_matches_brute_force(chunk_size) -> None:
    x, c = _data(0)
    scores = coverage_scores(x, c, chunk_size=chunk_size)
    assert scores.dtype == np.float64 and scores.shape == (len(c),)
    assert np.array_equal(scores, _brute_force(x, c, "nearest"))
    assert scores.sum() == len(x)


@pytest.mark.parametrize("m", [1, 2, 5])
@pytest.mark.parametrize("radius", [0.0, 2.5, 4.0, 100.0])
def test_radius_matches_brute_force(m: int, radius: float) -> None:
    x, c = _data(1)
    scores = coverage_scores(x, c, mode="radius", radius=radius, max_per_sample=m, chunk_size=50)
    assert np.array_equal(scores, _brute_force(x, c, "radius", radius, m))
    assert scores.sum() <= m * len(x)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 4), remove=st.integers(0, 59))
def test_sensitivity_bound_holds_for_neighbouring_datasets(seed: int, m: int, remove: int) -> None:
    """Removing one sample changes the score vector by at most the stated L2 sensitivity."""
    x, c = _data(seed, n=60, k=9, d=4)
    neighbour = np.delete(x, remove, axis=0)
    for mode, kwargs in [("nearest", {}), ("radius", {"radius": 2.0, "max_per_sample": m})]:
        diff = coverage_scores(x, c, mode, **kwargs) - coverage_scores(neighbour, c, mode, **kwargs)
        bound = score_sensitivity(mode, kwargs.get("max_per_sample", 1))
        assert np.linalg.norm(diff) <= bound + 1e-12


def test_sensitivity_values() -> None:
    assert score_sensitivity("nearest") == 1.0
    assert score_sensitivity("radius", 4) == 2.0
    assert score_sensitivity("radius", 3) == pytest.approx(math.sqrt(3))
    with pytest.raises(ValueError):
        score_sensitivity("radius", 0)
    with pytest.raises(ValueError):
        score_sensitivity("knn")


def test_input_validation() -> None:
    x, c = _data(2)
    with pytest.raises(ValueError, match="dimension mismatch"):
        coverage_scores(x, c[:, :4])
    with pytest.raises(ValueError, match="2-D"):
        coverage_scores(x[0], c)
    bad_c = c.copy()
    bad_c[0, 0] = np.inf  # the server's centroids: message-only, may be refused
    with pytest.raises(ValueError, match="NaN"):
        coverage_scores(x, bad_c)
    with pytest.raises(ValueError, match="radius"):
        coverage_scores(x, c, mode="radius")
    with pytest.raises(ValueError):
        coverage_scores(x, c, mode="nearest", radius=1.0)
    with pytest.raises(ValueError):
        coverage_scores(x, c, chunk_size=0)
    with pytest.raises(ValueError, match="empty"):
        coverage_scores(x, c[:0])


def test_private_features_never_raise() -> None:
    """Scoring is total in the private data: a non-finite row is dropped (not an error) and an
    empty local set scores zeros (see tests/test_mechanisms_total.py for the full property)."""
    x, c = _data(2)
    bad = x.copy()
    bad[3, 1] = np.nan
    bad[7, 0] = np.inf
    expected = coverage_scores(np.delete(x, [3, 7], axis=0), c)
    assert np.array_equal(coverage_scores(bad, c), expected)
    assert np.array_equal(coverage_scores(x[:0], c), np.zeros(len(c)))


def test_aggregate_sums_clips_and_thresholds() -> None:
    a = np.array([10.0, -3.0, 0.5, 4.0])
    b = np.array([12.0, 1.0, 0.2, 2.0])
    sigma = 2.0
    std = aggregate_noise_std(sigma, 2)
    assert std == pytest.approx(2 * math.sqrt(2))
    out = aggregate_scores([a, b], sigma, threshold_multiple=2.0)
    # sums: 22, -2 -> 0, 0.7, 6; threshold 2 * 2.83 = 5.66 keeps 22 and 6.
    assert np.allclose(out, [22.0, 0.0, 0.0, 6.0])
    assert np.allclose(aggregate_scores([a, b], sigma, threshold_multiple=0.0), [22, 0, 0.7, 6])
    assert np.allclose(aggregate_scores([a, b], [1.0, 3.0], 1.0), [22, 0, 0, 6])


def test_aggregate_fallback_is_uniform() -> None:
    noisy = [np.array([0.3, -1.0, 0.1])]
    assert np.array_equal(aggregate_scores(noisy, 5.0), np.ones(3))
    sizes = np.array([5, 1, 10])
    assert np.array_equal(aggregate_scores(noisy, 5.0, cluster_sizes=sizes), sizes.astype(float))


def test_aggregate_validation() -> None:
    with pytest.raises(ValueError):
        aggregate_scores([], 1.0)
    with pytest.raises(ValueError):
        aggregate_scores([np.ones(3), np.ones(4)], 1.0)
    with pytest.raises(ValueError):
        aggregate_scores([np.ones(3)], [1.0, 2.0])
    with pytest.raises(ValueError):
        aggregate_scores([np.array([1.0, np.inf])], 1.0)
    with pytest.raises(ValueError):
        aggregate_scores([np.ones(3)], 1.0, threshold_multiple=-1)
    with pytest.raises(ValueError):
        aggregate_scores([np.ones(3)], -1.0)


def test_thresholding_removes_fake_mass_of_empty_clusters() -> None:
    """Many empty clusters + noise: clipping alone leaves ~0.4 sigma each; thresholding drops it."""
    rng = np.random.default_rng(0)
    k, sigma = 200, 4.0
    true = np.zeros(k)
    true[:5] = 40.0
    noisy = true + rng.normal(0, sigma, k)
    clipped = aggregate_scores([noisy], sigma, threshold_multiple=0.0)
    kept = aggregate_scores([noisy], sigma)
    fake_clipped = clipped[5:].sum() / clipped.sum()
    fake_kept = kept[5:].sum() / kept.sum()
    assert fake_clipped > 0.5  # noise dominates the allocation without thresholding
    assert fake_kept < 0.1
