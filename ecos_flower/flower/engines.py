"""Run the ServerApp with a given config on an engine: Flower's Ray simulation or in process."""

from __future__ import annotations

import os
from typing import Any

from ecos_flower.flower.report import RunReport

ENGINES = ("ray", "in-process")


def run_once(config: dict[str, Any], num_clients: int, engine: str = "ray") -> RunReport:
    """One run of the configured method; returns its report (raises if the run produced none)."""
    from ecos_flower.client_app import app as client_app
    from ecos_flower.flower.inprocess import InProcessGrid, run_in_process
    from ecos_flower.server_app import make_server_app

    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    reports: list[RunReport] = []
    server_app = make_server_app(config, on_report=reports.append)
    if engine == "in-process":
        run_in_process(server_app, InProcessGrid(client_app, num_clients))
    else:
        from flwr.simulation import run_simulation

        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_clients,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
            },
        )
    if not reports:
        raise RuntimeError("the run ended without a report (see the log above)")
    return reports[0]
