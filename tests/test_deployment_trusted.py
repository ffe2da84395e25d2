"""Trusted code, not only trusted messages: a SuperNode started with `--trusted-entities` runs
only ClientApp code (FABs) signed by a key its operator trusts.

How Flower 1.39 does it (read from the installed source):

* A reviewer signs a FAB with an Ed25519 OpenSSH key (`flwr app review @account/app==x.y.z`,
  `flwr.cli.app_cmd.review._sign_fab`): the signed message is the 8-byte big-endian Unix time
  `signed_at` followed by SHA-256(FAB bytes); the signature goes to Flower Hub, base64url
  without padding.
* Signatures only travel with Hub apps: `flwr run @account/app==x.y.z` makes the SuperLink call
  `$FLWR_SUPERGRID_API_URL/hub/fetch-fab`, which answers the FAB's download URL and a list of
  verifications `{public_key_id, signature, signed_at}`. The SuperLink stores them in
  `Fab.verifications` as `{public_key_id: json({signature, signed_at}), "valid_license":
  "Valid"}`. A FAB built and uploaded by `flwr run APP_DIR` always has empty verifications:
  there is no local signing path.
* `flower-supernode --trusted-entities FILE` (YAML: `fpk_<id>: ssh-ed25519 AAAA... [comment]`)
  checks every new run's FAB before running it: no "valid_license" -> "App verification is not
  supported by the connected SuperLink."; no signature by a trusted id that verifies against
  the FAB's hash -> "FAB verification failed". Either way the ClientApp does not run and the
  SuperNode answers the message with Error(INVALID_FAB=7, "The FAB could not be verified.").

The Hub is not reachable here (no internet), so the test plays it on loopback: a small HTTP
server answering `/hub/fetch-fab` exactly like Flower Hub, with signatures made by Flower's own
signing code (`_sign_fab`) from keys generated here. Everything Flower does with them -- the
SuperLink fetching the FAB and verifications, the SuperNode verifying -- is unmodified Flower.

One SuperLink, two SuperNodes: "guarded" trusts the signing key, "open" has no
`--trusted-entities` (the control: it runs anything). Four runs:
signed (both answer), foreign-signed, signed-but-tampered FAB, and an unsigned local
`flwr run DIR` (guarded refuses each, open answers). The four runs are submitted at once; a tiny
app that only imports flwr keeps the test at 50-90 s on a loaded 2-CPU machine (`flwr` CLI and
app processes each take seconds to start there).
"""

from __future__ import annotations

import base64
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from ecos_flower.testing.deployment import (
    LocalDeployment,
    _descendants,
    _toml_value,
    _write_private,
    free_port,
    wait_for_log,
    write_flower_app_pyproject,
)

pytestmark = pytest.mark.deployment

PUBLISHER = "ecos"
ANSWER = "ClientApp code ran"

SERVER_APP = '''
"""Send one query to every SuperNode; report each reply; fail the run if any was refused."""

import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    wanted = int(context.run_config["num-nodes"])
    deadline = time.monotonic() + 30
    nodes = list(grid.get_node_ids())
    while len(nodes) < wanted and time.monotonic() < deadline:
        time.sleep(0.2)
        nodes = list(grid.get_node_ids())
    messages = [
        Message(RecordDict({"q": ConfigRecord({"x": 1})}), dst_node_id=node, message_type="query")
        for node in nodes
    ]
    outcomes = []
    for reply in grid.send_and_receive(messages, timeout=60):
        if reply.has_error():
            outcomes.append({"error-code": reply.error.code, "error": reply.error.reason})
        else:
            answer = reply.content["a"]
            outcomes.append({"answer": answer["answer"], "node": answer["node"]})
    Path(context.run_config["result-path"]).write_text(json.dumps(outcomes))
    refused = [o for o in outcomes if "error" in o]
    if refused:
        raise RuntimeError(f"{len(refused)} SuperNode(s) refused the app: {refused}")
'''

CLIENT_APP = '''
"""Answer a query: proof that this FAB's code ran on the SuperNode."""

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    answer = ConfigRecord({"answer": "ANSWER", "node": str(context.node_config["name"])})
    return Message(RecordDict({"a": answer}), reply_to=msg)
'''.replace("ANSWER", ANSWER)


