"""Shared helpers for the Flower tests: a tiny embedded scenario and an in-process run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.app import Error, Message, RecordDict

from ecos_flower.client_app import app as client_app
from ecos_flower.flower.inprocess import InProcessGrid, run_in_process, set_server_identity
from ecos_flower.flower.report import RunReport
from ecos_flower.flower.settings import merge_run_config
from ecos_flower.server_app import make_server_app
from ecos_flower.testing.scenarios import write_tiny_scenario

FAST = {
    "num-server-rounds": 1,
    "local-epochs": 1,
    "budget": 60,
    "num-centroids": 8,
    "extractor": "pca",
    "pca-components": 16,
    "cloud-epochs": 2,
}


def tiny_scenario(folder: Path, num_clients: int = 3) -> Path:
    """Write a two-domain embedded scenario with 8x8 images; returns its path."""
    return write_tiny_scenario(folder, num_clients)


def run_tiny(
    scenario: Path, num_clients: int = 3, grid: InProcessGrid | None = None, **overrides: Any
) -> tuple[RunReport, InProcessGrid]:
    """Run the ServerApp on an in-process grid of real ClientApps; returns (report, grid)."""
    config = merge_run_config(FAST, {"scenario": str(scenario)}, overrides)
    grid = grid or InProcessGrid(client_app, num_clients)
    reports: list[RunReport] = []
    run_in_process(make_server_app(config, on_report=reports.append), grid)
    assert len(reports) == 1
    return reports[0], grid


SERVER_NODE = 1


def server_message(node: int, message_type: str, content: RecordDict | None = None) -> Message:
    """A server message to `node`, stamped as the grid would."""
    set_server_identity(SERVER_NODE)
    msg = Message(content or RecordDict(), node, message_type, group_id="1")
    msg.metadata.__dict__["_message_id"] = f"{message_type}-{node}"
    msg.metadata.__dict__["_src_node_id"] = SERVER_NODE
    return msg


def reply_from(node: int, message_type: str, content: RecordDict | Error) -> Message:
    """`node`'s reply to a `message_type` message, as the grid would hand it to the strategy."""
    reply = Message(content, reply_to=server_message(node, message_type))
    reply.metadata.__dict__["_src_node_id"] = node
    reply.metadata.__dict__["_dst_node_id"] = SERVER_NODE
    return reply
