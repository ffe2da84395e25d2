"""The whole message flow of each method, in process: real ServerApp, real ClientApps, real
serialisation, no Ray."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flower_helpers import reply_from, run_tiny, tiny_scenario
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from ecos_flower.client_app import app as client_app
from ecos_flower.flower.fedavg import RecordingFedAvg
from ecos_flower.flower.inprocess import InProcessGrid
from ecos_flower.flower.report import RECORD_KEYS
from ecos_flower.flower.settings import DEFAULT_RUN_CONFIG


@pytest.fixture()
def scenario(tmp_path, flwr_home):
    return tiny_scenario(tmp_path)


def test_fedavg_reports_every_client_and_meters_model_traffic(scenario):
    report, grid = run_tiny(scenario, method="fedavg", **{"num-server-rounds": 2})
    assert sorted(report.accuracy_per_client) == [0, 1, 2]
    assert all(0.0 <= a <= 1.0 for a in report.accuracy_per_client.values())
    assert math.isinf(report.epsilon)
    # Each round a client downloads the model twice (train, evaluate) and uploads it once.
    model_bytes = 4 * sum(p.numel() for p in _small_cnn_params(8))
    for client in range(3):
        assert report.bytes_up_per_client[client] >= 2 * model_bytes
        assert report.bytes_down_per_client[client] >= 4 * model_bytes
        assert report.bytes_down_per_client[client] > report.bytes_up_per_client[client]


def _small_cnn_params(size: int):
    from ecos_flower.models import SmallCNN

    return list(SmallCNN(10, 1).parameters())


def test_fedavg_aggregate_does_not_depend_on_the_order_replies_arrive_in():
    """Flower samples nodes in random order; the average must be bitwise the same anyway, or
    the same seed would not repeat (float sums depend on their order)."""
    rng = np.random.default_rng(0)
    replies = [
        reply_from(
            node,
            "train",
            RecordDict(
                {
                    "arrays": ArrayRecord([rng.normal(size=(64, 33)).astype(np.float32)]),
                    "metrics": MetricRecord({"num-examples": int(rng.integers(5, 50))}),
                }
            ),
        )
        for node in range(2, 12)
    ]
    averages = []
    for order in (replies, replies[::-1], [replies[i] for i in rng.permutation(10)]):
        arrays, _ = RecordingFedAvg().aggregate_train(1, order)
        averages.append(arrays.to_numpy_ndarrays()[0])
    assert np.array_equal(averages[0], averages[1]) and np.array_equal(averages[0], averages[2])


def test_a_non_finite_reply_counts_as_the_model_sent_and_is_named(flwr_home):
    # One diverged or hostile client used to make the global model NaN for the rest of the run
    # (DP-FedAvg from round 3 on); its reply is now a zero update, named, and kept in the
    # average so a DP wrapper's divisor is unchanged.
    grid = InProcessGrid(client_app, 2)
    sent = ArrayRecord([np.ones((4, 3), dtype=np.float32)])
    strategy = RecordingFedAvg()
    strategy.configure_train(1, sent, ConfigRecord(), grid)
    good, bad = grid.node_ids
    nan = np.full((4, 3), np.nan, dtype=np.float32)
    replies = [
        reply_from(
            node,
            "train",
            RecordDict(
                {"arrays": ArrayRecord([values]), "metrics": MetricRecord({"num-examples": 1})}
            ),
        )
        for node, values in ((good, np.full((4, 3), 3.0, dtype=np.float32)), (bad, nan))
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], 2.0)  # (3 + 1) / 2
    assert set(strategy.errors) == {bad} and "non-finite" in strategy.errors[bad]


@pytest.mark.parametrize("method", ["fedavg", "dp-fedavg"])
def test_a_client_whose_training_diverges_sends_back_the_model_it_received(scenario, method):
    # For DP-FedAvg the zero update also passes Flower's clipping mod (which divides by the
    # update's norm: it raised ZeroDivisionError, and one error reply made FedAvg skip the round).
    sent, returned = [], []

    def recording(message, context):
        reply = client_app(message, context)
        if message.metadata.message_type.startswith("train"):
            assert not reply.has_error(), reply.error.reason
            sent.append(message.content["arrays"].to_numpy_ndarrays())
            returned.append(reply.content["arrays"].to_numpy_ndarrays())
        return reply

    grid = InProcessGrid(client_app, 3, client_apps=dict.fromkeys(range(3), recording))
    # A learning rate that makes local SGD overflow on every client.
    run_tiny(scenario, grid=grid, method=method, **{"learning-rate": 1e30})
    assert len(returned) == 3
    for before, after in zip(sent, returned, strict=True):
        assert all(np.array_equal(b, a) for b, a in zip(before, after, strict=True))


def test_ecos_flow_spends_the_requested_epsilon_and_uploads_k_numbers(scenario):
    report, grid = run_tiny(scenario, method="ecos", epsilon=0.5)
    assert sorted(report.accuracy_per_client) == [0, 1, 2]
    # One Gaussian release calibrated to (0.5, 1e-5) costs exactly 0.5 under exact composition.
    for eps in report.epsilon_per_client.values():
        assert eps == pytest.approx(0.5, rel=1e-6)
    assert report.delta == 1e-5
    # K = 8 float64 scores plus a few metrics: far below the extractor download.
    for client in range(3):
        assert report.bytes_up_per_client[client] < 2_000
        assert report.bytes_down_per_client[client] > 10 * report.bytes_up_per_client[client]
    assert report.extra["answered"] == 3
    assert report.extra["selected"] == 60
    assert 0.0 <= report.extra["domain-precision"] <= 1.0


@pytest.mark.parametrize(
    ("method", "unit", "budget"), [("ecos", "record", 60), ("fedavg", "none", None)]
)
def test_a_server_apps_results_json_has_the_documented_record_schema(
    scenario, tmp_path, method, unit, budget
):
    # A ServerApp run with `results-dir` (how `flwr run` writes results) writes the same record
    # as `ecos-flower compare`: privacy unit, budget and domain precision at the top level.
    report, _ = run_tiny(scenario, method=method, **{"results-dir": str(tmp_path / "out")})
    (record,) = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(RECORD_KEYS) <= set(record)
    assert (record["method"], record["privacy_unit"], record["budget"]) == (method, unit, budget)
    assert record["accuracy_mean"] == pytest.approx(report.accuracy_mean)
    assert set(record["accuracy_per_client"]) == {"0", "1", "2"}
    if method == "ecos":  # each client's ledger total; a non-private method charges none
        assert set(record["epsilon_per_client"]) == {"0", "1", "2"}
        assert record["domain_precision"] == report.extra["domain-precision"]
    else:
        assert record["epsilon_per_client"] == {} and record["epsilon"] == "inf"


def test_ecos_client_keeps_its_ledger_in_state_dir_and_refuses_beyond_its_limit(scenario, tmp_path):
    ledgers = {
        i: {"ledger-path": str(tmp_path / f"ledger-{i}.json"), "epsilon-limit": 1.2}
        for i in range(3)
    }
    grid = InProcessGrid(client_app, 3, node_configs=ledgers)
    first, _ = run_tiny(scenario, grid=grid, method="ecos", epsilon=1.0)
    assert len(first.epsilon_per_client) == 3
    stored = json.loads((tmp_path / "ledger-0.json").read_text())
    assert len(stored["events"]) == 1
    # A second query at epsilon 1 would compose to about 1.46 > 1.2: every client refuses.
    fresh_grid = InProcessGrid(client_app, 3, node_configs=ledgers)
    with pytest.raises(RuntimeError, match="no client answered"):
        run_tiny(scenario, grid=fresh_grid, method="ecos", epsilon=1.0)
    stored = json.loads((tmp_path / "ledger-0.json").read_text())
    assert len(stored["events"]) == 1  # the refused query was not charged


@pytest.mark.parametrize("method", ["random", "kcenter", "oracle", "in-domain"])
def test_baseline_samplers_run_through_the_same_flow(scenario, method):
    report, _ = run_tiny(scenario, method=method)
    assert sorted(report.accuracy_per_client) == [0, 1, 2]
    assert report.extra["selected"] == 60
    if method in ("random", "kcenter"):
        assert report.epsilon == 0.0  # they never read client data
    else:
        assert math.isinf(report.epsilon)
    if method == "in-domain":
        assert report.extra["domain-precision"] == 1.0


def test_pyproject_run_config_matches_the_code_defaults():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == DEFAULT_RUN_CONFIG


def test_unknown_method_is_a_clear_error(scenario):
    with pytest.raises(ValueError, match="unknown method 'fedsgd'"):
        run_tiny(scenario, method="fedsgd")


def test_inprocess_grid_turns_a_crashing_client_into_an_error_reply(scenario):
    def crashing(msg, context):
        raise RuntimeError("disk on fire")

    grid = InProcessGrid(client_app, 3, client_apps={1: crashing})
    report, _ = run_tiny(scenario, grid=grid, method="random")
    assert sorted(report.accuracy_per_client) == [0, 2]
    assert np.isfinite(report.accuracy_mean)