def write_tiny_app(folder: Path, name: str, marker: str = "") -> Path:
    """A Flower App `ecos/NAME` 1.0.0 that only imports flwr (a package per app: no clashes)."""
    package = name.replace("-", "_")
    (folder / package).mkdir(parents=True)
    (folder / package / "__init__.py").write_text(f'"""{name}{marker}"""\n')
    (folder / package / "server_app.py").write_text(SERVER_APP)
    (folder / package / "client_app.py").write_text(CLIENT_APP + marker)
    write_flower_app_pyproject(
        folder,
        name,
        packages=[package],
        serverapp=f"{package}.server_app:app",
        clientapp=f"{package}.client_app:app",
        config={"num-nodes": 2, "result-path": ""},
        publisher=PUBLISHER,
        dependencies=["flwr"],
        description="ecos-flower trusted-code test app",
    )
    return folder


def build_fab(app_dir: Path, deployment: LocalDeployment | None = None) -> bytes:
    """The FAB of APP_DIR: `flwr build --app APP_DIR` (as a publisher would) when a deployment
    is given (the CLI runs under its FLWR_HOME, in its workdir), else the same Flower function
    in-process (`flwr build` costs ~2 s of start-up per call)."""
    if deployment is None:
        from flwr.cli.build import build_fab_from_disk

        return build_fab_from_disk(app_dir)
    before = set(deployment.workdir.glob("*.fab"))
    result = deployment.flwr("build", "--app", str(app_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    (fab,) = set(deployment.workdir.glob("*.fab")) - before
    return fab.read_bytes()


def generate_signing_key(folder: Path, name: str) -> tuple[Path, str]:
    """An Ed25519 key pair in OpenSSH format (same as `ssh-keygen -t ed25519 -N '' -f NAME`):
    the private key file and the public key line `ssh-ed25519 AAAA... NAME`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    folder.mkdir(parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    private = folder / name
    _write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    line = f"{public.decode()} {name}"
    (folder / f"{name}.pub").write_text(line + "\n")
    return private, line


def sign(fab: bytes, private_key: Path, public_key_id: str) -> dict[str, Any]:
    """A Hub verification record, made by Flower's own `flwr app review` signing code."""
    from flwr.cli.app_cmd.review import _sign_fab
    from flwr.supercore.primitives.asymmetric_ed25519 import load_private_key

    signature, signed_at = _sign_fab(fab, load_private_key(private_key))
    return {
        "public_key_id": public_key_id,
        "signature": base64.urlsafe_b64encode(signature).rstrip(b"=").decode("ascii"),
        "signed_at": signed_at,
    }


class LoopbackHub:
    """Flower Hub's `/hub/fetch-fab` on 127.0.0.1: app spec -> FAB and its verifications.

    The SuperLink reaches it through FLWR_SUPERGRID_API_URL (Flower's Platform API base URL)."""

    def __init__(self) -> None:
        self.apps: dict[str, tuple[bytes, list[dict[str, Any]] | None]] = {}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _send(self, status: int, body: bytes, kind: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                hub.requests.append(self.path)
                spec = f"{body.get('app_id')}=={body.get('app_version')}"
                if not self.path.endswith("/hub/fetch-fab") or spec not in hub.apps:
                    self._send(404, b'{"detail": "not found"}', "application/json")
                    return
                _, verifications = hub.apps[spec]
                answer: dict[str, Any] = {"fab_url": f"{hub.url}/fabs/{spec}"}
                if verifications is not None:
                    answer["verifications"] = verifications
                self._send(200, json.dumps(answer).encode(), "application/json")

            def do_GET(self) -> None:  # noqa: N802
                spec = self.path.rsplit("/fabs/", 1)[-1]
                if "/fabs/" not in self.path or spec not in hub.apps:
                    self._send(404, b"", "text/plain")
                    return
                self._send(200, hub.apps[spec][0], "application/octet-stream")

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def publish(self, spec: str, fab: bytes, verifications: list[dict[str, Any]] | None) -> None:
        self.apps[spec] = (fab, verifications)

    def __enter__(self) -> LoopbackHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def run_all(
    deployment: LocalDeployment,
    apps: Mapping[str, str],
    configs: Mapping[str, Mapping[str, Any]],
    timeout: float = 120.0,
) -> dict[str, dict[str, Any]]:
    """Submit every app at once (`flwr run APP local-grpc --run-config ... --format json`, one
    process each: the CLI's start-up dominates on a small machine), then poll `flwr ls` until
    every run has finished. Returns case -> the run's `flwr ls` record (status:
    finished:completed / finished:failed)."""
    submitted = {
        case: subprocess.Popen(
            [
                str(deployment.bindir / "flwr"),
                "run",
                app,
                "local-grpc",
                "--run-config",
                " ".join(f"{k}={_toml_value(v)}" for k, v in configs[case].items()),
                "--format",
                "json",
            ],
            env=deployment.env,
            cwd=deployment.workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for case, app in apps.items()
    }
    outputs: dict[str, tuple[str, str]] = {}
    for case, process in submitted.items():  # collect all before asserting: none is left behind
        try:
            outputs[case] = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()  # only this `flwr run`, started just above
            outputs[case] = process.communicate()
    run_ids: dict[str, str] = {}
    for case, (out, err) in outputs.items():
        assert submitted[case].returncode == 0, (case, out, err, deployment.logs())
        run_ids[case] = str(json.loads(out[out.index("{") :])["run-id"])
    deadline = time.monotonic() + timeout
    while True:
        listed = deployment.flwr("ls", "local-grpc", "--format", "json")
        assert listed.returncode == 0, listed.stdout + listed.stderr
        by_id = {
            r["run-id"]: r for r in json.loads(listed.stdout[listed.stdout.index("{") :])["runs"]
        }
        records = {
            case: by_id.get(run_id, {"status": "unknown"}) for case, run_id in run_ids.items()
        }
        done = all(r["status"].startswith("finished") for r in records.values())
        if done or time.monotonic() > deadline:
            return records
        time.sleep(1.0)


def test_supernode_runs_only_apps_signed_by_a_trusted_key(tmp_path):
    apps = tmp_path / "apps"
    keys = tmp_path / "keys"
    trusted_key, trusted_pub = generate_signing_key(keys, "trusted-reviewer")
    foreign_key, _ = generate_signing_key(keys, "foreign-reviewer")
    trusted_id, foreign_id = f"fpk_{uuid.uuid4()}", f"fpk_{uuid.uuid4()}"
    # What the operator of the guarded SuperNode writes: key id -> OpenSSH public key.
    trusted_file = tmp_path / "trusted-entities.yaml"
    trusted_file.write_text(f"{trusted_id}: {trusted_pub}\n")

    deployment = LocalDeployment(tmp_path / "deploy", [])
    with LoopbackHub() as hub:
        deployment.env.update({"FLWR_SUPERGRID_API_URL": hub.url, "NO_PROXY": "127.0.0.1"})
        deployment.workdir.mkdir(parents=True)
        signed = build_fab(write_tiny_app(apps / "signed", "signed-app"), deployment)
        foreign = build_fab(write_tiny_app(apps / "foreign", "foreign-app"))
        tampered = build_fab(write_tiny_app(apps / "tampered", "tampered-app", "\n# injected\n"))
        reviewed = build_fab(write_tiny_app(apps / "reviewed", "tampered-app"))
        unsigned_dir = write_tiny_app(apps / "unsigned", "unsigned-app")
        hub.publish(
            f"@{PUBLISHER}/signed-app==1.0.0", signed, [sign(signed, trusted_key, trusted_id)]
        )
        # Signed, but by a key the operator does not trust.
        hub.publish(
            f"@{PUBLISHER}/foreign-app==1.0.0", foreign, [sign(foreign, foreign_key, foreign_id)]
        )
        # The trusted key signed the reviewed code; the Hub ships different code under it.
        assert tampered != reviewed
        hub.publish(
            f"@{PUBLISHER}/tampered-app==1.0.0",
            tampered,
            [sign(reviewed, trusted_key, trusted_id)],
        )

        with deployment:
            guarded = deployment.start_supernode(
                {"name": "guarded"},
                name="guarded",
                extra_args=["--trusted-entities", str(trusted_file)],
            )
            open_node = deployment.start_supernode({"name": "open"}, name="open")
            apps_by_case = {
                "signed": f"@{PUBLISHER}/signed-app==1.0.0",
                "foreign": f"@{PUBLISHER}/foreign-app==1.0.0",
                "tampered": f"@{PUBLISHER}/tampered-app==1.0.0",
                "unsigned": str(unsigned_dir),  # uploaded by `flwr run DIR`: no signature
            }
            results = {case: tmp_path / f"{case}.json" for case in apps_by_case}
            configs = {case: {"result-path": str(path)} for case, path in results.items()}
            records = run_all(deployment, apps_by_case, configs)
            runs = {
                case: {
                    "status": records[case]["status"],
                    "outcomes": json.loads(path.read_text()) if path.exists() else [],
                }
                for case, path in results.items()
            }
            assert wait_for_log(guarded, ["FAB verification failed"], 5.0)
            assert wait_for_log(open_node, ["Receiving: query message"], 5.0)
            started = [p.pid for p in deployment.processes]
        logs = deployment.logs()
    guarded_log = (tmp_path / "deploy" / "guarded.log").read_text()

    def answers(case: str) -> list[str]:
        return sorted(o.get("node", "refused") for o in runs[case]["outcomes"])

    # The signed app ran on both SuperNodes and the run completed.
    assert runs["signed"]["status"] == "finished:completed", (runs, logs)
    assert answers("signed") == ["guarded", "open"], (runs, logs)
    assert all(o["answer"] == ANSWER for o in runs["signed"]["outcomes"])

    # Foreign-signed, tampered and unsigned: the guarded SuperNode answered with Flower's
    # INVALID_FAB error instead of running the code; the open one ran it; the run failed.
    for case in ("foreign", "tampered", "unsigned"):
        assert runs[case]["status"] == "finished:failed", (case, runs, logs)
        assert answers(case) == ["open", "refused"], (case, runs, logs)
        (refusal,) = [o for o in runs[case]["outcomes"] if "error" in o]
        assert refusal == {"error-code": 7, "error": "The FAB could not be verified."}

    # What the guarded SuperNode logged: two failed signature checks (foreign key, tampered
    # FAB) and, for the locally uploaded FAB, that the SuperLink had no verification data.
    assert guarded_log.count("FAB verification failed") == 2, guarded_log
    assert guarded_log.count("App verification is not supported by the connected") == 1
    assert hub.requests.count("/v1/hub/fetch-fab") == 3  # one per Hub run, none for the local

    for pid in started:  # everything started here is gone
        assert not _descendants(pid)
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )


def test_trusted_entities_file_must_hold_ed25519_keys(tmp_path):
    """A SuperNode refuses to start with a malformed trusted-entities file or a non-Ed25519
    key (Flower exit code 304, SUPERNODE_INVALID_TRUSTED_ENTITIES), before connecting
    anywhere."""
    from ecos_flower.testing.deployment import generate_supernode_key

    _, ecdsa_public = generate_supernode_key(tmp_path / "keys", "ecdsa")
    cases = {
        "not-a-mapping.yaml": "- just a list\n",
        "ecdsa.yaml": f"fpk_{uuid.uuid4()}: {ecdsa_public.read_text().strip()}\n",
    }
    deployment = LocalDeployment(tmp_path / "deploy", [])
    deployment.workdir.mkdir(parents=True)
    deployment.home.mkdir()
    for name, text in cases.items():
        path = tmp_path / name
        path.write_text(text)
        result = subprocess.run(
            [
                str(deployment.bindir / "flower-supernode"),
                "--insecure",
                "--superlink",
                f"127.0.0.1:{free_port()}",
                "--trusted-entities",
                str(path),
            ],
            env=deployment.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        output = result.stdout + result.stderr
        # Flower logs "Exit Code: 304" and exits the process with status 1.
        assert result.returncode == 1, (name, result.returncode, output)
        assert "Exit Code: 304" in output, (name, output)
        assert "trusted entities" in output, (name, output)
