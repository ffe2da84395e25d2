"""Every client mechanism is total (DESIGN 2.4): non-finite feature rows and out-of-range labels
never raise and never change the output's shape; they are dropped, so the output equals the
output on the data without them (exactly, for the exact statistics before the noise, and for
the whole noisy output under the same seed). Neighbour orders are stable under the removal of
a sample: with many exact ties, removing one private sample moves the kNN votes by at most the
stated sensitivity."""

from __future__ import annotations

import inspect
import math

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis.extra.numpy import arrays

from ecos_flower.applications import (
    dp_fc_head,
    dp_finetune_head,
    dp_least_squares_head,
    knn_sensitivity,
    knn_votes,
)
from ecos_flower.applications.dp_fc import dp_covariance
from ecos_flower.applications.dp_least_squares import (
    SufficientStatistics,
    solve_ridge,
    sufficient_statistics,
)
from ecos_flower.applications.finetune import (
    DEFAULT_NORMALISER,
    FEATURE_LIMIT,
    make_private_head,
)
from ecos_flower.applications.linear_head import normalized_with_bias
from ecos_flower.ecos import coverage_scores

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook:UserWarning")

CLASSES = 3


def _clean(n: int = 80, d: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CLASSES, d)) * 3
    labels = rng.integers(0, CLASSES, size=n)
    return centres[labels] + rng.normal(size=(n, d)), labels


def _hostile(features: np.ndarray, labels: np.ndarray):
    """The clean data with bad samples spliced in; returns (features, labels, clean mask)."""
    d = features.shape[1]
    bad_rows = np.array(
        [
            [np.nan] + [0.0] * (d - 1),
            [np.inf] * d,
            [0.0] * (d - 1) + [-np.inf],
            features[0],  # finite row, label out of range (negative)
            features[1],  # finite row, label out of range (too large)
            features[2],  # finite row, label NaN
            features[3],  # finite row, fractional label
        ]
    )
    bad_labels = np.array([0, 1, 2, -1, CLASSES + 2, np.nan, 1.5])
    at = [5, 0, 17, 40, 41, 60, len(features)]
    out_x, out_y = features.astype(np.float64), labels.astype(np.float64)
    mask = np.ones(len(features), dtype=bool)
    for position, row, label in sorted(
        zip(at, bad_rows, bad_labels, strict=True), key=lambda t: -t[0]
    ):
        out_x = np.insert(out_x, position, row, axis=0)
        out_y = np.insert(out_y, position, label)
        mask = np.insert(mask, position, False)
    return out_x, out_y, mask


# ------------------------------------------------------------------ ECOS coverage scores
@pytest.mark.parametrize(
    "kwargs", [{"mode": "nearest"}, {"mode": "radius", "radius": 3.0, "max_per_sample": 2}]
)
def test_coverage_scores_drop_non_finite_rows(kwargs):
    features, labels = _clean()
    hostile, _, _ = _hostile(features, labels)
    finite = np.isfinite(hostile).all(axis=1)
    centroids = np.random.default_rng(1).normal(size=(7, 4)) * 3
    scores = coverage_scores(hostile, centroids, chunk_size=16, **kwargs)
    assert scores.shape == (7,)
    np.testing.assert_array_equal(scores, coverage_scores(hostile[finite], centroids, **kwargs))
    everything_bad = np.full((3, 4), np.nan)
    np.testing.assert_array_equal(coverage_scores(everything_bad, centroids, **kwargs), 0.0)
    np.testing.assert_array_equal(coverage_scores(np.zeros((0, 4)), centroids, **kwargs), 0.0)


def test_coverage_scores_do_not_depend_on_a_samples_position():
    """Exact float64 distances per row: the same sample gets the same centroid whatever chunk or
    row it sits in, even at exact ties (integer grid)."""
    rng = np.random.default_rng(3)
    x = rng.integers(-2, 3, size=(300, 3)).astype(np.float64)
    c = rng.integers(-2, 3, size=(9, 3)).astype(np.float64)
    perm = rng.permutation(len(x))
    for kwargs in ({"mode": "nearest"}, {"mode": "radius", "radius": 2.0, "max_per_sample": 3}):
        base = coverage_scores(x, c, chunk_size=7, **kwargs)
        np.testing.assert_array_equal(base, coverage_scores(x[perm], c, chunk_size=64, **kwargs))
        for i in range(0, len(x), 37):
            single = coverage_scores(x[i : i + 1], c, **kwargs)
            removed = coverage_scores(np.delete(x, i, axis=0), c, chunk_size=7, **kwargs)
            np.testing.assert_array_equal(base - removed, single)


