"""The warm node worker and the relay ClientApp (`ecos_flower.node`).

The relay imports no torch; messages relayed to a worker are answered with the worker's own node
config (policy, ledger, limit, data), whatever the SuperNode's node config says; a run through
relays learns like one in process and keeps per-run state (DSSGD) in the worker; failures are
clear on the relay side and fixed-text on the wire.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from flower_helpers import run_tiny, tiny_scenario
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from test_hostile_server import events, private_node, refusal_of, with_field

from ecos_flower.client_app import app as client_app
from ecos_flower.flower.inprocess import InProcessGrid, wire_copy
from ecos_flower.node.relay import forward
from ecos_flower.node.wire import send_frame
from ecos_flower.node.worker import WORKER_FAILURE, NodeWorker


@pytest.fixture
def sockets() -> Iterator[Path]:
    """A short folder for sockets (Unix socket paths are limited to 107 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="ew-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def running(
    path: Path, node_config: dict, app: ClientApp | None = None, socket_group: int | None = None
) -> Iterator[NodeWorker]:
    worker = NodeWorker(path, node_config, app=app, socket_group=socket_group)
    worker.bind()
    thread = threading.Thread(target=worker.serve_forever, daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.close()
        thread.join(10)
        assert not thread.is_alive()


def research_node(index: int, num: int = 3) -> dict:
    return {"partition-id": index, "num-partitions": num, "privacy-policy": "research"}


def relay_context(path: Path, **node_config) -> Context:
    return Context(
        run_id=7,
        node_id=1000,
        node_config={"worker": str(path), **node_config},
        state=RecordDict(),
        run_config={},
    )


def test_the_flower_app_module_imports_neither_torch_nor_the_handlers():
    # flwr itself imports numpy; torch, scikit-learn and the handlers are the heavy part
    code = (
        "import sys, ecos_flower.client_app as m; "
        "heavy = ('torch', 'torchvision', 'sklearn', 'ecos_flower.client'); "
        "bad = [n for n in heavy if n in sys.modules]; "
        "assert not bad, bad; assert isinstance(m.app, __import__('flwr').clientapp.ClientApp)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> Path:
    return tiny_scenario(tmp_path_factory.mktemp("relay"))


def test_an_ecos_run_through_relays_learns_and_every_message_reaches_a_worker(scenario, sockets):
    paths = [sockets / f"n{i}.sock" for i in range(3)]
    with contextlib.ExitStack() as stack:
        workers = [stack.enter_context(running(p, research_node(i))) for i, p in enumerate(paths)]
        # The SuperNodes' node configs name only the worker: no data, no partition.
        grid = InProcessGrid(
            client_app, 3, node_configs={i: {"worker": str(p)} for i, p in enumerate(paths)}
        )
        for context in grid.contexts.values():
            context.node_config.pop("partition-id")
            context.node_config.pop("privacy-policy")
        report, _ = run_tiny(scenario, grid=grid, **{"cloud-epochs": 30, "budget": 150})
    # 10 classes: chance is 0.1; the same run in process reaches 0.97 (0.78 at 15 epochs)
    assert report.accuracy_mean > 0.5
    assert all(w.handled >= 2 for w in workers)  # the ECOS query and the evaluation


def test_dssgd_state_lives_in_the_worker_across_messages(scenario, sockets):
    paths = [sockets / f"d{i}.sock" for i in range(2)]
    with contextlib.ExitStack() as stack:
        workers = [
            stack.enter_context(running(p, research_node(i, 2))) for i, p in enumerate(paths)
        ]
        grid = InProcessGrid(
            client_app, 2, node_configs={i: {"worker": str(p)} for i, p in enumerate(paths)}
        )
        report, grid = run_tiny(
            scenario, 2, grid=grid, method="dssgd", model="paper-mlp", **{"dssgd-epochs": 2}
        )
    assert len(report.accuracy_per_client) == 2
    for worker in workers:
        (state,) = worker._states.values()
        assert len(state) > 0  # the participant's local model persisted between messages
        assert worker.handled >= 3  # two train messages and the evaluation
    for context in grid.contexts.values():
        assert len(context.state) == 0  # nothing of the node's state sits in the relay


@pytest.fixture(scope="module")
def ecos_query(scenario) -> Message:
    captured: dict[str, Message] = {}

    def recording(msg: Message, context: Context) -> Message:
        captured.setdefault(msg.metadata.message_type, wire_copy(msg))
        return client_app(msg, context)

    run_tiny(scenario, grid=InProcessGrid(recording, 3))
    return captured["query.ecos"]


def test_the_workers_policy_wins_over_the_supernodes_node_config(ecos_query, sockets, tmp_path):
    node = private_node(tmp_path, **{"epsilon-limit": 1.0}).node_config
    with running(sockets / "p.sock", node):
        # A SuperNode (or a server-shipped relay) claiming the research policy and a huge limit
        # changes nothing: the worker answers with its own config.
        context = relay_context(
            sockets / "p.sock", **{"privacy-policy": "research", "epsilon-limit": 1e9}
        )
        exact = with_field(ecos_query, "ecos", "noise", False)
        for _ in range(3):
            assert refusal_of(client_app(wire_copy(exact), context)) is not None
        assert events(_ctx(node)) == 0
        answers = [client_app(wire_copy(ecos_query), context) for _ in range(3)]
    assert refusal_of(answers[0]) is None  # one private query at epsilon 1 fits the limit 1
    assert all(refusal_of(a) is not None for a in answers[1:])  # the worker's limit holds
    assert events(_ctx(node)) == 1


def _ctx(node_config: dict) -> Context:
    return Context(run_id=0, node_id=0, node_config=node_config, state=RecordDict(), run_config={})


def test_a_missing_worker_is_a_clear_error_naming_the_command(ecos_query, sockets):
    with pytest.raises(ConnectionError, match="ecos-flower node-worker --socket"):
        client_app(wire_copy(ecos_query), relay_context(sockets / "absent.sock"))


def test_a_malformed_request_does_not_stop_the_worker(ecos_query, sockets):
    path = sockets / "m.sock"
    with running(path, research_node(0)) as worker:
        for garbage in (b"not a context", b""):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(str(path))
                send_frame(sock, garbage)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(path))
            sock.sendall(b"\xff" * 8)  # a length far over the frame limit
        reply = client_app(wire_copy(ecos_query), relay_context(path))
        assert refusal_of(reply) is None and worker.handled == 1


def test_a_failure_in_the_worker_leaves_only_a_fixed_text(ecos_query, sockets):
    def leaky(msg: Message, context: Context) -> Message:
        raise ValueError("patient 42 has label 7")

    path = sockets / "f.sock"
    with (
        running(path, research_node(0), app=leaky),  # type: ignore[arg-type]
        pytest.raises(RuntimeError) as raised,
    ):
        forward(str(path), wire_copy(ecos_query), relay_context(path), timeout=30)
    assert str(raised.value) == WORKER_FAILURE and "42" not in str(raised.value)


def test_the_socket_is_only_for_the_operators_user(sockets):
    path = sockets / "s.sock"
    with running(path, research_node(0), app=lambda m, c: m):  # type: ignore[arg-type]
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode & 0o077 == 0, oct(mode)
    assert not path.exists()  # removed on close


def test_a_worker_cannot_relay_again_and_long_paths_are_refused(sockets):
    with pytest.raises(ValueError, match="worker"):
        NodeWorker(sockets / "x.sock", {"worker": "/elsewhere"}, app=lambda m, c: m)
    worker = NodeWorker(sockets / ("x" * 120), {}, app=lambda m, c: m)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="107"):
        worker.bind()


