"""The client, not the server, decides its privacy: a server can lower a node's default budget but
never raise it, and cannot buy a small sigma with a large delta."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from ecos_flower.flower.ecos_client import (
    DEFAULT_EPSILON_LIMIT,
    QueryRejected,
    check_query_fields,
    ledger_for,
)


def _context(tmp_path, **node_config) -> Context:
    config = {"partition-id": 0, "ledger-path": str(tmp_path / "ledger.json"), **node_config}
    return Context(run_id=1, node_id=5, node_config=config, state=RecordDict(), run_config={})


def _query(**fields) -> ConfigRecord:
    base = {"num-centroids": 4, "dim": 3, "noise": True, "epsilon": 1.0, "delta": 1e-5}
    return ConfigRecord({**base, **fields})


@pytest.mark.parametrize(
    ("suggested", "expected"), [(1e6, DEFAULT_EPSILON_LIMIT), (2.0, 2.0), (None, 10.0)]
)
def test_a_server_can_lower_but_never_raise_the_default_limit(tmp_path, suggested, expected):
    query = _query() if suggested is None else _query(**{"client-epsilon-limit": suggested})
    assert ledger_for(_context(tmp_path), query).epsilon_limit == expected


def test_the_node_config_limit_rules_whatever_the_server_suggests(tmp_path):
    context = _context(tmp_path, **{"epsilon-limit": 3.0})
    ledger = ledger_for(context, _query(**{"client-epsilon-limit": 0.5}))
    assert ledger.epsilon_limit == 3.0


def test_the_ledger_delta_is_the_nodes_not_the_servers(tmp_path):
    assert ledger_for(_context(tmp_path), _query(delta=5e-5)).delta == 1e-5
    assert ledger_for(_context(tmp_path / "b", delta=1e-6), _query()).delta == 1e-6


def test_a_query_with_a_delta_above_the_nodes_maximum_is_refused():
    with pytest.raises(QueryRejected, match="above this node's max-delta=0.0001"):
        check_query_fields(_query(delta=0.01), {})
    with pytest.raises(QueryRejected, match="extractor-hash"):  # past the delta check
        check_query_fields(_query(delta=0.01), {"max-delta": 0.05})  # the operator may allow it
