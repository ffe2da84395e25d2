"""`ecos_flower.strategy.Dssgd` run by Flower's own `Strategy.start()` on the in-process grid (a
minimal in-memory ClientApp over tiny synthetic train sets), its Result's metric records, the
drop / min-clients rule, and constructor validation naming the argument."""

from __future__ import annotations

import numpy as np
import pytest
from dssgd_helpers import tiny_data, tiny_model
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from ecos_flower.dssgd import flatten_params, svt_scales, upload_count
from ecos_flower.dssgd.simulate import DSSGDConfig
from ecos_flower.flower.dssgd_simulation import memory_client_app
from ecos_flower.flower.inprocess import InProcessGrid
from ecos_flower.strategy import Dssgd
from ecos_flower.strategy.dssgd import CLIENT_FIGURES, client_key, per_client

NODES = 3


def _grid(client_apps=None) -> tuple[InProcessGrid, list[str]]:
    """An in-process grid of NODES in-memory participants; also the message types they saw."""
    app = memory_client_app(
        [tiny_data(24, s) for s in range(NODES)],
        [tiny_data(30, 100 + s) for s in range(NODES)],
        tiny_model,
        DSSGDConfig(batch_size=8),
    )
    seen: list[str] = []

    def logged(msg, context):
        seen.append(msg.metadata.message_type)
        return app(msg, context)

    return InProcessGrid(logged, NODES, client_apps=client_apps), seen


def _start(strategy: Dssgd, grid: InProcessGrid, epochs: int = 2):
    initial = ArrayRecord({"params": Array(flatten_params(tiny_model()))})
    return strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=strategy.num_rounds(epochs, NODES),
        timeout=60,
        train_config=ConfigRecord({"seed": 0, "num-classes": 3}),
        evaluate_config=ConfigRecord(),
    )


def test_round_robin_through_start_returns_the_per_client_figures_in_the_result():
    strategy = Dssgd(theta_u=0.5, evaluate_every=4)
    grid, seen = _grid()
    result = _start(strategy, grid)
    # 2 epochs x 3 participants, one per round; evaluated at round 4 and at the last round.
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3, 4, 5, 6]
    assert all(int(r["accepted"]) == 1 for r in result.train_metrics_clientapp.values())
    assert sorted(result.evaluate_metrics_clientapp) == [4, 6]
    assert seen.count("train.dssgd") == 6 and seen.count("evaluate.dssgd") == 2 * NODES
    final = result.evaluate_metrics_clientapp[6]
    assert per_client(final, "uploads-accepted") == {0: 2, 1: 2, 2: 2}
    assert per_client(final, "local-steps") == {0: 2, 1: 2, 2: 2}
    accuracy = per_client(final, "accuracy")
    assert sorted(accuracy) == [0, 1, 2] and all(0 <= a <= 1 for a in accuracy.values())
    assert final["accuracy"] == pytest.approx(np.mean(list(accuracy.values())))
    assert sorted(per_client(final, "server-accuracy")) == [0, 1, 2]
    assert int(final["uploads-accepted"]) == 6 and int(final["uploads-rejected"]) == 0
    assert client_key("epsilon-spent", 0) not in final  # no DP: no budget figures
    # Round 4 saw the participants' state after 4 steps: client 0 had taken its second.
    assert per_client(result.evaluate_metrics_clientapp[4], "local-steps") == {0: 2, 1: 1, 2: 1}
    # The Result's arrays are the parameter server's, and the view says who is who.
    params = result.arrays["params"].numpy()
    np.testing.assert_array_equal(params, strategy._server.params)
    assert params.shape == (strategy.num_params,)
    assert sorted(strategy.node_clients.values()) == [0, 1, 2]
    assert strategy.rejected == () and strategy.dropped == []
    # start() again: a fresh run, the same numbers (non-DP in-process runs are deterministic).
    again = _start(strategy, _grid()[0])
    np.testing.assert_array_equal(again.arrays["params"].numpy(), params)
    assert dict(again.evaluate_metrics_clientapp[6].items()) == dict(final.items())


def test_parallel_dp_run_reports_each_clients_epsilon():
    strategy = Dssgd(theta_u=0.1, schedule="parallel", gamma=1e-3, tau=1e-4, dp_epsilon=1.0)
    grid, seen = _grid()
    result = _start(strategy, grid, epochs=2)
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert all(int(r["accepted"]) == NODES for r in result.train_metrics_clientapp.values())
    assert sorted(result.evaluate_metrics_clientapp) == [2]  # evaluate_every 0: the last round
    final = result.evaluate_metrics_clientapp[2]
    per_step = svt_scales(1.0, upload_count(0.1, strategy.num_params), 1e-3).epsilon_spent
    assert per_step == pytest.approx(5 / 9)
    assert per_client(final, "epsilon-run") == pytest.approx(dict.fromkeys(range(3), 2 * per_step))
    assert per_client(final, "epsilon-spent") == pytest.approx(per_client(final, "epsilon-run"))
    assert per_client(final, "delta") == dict.fromkeys(range(3), 0.0)
    assert strategy.epsilon_per_step() == pytest.approx(per_step)
    assert set(CLIENT_FIGURES) == {key.split("/")[0] for key in final if "/" in key}


