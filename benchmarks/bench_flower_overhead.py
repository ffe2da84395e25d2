"""Benchmark Flower's overhead: one ECOS query round and DSSGD rounds with 10 clients, driven
in process, through Flower's Ray simulation engine, and over a real gRPC deployment on loopback
(flower-superlink + 10 flower-supernode processes). Seconds per round and bytes per client.

    .venv/bin/python benchmarks/bench_flower_overhead.py [--engines in-process,ray,grpc]

The in-process engine is the baseline measured in the same run: the other engines' ratios to it
are the cost of Ray's actors and of gRPC plus one ClientApp process per message.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from ecos_flower.flower.engines import run_once
from ecos_flower.flower.settings import PACKAGE_ROOT, merge_run_config
from ecos_flower.testing.deployment import LocalDeployment

SCENARIO = PACKAGE_ROOT / "simulations" / "embedded.toml"
NUM_CLIENTS = 10
ECOS = {"method": "ecos", "cloud-epochs": 1, "budget": 200}
# Parallel schedule: every round sends one train message to every participant.
DSSGD = {
    "method": "dssgd",
    "model": "paper-mlp",
    "dssgd-schedule": "parallel",
    "dssgd-epochs": 3,
    "theta-u": 0.1,
}


def per_round(record: dict, method: str) -> float:
    """Seconds of the client-facing rounds: ECOS's query round; DSSGD's train rounds."""
    phases = record["phase_seconds"]
    if method == "ecos":
        return float(phases["query"])
    rounds = int(record["settings"]["num-server-rounds"])
    other = sum(v for k, v in phases.items() if k != "train")
    train = phases.get("train", record["wall_s"] - other)
    return float(train) / rounds


def run_grpc(config: dict, workdir: Path) -> dict:
    nodes = [{"partition-id": i, "num-partitions": NUM_CLIENTS} for i in range(NUM_CLIENTS)]
    out = workdir / "out"
    with LocalDeployment(workdir / "deploy", nodes) as deployment:
        result = deployment.run(
            PACKAGE_ROOT,
            {**config, "scenario": str(SCENARIO), "results-dir": str(out)},
            timeout=1800,
        )
    if result.returncode != 0:
        raise RuntimeError(result.stdout[-2000:] + result.stderr[-2000:])
    return json.loads((out / "results.json").read_text())[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="in-process,ray,grpc")
    args = parser.parse_args()
    engines = args.engines.split(",")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus; {NUM_CLIENTS} clients, "
        f"{SCENARIO.name}"
    )
    rows = []
    for method, layer in (("ecos", ECOS), ("dssgd", DSSGD)):
        base = None
        for engine in engines:
            workdir = Path(tempfile.mkdtemp(prefix=f"overhead-{engine}-"))
            os.environ["FLWR_HOME"] = str(workdir / "flwr")
            config = merge_run_config(layer, {"scenario": str(SCENARIO)})
            start = time.time()
            if engine == "grpc":
                record = run_grpc(layer, workdir)
            else:
                report = run_once(config, NUM_CLIENTS, engine)
                record = json.loads(json.dumps(report.to_json()))
            wall = time.time() - start
            seconds = per_round(record, method)
            base = seconds if engine == "in-process" else base
            up = sum(record["bytes_up_per_client"].values()) / NUM_CLIENTS
            down = sum(record["bytes_down_per_client"].values()) / NUM_CLIENTS
            ratio = f"{seconds / base:.1f}x" if base else "-"
            rows.append(
                f"| {method} | {engine} | {seconds:.2f} | {ratio} | {up:,.0f} | "
                f"{down:,.0f} | {wall:.0f} |"
            )
            print(rows[-1], flush=True)
    print(
        "\n| method | engine | s / round | vs in-process | bytes up / client | "
        "bytes down / client | run wall (s) |\n|---|---|---|---|---|---|---|"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
