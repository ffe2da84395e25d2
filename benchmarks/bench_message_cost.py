"""Benchmark what one message costs a real SuperNode (Flower 1.39 starts a fresh `flwr-clientapp`
process per message), before and after the node worker, against a floor measured in the same
deployment: a trivial Flower App whose ClientApp imports only flwr and answers at once.

    .venv/bin/python benchmarks/bench_message_cost.py [--nodes 3] [--rounds 4]

One loopback deployment (flower-superlink + N flower-supernode) per mode:
- in-process: each SuperNode's ClientApp process imports the project (torch, the handlers) and
  loads the node's data for every message (what Flower does without help);
- worker: each node runs `ecos-flower node-worker` (torch, data, policy, ledger stay warm) and
  the ClientApp process only relays the message over a Unix socket (imports flwr only).
In each deployment the floor app runs first, then an ECOS run (its query round: one message to
every node at once) and a DSSGD run (round-robin: one train message per round). Printed: seconds
per message, the node's own work (the handler's compute time), the goal (1.5 x floor + work),
peak RSS of the per-message ClientApp processes, and the import phases measured in fresh
processes (`python -c "import ..."`, median of 3).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

from ecos_flower.flower.settings import PACKAGE_ROOT
from ecos_flower.testing.deployment import (
    LocalDeployment,
    _descendants,
    write_flower_app_pyproject,
)

SCENARIO = PACKAGE_ROOT / "simulations" / "embedded.toml"
ECOS = {"method": "ecos", "cloud-epochs": 1, "budget": 200, "extractor": "pca"}
DSSGD = {"method": "dssgd", "model": "paper-mlp", "dssgd-schedule": "round-robin", "theta-u": 0.1}

FLOOR_APP = '''
"""The floor: a Flower App whose ClientApp imports flwr only and answers every message at once."""
import json
import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client = ClientApp()


@client.query("ecos")
def ecos(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"m": MetricRecord({"x": 1.0})}), reply_to=msg)


@client.train("dssgd")
def dssgd(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"m": MetricRecord({"x": 1.0})}), reply_to=msg)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    rounds, out = int(context.run_config["rounds"]), str(context.run_config["out"])
    while len(list(grid.get_node_ids())) < int(context.run_config["nodes"]):
        time.sleep(0.5)
    nodes = sorted(grid.get_node_ids())
    def round_of(kind, targets):
        messages = [Message(RecordDict({"c": ConfigRecord({"r": 1})}), n, kind) for n in targets]
        start = time.perf_counter()
        replies = list(grid.send_and_receive(messages, timeout=600))
        assert all(not r.has_error() for r in replies), [r.error for r in replies if r.has_error()]
        return time.perf_counter() - start
    query = [round_of("query.ecos", nodes) for _ in range(rounds)]
    train = [round_of("train.dssgd", [nodes[i % len(nodes)]]) for i in range(rounds)]
    with open(out, "w") as f:
        json.dump({"query": query, "train": train}, f)
'''


class PeakRss:
    """Polls the SuperNodes' descendants; the peak RSS (VmHWM) of each `flwr-clientapp`."""

    def __init__(self, parents: list[int]) -> None:
        self.parents, self.peaks, self._stop = parents, {}, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            for parent in self.parents:
                for pid in _descendants(parent):
                    try:
                        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                        status = Path(f"/proc/{pid}/status").read_text()
                    except OSError:
                        continue
                    if b"flwr-clientapp" not in cmdline:
                        continue
                    match = re.search(r"VmHWM:\s+(\d+) kB", status)
                    if match:
                        kib = int(match.group(1))
                        self.peaks[pid] = max(self.peaks.get(pid, 0), kib)
            time.sleep(0.05)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def mib(self) -> float:
        return max(self.peaks.values(), default=0) / 1024


