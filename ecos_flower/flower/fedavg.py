"""Flower's own FedAvg (Message API) on the scenario's clients: the baseline every method meets."""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import WARNING
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.supercore import log

from ecos_flower.data import load_federation
from ecos_flower.flower.payload import MeteredGrid
from ecos_flower.flower.report import RunReport, no_results_message
from ecos_flower.flower.settings import client_config
from ecos_flower.models import build_model

LABEL_METRICS = ("partition-id",)  # a node's label, not a measurement: no average means anything


def without_labels(metrics: MetricRecord | None) -> MetricRecord | None:
    """Flower's aggregate of the replies' metrics without the averaged node labels (FedAvg
    averages every metric, so the clients' partition ids became e.g. 'partition-id': 0.9985 in
    the round's log and in the run's summary)."""
    if metrics is None or not any(key in metrics for key in LABEL_METRICS):
        return metrics
    return MetricRecord({k: v for k, v in metrics.items() if k not in LABEL_METRICS})


class RecordingFedAvg(FedAvg):
    """FedAvg that keeps each node's last evaluation metrics (Flower keeps only the average)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.last_evaluation: dict[int, MetricRecord] = {}
        self.errors: dict[int, str] = {}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's weighted average, over the replies in node-id order: Flower samples the
        nodes in random order, and floating-point sums depend on the order, so without this a
        run with the same seed would not repeat exactly."""
        ordered = sorted(replies, key=lambda reply: reply.metadata.src_node_id)
        arrays, metrics = super().aggregate_train(server_round, ordered)
        return arrays, without_labels(metrics)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Keep each node's metrics and return their unweighted mean accuracy: nodes do not
        release their test-set sizes, so there is nothing to weight by."""
        accuracies = []
        for reply in replies:
            if reply.has_error() or "refusal" in reply.content:
                reason = (
                    str(reply.error.reason)
                    if reply.has_error()
                    else str(reply.content["refusal"]["reason"])
                )
                self.errors[reply.metadata.src_node_id] = reason
                log(WARNING, "node %s failed to evaluate: %s", reply.metadata.src_node_id, reason)
                continue
            metrics = reply.content.get("metrics")
            if not isinstance(metrics, MetricRecord) or "accuracy" not in metrics:
                self.errors[reply.metadata.src_node_id] = "no accuracy in its evaluate reply"
                continue
            self.last_evaluation[reply.metadata.src_node_id] = metrics
            accuracies.append(float(metrics["accuracy"]))
        if not accuracies:
            return None
        return MetricRecord({"accuracy": sum(accuracies) / len(accuracies)})


def run_fedavg(grid: Grid, config: dict[str, Any]) -> RunReport:
    """Run FedAvg for `num-server-rounds` rounds and report per-client test accuracy and bytes."""
    num_nodes = len(list(grid.get_node_ids()))
    strategy = RecordingFedAvg(
        fraction_train=config["fraction-train"],
        min_train_nodes=1,
        min_evaluate_nodes=num_nodes,
        min_available_nodes=num_nodes,
    )
    return run_fedavg_with(grid, config, strategy, strategy, method="fedavg")


def run_fedavg_with(
    grid: Grid, config: dict[str, Any], strategy: Strategy, recorder: RecordingFedAvg, method: str
) -> RunReport:
    """Start `strategy` (FedAvg, or a wrapper around `recorder`) and report what `recorder` saw."""
    start = time.time()
    federation = load_federation(
        config["scenario"],
        data_root=config["data-root"] or None,
        num_clients=config.get("num-clients"),
    )
    metered = MeteredGrid(grid)
    images = federation.pool.images
    model = build_model(
        config["model"],
        federation.num_classes,
        images.shape[1],
        images.shape[-1],
        seed=config["seed"],
    )
    strategy.start(
        grid=metered,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=config["num-server-rounds"],
        train_config=client_config(config),
        evaluate_config=client_config(config),
    )
    if not recorder.last_evaluation:
        raise RuntimeError(no_results_message(recorder.errors))
    report = RunReport(method=method, seed=config["seed"], scenario=config["scenario"])
    node_to_client = {}
    for node_id, metrics in recorder.last_evaluation.items():
        client = int(metrics["partition-id"])
        node_to_client[node_id] = client
        report.accuracy_per_client[client] = float(metrics["accuracy"])
    report.add_traffic(metered, node_to_client)
    if recorder.errors:  # nodes whose replies were dropped (named, with the reason)
        report.extra["problems"] = {str(node): reason for node, reason in recorder.errors.items()}
    report.wall_s = time.time() - start
    report.phase_seconds["federated-training"] = report.wall_s
    report.settings = {
        k: config[k]
        for k in (
            "num-server-rounds",
            "local-epochs",
            "batch-size",
            "learning-rate",
            "model",
            "fraction-train",
        )
    }
    return report