def _crash(msg, context):
    raise RuntimeError("boom")


def _refuse(msg, context):
    content = RecordDict({"refusal": ConfigRecord({"reason": "privacy budget exceeded"})})
    return Message(content, reply_to=msg)


def test_a_round_below_min_clients_raises_naming_the_failed_nodes():
    grid, _ = _grid(client_apps={1: _crash})
    strategy = Dssgd(schedule="parallel", min_clients=3)
    with pytest.raises(RuntimeError) as raised:
        _start(strategy, grid)
    text = str(raised.value)
    bad = grid.node_ids[1]
    assert "DSSGD round 1: 2 client(s) answered validly, fewer than min-clients=3" in text
    assert f"node {bad}: ClientApp error" in text
    # With min_clients=2 the run goes on without it, and names it in `dropped`.
    strategy = Dssgd(schedule="parallel", min_clients=2)
    result = _start(strategy, _grid(client_apps={1: _crash})[0])
    assert [(e["phase"], e["round"], e["node"]) for e in strategy.dropped] == [
        ("train", 1, bad),
        ("train", 2, bad),
        ("evaluate", 2, bad),
    ]
    assert sorted(per_client(result.evaluate_metrics_clientapp[2], "accuracy")) == [0, 2]


def test_a_refusal_is_an_answer_not_a_drop():
    strategy = Dssgd(schedule="parallel", min_clients=3)
    grid, _ = _grid(client_apps={2: _refuse})
    with pytest.raises(RuntimeError, match="DSSGD evaluation: 2 client"):
        _start(strategy, grid)  # every train round passes; its evaluation refusal counts too
    assert strategy.refused == {grid.node_ids[2]: "privacy budget exceeded"}
    assert [e["phase"] for e in strategy.dropped] == []


def test_a_run_in_which_every_upload_was_refused_is_an_error_naming_each_node():
    # Every node refuses every training step but answers evaluation: Flower's loop completes,
    # and start() says that no model was trained instead of returning the initial one.
    grid, _ = _grid()
    answer = grid.apps[grid.node_ids[0]]

    def refuse_training(msg, context):
        if msg.metadata.message_type.startswith("train"):
            return _refuse(msg, context)
        return answer(msg, context)

    grid.apps = dict.fromkeys(grid.node_ids, refuse_training)
    with pytest.raises(RuntimeError, match="DSSGD accepted no upload in 2 round") as raised:
        _start(Dssgd(schedule="parallel"), grid)
    for node in grid.node_ids:
        assert f"node {node}: refused: privacy budget exceeded" in str(raised.value)


def test_min_clients_above_the_connected_nodes_is_refused():
    with pytest.raises(RuntimeError, match="min-clients=4 but only 3 node"):
        _start(Dssgd(min_clients=4), _grid()[0])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"theta_u": 0.0}, "theta_u"),
        ({"theta_d": 1.5}, "theta_d"),
        ({"schedule": "sometimes"}, "schedule"),
        ({"upload_mode": "all"}, "upload_mode"),
        ({"svt_split": "half"}, "svt_split"),
        ({"gamma": -1.0}, "gamma"),
        ({"tau": float("nan")}, "tau"),
        ({"dp_epsilon": 0.0, "gamma": 1e-3}, "dp_epsilon"),
        ({"dp_epsilon": 1.0}, "gamma"),
        ({"beta": 2.0}, "beta"),
        ({"decay_every": -1}, "decay_every"),
        ({"min_clients": 0}, "min_clients"),
        ({"evaluate_every": 1.5}, "evaluate_every"),
        ({"num_classes": 1}, "num_classes"),
    ],
)
def test_constructor_errors_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        Dssgd(**kwargs)


def test_the_number_of_classes_is_never_assumed():
    initial = ArrayRecord({"params": Array(flatten_params(tiny_model()))})
    with pytest.raises(ValueError, match="num-classes"):
        Dssgd().start(grid=_grid()[0], initial_arrays=initial, num_rounds=1)
    strategy = Dssgd(schedule="parallel")
    _start(strategy, _grid()[0], epochs=1)
    assert strategy.num_classes == 3  # read from the train config


def test_start_needs_rounds_and_an_initial_model():
    with pytest.raises(ValueError, match="num_rounds"):
        Dssgd().start(grid=_grid()[0], initial_arrays=ArrayRecord(), num_rounds=0)
    with pytest.raises(ValueError, match="initial model"):
        Dssgd().start(grid=_grid()[0], initial_arrays=ArrayRecord(), num_rounds=1)
