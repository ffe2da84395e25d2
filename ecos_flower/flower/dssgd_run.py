"""DSSGD from the run config: build `ecos_flower.strategy.Dssgd`, run Flower's `start()` on a
metered grid, and turn its `Result` into a `RunReport`.

Server rounds are derived, not read from `num-server-rounds`: `dssgd-epochs` local epochs per
participant take epochs * participants rounds with one participant per round (round-robin, random)
and `dssgd-epochs` rounds when all participants train in parallel.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp import Grid
from flwr.supercore import log

from ecos_flower.data.pool import server_federation
from ecos_flower.dssgd import flatten_params
from ecos_flower.flower.payload import MeteredGrid
from ecos_flower.flower.report import RunReport
from ecos_flower.flower.settings import client_config
from ecos_flower.flower.task_space import task_input_shape
from ecos_flower.models import seeded_model
from ecos_flower.strategy import Dssgd
from ecos_flower.strategy.dssgd import per_client

SETTING_KEYS = (
    "model",
    "learning-rate",
    "batch-size",
    "dssgd-epochs",
    "dssgd-schedule",
    "theta-u",
    "theta-d",
    "upload-mode",
    "gamma",
    "max-update",
    "tau",
    "dssgd-epsilon",
    "svt-split",
    "stat-beta",
    "stat-decay-every",
    "evaluate-every",
)


def make_strategy(config: dict[str, Any], num_classes: int) -> Dssgd:
    """A `Dssgd` from the run config (gamma 0: no clipping, uploads still bounded by max-update;
    dssgd-epsilon 0: no DP;
    stat-decay-every 0: stat never decays)."""
    gamma = config["gamma"]
    epsilon = config["dssgd-epsilon"]
    decay_every = config["stat-decay-every"]
    return Dssgd(
        theta_u=config["theta-u"],
        theta_d=config["theta-d"],
        schedule=config["dssgd-schedule"],
        upload_mode=config["upload-mode"],
        gamma=gamma if gamma > 0 else None,
        max_update=config["max-update"],
        tau=config["tau"],
        dp_epsilon=epsilon if epsilon > 0 else None,
        svt_split=config["svt-split"],
        beta=config["stat-beta"] if decay_every > 0 else None,
        decay_every=decay_every,
        min_clients=config["min-clients"],
        evaluate_every=config["evaluate-every"],
        num_classes=num_classes,
        seed=config["seed"],
    )


class RoundMeter(MeteredGrid):
    """A MeteredGrid that also keeps each node's bytes of every train round and the seconds
    spent in train and evaluate exchanges (for the report; Flower's loop does not time them)."""

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.train_bytes: dict[int, list[tuple[int, int]]] = {}  # node -> [(up, down)] per round
        self.seconds = {"train": 0.0, "evaluate": 0.0}

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        if not messages:
            return []
        up, down = dict(self.bytes_up), dict(self.bytes_down)
        tick = time.perf_counter()
        replies = list(super().send_and_receive(messages, timeout=timeout))
        train = messages[0].metadata.message_type.startswith("train")
        self.seconds["train" if train else "evaluate"] += time.perf_counter() - tick
        if train:
            for msg in messages:
                node = msg.metadata.dst_node_id
                self.train_bytes.setdefault(node, []).append(
                    (
                        self.bytes_up.get(node, 0) - up.get(node, 0),
                        self.bytes_down.get(node, 0) - down.get(node, 0),
                    )
                )
        return replies


def _ints(values: dict[int, float]) -> dict[int, int]:
    return {client: int(value) for client, value in sorted(values.items())}


def run_dssgd(grid: Grid, config: dict[str, Any]) -> RunReport:
    """Run DSSGD for `dssgd-epochs` local epochs per participant; report local and server-model
    accuracy, epsilon per participant (pure DP ledger totals) and bytes."""
    start = time.time()
    seed = config["seed"]
    federation = server_federation(config)
    metered = RoundMeter(grid)
    nodes = sorted(grid.get_node_ids())
    tick = time.perf_counter()
    # The model's shape needs only the pool's label space and image shape: no client data.
    model = seeded_model(
        config["model"], seed, federation.num_classes, *task_input_shape(config, federation)
    )
    initial = ArrayRecord({"params": Array(flatten_params(model))})
    strategy = make_strategy(config, federation.num_classes)
    phase_seconds = {"init": time.perf_counter() - tick}
    num_rounds = strategy.num_rounds(config["dssgd-epochs"], len(nodes))
    log(
        INFO,
        "DSSGD: %d participants, %d server rounds (%d local epochs each, %s)",
        len(nodes),
        num_rounds,
        config["dssgd-epochs"],
        strategy.schedule,
    )
    result = strategy.start(
        grid=metered,
        initial_arrays=initial,
        num_rounds=num_rounds,
        timeout=config["timeout"],
        train_config=client_config(config),
        evaluate_config=client_config(config),
    )
    phase_seconds.update(metered.seconds)
    evaluations = result.evaluate_metrics_clientapp
    final = evaluations[num_rounds]  # the last round is always evaluated (or start() raised)
    accuracy = per_client(final, "accuracy")
    server_accuracy = per_client(final, "server-accuracy")
    clients = sorted(accuracy)
    node_clients = strategy.node_clients
    report = RunReport(method="dssgd", seed=seed, scenario=config["scenario"])
    report.accuracy_per_client = accuracy
    if strategy.private:
        spent = per_client(final, "epsilon-spent")
        report.epsilon_per_client = {c: spent.get(c, 0.0) for c in clients}
        # Each node's one lifetime ledger states its total at its own delta (the SVT releases
        # themselves are pure epsilon-DP: `epsilon-this-run` is their basic composition).
        report.delta = max(per_client(final, "delta").values(), default=0.0)
    else:
        report.epsilon_per_client = dict.fromkeys(clients, math.inf)
    report.add_traffic(metered, node_clients)
    report.phase_seconds = phase_seconds
    report.wall_s = time.time() - start
    per_round = {}
    for node, sizes in metered.train_bytes.items():
        client = node_clients.get(node)
        if client is not None and sizes:
            per_round[client] = {
                "rounds": len(sizes),
                "up": float(np.mean([u for u, _ in sizes])),
                "down": float(np.mean([d for _, d in sizes])),
            }
    num_params = strategy.num_params
    report.extra = {
        "server-accuracy-per-client": dict(sorted(server_accuracy.items())),
        "server-accuracy": float(final["server-accuracy"]),
        "theta-u": strategy.theta_u,
        "theta-d": strategy.theta_d,
        "num-params": num_params,
        "upload-count": strategy.max_upload,
        "server-rounds": num_rounds,
        "schedule": strategy.schedule,
        "uploads-accepted": int(final["uploads-accepted"]),
        "uploads-accepted-per-client": _ints(per_client(final, "uploads-accepted")),
        "local-steps-per-client": _ints(per_client(final, "local-steps")),
        "uploads-rejected": int(final["uploads-rejected"]),
        "rejected": [str(e) for e in strategy.rejected],
        "refused": {str(k): v for k, v in strategy.refused.items()},
        "bytes-per-round": dict(sorted(per_round.items())),
        "dropped": strategy.dropped,
        "history": [
            {
                "round": server_round,
                "accuracy": float(record["accuracy"]),
                "server-accuracy": float(record["server-accuracy"]),
            }
            for server_round, record in sorted(evaluations.items())
        ],
    }
    if strategy.private:
        report.extra["epsilon-per-step"] = strategy.epsilon_per_step()
        report.extra["epsilon-per-c"] = float(strategy.dp_epsilon) / strategy.max_upload
        report.extra["epsilon-this-run"] = dict(sorted(per_client(final, "epsilon-run").items()))
    report.settings = {key: config[key] for key in SETTING_KEYS}
    report.settings["num-server-rounds"] = num_rounds
    return report
