"""The node worker: one long-lived process per node, started by the node's operator.

It holds what a message needs warm (torch, the handlers, the node's data through their caches)
and what the node's privacy rests on: its node config (policy, ledger path, epsilon limit, data
path) comes from the operator's command line, never from a message or from the SuperNode's node
config, and the ledger is the node's one lifetime ledger on disk. Each relayed message runs the
project's ClientApp (`make_client_app`) exactly as a SuperNode would run it, with a `Context`
whose node config is the worker's and whose state persists per run in this process.

Messages are handled one at a time (a SuperNode sends one at a time per run; the ledger is
locked across processes anyway). A failure outside the release boundary answers with a fixed
text (the traceback goes to this process's log only), so no data-dependent error text leaves.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ecos_flower.node.wire import recv_request, send_error, send_reply

LOG = logging.getLogger("ecos_flower.node_worker")
WORKER_FAILURE = "the node worker could not answer this message (details in the node's log)"
REQUEST_TIMEOUT_S = 60.0
MAX_SOCKET_PATH = 107
FORBIDDEN_KEYS = ("worker",)  # a worker does not relay to another worker


class NodeWorker:
    """Serve relayed Flower messages on a Unix socket with this node's own config and state.

    Parameters
    ----------
    socket_path : str or Path
        Where to listen. The socket is created with mode 0600 (only the operator's user, i.e. the
        SuperNode running as that user, may connect); an existing stale socket is replaced.
    node_config : Mapping
        The node's config, as `flower-supernode --node-config` would take it (`data`,
        `privacy-policy`, `ledger-path`, `epsilon-limit`, ...).
    app : ClientApp, optional
        The app to run (default: the project's `make_client_app()`).
    socket_group : str or int, optional
        A group (name or id) whose members may connect: the socket becomes mode 0660 with that
        group. Lets the worker run as its own user, owning the data and the ledger, and the
        SuperNode (which runs the code the server ships) as another user in this group: the
        shipped code can then only send messages through the release boundary, never read the
        node's files. Default: none (0600, the worker's user only).
    """

    def __init__(
        self,
        socket_path: str | Path,
        node_config: Mapping[str, Any],
        app: ClientApp | None = None,
        socket_group: str | int | None = None,
    ) -> None:
        bad = [key for key in FORBIDDEN_KEYS if key in node_config]
        if bad:
            raise ValueError(f"a node worker's node config may not set {', '.join(bad)}")
        self.socket_path = Path(socket_path)
        self.socket_gid = None if socket_group is None else group_id(socket_group)
        self.node_config = dict(node_config)
        if app is None:
            from ecos_flower.client_app import make_client_app

            app = make_client_app()
        self.app = app
        self._states: dict[int, RecordDict] = {}
        self._lock = threading.Lock()
        self._server: socket.socket | None = None
        self.handled = 0

    def handle(self, message: Message, relayed: Context) -> Message:
        """Answer one message with this node's config and the run's persistent state.

        From the relayed context only the run id, node id and run config are used (the run
        config is the server's anyway); the node config and state are the worker's."""
        with self._lock:
            state = self._states.setdefault(relayed.run_id, RecordDict())
            context = Context(
                run_id=relayed.run_id,
                node_id=relayed.node_id,
                node_config=dict(self.node_config),
                state=state,
                run_config=dict(relayed.run_config),
            )
            start = time.perf_counter()
            reply = self.app(message, context)
            self.handled += 1
            LOG.info(
                "handled %s (run %d) in %.3f s",
                message.metadata.message_type,
                relayed.run_id,
                time.perf_counter() - start,
            )
            return reply

    def _serve_one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(REQUEST_TIMEOUT_S)  # a silent peer must not hold the worker
            try:
                message, context = recv_request(conn)
            except Exception as exc:  # not a relay speaking our protocol (or it went away)
                LOG.warning("dropped a malformed request: %s: %s", type(exc).__name__, exc)
                return
            conn.settimeout(None)
            try:
                reply = self.handle(message, context)
            except Exception:  # the log keeps the traceback; the relay gets a fixed text
                LOG.exception("message %s failed", message.metadata.message_type)
                send_error(conn, WORKER_FAILURE)
                return
            send_reply(conn, reply)

    def bind(self) -> None:
        """Create the socket (mode 0600, or 0660 for `socket_group`) and listen; safe to call
        before `serve_forever`."""
        path = self.socket_path
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:  # the kernel's sun_path limit
            raise ValueError(
                f"socket path {path} is {len(os.fsencode(path))} bytes; Unix sockets allow "
                f"{MAX_SOCKET_PATH}: choose a shorter path"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise FileExistsError(f"{path} exists and is not a socket")
            path.unlink()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket file is created 0600, with no window
        try:
            server.bind(str(path))
        finally:
            os.umask(old_umask)
        if self.socket_gid is not None:  # widened only after it exists, never wider than 0660
            os.chown(path, -1, self.socket_gid)
            os.chmod(path, 0o660)
        server.listen(8)
        self._server = server

    def serve_forever(self, ready: Callable[[], None] | None = None) -> None:
        """Accept relayed messages until `close()` (or the process ends)."""
        if self._server is None:
            self.bind()
        server = self._server
        assert server is not None
        if ready is not None:
            ready()
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed
                return
            try:
                self._serve_one(conn)
            except Exception as exc:  # e.g. the relay went away mid-reply: serve the next one
                LOG.warning("relay connection failed: %s: %s", type(exc).__name__, exc)

    def close(self) -> None:
        if self._server is not None:
            with contextlib.suppress(OSError):  # wakes a thread blocked in accept()
                self._server.shutdown(socket.SHUT_RDWR)
            self._server.close()
            self._server = None
        self.socket_path.unlink(missing_ok=True)


def group_id(group: str | int) -> int:
    """The id of a group given by name or id; ValueError naming it if this system lacks it."""
    import grp

    try:
        if str(group).isdigit():
            return grp.getgrgid(int(group)).gr_gid
        return grp.getgrnam(str(group)).gr_gid
    except KeyError:
        raise ValueError(f"no group {group!r} on this system (socket-group)") from None


def main(
    socket_path: str,
    node_config_args: list[str] | None,
    log_file: str | None,
    socket_group: str | None = None,
) -> None:
    """`ecos-flower node-worker`: parse the node config like `flower-supernode` does, serve."""
    from flwr.common.config import parse_config_args

    logging.basicConfig(
        level=logging.INFO,
        filename=log_file,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    node_config = parse_config_args(node_config_args)
    worker = NodeWorker(socket_path, node_config, socket_group=socket_group)
    LOG.info("node worker on %s (node config keys: %s)", socket_path, sorted(node_config))
    try:
        worker.serve_forever(
            ready=lambda: print(f"node worker listening on {socket_path}", flush=True)
        )
    except KeyboardInterrupt:
        pass
    finally:
        worker.close()
