"""Run the ServerApp with a given config on an engine: Flower's Ray simulation or in process.

Repeatability on Ray: Flower's simulation draws every SuperNode's id from `os.urandom` and gives
partition i to the i-th id drawn, so the node-id order of the partitions is a fresh random
permutation every run. The server knows a node only by its id: whatever it orders by node id
(DSSGD's round-robin, the order FedAvg sums the updates in) then follows a different order of the
clients each run, and the same command gave different numbers (issue 16). `run_once` therefore
hands the partitions out in node-id order (`partitions_in_node_id_order`), as the in-process grid
does: the ids stay Flower's random ones, only which partition each id simulates is fixed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
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


@contextlib.contextmanager
def partitions_in_node_id_order() -> Iterator[None]:
    """Within this context, Flower's simulation engine gives partition i to the node with the
    i-th smallest id (Flower draws the ids at random and assigns partitions in the order drawn).

    This patches Flower's node registration (`vce_api._register_nodes`, flwr 1.39; the pin
    `flwr<1.40` keeps it, and tests/test_ray_repeatability.py fails if it moves): `run_simulation`
    takes no node ids or mapping of its own. It acts on the engine in this process (where
    `run_simulation` registers the nodes); `flwr run` registers them in its own
    `flwr-simulation` process, which this does not reach.
    """
    from flwr.server.superlink.fleet.vce import vce_api

    register = vce_api._register_nodes

    def register_in_node_id_order(num_nodes: int, state_factory: Any) -> dict[int, int]:
        mapping = register(num_nodes=num_nodes, state_factory=state_factory)
        return {node_id: partition for partition, node_id in enumerate(sorted(mapping))}

    vce_api._register_nodes = register_in_node_id_order
    try:
        yield
    finally:
        vce_api._register_nodes = register


def node_noise_seed(seed: int, partition: int) -> int:
    """The research noise seed of simulated node `partition` in a run with `seed` (both engines),
    so DP methods repeat given the run's seed; a deployed node never gets one (policy.py)."""
    return 1_000_003 * seed + partition


@contextlib.contextmanager
def noise_seeds_for_simulated_nodes(seed: int) -> Iterator[None]:
    """Within this context, every node Flower's simulation engine registers gets node config
    `noise-seed` = `node_noise_seed(seed, partition-id)` next to its partition id, as the
    in-process engine's nodes do (Flower's `run_simulation` takes no node config; this wraps its
    `vce_api._register_node_info_stores`, flwr 1.39, whose contexts share that dict)."""
    from flwr.server.superlink.fleet.vce import vce_api

    register = vce_api._register_node_info_stores

    def register_with_noise_seeds(nodes_mapping: Any, run: Any, app_dir: Any = None) -> Any:
        stores = register(nodes_mapping, run, app_dir)
        for node_id, partition in nodes_mapping.items():
            stores[node_id].node_config["noise-seed"] = node_noise_seed(seed, int(partition))
        return stores

    vce_api._register_node_info_stores = register_with_noise_seeds
    try:
        yield
    finally:
        vce_api._register_node_info_stores = register


def run_once(config: dict[str, Any], num_clients: int, engine: str = "ray") -> RunReport:
    """One run of the configured method; returns its report (raises if the run produced none).
    `config` is validated here (an unknown key or a bad value raises before anything starts)."""
    from ecos_flower.client_app import app as client_app
    from ecos_flower.flower.inprocess import InProcessGrid, run_in_process
    from ecos_flower.server_app import make_server_app

    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    config = merge_run_config(config)
    seed = config["seed"]
    if config["dp-server-noise-seed"] < 0:
        # Each simulated node gets a research noise seed derived from the run's seed, and so does
        # the server's noise of client-level DP-FedAvg: an experiment repeats exactly, DP or not,
        # on either engine (a deployment's nodes and server draw fresh OS entropy).
        config["dp-server-noise-seed"] = node_noise_seed(seed, num_clients)
    reports: list[RunReport] = []
    server_app = make_server_app(config, on_report=reports.append)
    if engine == "in-process":
        node_configs = {i: {"noise-seed": node_noise_seed(seed, i)} for i in range(num_clients)}
        grid = InProcessGrid(client_app, num_clients, node_configs=node_configs)
        run_in_process(server_app, grid)
    else:
        from flwr.simulation import run_simulation

        with partitions_in_node_id_order(), noise_seeds_for_simulated_nodes(seed):
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=num_clients,
                backend_config=ray_backend_config(),
            )
    if not reports:
        raise RuntimeError("the run ended without a report (see the log above)")
    return reports[0]
