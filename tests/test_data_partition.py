"""Partition properties (hypothesis): disjoint, complete, deterministic, sizes, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ecos_flower.data import DataError, dirichlet_partition, iid_partition, split_fraction


def assert_partition(parts: list[np.ndarray], universe: np.ndarray) -> None:
    joined = np.concatenate(parts) if parts else np.array([], dtype=np.int64)
    assert len(joined) == len(np.unique(joined)), "parts overlap"
    assert np.array_equal(np.sort(joined), np.sort(universe)), "parts are not complete"


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 400), k=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_iid_partition(n, k, seed):
    if n < k:
        with pytest.raises(DataError, match="would be empty"):
            iid_partition(n, k, seed)
        return
    parts = iid_partition(n, k, seed)
    assert len(parts) == k
    assert_partition(parts, np.arange(n))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert all(a.dtype == np.int64 for a in parts)
    assert all(np.array_equal(a, b) for a, b in zip(parts, iid_partition(n, k, seed), strict=True))


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 9), min_size=1, max_size=300),
    k=st.integers(1, 12),
    alpha=st.floats(0.05, 100.0),
    min_size=st.integers(1, 5),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_partition(labels, k, alpha, min_size, seed):
    labels = np.array(labels)
    try:
        parts = dirichlet_partition(labels, k, alpha, seed, min_size=min_size)
    except DataError as exc:
        assert "dirichlet partition" in str(exc) and str(min_size) in str(exc)
        return
    assert len(parts) == k
    assert_partition(parts, np.arange(len(labels)))
    assert min(len(p) for p in parts) >= min_size
    again = dirichlet_partition(labels, k, alpha, seed, min_size=min_size)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_dirichlet_small_alpha_skews_labels():
    labels = np.repeat(np.arange(10), 100)
    parts = dirichlet_partition(labels, 5, 0.05, seed=0, min_size=10)
    classes_per_part = [len(np.unique(labels[p])) for p in parts]
    assert min(classes_per_part) < 10
    iid = dirichlet_partition(labels, 5, 1000.0, seed=0)
    assert all(len(np.unique(labels[p])) == 10 for p in iid)


def test_dirichlet_impossible_min_size_is_clear():
    with pytest.raises(DataError, match="5 samples cannot give 3 parts at least 2"):
        dirichlet_partition(np.zeros(5), 3, 1.0, seed=0, min_size=2)


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(0, 300),
    fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_split_fraction(n, fraction, seed):
    indices = np.arange(n) * 3 + 7
    rest, part = split_fraction(indices, fraction, seed)
    assert_partition([rest, part], indices)
    if 0 < fraction < 1 and n >= 2:
        assert len(part) >= 1 and len(rest) >= 1
        assert abs(len(part) - fraction * n) <= 1
    if fraction == 0:
        assert len(part) == 0
    again = split_fraction(indices, fraction, seed)
    assert np.array_equal(again[0], rest) and np.array_equal(again[1], part)


def test_split_fraction_rejects_bad_fraction():
    with pytest.raises(DataError, match="split fraction"):
        split_fraction(np.arange(3), 1.5, 0)