def test_a_socket_group_lets_another_user_reach_the_worker_but_not_the_nodes_files(sockets):
    # The worker widens its socket to 0660 for the operator's group, no further.
    gid = os.getgid()
    path = sockets / "g.sock"
    with running(path, {}, app=echo, socket_group=gid):
        info = os.stat(path)
        assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o660, gid)
    with pytest.raises(ValueError, match="no group 'no-such-group-here'"):
        NodeWorker(path, {}, app=lambda m, c: m, socket_group="no-such-group-here")


PROBE = """
import socket, sys
try:
    socket.socket(socket.AF_UNIX).connect(sys.argv[1]); print("connect ok")
except OSError: print("connect denied")
try:
    open(sys.argv[2]).read(); print("read ok")
except OSError: print("read denied")
"""


def _python_for(uid: int) -> str | None:
    """An interpreter user `uid` can run (the venv may live under root's home)."""
    for candidate in ("/usr/bin/python3", sys.executable):
        probe = subprocess.run(
            [candidate, "-c", "pass"], user=uid, group=uid, extra_groups=[], capture_output=True
        )
        if probe.returncode == 0:
            return candidate
    return None


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to run probes as nobody"
)
def test_the_supernodes_user_in_the_group_reaches_the_worker_but_cannot_read_its_data():
    import grp
    import pwd

    try:
        nobody = pwd.getpwnam("nobody")
        other_group = grp.getgrnam("daemon").gr_gid
    except KeyError:
        pytest.skip("needs the system's nobody user and daemon group")
    python = _python_for(nobody.pw_uid)
    if python is None:
        pytest.skip("no Python interpreter the nobody user may run")
    folder = Path(tempfile.mkdtemp(prefix="ew-", dir="/tmp"))
    try:
        folder.chmod(0o711)  # others may reach the socket by name, not list the folder
        data = folder / "data"
        data.mkdir(mode=0o700)  # the node's images and ledger: the worker's user only
        secret = data / "image.png"
        secret.write_text("pixels")

        def probe(socket_path: Path, gid: int) -> list[str]:
            done = subprocess.run(
                [python, "-c", PROBE, str(socket_path), str(secret)],
                user=nobody.pw_uid,
                group=gid,
                extra_groups=[],
                capture_output=True,
                text=True,
                timeout=30,
            )
            return done.stdout.split("\n")[:-1]

        grouped, private = folder / "g.sock", folder / "p.sock"
        with (
            running(grouped, {}, app=echo, socket_group=nobody.pw_gid),
            running(private, {}, app=echo),
        ):
            # The SuperNode's user, in the socket's group: it reaches the worker (whose
            # release boundary answers) but cannot read the data behind it.
            assert probe(grouped, nobody.pw_gid) == ["connect ok", "read denied"]
            # Outside the group, or with the default 0600 socket: not even the worker.
            assert probe(grouped, other_group) == ["connect denied", "read denied"]
            assert probe(private, nobody.pw_gid) == ["connect denied", "read denied"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def echo(message: Message, context: Context) -> Message:
    return message
