"""Run the ServerApp with a given config on an engine: Flower's Ray simulation or in process."""

from __future__ import annotations

import os
from typing import Any

from ecos_flower.flower.report import RunReport
from ecos_flower.flower.settings import merge_run_config

ENGINES = ("ray", "in-process")


def ray_backend_config() -> dict[str, Any]:
    """One CPU per simulated client. On this machine Ray starts with all its cores; with
    RAY_ADDRESS set, Flower joins that running cluster, where Ray refuses resource arguments."""
    config: dict[str, Any] = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
    if not os.environ.get("RAY_ADDRESS"):
        config["init_args"] = {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}
    return config


def run_once(config: dict[str, Any], num_clients: int, engine: str = "ray") -> RunReport:
    """One run of the configured method; returns its report (raises if the run produced none).
    `config` is validated here (an unknown key or a bad value raises before anything starts)."""
    from ecos_flower.client_app import app as client_app
    from ecos_flower.flower.inprocess import InProcessGrid, run_in_process
    from ecos_flower.server_app import make_server_app

    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    config = merge_run_config(config)
    reports: list[RunReport] = []
    server_app = make_server_app(config, on_report=reports.append)
    if engine == "in-process":
        # Each node gets a private noise seed derived from the run's seed, so an in-process
        # experiment repeats exactly (Ray's simulated nodes draw fresh OS entropy).
        seed = config["seed"]
        node_configs = {i: {"noise-seed": 1_000_003 * seed + i} for i in range(num_clients)}
        grid = InProcessGrid(client_app, num_clients, node_configs=node_configs)
        run_in_process(server_app, grid)
    else:
        from flwr.simulation import run_simulation

        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_clients,
            backend_config=ray_backend_config(),
        )
    if not reports:
        raise RuntimeError("the run ended without a report (see the log above)")
    return reports[0]
