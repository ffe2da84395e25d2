"""The default app through Flower's real simulation engine (Ray), as `ecos-flower run` runs it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from flower_helpers import FAST, tiny_scenario

from ecos_flower.cli import main

pytestmark = pytest.mark.simulation


def test_ecos_through_ray_simulation_writes_a_full_report(tmp_path, flwr_home, capsys):
    scenario = tiny_scenario(tmp_path, num_clients=3)
    out = tmp_path / "out"
    args = ["run", "--scenario", str(scenario), "--out", str(out), "--set", 'method="ecos"']
    for key, value in FAST.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "ecos: mean accuracy" in printed
    (record,) = json.loads((out / "results.json").read_text())
    assert sorted(record["accuracy_per_client"]) == ["0", "1", "2"]
    assert all(v == pytest.approx(1.0) for v in record["epsilon_per_client"].values())
    assert all(0 < v < 2_000 for v in record["bytes_up_per_client"].values())
    assert record["extra"]["answered"] == 3


def test_dssgd_through_ray_simulation_keeps_local_models_across_rounds(tmp_path, flwr_home):
    scenario = tiny_scenario(tmp_path, num_clients=2)
    out = tmp_path / "out"
    args = [
        "run",
        "--scenario",
        str(scenario),
        "--out",
        str(out),
        "--preset",
        "strategies/dssgd.toml",
        "--set",
        "dssgd-epochs=2",
        "--set",
        "theta-u=0.1",
    ]
    assert main(args) == 0
    (record,) = json.loads((out / "results.json").read_text())
    assert record["method"] == "dssgd"
    assert sorted(record["accuracy_per_client"]) == ["0", "1"]
    # Round-robin, 2 epochs each: every participant made 2 local steps, kept in its node state.
    assert record["extra"]["local-steps-per-client"] == {"0": 2, "1": 2}
    model_bytes = 4 * record["extra"]["num-params"]
    for client in ("0", "1"):
        # Two sparse uploads of 10 % of the parameters (indices + values), far below the model.
        assert record["bytes_up_per_client"][client] < model_bytes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _process_tree(marker: str) -> list[int]:
    """Pids whose command line names `marker` (our cluster's private temp folder or port), and
    all their descendants (Ray's agents rename themselves and name neither)."""
    parents, roots = {}, []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        if marker in cmdline:
            roots.append(int(entry.name))
    tree, frontier = set(roots), list(roots)
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier += children
    return sorted(tree)


@pytest.fixture()
def ray_cluster(flwr_home):
    """A Ray cluster started with `ray start --head` (as an operator would on the head machine),
    in a private temp folder; stopped afterwards by killing exactly its processes."""
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    if ray is None:
        pytest.skip("the `ray` command is not installed next to this Python")
    temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # Ray's socket paths must stay short
    port = _free_port()
    command = [ray, "start", "--head", f"--port={port}", "--num-cpus=2", f"--temp-dir={temp}"]
    command += ["--include-dashboard=false", "--disable-usage-stats"]
    command += [f"--ray-client-server-port={_free_port()}", f"--dashboard-port={_free_port()}"]
    started = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    markers = (temp, f":{port}")
    tracked = sorted({pid for marker in markers for pid in _process_tree(marker)})
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        yield f"127.0.0.1:{port}", Path(temp)
    finally:
        tracked = sorted({*tracked, *(pid for m in markers for pid in _process_tree(m))})
        for signal_number in (signal.SIGTERM, signal.SIGKILL):
            for pid in tracked:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal_number)
            time.sleep(3)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_simulation_joins_a_running_ray_cluster(tmp_path, ray_cluster):
    """With RAY_ADDRESS set (README, "Multi-machine simulation"), Flower's simulation engine
    joins the running cluster instead of starting its own: the run's process appears as a
    driver in that cluster's session logs."""
    address, temp = ray_cluster
    scenario = tiny_scenario(tmp_path, num_clients=2)
    out = tmp_path / "out"
    args = ["run", "--scenario", str(scenario), "--out", str(out), "--set", 'method="ecos"']
    for key, value in FAST.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    code = "import sys; from ecos_flower.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "RAY_ADDRESS": address}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    run = subprocess.Popen([sys.executable, "-c", code, *args], env=env)
    assert run.wait(timeout=600) == 0
    (record,) = json.loads((out / "results.json").read_text())
    assert sorted(record["accuracy_per_client"]) == ["0", "1"]
    drivers = list(temp.glob("session_*/logs/python-core-driver-*.log"))
    assert any(log.stem.endswith(f"_{run.pid}") for log in drivers), drivers
