"""`ecos_flower.strategy.Ecos` run through its own `start()` on the in-process grid of real
ClientApps: the Result's metric records hold the per-client figures, malformed replies are
rejected naming the node while the round goes on, and bad constructor arguments are named."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flower_helpers import tiny_scenario
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Result, Strategy

from ecos_flower.client_app import app as client_app
from ecos_flower.data import load_federation
from ecos_flower.ecos import RandomSampler, make_extractor
from ecos_flower.flower.inprocess import InProcessGrid
from ecos_flower.flower.settings import client_config, merge_run_config
from ecos_flower.strategy import Ecos
from ecos_flower.strategy.ecos import per_client, supervised_fit

K, BUDGET = 8, 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    scenario = tiny_scenario(tmp_path_factory.mktemp("strategy-ecos"))
    federation = load_federation(scenario)
    extractor = make_extractor("pca", n_components=8).fit(federation.pool.images)
    # The server tells every client the label space (no client assumes a default).
    run_config = {"scenario": str(scenario), "num-classes": federation.num_classes}
    config = client_config(merge_run_config(run_config))
    return federation, extractor, config


def _ecos(setup, **overrides) -> Ecos:
    federation, extractor, _ = setup
    pool = federation.pool
    arguments = {
        "budget": BUDGET,
        "pool": pool,
        "extractor": extractor,
        "num_centroids": K,
        "fit_fn": supervised_fit(pool, num_classes=federation.num_classes, epochs=1),
        **overrides,
    }
    return Ecos(**arguments)


def _start(strategy: Ecos, setup, grid: InProcessGrid, **kwargs) -> Result:
    return strategy.start(grid, ArrayRecord(), timeout=60, train_config=setup[2], **kwargs)


def test_start_runs_the_protocol_and_reports_per_client_figures(setup, flwr_home):
    grid = InProcessGrid(client_app, 3)
    seen = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        seen.append((server_round, len(arrays)))
        return MetricRecord({"arrays": len(arrays)})

    strategy = _ecos(setup)
    assert isinstance(strategy, Strategy)
    result = _start(strategy, setup, grid, evaluate_fn=evaluate_fn)
    assert isinstance(result, Result)
    query = result.train_metrics_clientapp[1]
    assert query["answered"] == 3 and query["rejected"] == 0 and query["selected"] == BUDGET
    assert query["client-ids"] == [0, 1, 2]
    spent, sigma = per_client(query, "epsilon-spent"), per_client(query, "sigma")
    assert sorted(spent) == [0, 1, 2]
    assert all(0 < e <= 1.0 + 1e-9 for e in spent.values())  # one release at epsilon 1
    assert all(s > 0 for s in sigma.values())
    evaluation = result.evaluate_metrics_clientapp[1]
    accuracy = per_client(evaluation, "accuracy-per-client")
    assert sorted(accuracy) == [0, 1, 2] and all(0 <= a <= 1 for a in accuracy.values())
    assert evaluation["accuracy"] == pytest.approx(np.mean(list(accuracy.values())))
    assert evaluation["evaluated"] == 3
    # The cloud-trained model, the selection, who answered; server-side evaluation hooked in.
    assert len(result.arrays) > 0 and len(result.selection) == BUDGET
    assert len(set(result.selection.tolist())) == BUDGET
    assert sorted(result.node_to_client) == sorted(grid.node_ids)
    assert [r for r, _ in seen] == [0, 1] and seen[0][1] == 0 and seen[1][1] > 0
    assert result.dropped == [] and result.refused == {}
    assert set(result.phase_seconds) == {
        "compress",
        "query",
        "select",
        "cloud-training",
        "evaluate",
    }


def _bad_scores(msg: Message, context) -> Message:
    metrics = MetricRecord({"partition-id": 1, "sigma": 1.0, "epsilon-spent": 1.0})
    content = RecordDict({"scores": ArrayRecord([np.full(K, np.nan)]), "metrics": metrics})
    return Message(content=content, reply_to=msg)


def test_a_malformed_reply_is_rejected_naming_the_node_and_the_round_goes_on(setup, flwr_home):
    grid = InProcessGrid(client_app, 3, client_apps={1: _bad_scores})
    result = _start(_ecos(setup), setup, grid)
    bad = grid.node_ids[1]
    query = result.train_metrics_clientapp[1]
    assert query["answered"] == 2 and query["rejected"] == 1
    assert query["client-ids"] == [0, 2]
    (error,) = result.rejected["query"]
    assert error.node_id == bad and "non-finite" in str(error) and f"node {bad}" in str(error)
    dropped = {(e["phase"], e["node"]) for e in result.dropped}
    assert ("query", bad) in dropped and ("evaluate", bad) in dropped
    assert sorted(per_client(result.evaluate_metrics_clientapp[1], "accuracy-per-client")) == [
        0,
        2,
    ]


def test_too_few_answers_stop_the_run_naming_who_dropped(setup, flwr_home):
    grid = InProcessGrid(client_app, 3, client_apps={1: _bad_scores})
    with pytest.raises(RuntimeError, match="2 client\\(s\\) answered validly, fewer than"):
        _start(_ecos(setup, min_answers=3), setup, grid)


def test_a_selector_replaces_the_query_and_the_oracle_spends_no_privacy(setup, flwr_home):
    federation = setup[0]
    grid = InProcessGrid(client_app, 3)
    random = _ecos(setup, extractor=None, selector=RandomSampler(len(federation.pool), seed=0))
    result = _start(random, setup, grid)
    assert dict(result.train_metrics_clientapp[1]) == {"selected": BUDGET}
    assert result.evaluate_metrics_clientapp[1]["evaluated"] == 3
    assert "query" not in result.phase_seconds
    oracle = _start(_ecos(setup, noise=False), setup, InProcessGrid(client_app, 3))
    spent = per_client(oracle.train_metrics_clientapp[1], "epsilon-spent")
    assert sorted(spent) == [0, 1, 2] and all(math.isinf(e) for e in spent.values())


def test_the_unused_train_hooks_do_nothing(setup):
    strategy = _ecos(setup)
    grid = InProcessGrid(client_app, 2)
    assert list(strategy.configure_train(1, ArrayRecord(), setup[2], grid)) == []
    assert strategy.aggregate_train(1, []) == (None, None)
    messages = list(strategy.configure_evaluate(1, ArrayRecord(), setup[2], grid))
    assert sorted(m.metadata.dst_node_id for m in messages) == sorted(grid.node_ids)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"budget": 0}, "budget=0"),
        ({"budget": 2.5}, "budget=2.5"),
        ({"epsilon": 0.0}, "epsilon=0.0"),
        ({"delta": 1.0}, "delta=1.0"),
        ({"score_mode": "psychic"}, "score_mode='psychic'"),
        ({"score_mode": "radius", "radius": None}, "radius=None"),
        ({"max_per_sample": 0}, "max_per_sample=0"),
        ({"threshold_multiple": -1.0}, "threshold_multiple=-1.0"),
        ({"num_centroids": 10**6}, "num_centroids=1000000"),
        ({"fraction_query": 0.0}, "fraction_query=0.0"),
        ({"fraction_evaluate": 1.5}, "fraction_evaluate=1.5"),
        ({"min_answers": 0}, "min_answers=0"),
        ({"min_available_nodes": -1}, "min_available_nodes=-1"),
        ({"extractor": None}, "extractor=None"),
        ({"pool_features": np.full((3, 2), np.nan)}, "pool_features="),
        ({"pool_features": np.ones((5, 2))}, "5 rows for a pool"),
        ({"fit_fn": "train"}, "fit_fn="),
        ({"selector": object()}, "selector="),
    ],
)
def test_constructor_validation_names_the_argument(setup, overrides, named):
    with pytest.raises(ValueError, match=r"Ecos\(") as info:
        _ecos(setup, **overrides)
    assert named in str(info.value)