# ------------------------------------------------------------------ private kNN
@pytest.mark.parametrize("mode", ["query", "capped"])
def test_knn_votes_drop_bad_rows_and_labels(mode):
    features, labels = _clean()
    hostile, hostile_labels, mask = _hostile(features, labels)
    queries = np.random.default_rng(2).normal(size=(12, 4)) * 3
    votes = knn_votes(hostile, hostile_labels, queries, 5, CLASSES, mode)
    assert votes.shape == (12, CLASSES)
    np.testing.assert_array_equal(votes, knn_votes(features, labels, queries, 5, CLASSES, mode))
    assert np.array_equal(hostile[mask], features)
    # A label beyond num_classes (the audit's num_classes=2, label 5) is dropped, not an error.
    two = knn_votes(features[:4], np.array([0, 5, 1, 1]), queries, 2, 2, mode)
    np.testing.assert_array_equal(
        two, knn_votes(features[[0, 2, 3]], np.array([0, 1, 1]), queries, 2, 2, mode)
    )
    # Nothing usable: zero votes of the normal shape.
    nothing = knn_votes(np.full((3, 4), np.nan), np.zeros(3), queries, 2, CLASSES, mode)
    np.testing.assert_array_equal(nothing, np.zeros((12, CLASSES)))


@pytest.mark.parametrize("mode", ["query", "capped"])
def test_knn_votes_break_ties_by_private_id_not_position(mode):
    rng = np.random.default_rng(4)
    private = rng.integers(0, 3, size=(40, 2)).astype(np.float64)  # many exact ties
    labels = rng.integers(0, CLASSES, size=40)
    queries = rng.integers(0, 3, size=(10, 2)).astype(np.float64)
    base = knn_votes(private, labels, queries, 4, CLASSES, mode)
    perm = rng.permutation(40)
    shuffled = knn_votes(private[perm], labels[perm], queries, 4, CLASSES, mode, private_ids=perm)
    np.testing.assert_array_equal(base, shuffled)
    with pytest.raises(ValueError, match="unique"):
        knn_votes(private, labels, queries, 4, CLASSES, mode, private_ids=np.zeros(40))


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 60),
    num_queries=st.integers(1, 4),
    k=st.integers(1, 8),
    grid=st.integers(2, 3),
    mode=st.sampled_from(["query", "capped"]),
)
def test_removing_any_one_sample_stays_within_the_sensitivity_even_with_ties(
    seed, n, num_queries, k, grid, mode
):
    rng = np.random.default_rng(seed)
    private = rng.integers(0, grid, size=(n, 2)).astype(np.float64)  # integer grid: exact ties
    labels = rng.integers(0, CLASSES, size=n)
    queries = rng.integers(0, grid, size=(num_queries, 2)).astype(np.float64)
    full = knn_votes(private, labels, queries, k, CLASSES, mode)
    bound = knn_sensitivity(mode, k, len(queries))
    for drop in range(len(private)):
        keep = np.arange(len(private)) != drop
        fewer = knn_votes(private[keep], labels[keep], queries, k, CLASSES, mode)
        change = full - fewer
        assert np.linalg.norm(change) <= bound + 1e-12
        if mode == "query":
            # One vote per histogram moves at most: L1 <= 2 in every query's row.
            assert np.abs(change).sum(axis=1).max() <= 2
        else:
            # The removed sample's own k votes, nothing else.
            alone = knn_votes(
                private[drop : drop + 1], labels[drop : drop + 1], queries, k, 3, mode
            )
            np.testing.assert_array_equal(change, alone)


# ------------------------------------------------------------------ DP head fits
def _tensors(features: np.ndarray, labels: np.ndarray):
    return torch.from_numpy(features.astype(np.float64)), torch.from_numpy(labels)


def test_least_squares_statistics_drop_bad_rows_exactly():
    features, labels = _clean()
    hostile, hostile_labels, _ = _hostile(features, labels)
    x_bad, y_bad = _tensors(hostile, hostile_labels)
    x, y = _tensors(features, labels)
    bad = sufficient_statistics(normalized_with_bias(x_bad, 3.0), y_bad, CLASSES)
    good = sufficient_statistics(normalized_with_bias(x, 3.0), y, CLASSES)
    assert torch.equal(bad.gram, good.gram) and torch.equal(bad.cross, good.cross)
    assert torch.equal(bad.gram, bad.gram.T)
    # Rows above norm 1 are scaled to norm 1 (not refused): one sample's effect stays bounded.
    big = sufficient_statistics(torch.full((1, 2), 5.0, dtype=torch.float64), y[:1], CLASSES)
    assert float(torch.linalg.matrix_norm(big.gram)) == pytest.approx(1.0)
    # Covariance of DP-FC (no labels): non-finite rows dropped, exactly symmetric.
    rows = normalized_with_bias(x_bad, 3.0)
    finite = torch.isfinite(rows).all(dim=1)
    cov = dp_covariance(rows, 0.0, torch.Generator())
    assert torch.equal(cov, dp_covariance(rows[finite], 0.0, torch.Generator()))
    assert torch.equal(cov, cov.T)


