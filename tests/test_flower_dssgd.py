"""DSSGD through Flower, in process: real ServerApp and ClientApps, real serialisation, no Ray.

The participant's local model persists in `context.state`, the server applies exactly the
accepted uploads, schedules follow the paper, the DP ledger composes and refuses, and malformed
uploads are rejected with the node named while the others are applied.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flower_helpers import run_tiny, tiny_scenario
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

import ecos_flower.client.dssgd as dssgd_client
from ecos_flower.client.dssgd import STATE_INFO, STATE_PARAMS
from ecos_flower.client_app import app as client_app
from ecos_flower.data import load_federation
from ecos_flower.dssgd import ParameterServer, SparseUpdate, flatten_params, upload_count
from ecos_flower.dssgd.server import fraction_count
from ecos_flower.flower.dssgd_run import make_strategy
from ecos_flower.flower.inprocess import InProcessGrid, set_server_identity
from ecos_flower.flower.settings import client_config, merge_run_config
from ecos_flower.models import seeded_model
from ecos_flower.strategy import Dssgd

DSSGD = {"method": "dssgd", "model": "paper-mlp", "dssgd-epochs": 2}
_INITIAL: dict[Dssgd, ArrayRecord] = {}  # each strategy's initial model, sent in round 1


@pytest.fixture()
def scenario(tmp_path, flwr_home):
    return tiny_scenario(tmp_path)


def _setup(scenario, num_nodes: int = 3, client_apps=None, node_configs=None, **overrides):
    """A strategy from the run config, an in-process grid and the client config."""
    config = merge_run_config(
        {"scenario": str(scenario), "num-clients": num_nodes}, DSSGD, overrides
    )
    federation = load_federation(scenario, num_clients=num_nodes)
    model = seeded_model("paper-mlp", 0, federation.num_classes, 1, 8)
    strategy = make_strategy(config, federation.num_classes)
    _INITIAL[strategy] = ArrayRecord({"params": Array(flatten_params(model))})
    grid = InProcessGrid(client_app, num_nodes, client_apps=client_apps, node_configs=node_configs)
    return strategy, grid, client_config(config)


def _round(strategy, grid, config, server_round):
    arrays = _INITIAL[strategy] if server_round == 1 else ArrayRecord()
    messages = strategy.configure_train(server_round, arrays, config, grid)
    replies = list(grid.send_and_receive(messages))
    strategy.aggregate_train(server_round, replies)
    return messages, replies


def _upload(reply):
    record = reply.content["upload"]
    return record["indices"].numpy(), record["values"].numpy()


# ---------------------------------------------------------------------------- whole flow
def test_dssgd_flow_reports_local_and_server_accuracy_and_sparse_traffic(scenario):
    report, grid = run_tiny(scenario, **DSSGD)
    assert report.method == "dssgd"
    assert sorted(report.accuracy_per_client) == [0, 1, 2]
    assert all(0.0 <= a <= 1.0 for a in report.accuracy_per_client.values())
    extra = report.extra
    assert sorted(extra["server-accuracy-per-client"]) == [0, 1, 2]
    assert extra["server-rounds"] == 6  # round-robin: 2 epochs x 3 participants
    assert extra["uploads-accepted"] == 6 and extra["uploads-rejected"] == 0
    assert extra["uploads-accepted-per-client"] == {0: 2, 1: 2, 2: 2}
    assert math.isinf(report.epsilon) and report.delta == 0.0
    # Every participant kept its model (two local steps) in its node's state.
    for node in grid.node_ids:
        info = grid.contexts[node].state[STATE_INFO]
        assert int(info["steps"]) == 2 and int(info["num-params"]) == extra["num-params"]
    # theta_u = 0.1 up (int64 index + float32 value) vs the full download (theta_d = 1: the
    # float32 values alone, in index order).
    n = extra["num-params"]
    for sizes in extra["bytes-per-round"].values():
        assert sizes["rounds"] == 2
        assert 12 * upload_count(0.1, n) < sizes["up"] < 12 * upload_count(0.1, n) + 2_000
        assert 4 * n < sizes["down"] < 4 * n + 4_000


def test_the_next_step_starts_from_the_local_model_kept_in_state(scenario, monkeypatch):
    strategy, grid, config = _setup(scenario, **{"theta-d": 0.3})
    seen: list[tuple[np.ndarray, np.ndarray]] = []  # (params at entry, params after training)
    real_step = dssgd_client.local_step

    def spy(model, *args, **kwargs):
        entry = flatten_params(model)
        result = real_step(model, *args, **kwargs)
        seen.append((entry, flatten_params(model)))
        return result

    monkeypatch.setattr(dssgd_client, "local_step", spy)
    first = grid.node_ids[0]
    _round(strategy, grid, config, 1)
    after_first = grid.contexts[first].state[STATE_PARAMS]["params"].numpy().copy()
    np.testing.assert_array_equal(after_first, seen[0][1])
    for server_round in (2, 3):
        _round(strategy, grid, config, server_round)
    download = strategy._server.download(0.3)  # what round 4 sends
    messages, _ = _round(strategy, grid, config, 4)
    assert [m.metadata.dst_node_id for m in messages] == [first]
    # Round 4 trained the state's model with only the downloaded entries overwritten...
    expected = after_first.copy()
    expected[download.indices] = download.values
    np.testing.assert_array_equal(seen[3][0], expected)
    assert not np.array_equal(seen[3][0], strategy._server.params)  # theta_d < 1: not the server's
    # ... and the state now holds the model after that step.
    np.testing.assert_array_equal(
        grid.contexts[first].state[STATE_PARAMS]["params"].numpy(), seen[3][1]
    )
    assert int(grid.contexts[first].state[STATE_INFO]["steps"]) == 2


def test_the_server_applies_accepted_uploads_additively_and_counts_stat(scenario):
    strategy, grid, config = _setup(scenario, **{"dssgd-schedule": "parallel"})
    params = _INITIAL[strategy]["params"].numpy().copy()
    stat = np.zeros(params.shape, np.float64)
    for server_round in (1, 2):
        _, replies = _round(strategy, grid, config, server_round)
        assert len(replies) == 3
        for reply in replies:
            indices, values = _upload(reply)
            assert len(indices) == upload_count(0.1, strategy.num_params)
            params[indices] += values
            stat[indices] += 1
    np.testing.assert_allclose(strategy._server.params, params, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(strategy._server.stat, stat)
    assert strategy.accepted == 6 and strategy._server.num_applied == 6


def test_round_robin_cycles_over_nodes_sorted_by_id_and_random_is_a_permutation(scenario):
    strategy, grid, config = _setup(scenario)
    nodes = sorted(grid.node_ids)
    order = []
    for server_round in range(1, 7):
        messages, _ = _round(strategy, grid, config, server_round)
        order += [m.metadata.dst_node_id for m in messages]
        assert all(m.metadata.message_type == "train.dssgd" for m in messages)
    assert order == nodes + nodes
    assert [int(m.content["dssgd"]["epoch"]) for m in messages] == [1]
    random_strategy, _, _ = _setup(scenario, **{"dssgd-schedule": "random"})
    for start in (1, 4, 7):
        picked = [random_strategy.scheduled_nodes(r, nodes)[0] for r in range(start, start + 3)]
        assert sorted(picked) == nodes  # every pass visits everyone once
    assert random_strategy.num_rounds(2, 3) == 6
    parallel, _, _ = _setup(scenario, **{"dssgd-schedule": "parallel"})
    assert parallel.scheduled_nodes(1, nodes) == nodes and parallel.num_rounds(2, 3) == 2


# ------------------------------------------------------------------------------ privacy
DP = {"dssgd-epsilon": 5.0, "gamma": 0.001, "tau": 0.0001}


@pytest.mark.parametrize(("split", "per_step"), [("published", 25 / 9), ("corrected", 2.5)])
def test_dp_epsilon_per_participant_is_charged_at_the_svts_true_cost(
    scenario, tmp_path, split, per_step
):
    # With the test query |clip(dw)| of sensitivity gamma, the SVT costs eps1/2 + eps2/2: 5/9 of
    # dssgd-epsilon for the published split, 1/2 for the corrected one.
    ledgers = {i: {"ledger-path": str(tmp_path / f"ledger-{i}.json")} for i in range(3)}
    grid = InProcessGrid(client_app, 3, node_configs=ledgers)
    report, _ = run_tiny(scenario, grid=grid, **DSSGD, **DP, **{"svt-split": split})
    for client in range(3):
        stored = json.loads((tmp_path / f"ledger-{client}.json").read_text())
        assert [e["kind"] for e in stored["events"]] == ["laplace", "laplace"]
        assert [e["epsilon"] for e in stored["events"]] == pytest.approx([per_step, per_step])
        # One lifetime ledger: the two Laplace releases compose to at most their sum.
        assert per_step < report.epsilon_per_client[client] <= 2 * per_step * (1 + 1e-9)
        assert report.extra["epsilon-this-run"][client] == pytest.approx(2 * per_step)
    assert report.extra["epsilon-per-step"] == pytest.approx(per_step)


def test_a_participant_refuses_a_step_beyond_its_epsilon_limit(scenario, tmp_path):
    # Two steps cost at most 2 x 25/9 = 5.6; a third would pass 6: refused, not charged.
    ledgers = {
        i: {"ledger-path": str(tmp_path / f"ledger-{i}.json"), "epsilon-limit": 6.0}
        for i in range(3)
    }
    grid = InProcessGrid(client_app, 3, node_configs=ledgers)
    report, _ = run_tiny(scenario, grid=grid, **{**DSSGD, **DP, "dssgd-epochs": 3})
    assert report.extra["uploads-accepted"] == 6
    assert len(report.extra["refused"]) == 3
    assert all("budget exceeded" in r for r in report.extra["refused"].values())
    for client in range(3):
        assert report.epsilon_per_client[client] <= 6.0
        stored = json.loads((tmp_path / f"ledger-{client}.json").read_text())
        assert len(stored["events"]) == 2
    # A simulated node without a limit of its own is limited by nothing the server says.
    fresh = InProcessGrid(client_app, 3)
    unlimited, _ = run_tiny(scenario, grid=fresh, **{**DSSGD, **DP, "dssgd-epochs": 3})
    assert unlimited.extra["uploads-accepted"] == 9 and not unlimited.extra["refused"]


# ------------------------------------------------------------------ malformed uploads
def _tampered(change):
    """A ClientApp that runs the real step, then rewrites its upload with `change`."""

    def app(msg, context):
        reply = client_app(msg, context)
        indices, values = _upload(reply)
        metrics = reply.content["metrics"]
        content = change(indices.copy(), values.copy(), metrics)
        return Message(content=content, reply_to=msg)

    return app


def _content(indices, values, metrics):
    return RecordDict(
        {
            "upload": ArrayRecord(
                {"indices": Array(np.asarray(indices)), "values": Array(np.asarray(values))}
            ),
            "metrics": metrics,
        }
    )


def _without(metrics, key):
    return MetricRecord({k: v for k, v in metrics.items() if k != key})


MALFORMED = {
    "index out of range": (lambda i, v, m: _content(np.r_[i[:-1], 10**7], v, m), "out of range"),
    "negative index": (lambda i, v, m: _content(np.r_[-1, i[1:]], v, m), "index -1 out of range"),
    "duplicate indices": (lambda i, v, m: _content(np.r_[i[:-1], i[0]], v, m), "duplicate"),
    "NaN": (lambda i, v, m: _content(i, np.r_[np.float32(np.nan), v[1:]], m), "finite"),
    "too many entries": (
        lambda i, v, m: _content(np.arange(len(i) + 1), np.zeros(len(i) + 1, np.float32), m),
        "exceed the maximum",
    ),
    "float indices": (lambda i, v, m: _content(i.astype(np.float64), v, m), "must be integers"),
    "lengths differ": (lambda i, v, m: _content(i, v[:-1], m), "lengths must match"),
    "upload is a ConfigRecord": (
        lambda i, v, m: RecordDict({"upload": ConfigRecord({"indices": "all"}), "metrics": m}),
        "ConfigRecord",
    ),
    "extra array": (
        lambda i, v, m: RecordDict(
            {
                "upload": ArrayRecord({"indices": Array(i), "values": Array(v), "x": Array(v)}),
                "metrics": m,
            }
        ),
        "expected indices and values",
    ),
    "no metrics": (
        lambda i, v, m: RecordDict(
            {"upload": ArrayRecord({"indices": Array(i), "values": Array(v)})}
        ),
        "no MetricRecord 'metrics'",
    ),
    # (No partition-id at all is a node with its own data: it is keyed by its node id.)
    "fractional partition-id": (
        lambda i, v, m: _content(i, v, MetricRecord({**dict(m.items()), "partition-id": 0.5})),
        "is not an integer",
    ),
    "no epsilon-epoch": (
        lambda i, v, m: _content(i, v, _without(m, "epsilon-epoch")),
        "epsilon-epoch",
    ),
    "stolen partition-id": (
        lambda i, v, m: _content(i, v, MetricRecord({**dict(m.items()), "partition-id": 0})),
        "already claimed by node",
    ),
    "crash": (lambda i, v, m: (_ for _ in ()).throw(RuntimeError("boom")), "ClientApp error"),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_a_malformed_upload_is_rejected_naming_the_node(scenario, kind):
    change, expected = MALFORMED[kind]
    strategy, grid, config = _setup(
        scenario, client_apps={1: _tampered(change)}, **{"dssgd-schedule": "parallel"}
    )
    reference = ParameterServer(_INITIAL[strategy]["params"].numpy())
    _, replies = _round(strategy, grid, config, 1)
    bad = grid.node_ids[1]
    assert len(strategy.rejected) == 1
    error = strategy.rejected[0]
    assert error.node_id == bad and f"node {bad}" in str(error) and expected in str(error)
    # The good uploads were applied; the server holds exactly what they alone produce.
    good = [r for r in replies if r.metadata.src_node_id != bad]
    for reply in good:
        indices, values = _upload(reply)
        reference.apply(SparseUpdate(indices, values))
    np.testing.assert_array_equal(strategy._server.params, reference.params)
    np.testing.assert_array_equal(strategy._server.stat, reference.stat)
    assert strategy.accepted == 2 and bad not in strategy.node_clients


def test_dp_uploads_beyond_gamma_or_without_privacy_cost_are_rejected(scenario):
    def too_large(i, v, m):
        return _content(i, np.full_like(v, 0.5), m)

    def free(i, v, m):
        return _content(i, v, MetricRecord({**dict(m.items()), "epsilon-epoch": 0.0}))

    for change, expected in ((too_large, "outside the clip bound"), (free, "no privacy cost")):
        strategy, grid, config = _setup(
            scenario, client_apps={2: _tampered(change)}, **DP, **{"dssgd-schedule": "parallel"}
        )
        _round(strategy, grid, config, 1)
        assert [e.node_id for e in strategy.rejected] == [grid.node_ids[2]]
        assert expected in str(strategy.rejected[0]) and strategy.accepted == 2


def test_a_reply_from_a_node_that_was_not_scheduled_is_dropped(scenario):
    strategy, grid, config = _setup(scenario)
    messages = strategy.configure_train(1, _INITIAL[strategy], config, grid)
    (reply,) = grid.send_and_receive(messages)
    strategy.aggregate_train(1, [reply, reply])  # the second copy: answered twice
    assert strategy.accepted == 1 and "answered twice" in str(strategy.rejected[0])
    before = strategy._server.params.copy()
    strategy.aggregate_train(2, [reply])  # a replay in a later round
    assert "not scheduled" in str(strategy.rejected[-1])
    np.testing.assert_array_equal(strategy._server.params, before)


# --------------------------------------------------------------- client-side refusals
def _task_message(strategy, grid, config, field=None, value=None, download=None):
    (message,) = strategy.configure_train(1, _INITIAL[strategy], config, grid)
    if field is not None:
        message.content["dssgd"][field] = value
    if download is not None:
        message.content["download"] = download
    set_server_identity(1)
    message.metadata.__dict__["_message_id"] = "m1"
    return message


def _download(indices, values):
    return ArrayRecord({"indices": Array(np.asarray(indices)), "values": Array(np.asarray(values))})


@pytest.mark.parametrize(
    ("field", "value", "download", "reason"),
    [
        ("theta-u", 0.0, None, "theta-u=0.0 must lie in (0, 1]"),
        ("theta-d", 1.5, None, "theta-d=1.5 must lie in (0, 1]"),
        ("num-params", 12, None, "elements exceed the maximum 12"),
        ("num-params", 10**12, None, "num-params=1000000000000 outside 1..50000000"),
        ("upload-mode", "everything", None, "unknown upload-mode"),
        ("dp-epsilon", -1.0, None, "dp-epsilon=-1.0 must be"),
        ("tau", float("nan"), None, "tau=nan"),
        ("theta-d", 0.5, None, "expected indices and values"),
        ("theta-d", 0.99, "range", "bad download: index"),
        ("theta-d", 0.99, "nan", "bad download: values must be finite"),
        ("theta-d", 0.99, "dtype", "expected int64/float32"),
        (None, None, "dense-nan", "bad download: values must be finite"),
        (None, None, "dense-dtype", "expected (N,) float32"),
    ],
)
def test_the_participant_refuses_absurd_tasks_before_any_work(
    scenario, field, value, download, reason, tmp_path
):
    strategy, grid, config = _setup(scenario, 1)
    n = _INITIAL[strategy]["params"].numpy().size
    m = fraction_count(0.99, n)  # a partial download: indices and values
    payload = None
    if download == "range":
        payload = _download(np.r_[np.arange(m - 1), n], np.zeros(m, np.float32))
    elif download == "nan":
        payload = _download(np.arange(m), np.r_[np.float32(np.nan), np.zeros(m - 1, np.float32)])
    elif download == "dtype":
        payload = _download(np.arange(m, dtype=np.int32), np.zeros(m, np.float32))
    elif download == "dense-nan":  # theta_d = 1: the values alone
        payload = ArrayRecord(
            {"values": Array(np.r_[np.float32(np.nan), np.zeros(n - 1, np.float32)])}
        )
    elif download == "dense-dtype":
        payload = ArrayRecord({"values": Array(np.zeros(n, np.float64))})
    message = _task_message(strategy, grid, config, field, value, payload)
    if reason == "expected (N,) float32":
        reason = f"expected ({n},) float32"
    context = grid.contexts[grid.node_ids[0]]
    reply = dssgd_client.handle_dssgd_train(message, context)
    assert "refusal" in reply.content
    assert reason in reply.content["refusal"]["reason"]
    assert STATE_PARAMS not in context.state  # nothing was trained or kept


def test_the_participant_refuses_a_model_of_another_size(scenario):
    strategy, grid, config = _setup(scenario, 1)
    message = _task_message(strategy, grid, config)
    message.content["config"]["model"] = "small-cnn"
    reply = dssgd_client.handle_dssgd_train(message, grid.contexts[grid.node_ids[0]])
    assert "this node's small-cnn has" in reply.content["refusal"]["reason"]
