"""Malformed or malicious ECOS replies are rejected with the node named; the round goes on with
the others and the query tally only ever holds the good replies."""

from __future__ import annotations

import numpy as np
import pytest
from flower_helpers import tiny_scenario
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from ecos_flower.client.ecos import handle_ecos_query
from ecos_flower.client_app import app as client_app
from ecos_flower.data import load_federation
from ecos_flower.ecos import compress, make_extractor
from ecos_flower.flower.inprocess import InProcessGrid
from ecos_flower.flower.settings import client_config, merge_run_config
from ecos_flower.strategy.ecos_query import QuerySettings, QueryTally, query_messages

K = 6


def _reply(msg: Message, scores=None, metrics=None, extra=None) -> Message:
    content = RecordDict()
    if scores is not None:
        content["scores"] = ArrayRecord([np.asarray(scores)])
    if metrics is not None:
        content["metrics"] = metrics
    for key, value in (extra or {}).items():
        content[key] = value
    return Message(content=content, reply_to=msg)


def _good_metrics(partition: int = 9, sigma: float = 3.0) -> MetricRecord:
    return MetricRecord({"partition-id": partition, "sigma": sigma, "epsilon-spent": 1.0})


MALFORMED = {
    "wrong length": (lambda m: _reply(m, np.ones(K + 1), _good_metrics()), "shape (7,)"),
    "NaN": (lambda m: _reply(m, np.r_[np.ones(K - 1), np.nan], _good_metrics()), "non-finite"),
    "inf": (lambda m: _reply(m, np.r_[np.ones(K - 1), np.inf], _good_metrics()), "non-finite"),
    "integer dtype": (lambda m: _reply(m, np.ones(K, dtype=np.int64), _good_metrics()), "dtype"),
    "2-d scores": (lambda m: _reply(m, np.ones((K, 1)), _good_metrics()), "shape"),
    "strings for scores": (
        lambda m: _reply(m, None, _good_metrics(), {"scores": ConfigRecord({"0": "many"})}),
        "ConfigRecord",
    ),
    "no scores": (lambda m: _reply(m, None, _good_metrics()), "no ArrayRecord 'scores'"),
    "two arrays": (
        lambda m: _reply(
            m, None, _good_metrics(), {"scores": ArrayRecord([np.ones(K), np.ones(K)])}
        ),
        "holds 2 arrays",
    ),
    "claims no noise": (lambda m: _reply(m, np.ones(K), _good_metrics(sigma=0.0)), "sigma=0"),
    "negative partition": (
        lambda m: _reply(
            m, np.ones(K), MetricRecord({"partition-id": -4, "sigma": 1.0, "epsilon-spent": 1.0})
        ),
        "partition-id",
    ),
    "crash": (lambda m: (_ for _ in ()).throw(RuntimeError("boom")), "ClientApp error"),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ecos-validation")
    scenario = tiny_scenario(folder)
    config = merge_run_config({"scenario": str(scenario)})
    federation = load_federation(scenario)
    extractor = make_extractor("pca", n_components=8).fit(federation.pool.images)
    compression = compress(extractor.transform(federation.pool.images), K, seed=0)
    return config, extractor, compression


def _round(setup, client_apps, monkeypatch, tmp_path):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    config, extractor, compression = setup
    grid = InProcessGrid(client_app, 3, client_apps=client_apps)
    tally = QueryTally(K, threshold_multiple=0.0)
    messages = query_messages(
        QuerySettings(epsilon=1.0, delta=1e-5),
        compression.centroids,
        extractor,
        client_config(config),
        grid.get_node_ids(),
    )
    replies = grid.send_and_receive(messages)
    return tally, grid, replies


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_a_malformed_reply_is_rejected_naming_the_node(kind, setup, monkeypatch, tmp_path):
    make_reply, expected = MALFORMED[kind]
    tally, grid, replies = _round(
        setup, {1: lambda msg, ctx: make_reply(msg)}, monkeypatch, tmp_path
    )
    tally.add(replies)
    aggregated = tally.aggregate()
    bad_node = grid.node_ids[1]
    assert len(tally.rejected) == 1
    error = tally.rejected[0]
    assert error.node_id == bad_node
    assert f"node {bad_node}" in str(error) and expected in str(error)
    # The round went on with the two good clients, and only their scores entered the state.
    assert sorted(tally.scores) == [grid.node_ids[0], grid.node_ids[2]]
    expected_sum = np.clip(sum(tally.scores.values()), 0.0, None)
    np.testing.assert_allclose(aggregated, expected_sum)
    assert bad_node not in tally.sigmas and bad_node not in tally.node_to_client


def test_a_second_answer_from_the_same_node_is_dropped(setup, monkeypatch, tmp_path):
    tally, grid, replies = _round(setup, {}, monkeypatch, tmp_path)
    replies = list(replies)
    tally.add(replies + [replies[0]])
    assert len(tally.scores) == 3
    assert len(tally.rejected) == 1 and "answered twice" in str(tally.rejected[0])
    # Answering again in a later call of the same query is refused too, state unchanged.
    before = {n: s.copy() for n, s in tally.scores.items()}
    tally.add([replies[1]])
    assert "already answered" in str(tally.rejected[-1])
    for node, scores in before.items():
        np.testing.assert_array_equal(tally.scores[node], scores)


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("num-centroids", 10**9, "num-centroids=1000000000 outside"),
        ("dim", 10**7, "dim=10000000 outside"),
        ("epsilon", -1.0, "epsilon=-1.0 must be"),
        ("delta", 2.0, "delta=2.0 must lie"),
        ("score-mode", "psychic", "unknown score-mode"),
    ],
)
def test_the_client_refuses_absurd_queries_before_any_work(
    setup, field, value, reason, monkeypatch, tmp_path
):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    config, extractor, compression = setup
    grid = InProcessGrid(client_app, 1)
    (message,) = query_messages(
        QuerySettings(), compression.centroids, extractor, client_config(config), grid.node_ids
    )
    message.content["ecos"][field] = value
    from ecos_flower.flower.inprocess import set_server_identity

    set_server_identity(1)
    message.metadata.__dict__["_message_id"] = "m1"
    reply = handle_ecos_query(message, grid.contexts[grid.node_ids[0]])
    assert "refusal" in reply.content
    assert reason in reply.content["refusal"]["reason"]
    assert not (tmp_path / "ecos-ledgers").exists()  # nothing was charged
