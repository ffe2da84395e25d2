"""The run's stop message when fewer than `min-clients` answer names every node that was left
out and why: those that failed (invalid reply, crash, timeout) and those that refused."""

from __future__ import annotations

import numpy as np
import pytest
from flower_helpers import tiny_scenario
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from ecos_flower.client_app import app as client_app
from ecos_flower.data import load_federation
from ecos_flower.ecos import make_extractor
from ecos_flower.flower.inprocess import InProcessGrid
from ecos_flower.flower.settings import client_config, merge_run_config
from ecos_flower.flower.validation import TOO_FEW_LISTED, too_few_message
from ecos_flower.strategy import Ecos
from ecos_flower.strategy.ecos import supervised_fit

K = 8


def test_the_message_names_dropped_and_refusing_nodes():
    events = [{"node": 5, "reason": "no reply within the timeout"}]
    text = too_few_message("ECOS query", 1, 3, events, {9: "epsilon limit reached", 7: "x"})
    assert text == (
        "ECOS query: 1 client(s) answered validly, fewer than min-clients=3; dropped: node 5: "
        "no reply within the timeout; refused: node 7: x; node 9: epsilon limit reached"
    )
    many = [{"node": n, "reason": "r"} for n in range(TOO_FEW_LISTED + 3)]
    assert "and 3 more" in too_few_message("q", 0, 1, many)


def _refusing(msg: Message, context) -> Message:
    refusal = ConfigRecord({"reason": "this node's epsilon-limit is spent"})
    return Message(content=RecordDict({"refusal": refusal}), reply_to=msg)


def _invalid(msg: Message, context) -> Message:
    metrics = MetricRecord({"partition-id": 2, "sigma": 1.0, "epsilon-spent": 1.0})
    content = RecordDict({"scores": ArrayRecord([np.full(K, np.nan)]), "metrics": metrics})
    return Message(content=content, reply_to=msg)


def test_an_ecos_run_stopped_by_min_clients_names_each_left_out_node(tmp_path, flwr_home):
    scenario = tiny_scenario(tmp_path)
    federation = load_federation(scenario)
    pool = federation.pool
    extractor = make_extractor("pca", n_components=8).fit(pool.images)
    config = client_config(
        merge_run_config({"scenario": str(scenario), "num-classes": federation.num_classes})
    )
    strategy = Ecos(
        budget=40,
        pool=pool,
        extractor=extractor,
        num_centroids=K,
        fit_fn=supervised_fit(pool, num_classes=federation.num_classes, epochs=1),
        min_answers=2,
    )
    grid = InProcessGrid(client_app, 3, client_apps={1: _refusing, 2: _invalid})
    refusing, invalid = grid.node_ids[1], grid.node_ids[2]
    with pytest.raises(RuntimeError) as raised:
        strategy.start(grid, ArrayRecord(), timeout=60, train_config=config)
    text = str(raised.value)
    assert "1 client(s) answered validly, fewer than min-clients=2" in text
    assert f"node {refusing}: this node's epsilon-limit is spent" in text
    assert f"node {invalid}: " in text and "non-finite" in text
