"""The server loop of DSSGD: schedule participants round by round (`train.dssgd`), fold their
sparse uploads into the parameter server, and evaluate local and server models (`evaluate.dssgd`).

Server rounds are derived, not read from `num-server-rounds`: `dssgd-epochs` local epochs per
participant take epochs * participants rounds with one participant per round (round-robin, random)
and `dssgd-epochs` rounds when all participants train in parallel.
"""

from __future__ import annotations

import math
import time
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from ecos_flower.data import load_federation
from ecos_flower.dssgd import flatten_params
from ecos_flower.flower.dssgd_client import seeded_model
from ecos_flower.flower.dssgd_strategy import DSSGDStrategy
from ecos_flower.flower.payload import MeteredGrid
from ecos_flower.flower.report import RunReport, no_results_message
from ecos_flower.flower.sampling_run import PhaseTimer
from ecos_flower.flower.settings import client_config
from ecos_flower.flower.validation import drop_events, refusal, too_few_message

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
    "tau",
    "dssgd-epsilon",
    "svt-split",
    "stat-beta",
    "stat-decay-every",
    "evaluate-every",
)


def make_strategy(config: dict[str, Any], initial: np.ndarray, num_classes: int) -> DSSGDStrategy:
    """A DSSGDStrategy from the run config (gamma 0: no clipping; dssgd-epsilon 0: no DP;
    stat-decay-every 0: stat never decays)."""
    gamma = float(config["gamma"])
    epsilon = float(config["dssgd-epsilon"])
    decay_every = int(config["stat-decay-every"])
    return DSSGDStrategy(
        initial,
        theta_u=float(config["theta-u"]),
        theta_d=float(config["theta-d"]),
        schedule=str(config["dssgd-schedule"]),
        upload_mode=str(config["upload-mode"]),
        gamma=gamma if gamma > 0 else None,
        tau=float(config["tau"]),
        dp_epsilon=epsilon if epsilon > 0 else None,
        svt_split=str(config["svt-split"]),
        beta=float(config["stat-beta"]) if decay_every > 0 else None,
        decay_every=decay_every,
        num_classes=num_classes,
        seed=int(config["seed"]),
    )


def _evaluate(
    strategy: DSSGDStrategy,
    grid: MeteredGrid,
    server_round: int,
    config: dict[str, Any],
    dropped: list[dict[str, Any]] | None = None,
) -> dict[str, float] | None:
    messages = strategy.configure_evaluate(
        server_round, strategy.global_arrays(), client_config(config), grid
    )
    replies = list(grid.send_and_receive(messages, timeout=float(config["timeout"])))
    rejected_before = len(strategy.rejected)
    refused_now = {r.metadata.src_node_id for r in replies if refusal(r) is not None}
    strategy.evaluated_nodes = set()
    result = strategy.aggregate_evaluate(server_round, replies)
    events = drop_events(
        "evaluate",
        server_round,
        [m.metadata.dst_node_id for m in messages],
        strategy.evaluated_nodes | refused_now,
        strategy.rejected[rejected_before:],
        strategy.node_to_client,
    )
    if dropped is not None:
        dropped += events
    min_clients = int(config.get("min-clients", 1))
    if result is not None and len(strategy.evaluated_nodes) < min_clients:
        raise RuntimeError(
            too_few_message("DSSGD evaluation", len(strategy.evaluated_nodes), min_clients, events)
        )
    if result is None:
        return None
    point = {"round": server_round, **{k: float(v) for k, v in result.items()}}
    log(
        INFO,
        "round %d: local accuracy %.4f, server-model accuracy %.4f",
        server_round,
        point["accuracy"],
        point["server-accuracy"],
    )
    return point


