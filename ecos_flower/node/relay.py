"""The relay side: forward one Flower message to the node's worker and return its reply.

Imports the standard library and flwr only (never torch or the handlers), so a `flwr-clientapp`
process that loads the relay costs a flwr import. The worker's address is the SuperNode's node
config key `worker` (a Unix socket path the operator chose); the SuperNode's node config holds
nothing else the relay needs: the data, policy and ledger are the worker's.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from ecos_flower.node.wire import recv_reply, send_request

WORKER_KEY = "worker"
CONNECT_TIMEOUT_S = 10.0


def worker_address(context: Context) -> str | None:
    """The node config's `worker` socket path, or None (the handlers then run in process)."""
    value = context.node_config.get(WORKER_KEY)
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise ValueError(f"node config {WORKER_KEY!r} must be a socket path, got {value!r}")
    return value


def forward(address: str, message: Message, context: Context, timeout: float | None) -> Message:
    """Send `message` to the worker at `address` and wait for its reply (`timeout` seconds for
    the whole exchange; None: as long as the work takes)."""
    if not os.path.exists(address):
        raise ConnectionError(
            f"no node worker at {address}: start it on this node with "
            f"`ecos-flower node-worker --socket {address} --node-config ...`"
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(CONNECT_TIMEOUT_S)
        try:
            sock.connect(address)
        except OSError as exc:
            raise ConnectionError(f"node worker at {address} does not answer: {exc}") from exc
        sock.settimeout(timeout)
        send_request(sock, message, context)
        return recv_reply(sock)


class RelayingClientApp(ClientApp):
    """A ClientApp that relays every message to the node's worker when the node config names
    one (`worker = "/path/to/socket"`), and otherwise runs the full app in process.

    Building the in-process app (torch, the handlers) is deferred to its first use, so a
    `flwr-clientapp` process on a node with a worker imports flwr and this module only.

    Parameters
    ----------
    build_local : callable
        Returns the ClientApp that answers in process (simulation, or a node without worker).
    timeout : float, optional
        Seconds to wait for the worker's reply (None: as long as the work takes; Flower's own
        round timeout still applies on the server).
    """

    def __init__(self, build_local: Callable[[], ClientApp], timeout: float | None = None):
        super().__init__()
        self._build_local = build_local
        self._local: ClientApp | None = None
        self.timeout = timeout

    def __call__(self, message: Message, context: Context) -> Message:
        address = worker_address(context)
        if address is not None:
            return forward(address, message, context, self.timeout)
        if self._local is None:
            self._local = self._build_local()
        return self._local(message, context)
