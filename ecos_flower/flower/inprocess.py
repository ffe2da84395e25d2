"""An in-process Grid: drives a ServerApp and ClientApps as plain callables (no Ray, no SuperLink).

Every message and reply makes a real serialisation round trip (deflate/inflate, as on the wire),
so a payload that Flower cannot carry fails here too. Message flows test in milliseconds.
"""

from __future__ import annotations

import secrets
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

ClientAppCallable = Callable[[Message, Context], Message]
SUPERLINK_NODE_ID = 1
CLIENT_APP_EXCEPTION = 2  # Flower's ErrorCode.CLIENT_APP_RAISED_EXCEPTION


def wire_copy(message: Message) -> Message:
    """A copy of `message` made through its serialised form (what the transport would deliver)."""
    objects = get_all_nested_objects(message)
    contents = {object_id: obj.deflate() for object_id, obj in objects.items()}
    copy = inflate_object_from_contents(message.object_id, contents)
    assert isinstance(copy, Message)
    copy.metadata.__dict__.update(
        {k: v for k, v in message.metadata.__dict__.items() if k != "_created_at"}
    )
    return copy


def set_server_identity(run_id: int) -> None:
    """Flower stamps new messages with the process's task identity; set it as its runtimes do."""
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp callables in this process, one Context (and state) per node.

    `client_apps` may map a node index to its own app, e.g. a malicious one in fault tests.
    """

    def __init__(
        self,
        client_app: ClientAppCallable,
        num_nodes: int,
        *,
        client_apps: Mapping[int, ClientAppCallable] | None = None,
        node_configs: Mapping[int, Mapping[str, Any]] | None = None,
        run_config: Mapping[str, Any] | None = None,
        run_id: int | None = None,
    ) -> None:
        if num_nodes < 1:
            raise ValueError("an in-process grid needs at least one node")
        # A fresh run id per grid, as Flower gives each run: per-run state (e.g. a client's default
        # ledger file) must not leak from one run into the next.
        run_id = run_id if run_id is not None else secrets.randbits(62)
        self._run = Run.create_empty(run_id)
        set_server_identity(run_id)
        self.node_ids = [1_000 + 7 * index for index in range(num_nodes)]
        overrides = dict(client_apps or {})
        self.apps = {nid: overrides.get(i, client_app) for i, nid in enumerate(self.node_ids)}
        self.contexts: dict[int, Context] = {}
        for index, node_id in enumerate(self.node_ids):
            # The in-process engine is a simulation: its nodes hold the researcher's data, so
            # they get the research policy unless a test's node config says otherwise.
            node_config = {
                "partition-id": index,
                "num-partitions": num_nodes,
                "privacy-policy": "research",
            }
            node_config.update((node_configs or {}).get(index, {}))
            self.contexts[node_id] = Context(
                run_id=run_id,
                node_id=node_id,
                node_config=node_config,
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
        self._pending: dict[str, Message] = {}
        self.offline: set[int] = set()  # nodes that never answer (fault tests)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

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
        return list(self.node_ids)

    def _deliver(self, message: Message) -> Message | None:
        node_id = message.metadata.dst_node_id
        if node_id not in self.apps:
            raise ValueError(f"no node {node_id} in this grid")
        if node_id in self.offline:
            return None
        delivered = wire_copy(message)
        try:
            reply = self.apps[node_id](delivered, self.contexts[node_id])
        except Exception as exc:  # a crashing ClientApp becomes an error reply, as in Flower
            reason = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
            reply = Message(Error(code=CLIENT_APP_EXCEPTION, reason=reason), reply_to=delivered)
        reply.metadata.__dict__["_src_node_id"] = node_id
        reply.metadata.__dict__["_dst_node_id"] = SUPERLINK_NODE_ID
        return wire_copy(reply)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message_id = uuid4().hex
            message.metadata.__dict__["_message_id"] = message_id
            message.metadata.__dict__["_run_id"] = self._run.run_id
            message.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
            reply = self._deliver(message)
            if reply is not None:
                self._pending[message_id] = reply
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._pending.pop(mid) for mid in list(message_ids) if mid in self._pending]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_in_process(
    server_app: ServerApp,
    grid: InProcessGrid,
    run_config: Mapping[str, Any] | None = None,
) -> Context:
    """Run `server_app` against `grid` in this thread; returns the server's Context."""
    context = Context(
        run_id=grid.run.run_id,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config=dict(run_config or {}),
    )
    server_app(grid, context)
    return context