def run_dssgd(grid: Grid, config: dict[str, Any]) -> RunReport:
    """Run DSSGD for `dssgd-epochs` local epochs per participant; report local and server-model
    accuracy, epsilon per participant (pure DP ledger totals) and bytes."""
    start, timer = time.time(), PhaseTimer()
    seed = int(config["seed"])
    federation = load_federation(
        config["scenario"],
        data_root=config["data-root"] or None,
        num_clients=config.get("num-clients"),
    )
    scenario = federation.scenario
    metered = MeteredGrid(grid)
    nodes = sorted(grid.get_node_ids())
    with timer("init"):
        model = seeded_model(
            str(config["model"]),
            seed,
            federation.num_classes,
            scenario.channels,
            scenario.image_size,
        )
        strategy = make_strategy(config, flatten_params(model), federation.num_classes)
    strategy.summary()
    num_rounds = strategy.num_rounds(int(config["dssgd-epochs"]), len(nodes))
    evaluate_every = int(config["evaluate-every"])
    log(
        INFO,
        "DSSGD: %d participants, %d server rounds (%d local epochs each, %s)",
        len(nodes),
        num_rounds,
        int(config["dssgd-epochs"]),
        strategy.schedule_name,
    )
    train_config = client_config(config)
    # Rounds go on with the participants that answer; a participant that crashed, timed out,
    # disconnected or sent an invalid upload in its latest scheduled step counts as dropped
    # (a refusal, e.g. its privacy budget, is an answer). The run stops when fewer than
    # `min-clients` participants remain; `dropped` names who dropped, when and why.
    min_clients = int(config.get("min-clients", 1))
    if min_clients > len(nodes):
        raise RuntimeError(f"min-clients={min_clients} but only {len(nodes)} node(s) connected")
    dropped: list[dict[str, Any]] = []
    latest_drop: dict[int, dict[str, Any]] = {}
    round_bytes: dict[int, list[tuple[int, int]]] = {}
    history: list[dict[str, float]] = []
    train_s = 0.0
    for server_round in range(1, num_rounds + 1):
        tick = time.perf_counter()
        up, down = dict(metered.bytes_up), dict(metered.bytes_down)
        messages = strategy.configure_train(server_round, ArrayRecord(), train_config, metered)
        replies = metered.send_and_receive(messages, timeout=float(config["timeout"]))
        rejected_before = len(strategy.rejected)
        strategy.aggregate_train(server_round, replies)
        events = drop_events(
            "train",
            server_round,
            [m.metadata.dst_node_id for m in messages],
            strategy.answered_nodes,
            strategy.rejected[rejected_before:],
            strategy.node_to_client,
        )
        dropped += events
        for msg in messages:
            latest_drop.pop(msg.metadata.dst_node_id, None)
        latest_drop.update((e["node"], e) for e in events)
        if len(nodes) - len(latest_drop) < min_clients:
            raise RuntimeError(
                too_few_message(
                    f"DSSGD round {server_round}",
                    len(nodes) - len(latest_drop),
                    min_clients,
                    latest_drop.values(),
                )
            )
        for msg in messages:
            node = msg.metadata.dst_node_id
            round_bytes.setdefault(node, []).append(
                (
                    metered.bytes_up.get(node, 0) - up.get(node, 0),
                    metered.bytes_down.get(node, 0) - down.get(node, 0),
                )
            )
        train_s += time.perf_counter() - tick
        if server_round % max(1, num_rounds // 10) == 0:
            log(
                INFO,
                "[train] round %d/%d: %d uploads applied, %d rejected, %d refused",
                server_round,
                num_rounds,
                strategy.accepted,
                len(strategy.rejected),
                len(strategy.refused),
            )
        if evaluate_every > 0 and server_round % evaluate_every == 0 and server_round < num_rounds:
            with timer("evaluate"):
                point = _evaluate(strategy, metered, server_round, config, dropped)
            if point is not None:
                history.append(point)
    timer.seconds["train"] = train_s
    with timer("evaluate"):
        point = _evaluate(strategy, metered, num_rounds, config, dropped)
    if point is None:
        errors = {e.node_id: e.problem for e in strategy.rejected}
        errors.update(strategy.refused)
        raise RuntimeError(no_results_message(errors))
    history.append(point)
    report = RunReport(method="dssgd", seed=seed, scenario=str(config["scenario"]))
    report.accuracy_per_client = dict(strategy.accuracy)
    clients = sorted(strategy.accuracy)
    if strategy.private:
        report.epsilon_per_client = {c: strategy.epsilon_spent.get(c, 0.0) for c in clients}
        # Each node's one lifetime ledger states its total at its own delta (the SVT releases
        # themselves are pure epsilon-DP: `epsilon-this-run` is their basic composition).
        report.delta = max(strategy.ledger_delta.values(), default=0.0)
    else:
        report.epsilon_per_client = dict.fromkeys(clients, math.inf)
    report.add_traffic(metered, strategy.node_to_client)
    report.phase_seconds = timer.seconds
    report.wall_s = time.time() - start
    per_round = {}
    for node, sizes in round_bytes.items():
        client = strategy.node_to_client.get(node)
        if client is not None and sizes:
            per_round[client] = {
                "rounds": len(sizes),
                "up": float(np.mean([u for u, _ in sizes])),
                "down": float(np.mean([d for _, d in sizes])),
            }
    report.extra = {
        "server-accuracy-per-client": dict(sorted(strategy.server_accuracy.items())),
        "server-accuracy": float(np.mean(list(strategy.server_accuracy.values()))),
        "theta-u": strategy.theta_u,
        "theta-d": strategy.theta_d,
        "num-params": strategy.server.num_params,
        "upload-count": strategy.max_upload,
        "server-rounds": num_rounds,
        "schedule": strategy.schedule_name,
        "uploads-accepted": strategy.accepted,
        "uploads-accepted-per-client": dict(sorted(strategy.accepted_per_client.items())),
        "local-steps-per-client": dict(sorted(strategy.local_steps.items())),
        "uploads-rejected": len(strategy.rejected),
        "rejected": [str(e) for e in strategy.rejected],
        "refused": {str(k): v for k, v in strategy.refused.items()},
        "bytes-per-round": dict(sorted(per_round.items())),
        "dropped": dropped,
        "history": history,
    }
    if strategy.private:
        report.extra["epsilon-per-step"] = strategy.epsilon_per_step()
        report.extra["epsilon-per-c"] = float(strategy.dp_epsilon) / strategy.max_upload
        report.extra["epsilon-this-run"] = dict(sorted(strategy.epsilon_run.items()))
    report.settings = {key: config[key] for key in SETTING_KEYS}
    report.settings["num-server-rounds"] = num_rounds
    return report
