"""The node, not the server, decides its privacy: its policy, limit and delta come from its node
config only; a message can neither set a limit nor buy a small sigma with a large delta."""

from __future__ import annotations

import math

import pytest

from ecos_flower.client.messages import ECOS_QUERY, QueryRejected
from ecos_flower.privacy.policy import MECHANISMS, OPT_IN, NodePolicy, PolicyError


def _query(**fields) -> dict:
    from flwr.app import ConfigRecord

    base = {"num-centroids": 4, "dim": 3, "noise": True, "epsilon": 1.0, "delta": 1e-5}
    return ConfigRecord({**base, **fields})


def test_a_node_outside_a_simulation_is_private_and_needs_its_own_ledger_and_limit():
    policy = NodePolicy.from_node_config({"partition-id": 0}, simulated=False)
    assert policy.mode == "private"
    reason = policy.refusal("ecos-counts")
    assert reason is not None and "ledger-path" in reason
    named = NodePolicy.from_node_config(
        {"ledger-path": "/tmp/x.json", "epsilon-limit": 3.0}, simulated=False
    )
    assert named.refusal("ecos-counts") is None
    assert named.epsilon_limit == 3.0
    # A ledger without a limit is not enough: the limit never comes from a message.
    no_limit = NodePolicy.from_node_config({"ledger-path": "/tmp/x.json"}, simulated=False)
    assert no_limit.refusal("ecos-counts") is not None


@pytest.mark.parametrize("mechanism", OPT_IN)
def test_a_private_node_refuses_every_non_private_mechanism_unless_its_operator_opts_in(mechanism):
    node = {"ledger-path": "/tmp/x.json", "epsilon-limit": 3.0}
    assert NodePolicy.from_node_config(node, simulated=False).refusal(mechanism) is not None
    opted = NodePolicy.from_node_config({**node, "allow": mechanism}, simulated=False)
    assert opted.refusal(mechanism) is None
    others = [m for m in OPT_IN if m != mechanism]
    assert all(opted.refusal(m) is not None for m in others)


def test_exact_metrics_leave_a_private_node_only_with_report_metrics():
    node = {"ledger-path": "/tmp/x.json", "epsilon-limit": 3.0}
    assert NodePolicy.from_node_config(node, simulated=False).refusal("evaluation-metrics")
    opted = NodePolicy.from_node_config({**node, "report-metrics": True}, simulated=False)
    assert opted.refusal("evaluation-metrics") is None


def test_a_simulated_node_answers_everything_and_has_no_limit_unless_it_sets_one():
    policy = NodePolicy.from_node_config({"partition-id": 0}, simulated=True)
    assert policy.research
    assert all(policy.refusal(m) is None for m in MECHANISMS)
    assert math.isinf(policy.epsilon_limit)
    limited = NodePolicy.from_node_config({"epsilon-limit": 2.0}, simulated=True)
    assert limited.epsilon_limit == 2.0


def test_the_operators_word_beats_the_detection():
    assert NodePolicy.from_node_config({"privacy-policy": "private"}, simulated=True).mode == (
        "private"
    )
    assert NodePolicy.from_node_config({"privacy-policy": "research"}, simulated=False).research


def test_replayable_noise_is_refused_on_a_private_node():
    with pytest.raises(PolicyError, match="noise-seed"):
        NodePolicy.from_node_config({"noise-seed": 3}, simulated=False)
    assert NodePolicy.from_node_config({"noise-seed": 3}, simulated=True).noise_seed == 3


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("privacy-policy", "lax"),
        ("allow", "everything"),
        ("epsilon-limit", -1.0),
        ("epsilon-limit", "x"),
        ("delta", 2.0),
        ("report-metrics", "maybe"),
    ],
)
def test_invalid_privacy_settings_name_the_key(key, value):
    with pytest.raises(PolicyError, match=key):
        NodePolicy.from_node_config({key: value}, simulated=False)


def test_the_ledger_delta_is_the_nodes_not_the_servers():
    assert NodePolicy.from_node_config({}, simulated=True).delta == 1e-5
    assert NodePolicy.from_node_config({"delta": 1e-6}, simulated=True).delta == 1e-6


def test_a_query_with_a_delta_above_the_nodes_maximum_is_refused():
    with pytest.raises(QueryRejected, match="above this node's max-delta=0.0001"):
        ECOS_QUERY.parse(_query(delta=0.01), {})
    with pytest.raises(QueryRejected, match="extractor-hash"):  # past the delta check
        ECOS_QUERY.parse(_query(delta=0.01), {"max-delta": 0.05})  # the operator may allow it
