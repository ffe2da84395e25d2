"""SparseUpdate validation and the parameter server: counting, decay, top-theta_d download."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ecos_flower.dssgd.server import ParameterServer, fraction_count
from ecos_flower.dssgd.sparse import InvalidUpdateError, SparseUpdate, validate_sparse_update


def _upd(idx, vals) -> SparseUpdate:
    return SparseUpdate(np.asarray(idx, dtype=np.int64), np.asarray(vals, dtype=np.float32))


@pytest.mark.parametrize(
    ("indices", "values", "reason"),
    [
        (np.array([0.0, 1.0]), np.array([1.0, 2.0], np.float32), "integers"),
        (np.array([0, 1]), np.array([1, 2]), "floating"),
        (np.array([[0, 1]]), np.array([[1.0, 2.0]]), "1-D"),
        (np.array([0, 1]), np.array([1.0], np.float32), "lengths"),
        (np.array([0, 10]), np.array([1.0, 2.0], np.float32), "out of range"),
        (np.array([-1, 2]), np.array([1.0, 2.0], np.float32), "out of range"),
        (np.array([3, 3]), np.array([1.0, 2.0], np.float32), "duplicate"),
        (np.array([0, 1]), np.array([np.nan, 2.0], np.float32), "finite"),
        (np.array([0, 1, 2]), np.array([1.0, 2.0, 3.0], np.float32), "exceed"),
    ],
)
def test_validation_rejects_with_reason(indices, values, reason):
    before_i, before_v = indices.copy(), values.copy()
    with pytest.raises(InvalidUpdateError, match=reason):
        validate_sparse_update(indices, values, num_params=10, max_count=2)
    np.testing.assert_array_equal(indices, before_i)
    np.testing.assert_array_equal(values, before_v)


def test_validation_copies_and_converts():
    idx, vals = np.array([2, 0], dtype=np.int32), np.array([1.5, -1.0], dtype=np.float64)
    upd = validate_sparse_update(idx, vals, 5)
    assert upd.indices.dtype == np.int64 and upd.values.dtype == np.float32
    assert upd.nbytes == 2 * 8 + 2 * 4
    np.testing.assert_array_equal(upd.to_dense(5), [-1.0, 0, 1.5, 0, 0])
    upd.indices[0] = 4
    assert idx[0] == 2


def test_server_refuses_invalid_without_change():
    server = ParameterServer(np.zeros(4, np.float32))
    with pytest.raises(InvalidUpdateError):
        server.apply(_upd([0, 9], [1.0, 1.0]))
    assert not server.params.any() and not server.stat.any() and server.num_applied == 0


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.lists(st.integers(0, 19), unique=True, max_size=20),
        max_size=12,
    )
)
def test_server_counts_and_sums(updates):
    server = ParameterServer(np.zeros(20, np.float32))
    expected_stat = np.zeros(20)
    expected_params = np.zeros(20, np.float32)
    for k, idx in enumerate(updates):
        vals = np.full(len(idx), k + 1, np.float32)
        server.apply(_upd(idx, vals))
        expected_stat[idx] += 1
        expected_params[idx] += k + 1
    np.testing.assert_array_equal(server.stat, expected_stat)
    np.testing.assert_allclose(server.params, expected_params)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.floats(0.1, 0.9), st.integers(1, 15))
def test_decay(every, beta, n_updates):
    server = ParameterServer(np.zeros(3, np.float32), beta=beta, decay_every=every)
    expected = np.zeros(3)
    for k in range(1, n_updates + 1):
        server.apply(_upd([0], [0.0]))
        expected[0] += 1
        if k % every == 0:
            expected *= beta
    np.testing.assert_allclose(server.stat, expected)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 5), min_size=1, max_size=40),
    st.floats(0.0, 1.0),
)
def test_download_top_theta(stats, theta_d):
    n = len(stats)
    server = ParameterServer(np.arange(n, dtype=np.float32))
    server.stat = np.asarray(stats, dtype=np.float64)
    down = server.download(theta_d)
    k = fraction_count(theta_d, n)
    assert len(down) == k
    assert np.all(np.diff(down.indices) > 0)
    np.testing.assert_array_equal(down.values, server.params[down.indices])
    # Exactly the k largest stats, ties to the smaller index.
    ranking = sorted(range(n), key=lambda j: (-stats[j], j))[:k]
    assert sorted(ranking) == down.indices.tolist()


def test_fraction_count_rules():
    assert fraction_count(0.0, 100) == 0
    assert fraction_count(0.1, 100) == 10
    assert fraction_count(0.001, 100) == 1  # at least one
    assert fraction_count(0.015, 100) == 2  # ceil
    assert fraction_count(1.0, 7) == 7
    with pytest.raises(ValueError):
        fraction_count(1.5, 10)


def test_state_dict_round_trip():
    server = ParameterServer(np.ones(5, np.float32), beta=0.5, decay_every=2)
    server.apply(_upd([1, 3], [0.5, -0.5]))
    state = server.state_dict()
    clone = ParameterServer.from_state_dict(state)
    np.testing.assert_array_equal(clone.params, server.params)
    np.testing.assert_array_equal(clone.stat, server.stat)
    assert clone.num_applied == 1 and clone.beta == 0.5 and clone.decay_every == 2
    state["params"][0] = 99
    assert server.params[0] == 1
