"""Bytes on the wire, measured from the real Flower messages; a Grid wrapper that meters them."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.run import Run


def payload_bytes(message: Message) -> int:
    """Serialised size of a message: the sum of its deflated objects, as Flower transfers them."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def reported_compute_seconds(reply: Message) -> float:
    """The `compute-s` metric a ClientApp adds to its replies (0 when absent or implausible)."""
    if reply.has_error() or "metrics" not in reply.content:
        return 0.0
    record = reply.content["metrics"]
    value = record.get("compute-s", 0.0) if isinstance(record, MetricRecord) else 0.0
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value) if 0.0 <= value < 1e7 else 0.0


class MeteredGrid(Grid):
    """Delegates to a real Grid and counts bytes sent to (down) and received from (up) each node.

    Wrapping the grid, not the strategy, meters Flower's own strategies as well as ours.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.bytes_down: dict[int, int] = defaultdict(int)
        self.bytes_up: dict[int, int] = defaultdict(int)
        self.messages_down: dict[int, int] = defaultdict(int)
        self.messages_up: dict[int, int] = defaultdict(int)
        self.compute_seconds: dict[int, float] = defaultdict(float)

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def _count_down(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.bytes_down[node] += payload_bytes(msg)
            self.messages_down[node] += 1
        return messages

    def _count_up(self, replies: Iterable[Message]) -> list[Message]:
        replies = list(replies)
        for msg in replies:
            node = msg.metadata.src_node_id
            self.bytes_up[node] += payload_bytes(msg)
            self.messages_up[node] += 1
            self.compute_seconds[node] += reported_compute_seconds(msg)
        return replies

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(self._count_down(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._count_up(self._grid.pull_messages(message_ids))

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = self._grid.send_and_receive(self._count_down(messages), timeout=timeout)
        return self._count_up(replies)
