"""Start a real Flower deployment on loopback: one `flower-superlink` and N `flower-supernode`
processes over gRPC, run the app with `flwr run`, and stop exactly the processes started here.

Used by the deployment tests and benchmarks; also a worked example of the commands in the README.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _descendants(pid: int) -> list[int]:
    """All processes below `pid` (Flower's SuperExec and app processes), read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"process exited with {process.returncode}; log {log}:\n{log.read_text()[-3000:]}"
            )
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"port {port} not open after {timeout:.0f} s; log {log}")


class LocalDeployment:
    """A SuperLink and SuperNodes on loopback, insecure or with TLS, under a private FLWR_HOME."""

    def __init__(
        self,
        workdir: Path,
        node_configs: Sequence[Mapping[str, Any]],
        *,
        certificates: Mapping[str, Path] | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        self.workdir = Path(workdir)
        self.node_configs = [dict(c) for c in node_configs]
        self.certificates = certificates  # keys: ca, server-cert, server-key
        self.startup_timeout = startup_timeout
        self.home = self.workdir / "home"
        self.processes: list[subprocess.Popen] = []
        self.control_port = free_port()
        self.fleet_port = free_port()
        bindir = Path(sys.executable).parent
        self.env = dict(os.environ)
        self.env.update(
            {
                "HOME": str(self.home),
                "FLWR_HOME": str(self.home / ".flwr"),
                # Flower starts its SuperExec helpers by name: they must be on PATH.
                "PATH": f"{bindir}{os.pathsep}{self.env.get('PATH', '')}",
            }
        )

    def _tls_args(self, role: str) -> list[str]:
        if self.certificates is None:
            return ["--insecure"]
        if role == "superlink":
            return [
                "--ssl-ca-certfile",
                str(self.certificates["ca"]),
                "--ssl-certfile",
                str(self.certificates["server-cert"]),
                "--ssl-keyfile",
                str(self.certificates["server-key"]),
            ]
        return ["--root-certificates", str(self.certificates["ca"])]

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.workdir / f"{name}.log"
        handle = log.open("w")
        process = subprocess.Popen(
            args, stdout=handle, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir
        )
        process.log_path = log  # type: ignore[attr-defined]
        self.processes.append(process)
        return process

    def start(self) -> LocalDeployment:
        """Start the SuperLink, wait for its ports, then start every SuperNode."""
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / ".flwr").mkdir(exist_ok=True)
        bindir = Path(sys.executable).parent
        superlink = self._spawn(
            "superlink",
            [
                str(bindir / "flower-superlink"),
                *self._tls_args("superlink"),
                "--port",
                str(self.control_port),
                "--fleet-api-address",
                f"127.0.0.1:{self.fleet_port}",
                # The app runs in this environment: no per-run dependency installation.
                "--disable-runtime-dependency-installation",
            ],
        )
        for port in (self.control_port, self.fleet_port):
            _wait_for_port(port, superlink, superlink.log_path, self.startup_timeout)
        for index, node_config in enumerate(self.node_configs):
            config_text = " ".join(f"{k}={_toml_value(v)}" for k, v in node_config.items())
            self._spawn(
                f"supernode-{index}",
                [
                    str(bindir / "flower-supernode"),
                    *self._tls_args("supernode"),
                    "--superlink",
                    f"127.0.0.1:{self.fleet_port}",
                    "--port",
                    str(free_port()),
                    "--node-config",
                    config_text,
                ],
            )
        self._write_connection()
        return self

    def _write_connection(self) -> None:
        connection: dict[str, Any] = {"address": f"127.0.0.1:{self.control_port}"}
        if self.certificates is None:
            connection["insecure"] = True
        else:
            connection["root-certificates"] = str(self.certificates["ca"])
        config = {"superlink": {"default": "local-grpc", "local-grpc": connection}}
        (self.home / ".flwr" / "config.toml").write_text(tomli_w.dumps(config))

    def run(
        self, app_dir: Path, run_config: Mapping[str, Any], timeout: float = 600.0
    ) -> subprocess.CompletedProcess:
        """`flwr run APP_DIR local-grpc --run-config ... --stream`, waiting for the run to end."""
        bindir = Path(sys.executable).parent
        overrides = " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())
        return subprocess.run(
            [
                str(bindir / "flwr"),
                "run",
                str(app_dir),
                "local-grpc",
                "--run-config",
                overrides,
                "--stream",
            ],
            env=self.env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def logs(self) -> str:
        """Every process log, for assertion messages."""
        return "\n".join(
            f"--- {p.log_path.name}\n{p.log_path.read_text()[-4000:]}" for p in self.processes
        )

    def stop(self) -> None:
        """Terminate the started processes and everything they started (SuperExec, app
        processes), by process id; kill what is still alive after a grace period."""
        targets: list[int] = []
        for process in self.processes:
            targets.extend(_descendants(process.pid))
            targets.append(process.pid)
        for pid in targets:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        for pid in targets:
            _signal(pid, signal.SIGKILL)
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)

    def __enter__(self) -> LocalDeployment:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _toml_value(value: Any) -> str:
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()
