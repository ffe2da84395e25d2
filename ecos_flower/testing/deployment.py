"""Start a real Flower deployment on loopback: one `flower-superlink` and N `flower-supernode`
processes over gRPC, run the app with `flwr run`, and stop exactly the processes started here.

Insecure, or with TLS (`generate_certificates`: a private CA and a server certificate for the
SuperLink's host names) and SuperNode authentication (`generate_supernode_key`: an EC P-384 key
pair in OpenSSH format; the SuperLink runs with `--enable-supernode-auth`, each public key is
registered with `flwr supernode register KEY.pub CONNECTION`, and each SuperNode proves its
identity with `--auth-supernode-private-key KEY`).

Used by the deployment tests and benchmarks; also a worked example of the commands in the README.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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


def generate_certificates(
    folder: Path,
    hosts: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
    *,
    days: int = 365,
) -> dict[str, Path]:
    """Write a private CA and a SuperLink server certificate signed by it into `folder`.

    `hosts`: the names and IP addresses SuperNodes and `flwr` use to reach the SuperLink (every
    one goes into the certificate's subjectAltName). Returns the paths under the keys the
    SuperLink and SuperNodes need: ``ca`` (ca.crt: give it to every SuperNode and to `flwr`),
    ``server-cert`` (server.pem) and ``server-key`` (server.key, keep it on the SuperLink host),
    and ``ca-key`` (ca.key: keep it offline; it signs further certificates).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    until = now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ecos-flower private CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(hosts[0]))]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )

    def key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    paths = {
        "ca": folder / "ca.crt",
        "ca-key": folder / "ca.key",
        "server-cert": folder / "server.pem",
        "server-key": folder / "server.key",
    }
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["server-cert"].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    for name, key in (("ca-key", ca_key), ("server-key", server_key)):
        _write_private(paths[name], key_bytes(key))
    return paths