def import_seconds(code: str) -> float:
    """Median wall time of a fresh `python -c CODE` (process start + the imports)."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_app(deployment: LocalDeployment, app: Path, config: dict, timeout: float = 1800) -> None:
    result = deployment.run(app, config, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(result.stdout[-3000:] + result.stderr[-3000:] + deployment.logs())


def measure(mode: str, nodes: int, rounds: int, workdir: Path, floor_app: Path) -> dict:
    node_configs = [
        {"partition-id": i, "num-partitions": nodes, "privacy-policy": "research"}
        for i in range(nodes)
    ]
    workers = node_configs if mode == "worker" else None
    supernode_configs = [{} for _ in range(nodes)] if workers else node_configs
    deployment = LocalDeployment(workdir / "deploy", supernode_configs, workers=workers)
    out: dict = {"mode": mode}
    with deployment:
        with PeakRss([p.pid for p in deployment.supernodes]) as floor_rss:
            floor_json = workdir / "floor.json"
            run_app(
                deployment, floor_app, {"rounds": rounds, "nodes": nodes, "out": str(floor_json)}
            )
        floor = json.loads(floor_json.read_text())
        out["floor-query"] = statistics.median(floor["query"])
        out["floor-train"] = statistics.median(floor["train"])
        out["floor-rss"] = floor_rss.mib()
        for method, layer in (("ecos", ECOS), ("dssgd", {**DSSGD, "dssgd-epochs": rounds})):
            results = workdir / method
            with PeakRss([p.pid for p in deployment.supernodes]) as rss:
                run_app(
                    deployment,
                    PACKAGE_ROOT,
                    {**layer, "scenario": str(SCENARIO), "results-dir": str(results)},
                )
            record = json.loads((results / "results.json").read_text())[0]
            phases = record["phase_seconds"]
            compute = record["client_compute_s"]
            work = statistics.mean(compute.values()) if compute else 0.0
            if method == "ecos":
                out["ecos-message"] = float(phases["query"])
                # the query phase is one round; the compute is summed over the run's messages
                out["ecos-work"] = _worker_seconds(deployment, "query.ecos") or work / 2
            else:
                out["dssgd-message"] = float(phases["train"]) / int(
                    record["settings"]["num-server-rounds"]
                )
                out["dssgd-work"] = _worker_seconds(deployment, "train.dssgd") or _train_work(
                    record
                )
            out[f"{method}-rss"] = rss.mib()
    return out


def _worker_seconds(deployment: LocalDeployment, kind: str) -> float | None:
    """Mean handler seconds of `kind` messages, from the workers' logs (worker mode)."""
    seconds = []
    for process in deployment.workers:
        text = process.log_path.read_text()  # type: ignore[attr-defined]
        seconds += [
            float(s)
            for s in re.findall(rf"handled {re.escape(kind)} \(run \d+\) in ([\d.]+) s", text)
        ]
    return statistics.mean(seconds) if seconds else None


def _train_work(record: dict) -> float:
    compute = record["client_compute_s"]
    rounds = int(record["settings"]["num-server-rounds"])
    return sum(compute.values()) / rounds if compute else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--modes", default="in-process,worker")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="msgcost-"))
    floor_app = root / "floor"
    floor_app.mkdir()
    (floor_app / "floor_app.py").write_text(textwrap.dedent(FLOOR_APP))
    write_flower_app_pyproject(
        floor_app,
        "floor-app",
        packages=["."],
        serverapp="floor_app:server",
        clientapp="floor_app:client",
        config={"rounds": 3, "nodes": 1, "out": ""},
        publisher="bench",
    )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus; {args.nodes} SuperNodes on loopback"
    )
    phases = {
        "import flwr": import_seconds("import flwr.clientapp"),
        "import the relay app (what a worker node loads)": import_seconds(
            "import ecos_flower.client_app"
        ),
        "import and build the in-process app (torch, handlers)": import_seconds(
            "from ecos_flower.client_app import make_client_app; make_client_app()"
        ),
    }
    for name, seconds in phases.items():
        print(f"fresh process, {name}: {seconds:.2f} s (total)", flush=True)
    rows = []
    for mode in args.modes.split(","):
        m = measure(mode, args.nodes, args.rounds, root / mode, floor_app)
        for method, kind in (("ecos", "query"), ("dssgd", "train")):
            floor, seconds, work = m[f"floor-{kind}"], m[f"{method}-message"], m[f"{method}-work"]
            goal = 1.5 * floor + work
            rows.append(
                f"| {method} {kind} | {mode} | {seconds:.2f} | {floor:.2f} | {work:.2f} | "
                f"{goal:.2f} | {seconds / goal:.2f} | {m[f'{method}-rss']:.0f} | "
                f"{m['floor-rss']:.0f} |"
            )
            print(rows[-1], flush=True)
    print(
        "\n| message | mode | s / message | floor s | work s | goal 1.5 x floor + work | "
        "vs goal | peak RSS MiB | floor RSS MiB |\n|---|---|---|---|---|---|---|---|---|"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