def _fit(method: str, features: torch.Tensor, labels: torch.Tensor, seed: int):
    common = {"epsilon": 2.0, "delta": 1e-5, "seed": seed}
    if method == "dp-least-squares":
        return dp_least_squares_head(features, labels, CLASSES, scale=3.0, **common)
    if method == "dp-fc":
        return dp_fc_head(features, labels, CLASSES, scale=3.0, steps=5, **common)
    return dp_finetune_head(features, labels, CLASSES, steps=5, **common)


METHODS = ["dp-least-squares", "dp-fc", "dp-sgd"]


@pytest.mark.parametrize("method", METHODS)
def test_head_fits_drop_bad_samples_and_equal_the_fit_without_them(method):
    features, labels = _clean()
    hostile, hostile_labels, _ = _hostile(features, labels)
    hostile[9] = 1e30  # finite but huge: a per-sample bound drops it for DP-SGD's raw features
    hostile_labels[9] = 0
    x_bad, y_bad = _tensors(hostile, hostile_labels)
    result = _fit(method, x_bad, y_bad, seed=11)
    head = result.head
    assert head.weight.shape == (CLASSES, 4) and head.bias.shape == (CLASSES,)
    assert torch.isfinite(head.weight).all() and torch.isfinite(head.bias).all()
    if method == "dp-sgd":  # the huge row is dropped (|x| > FEATURE_LIMIT) ...
        assert FEATURE_LIMIT < 1e30
        keep = np.isfinite(hostile).all(axis=1) & (np.abs(hostile).max(axis=1) <= FEATURE_LIMIT)
    else:  # ... or normalised to a bounded row and kept
        keep = np.isfinite(hostile).all(axis=1)
    keep &= np.isin(hostile_labels, np.arange(CLASSES))
    x, y = _tensors(hostile[keep], hostile_labels[keep].astype(np.int64))
    clean = _fit(method, x, y, seed=11).head
    assert torch.equal(head.weight, clean.weight) and torch.equal(head.bias, clean.bias)


@pytest.mark.parametrize("method", METHODS)
def test_head_fits_with_no_usable_sample_still_release_noise(method):
    x = torch.full((4, 4), math.nan, dtype=torch.float64)
    y = torch.tensor([0, 1, -1, 7])
    first = _fit(method, x, y, seed=1).head
    again = _fit(method, x, y, seed=1).head
    other = _fit(method, x, y, seed=2).head
    for head in (first, other):
        assert head.weight.shape == (CLASSES, 4)
        assert torch.isfinite(head.weight).all() and torch.isfinite(head.bias).all()
    assert torch.equal(first.weight, again.weight)  # the caller's seed drives the noise...
    assert not torch.equal(first.weight, other.weight)  # ...and there is noise to drive
    empty = _fit(method, x[:0], y[:0], seed=1).head
    assert torch.equal(empty.weight, first.weight) and torch.equal(empty.bias, first.bias)


@settings(max_examples=60, deadline=None)
@given(
    gram=arrays(np.float64, (4, 4), elements=st.floats(-1e300, 1e300)),
    cross=arrays(np.float64, (4, 2), elements=st.floats(-1e300, 1e300)),
    ridge=st.floats(1e-6, 1e6),
)
def test_the_ridge_solve_never_raises_on_finite_noisy_statistics(gram, cross, ridge):
    weights = solve_ridge(
        SufficientStatistics(torch.from_numpy(gram), torch.from_numpy(cross)), ridge
    )
    assert weights.shape == (2, 4) and torch.isfinite(weights).all()


@pytest.mark.parametrize(
    "function", [dp_least_squares_head, dp_fc_head, dp_finetune_head, make_private_head]
)
def test_privacy_noise_has_no_default_seed(function):
    seed = inspect.signature(function).parameters["seed"]
    assert seed.default is inspect.Parameter.empty


@pytest.mark.parametrize("function", [dp_fc_head, dp_finetune_head])
def test_head_fits_normalise_by_a_public_constant_by_default(function):
    """DESIGN 2.4: no exact dataset size may influence a release. The head fits divide their
    noisy sums by `normaliser`, whose default is a fixed number (never a sentinel standing for
    the private sample count)."""
    normaliser = inspect.signature(function).parameters["normaliser"].default
    assert normaliser == DEFAULT_NORMALISER
    assert isinstance(normaliser, float) and math.isfinite(normaliser) and normaliser > 0