def generate_supernode_key(folder: Path, name: str = "supernode") -> tuple[Path, Path]:
    """Write a SuperNode authentication key pair (EC P-384, OpenSSH format, as Flower expects)
    into `folder`: NAME (private: stays on the SuperNode, `--auth-supernode-private-key`) and
    NAME.pub (public: registered on the SuperLink with `flwr supernode register NAME.pub`).
    Same as `ssh-keygen -t ecdsa -b 384 -N '' -f NAME`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    _write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )
    return private, public


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


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
    """A SuperLink and SuperNodes on loopback, insecure or with TLS, under a private FLWR_HOME.

    `certificates`: paths from `generate_certificates` (keys ca, server-cert, server-key); None:
    insecure. `supernode_auth=True` (needs certificates): the SuperLink only accepts SuperNodes
    whose public keys were registered; a key pair per SuperNode is generated under
    `workdir/keys` and registered with `flwr supernode register` before the SuperNode starts.
    """

    def __init__(
        self,
        workdir: Path,
        node_configs: Sequence[Mapping[str, Any]],
        *,
        certificates: Mapping[str, Path] | None = None,
        supernode_auth: bool = False,
        workers: Sequence[Mapping[str, Any] | None] | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        if supernode_auth and certificates is None:
            raise ValueError("SuperNode authentication needs TLS: pass certificates=")
        if workers is not None and len(workers) != len(node_configs):
            raise ValueError("give one worker node config (or None) per SuperNode")
        self.workdir = Path(workdir)
        self.node_configs = [dict(c) for c in node_configs]
        self.worker_configs = list(workers or [None] * len(self.node_configs))
        self.workers: list[subprocess.Popen] = []
        self._socket_dir: Path | None = None
        self.certificates = certificates  # keys: ca, server-cert, server-key
        self.supernode_auth = supernode_auth
        self.startup_timeout = startup_timeout
        self.home = self.workdir / "home"
        self.processes: list[subprocess.Popen] = []
        self.supernodes: list[subprocess.Popen] = []
        self.control_port = free_port()
        self.fleet_port = free_port()
        self.bindir = Path(sys.executable).parent
        self.env = dict(os.environ)
        self.env.update(
            {
                "HOME": str(self.home),
                "FLWR_HOME": str(self.home / ".flwr"),
                # Flower starts its SuperExec helpers by name: they must be on PATH.
                "PATH": f"{self.bindir}{os.pathsep}{self.env.get('PATH', '')}",
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
        handle.close()  # the child holds its own descriptor
        process.log_path = log  # type: ignore[attr-defined]
        self.processes.append(process)
        return process

    def start(self) -> LocalDeployment:
        """Start the SuperLink, wait for its ports, then register keys (auth) and start every
        SuperNode."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / ".flwr").mkdir(exist_ok=True)
        superlink_args = [
            str(self.bindir / "flower-superlink"),
            *self._tls_args("superlink"),
            "--port",
            str(self.control_port),
            "--fleet-api-address",
            f"127.0.0.1:{self.fleet_port}",
            # The app runs in this environment: no per-run dependency installation.
            "--disable-runtime-dependency-installation",
        ]
        if self.supernode_auth:
            superlink_args.append("--enable-supernode-auth")
        superlink = self._spawn("superlink", superlink_args)
        for port in (self.control_port, self.fleet_port):
            _wait_for_port(port, superlink, superlink.log_path, self.startup_timeout)
        self._write_connection()
        for index, node_config in enumerate(self.node_configs):
            if self.worker_configs[index] is not None:
                socket_path = self.start_worker(self.worker_configs[index], f"worker-{index}")
                node_config = {**node_config, "worker": str(socket_path)}
            key = None
            if self.supernode_auth:
                key, public = generate_supernode_key(self.workdir / "keys", f"supernode-{index}")
                self.register_supernode(public, name=f"supernode-{index}")
            self.start_supernode(node_config, name=f"supernode-{index}", auth_key=key)
        return self

    def start_worker(self, node_config: Mapping[str, Any], name: str) -> Path:
        """Start `ecos-flower node-worker` with this node config (its data, policy, ledger) and
        wait until it listens; returns its socket (give it to the SuperNode as `worker`)."""
        if self._socket_dir is None:  # short: Unix socket paths are limited to 107 bytes
            self._socket_dir = Path(tempfile.mkdtemp(prefix="ecos-sock-"))
        socket_path = self._socket_dir / f"{name}.sock"
        config_text = " ".join(f"{k}={_toml_value(v)}" for k, v in node_config.items())
        args = [str(self.bindir / "ecos-flower"), "node-worker", "--socket", str(socket_path)]
        if config_text:
            args += ["--node-config", config_text]
        process = self._spawn(name, args)
        self.workers.append(process)
        if wait_for_log(process, ["node worker listening"], self.startup_timeout) is None:
            raise RuntimeError(f"{name} did not start:\n{process.log_path.read_text()[-3000:]}")
        return socket_path

    def start_supernode(
        self,
        node_config: Mapping[str, Any],
        *,
        name: str,
        tls: bool = True,
        auth_key: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> subprocess.Popen:
        """Start one SuperNode against this SuperLink; its output goes to `workdir/NAME.log`.

        `tls=False` starts it with `--insecure` even when the SuperLink uses TLS (a negative
        check); `auth_key`: its private key (`--auth-supernode-private-key`)."""
        config_text = " ".join(f"{k}={_toml_value(v)}" for k, v in node_config.items())
        args = [
            str(self.bindir / "flower-supernode"),
            *(self._tls_args("supernode") if tls else ["--insecure"]),
            "--superlink",
            f"127.0.0.1:{self.fleet_port}",
            "--port",
            str(free_port()),
            "--node-config",
            config_text,
        ]
        if auth_key is not None:
            args += ["--auth-supernode-private-key", str(auth_key)]
        process = self._spawn(name, [*args, *extra_args])
        self.supernodes.append(process)
        return process

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run the `flwr` CLI against this deployment (FLWR_HOME/config.toml, `local-grpc`)."""
        return subprocess.run(
            [str(self.bindir / "flwr"), *args],
            env=self.env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def register_supernode(self, public_key: Path, name: str | None = None) -> int:
        """Register a SuperNode's public key with the SuperLink (`flwr supernode register`);
        returns the node id the SuperLink assigned."""
        args = ["supernode", "register", str(public_key), "local-grpc", "--format", "json"]
        if name:
            args += ["--name", name]
        result = self.flwr(*args)
        if result.returncode != 0:
            raise RuntimeError(
                f"flwr supernode register failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}"
            )
        for line in reversed(result.stdout.strip().splitlines()):
            with contextlib.suppress(ValueError):
                data = json.loads(line)
                if isinstance(data, dict) and "node-id" in data:
                    return int(data["node-id"])
        with contextlib.suppress(ValueError):
            return int(json.loads(result.stdout[result.stdout.index("{") :])["node-id"])
        raise RuntimeError(f"flwr supernode register gave no node id:\n{result.stdout}")

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
        overrides = " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())
        return self.flwr(
            "run",
            str(app_dir),
            "local-grpc",
            "--run-config",
            overrides,
            "--stream",
            timeout=timeout,
        )

    def logs(self) -> str:
        """Every process log, for assertion messages."""
        return "\n".join(
            f"--- {p.log_path.name}\n{p.log_path.read_text()[-4000:]}" for p in self.processes
        )

    def stop_process(self, process: subprocess.Popen) -> None:
        """Stop one process started here (and its descendants), by process id."""
        _terminate([process])

    def stop(self) -> None:
        """Terminate the started processes and everything they started (SuperExec, app
        processes), by process id; kill what is still alive after a grace period."""
        _terminate(self.processes)
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def __enter__(self) -> LocalDeployment:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for_log(process: subprocess.Popen, patterns: Sequence[str], timeout: float) -> str | None:
    """The first of `patterns` to appear in the process's log within `timeout` seconds (checked
    until the process exits and once more after), else None."""
    log_path: Path = process.log_path  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    while True:
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        for pattern in patterns:
            if pattern in text:
                return pattern
        if time.monotonic() >= deadline:
            return None
        if process.poll() is not None:
            time.sleep(0.2)  # let the last lines land, then a final look
            text = log_path.read_text(errors="replace")
            return next((p for p in patterns if p in text), None)
        time.sleep(0.2)


def _terminate(processes: Sequence[subprocess.Popen]) -> None:
    targets: list[int] = []
    for process in processes:
        targets.extend(_descendants(process.pid))
        targets.append(process.pid)
    for pid in targets:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
    for pid in targets:
        _signal(pid, signal.SIGKILL)
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def write_flower_app_pyproject(
    folder: Path,
    name: str,
    *,
    packages: Sequence[str],
    serverapp: str,
    clientapp: str,
    config: Mapping[str, Any],
    publisher: str = "ecos",
    dependencies: Sequence[str] = ("flwr>=1.39,<1.40",),
    description: str = "",
) -> Path:
    """Write `folder/pyproject.toml` of a minimal Flower App `publisher/name` 1.0.0 (hatchling
    build, the given components and run config): what benchmarks and deployment tests ship."""
    project: dict[str, Any] = {"name": name, "version": "1.0.0", "dependencies": list(dependencies)}
    if description:
        project["description"], project["license"] = description, "Apache-2.0"
    document = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": project,
        "tool": {
            "hatch": {"build": {"targets": {"wheel": {"packages": list(packages)}}}},
            "flwr": {
                "app": {
                    "publisher": publisher,
                    "components": {"serverapp": serverapp, "clientapp": clientapp},
                    "config": dict(config),
                }
            },
        },
    }
    path = Path(folder) / "pyproject.toml"
    path.write_text(tomli_w.dumps(document))
    return path


def _toml_value(value: Any) -> str:
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()
