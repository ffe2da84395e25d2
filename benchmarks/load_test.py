"""Load benchmark (a plain script, not a test): many simulated clients through the real ServerApp
and ClientApps on the in-process grid (real message serialisation, no Ray).

ECOS with 100 clients (repeated runs: each is a query round and an evaluation round) and DSSGD
with 50 participants (parallel schedule: every participant steps every round). For every round
(one `send_and_receive`) it records the seconds it took, the process's resident memory after it
and the peak resident memory so far (getrusage), so a leak would show as RSS growing per round.

    python benchmarks/load_test.py [--ecos-clients 100 --ecos-runs 3 --dssgd-clients 50
                                    --dssgd-epochs 5 --out simulations/results/load.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from flwr.app import Message

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ecos_flower.client_app import app as client_app  # noqa: E402
from ecos_flower.flower.inprocess import InProcessGrid, run_in_process  # noqa: E402
from ecos_flower.flower.settings import merge_run_config  # noqa: E402
from ecos_flower.server_app import make_server_app  # noqa: E402
from ecos_flower.testing.scenarios import write_tiny_scenario  # noqa: E402


def rss_mb() -> float:
    """Current resident set size of this process (MB)."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MeasuredGrid(InProcessGrid):
    """An in-process grid that times every round (one send_and_receive) and samples memory."""

    def __init__(self, *args, label: str, rows: list, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.label, self.rows = label, rows

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        kind = messages[0].metadata.message_type if messages else "-"
        start = time.perf_counter()
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.rows.append(
            {
                "run": self.label,
                "round": sum(1 for r in self.rows if r["run"] == self.label) + 1,
                "message": kind,
                "clients": len(messages),
                "replies": len(replies),
                "seconds": time.perf_counter() - start,
                "rss_mb": rss_mb(),
                "peak_rss_mb": peak_rss_mb(),
            }
        )
        return replies


def run(label: str, num_clients: int, rows: list, folder: Path, **overrides) -> float:
    scenario = write_tiny_scenario(folder / f"clients-{num_clients}", num_clients)
    config = merge_run_config(
        {"scenario": str(scenario), "node-wait": 0.0, "torch-threads": 1}, overrides
    )
    grid = MeasuredGrid(client_app, num_clients, label=label, rows=rows)
    start = time.perf_counter()
    run_in_process(make_server_app(config), grid)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ecos-clients", type=int, default=100)
    parser.add_argument("--ecos-runs", type=int, default=3)
    parser.add_argument("--dssgd-clients", type=int, default=50)
    parser.add_argument("--dssgd-epochs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "simulations/results/load.md")
    args = parser.parse_args()
    rows: list[dict] = []
    walls: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FLWR_HOME"] = tmp  # the clients' per-run ledgers go here
        folder = Path(tmp)
        for index in range(args.ecos_runs):
            label = f"ecos-{index + 1}"
            walls[label] = run(
                label,
                args.ecos_clients,
                rows,
                folder,
                method="ecos",
                extractor="pca",
                **{"pca-components": 16, "num-centroids": 20, "budget": 200, "cloud-epochs": 5},
            )
            print(f"{label}: {walls[label]:.1f} s", flush=True)
        walls["dssgd"] = run(
            "dssgd",
            args.dssgd_clients,
            rows,
            folder,
            method="dssgd",
            model="paper-mlp",
            **{
                "dssgd-epochs": args.dssgd_epochs,
                "dssgd-schedule": "parallel",
                "dssgd-epsilon": 1.0,
                "gamma": 0.001,
                "tau": 0.0001,
                "dssgd-epsilon-limit": 1000.0,
            },
        )
        print(f"dssgd: {walls['dssgd']:.1f} s", flush=True)
    lines = [
        "# Load test",
        "",
        f"Command: `python benchmarks/load_test.py --ecos-clients {args.ecos_clients} "
        f"--ecos-runs {args.ecos_runs} --dssgd-clients {args.dssgd_clients} "
        f"--dssgd-epochs {args.dssgd_epochs}`",
        "",
        f"Machine: {platform.platform()}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPU(s); in-process grid (real ServerApp/ClientApps and message "
        "serialisation, clients run one after another in one process, no Ray).",
        "",
        "Scenario: embedded digits, 8x8, the clients' domain split IID over the clients. ECOS: PCA "
        "extractor (16 dims), K = 20, budget 200, epsilon 1 per query. DSSGD: paper MLP, parallel "
        "schedule, theta_u = 0.1, SVT epsilon 1 per step, gamma 0.001.",
        "",
        "| run | round | message | clients | replies | seconds | RSS after (MB) | peak RSS (MB) |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['round']} | {r['message']} | {r['clients']} | {r['replies']} | "
            f"{r['seconds']:.2f} | {r['rss_mb']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    lines += ["", "Wall time per run (s): " + ", ".join(f"{k} {v:.1f}" for k, v in walls.items())]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
