"""Budget allocation over clusters and greedy k-center."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ecos_flower.ecos import allocate_budget, greedy_k_center

cluster_lists = st.integers(1, 12).flatmap(
    lambda k: st.tuples(
        st.lists(
            st.one_of(st.just(0.0), st.floats(0.0, 100.0, allow_nan=False)), min_size=k, max_size=k
        ),
        st.lists(st.integers(0, 30), min_size=k, max_size=k),
    )
)


@settings(max_examples=300, deadline=None)
@given(data=cluster_lists, budget=st.integers(0, 400))
def test_allocation_invariants(data, budget: int) -> None:
    scores, sizes = np.array(data[0]), np.array(data[1])
    alloc = allocate_budget(scores, sizes, budget)
    assert alloc.dtype == np.int64
    assert alloc.sum() == min(budget, sizes.sum())
    assert np.all(alloc >= 0) and np.all(alloc <= sizes)
    scored_room = sizes[scores > 0].sum()
    if scored_room >= budget:
        # Zero-score clusters get nothing unless needed to reach the budget.
        assert alloc[scores == 0].sum() == 0
    else:
        # Otherwise every scored cluster is full before any zero-score cluster gets a sample.
        assert np.all(alloc[scores > 0] == sizes[scores > 0])
    # Monotone: a higher score never gets less, unless capped by its size.
    for i in range(len(scores)):
        for j in range(len(scores)):
            if scores[i] > scores[j] and scores[j] > 0:
                assert alloc[i] >= min(alloc[j], sizes[i])


@settings(max_examples=100, deadline=None)
@given(
    scores=st.lists(st.floats(0.1, 100.0), min_size=2, max_size=10),
    budget=st.integers(0, 200),
)
def test_uncapped_allocation_is_proportional(scores, budget: int) -> None:
    s = np.array(scores)
    sizes = np.full(len(s), 10_000)
    alloc = allocate_budget(s, sizes, budget)
    quota = budget * s / s.sum()
    assert np.all(np.abs(alloc - quota) < 1.0)  # largest remainder: within one of the quota


def test_allocation_examples() -> None:
    assert allocate_budget(np.array([3.0, 1.0]), np.array([100, 100]), 8).tolist() == [6, 2]
    # Capped cluster overflows to the other scored one, not to the zero-score one.
    assert allocate_budget(np.array([9.0, 1.0, 0.0]), np.array([2, 50, 50]), 10).tolist() == [
        2,
        8,
        0,
    ]
    # All scored clusters full: the rest goes by remaining capacity.
    assert allocate_budget(np.array([1.0, 0.0, 0.0]), np.array([2, 6, 2]), 6).tolist() == [2, 3, 1]
    # Budget above the pool: everything.
    assert allocate_budget(np.array([1.0, 0.0]), np.array([2, 3]), 99).tolist() == [2, 3]
    # All-zero scores still reach the budget (by capacity).
    assert allocate_budget(np.zeros(3), np.array([5, 5, 10]), 4).sum() == 4


def test_allocation_validation() -> None:
    with pytest.raises(ValueError):
        allocate_budget(np.array([1.0, -1.0]), np.array([1, 1]), 1)
    with pytest.raises(ValueError):
        allocate_budget(np.array([1.0, np.nan]), np.array([1, 1]), 1)
    with pytest.raises(ValueError):
        allocate_budget(np.array([1.0]), np.array([1, 1]), 1)
    with pytest.raises(ValueError):
        allocate_budget(np.array([1.0]), np.array([1]), -1)
    with pytest.raises(ValueError):
        allocate_budget(np.array([1.0]), np.array([1.5]), 1)


def _exact_min_dist(x: np.ndarray, picked: list[int]) -> np.ndarray:
    d = np.sqrt(((x[:, None, :].astype(np.float64) - x[picked][None, :, :]) ** 2).sum(-1))
    return d.min(axis=1)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 80), k=st.integers(0, 100))
def test_k_center_is_farthest_first(seed: int, n: int, k: int) -> None:
    x = np.random.default_rng(seed).normal(size=(n, 3)).astype(np.float32)
    picks = greedy_k_center(x, k, seed=seed)
    assert picks.dtype == np.int64
    assert len(picks) == min(k, n)
    assert len(set(picks.tolist())) == len(picks)
    for step in range(1, len(picks)):
        dist = _exact_min_dist(x, picks[:step].tolist())
        assert dist[picks[step]] >= dist.max() - 1e-4
    assert np.array_equal(picks, greedy_k_center(x, k, seed=seed))  # deterministic


def test_k_center_first_duplicates_and_validation() -> None:
    x = np.zeros((5, 2), dtype=np.float32)
    picks = greedy_k_center(x, 5, first=2)
    assert picks[0] == 2 and sorted(picks.tolist()) == [0, 1, 2, 3, 4]
    line = np.array([[0.0], [1.0], [10.0], [4.0]], dtype=np.float32)
    assert greedy_k_center(line, 3, first=0).tolist() == [0, 2, 3]
    assert greedy_k_center(line, 0).size == 0
    with pytest.raises(ValueError):
        greedy_k_center(line, 2, first=4)
    with pytest.raises(ValueError):
        greedy_k_center(line, -1)
