"""Client-level DP-FedAvg averages with uniform weights, as its noise calibration assumes: every
client reports the weight 1, and a client claiming more is dropped with its node named."""

from __future__ import annotations

import pytest
from flower_helpers import run_tiny, tiny_scenario
from flwr.app import Message, MetricRecord

from ecos_flower.client_app import app as client_app
from ecos_flower.flower.inprocess import InProcessGrid


@pytest.fixture()
def scenario(tmp_path, flwr_home):
    return tiny_scenario(tmp_path)


def _recording(seen: list[float]):
    def app(msg: Message, context):
        reply = client_app(msg, context)
        if msg.metadata.message_type == "train.dpfedavg":
            seen.append(float(reply.content["metrics"]["num-examples"]))
        return reply

    return app


def test_every_client_reports_the_uniform_weight_whatever_its_size(scenario):
    seen: list[float] = []
    report, _ = run_tiny(scenario, grid=InProcessGrid(_recording(seen), 3), method="dp-fedavg")
    assert seen and set(seen) == {1.0}
    assert sorted(report.accuracy_per_client) == [0, 1, 2]
    assert "central DP" in report.extra["privacy-unit"]


def test_a_client_claiming_a_large_weight_is_dropped_and_named(scenario):
    def heavy(msg: Message, context):
        reply = client_app(msg, context)
        if msg.metadata.message_type == "train.dpfedavg" and "metrics" in reply.content:
            metrics = dict(reply.content["metrics"].items())
            reply.content["metrics"] = MetricRecord({**metrics, "num-examples": 1000})
        return reply

    grid = InProcessGrid(client_app, 3, client_apps={1: heavy})
    report, grid = run_tiny(scenario, grid=grid, method="dp-fedavg")
    assert sorted(report.accuracy_per_client) == [0, 1, 2]  # it still evaluates
    # The strategy dropped node 1's update and said why; the others were averaged.
    problems = report.extra["problems"]
    assert list(problems) == [str(grid.node_ids[1])]
    assert "num-examples=1000" in problems[str(grid.node_ids[1])]
