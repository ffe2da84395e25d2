"""Non-private selection modes and clipping (property tests)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ecos_flower.dssgd.selection import clip, select_largest, select_threshold, upload_count

finite = st.floats(-10, 10, allow_nan=False, width=32)
deltas = arrays(np.float32, st.integers(1, 200), elements=finite)
thetas = st.floats(0.0, 1.0)


@settings(max_examples=80, deadline=None)
@given(deltas, thetas)
def test_select_largest(delta, theta):
    upd = select_largest(delta, theta)
    k = upload_count(theta, delta.size)
    assert len(upd) == k
    assert len(np.unique(upd.indices)) == k
    np.testing.assert_array_equal(upd.values, delta[upd.indices])
    if 0 < k < delta.size:
        rest = np.setdiff1d(np.arange(delta.size), upd.indices)
        assert np.abs(upd.values).min() >= np.abs(delta[rest]).max()


@settings(max_examples=80, deadline=None)
@given(deltas, thetas, st.floats(0.0, 5.0), st.integers(0, 2**31))
def test_select_threshold(delta, theta, tau, seed):
    upd = select_threshold(delta, theta, tau, np.random.default_rng(seed))
    k = upload_count(theta, delta.size)
    eligible = int((np.abs(delta) > tau).sum())
    assert len(upd) == min(k, eligible)
    assert np.all(np.abs(upd.values) > tau)
    assert len(np.unique(upd.indices)) == len(upd)


def test_select_threshold_is_random_among_eligible():
    delta = np.ones(10, np.float32)
    counts = np.zeros(10)
    for seed in range(400):
        counts[select_threshold(delta, 0.1, 0.5, np.random.default_rng(seed)).indices] += 1
    assert counts.min() > 15  # each of 10 chosen about 40 times


@settings(max_examples=80, deadline=None)
@given(arrays(np.float32, st.integers(0, 50), elements=finite), st.floats(1e-3, 5.0))
def test_clip(values, gamma):
    before = values.copy()
    out = clip(values, gamma)
    assert np.all(np.abs(out) <= np.float32(gamma) + 1e-6)
    inside = np.abs(values) <= gamma
    np.testing.assert_array_equal(out[inside], values[inside])
    np.testing.assert_array_equal(values, before)
    np.testing.assert_array_equal(clip(values, None), values)
