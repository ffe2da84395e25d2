"""The ecos-flower ServerApp: reads the run config and runs the chosen method's server loop.

Where the server's data comes from: in a simulation, the scenario's federation (of which server
code uses only the public pool); in a deployment, run-config `pool`, a pool file naming the public
data the server owns (`ecos_flower.data.pool`): then it reads only those paths, never the
scenario, a shard or a client test set, and the methods that need client data on the server
(`SIMULATION_ONLY`) are refused before any message is sent.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from logging import INFO, WARNING
from typing import Any

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log
from threadpoolctl import threadpool_limits

from ecos_flower.data import load_scenario
from ecos_flower.data.node_data import format_class_names
from ecos_flower.data.pool import server_federation
from ecos_flower.flower.applications import run_dp_linear_probe
from ecos_flower.flower.baselines_run import run_centralized, run_dp_fedavg, run_local
from ecos_flower.flower.dssgd_run import run_dssgd
from ecos_flower.flower.fedavg import run_dp_fedavg_sample, run_fedavg
from ecos_flower.flower.report import RunReport
from ecos_flower.flower.sampling_run import SAMPLING_METHODS, run_sampling
from ecos_flower.flower.settings import merge_run_config, resolve_path, wait_for_nodes
from ecos_flower.flower.task_space import name_head_extractor
from ecos_flower.models import set_torch_threads
from ecos_flower.privacy.units import privacy_unit

METHODS: dict[str, Callable[[Grid, dict[str, Any]], RunReport]] = {
    "fedavg": run_fedavg,
    "dssgd": run_dssgd,
    "local": run_local,
    "centralized": run_centralized,
    "dp-fedavg": run_dp_fedavg,
    "dp-fedavg-sample": run_dp_fedavg_sample,
    "dp-linear-probe": run_dp_linear_probe,
    **dict.fromkeys(SAMPLING_METHODS, run_sampling),
}

SIMULATION_ONLY: dict[str, str] = {
    "in-domain": "it selects the pool samples of the clients' domain, which only a simulation's "
    "server knows (a server-owned pool does not say which samples resemble the clients' data)",
    "centralized": "the clients upload their raw training data to the server",
}
"""Methods that need client data on the server, with why: refused when `pool` is set. (The
oracle is `Ecos(noise=False)`: it reads no client data on the server, but asks the nodes for
exact counts, which a deployed node's own policy refuses.)"""


def check_pool_method(config: Mapping[str, Any]) -> None:
    """ValueError naming the method and why, if it is simulation-only and `pool` is set."""
    method = config["method"]
    if config.get("pool") and method in SIMULATION_ONLY:
        raise ValueError(
            f"method {method!r} is simulation-only and cannot run with a server-owned pool "
            f"(run-config `pool`): {SIMULATION_ONLY[method]}"
        )


def run_method(grid: Grid, config: dict[str, Any]) -> RunReport:
    """Resolve paths, run the configured method, log and (optionally) write its report.
    `config` is a validated run config (`merge_run_config`): its values have their types."""
    method = config["method"]
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(sorted(METHODS))}")
    check_pool_method(config)  # before any wait or message
    config = dict(config)
    set_torch_threads(config["torch-threads"])
    if config["pool"]:
        # The scenario is not even resolved: a deployed server need not hold it.
        config["pool"] = str(resolve_path(config["pool"], "pool"))
        # The node count comes from the connected nodes: wait for `num-clients` if the run
        # config names it, else until the count has settled (or `node-wait` runs out).
        expected = config.get("num-clients") or sys.maxsize
    else:
        config["scenario"] = str(resolve_path(config["scenario"], "scenario"))
        expected = load_scenario(config["scenario"], config["data-root"] or None).num_clients
    nodes = wait_for_nodes(grid, expected, timeout=config["node-wait"])
    if not config["pool"] and len(nodes) != expected:
        log(
            WARNING,
            "scenario %s defines %d clients but %d nodes are connected: splitting the "
            "clients' data into %d shards",
            config["scenario"],
            expected,
            len(nodes),
            len(nodes),
        )
    if config["pool"]:
        log(INFO, "server-owned pool %s; %d nodes connected", config["pool"], len(nodes))
    config["num-clients"] = len(nodes)
    # The label space every client is told (the pool's classes); no client assumes a default.
    federation = server_federation(config)
    config["num-classes"] = federation.num_classes
    # Not run-config keys: what a node reading its own data needs (the label space by name,
    # in label order, and the image shape it must resize to), all from the pool.
    config["class-names"] = format_class_names(federation.class_names)
    config["image-size"] = federation.image_size
    config["channels"] = federation.channels
    name_head_extractor(config, federation)  # a head model: which extractor, by name + digest
    # BLAS/OpenMP pools (scikit-learn's K-means, numpy) get the same thread count as torch:
    # on small shared machines their default of one thread per core ran K-means 8x slower.
    with threadpool_limits(limits=config["torch-threads"]):
        report = METHODS[method](grid, config)
    report.privacy_unit = privacy_unit(config).label  # printed next to every epsilon
    if config["pool"]:
        # What the server read (the scenario's default path in the run config it did not).
        report.extra["pool"] = report.scenario = config["pool"]
    for line in report.table().splitlines():
        log(INFO, "%s", line)
    if config.get("results-dir"):
        budget = config["budget"] if method in SAMPLING_METHODS else None
        path = report.write(config["results-dir"], budget=budget)
        log(INFO, "results written to %s", path)
    return report


def make_server_app(
    overrides: Mapping[str, Any] | None = None,
    on_report: Callable[[RunReport], None] | None = None,
) -> ServerApp:
    """A ServerApp whose config is defaults < the run's config < `overrides` (the CLI's);
    `on_report` receives the finished report (the CLI prints it)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        config = merge_run_config(context.run_config, overrides or {})
        report = run_method(grid, config)
        context.state["report"] = _report_record(report)
        if on_report is not None:
            on_report(report)

    return server_app


def _report_record(report: RunReport) -> ConfigRecord:
    """The report as JSON in the server's state, for callers that only hold the Context."""
    return ConfigRecord({"json": json.dumps(report.to_json())})


app = make_server_app()
