"""Flower's own FedAvg (Message API) on the scenario's clients: the baseline every method meets;
and sample-level DP-FedAvg (`run_dp_fedavg_sample`): the same FedAvg, uniform weights, whose
clients train with DP-SGD (`train.dpsgd`, `ecos_flower.client.dp_fedavg`) and charge their own
ledgers."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.supercore import log

from ecos_flower.data.pool import server_federation
from ecos_flower.flower.payload import MeteredGrid
from ecos_flower.flower.report import RunReport, no_results_message
from ecos_flower.flower.settings import client_config
from ecos_flower.flower.task_space import task_input_shape
from ecos_flower.flower.validation import InvalidReplyError, claimed_client, metric, refusal
from ecos_flower.models import build_model
from ecos_flower.privacy.ledger import PrivacyEvent, compose_epsilon

LABEL_METRICS = ("partition-id",)  # a node's label, not a measurement: no average means anything


def without_labels(metrics: MetricRecord | None) -> MetricRecord | None:
    """Flower's aggregate of the replies' metrics without the averaged node labels (FedAvg
    averages every metric, so the clients' partition ids became e.g. 'partition-id': 0.9985 in
    the round's log and in the run's summary)."""
    if metrics is None or not any(key in metrics for key in LABEL_METRICS):
        return metrics
    return MetricRecord({k: v for k, v in metrics.items() if k not in LABEL_METRICS})


def aggregation_order(reply: Message) -> tuple[int, int]:
    """Sort key of a train reply: the client it claims (`claimed_client`: its simulation
    `partition-id`, else its node id), then its node id. A simulation's node ids are random per
    run (Flower draws them from os.urandom, also under `flwr run`), its partition ids are not.
    A claim only orders the sum, it weighs nothing; a reply without a valid claim sorts
    first, by node id."""
    node = reply.metadata.src_node_id
    try:
        return claimed_client(reply, {}), node
    except InvalidReplyError:
        return -1, node


def _finite_arrays(reply: Message) -> bool:
    """Whether every array of the reply's ArrayRecord(s) holds only finite numbers (a reply
    without arrays is left to FedAvg, which rejects it)."""
    for record in reply.content.array_records.values():
        for array in record.values():
            values = array.numpy()
            if values.dtype.kind in "fc" and not np.isfinite(values).all():
                return False
    return True


class RecordingFedAvg(FedAvg):
    """FedAvg that keeps each node's last evaluation metrics (Flower keeps only the average)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.last_evaluation: dict[int, MetricRecord] = {}
        self.node_to_client: dict[int, int] = {}  # checked claims (`claimed_client`)
        self.errors: dict[int, str] = {}
        self._sent: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent = arrays  # what a non-finite reply is replaced by (a zero update)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's weighted average, over the replies in the order of the clients they claim
        (`aggregation_order`): Flower samples the nodes in random order, and floating-point
        sums depend on the order, so without this a run with the same seed would not repeat
        exactly. A reply whose arrays are not all finite (a diverged or hostile client) counts
        as the model it was sent, i.e. a zero update, named in the log and in `errors`: one
        NaN would otherwise make the global model NaN for the rest of the run, and keeping
        the reply (not dropping it) keeps the divisor a DP wrapper calibrated its noise to."""
        ordered = sorted(replies, key=aggregation_order)
        for reply in ordered:
            if not reply.has_error() and not _finite_arrays(reply):
                node = reply.metadata.src_node_id
                self.errors[node] = f"round {server_round}: non-finite model, taken as no update"
                log(WARNING, "node %s sent non-finite parameters: taken as no update", node)
                for key in list(reply.content.array_records):  # the same record, its values reset
                    reply.content[key] = self._sent
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
            try:
                client = claimed_client(reply, self.node_to_client)
            except InvalidReplyError as exc:
                self.errors[exc.node_id] = exc.problem
                log(WARNING, "rejected reply: %s", exc)
                continue
            self.node_to_client[reply.metadata.src_node_id] = client
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
    federation = server_federation(config)
    metered = MeteredGrid(grid)
    model = build_model(
        config["model"],
        federation.num_classes,
        *task_input_shape(config, federation),
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
    node_to_client = {node: recorder.node_to_client[node] for node in recorder.last_evaluation}
    for node_id, metrics in recorder.last_evaluation.items():
        report.accuracy_per_client[node_to_client[node_id]] = float(metrics["accuracy"])
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


DPSGD_TRAIN = "train.dpsgd"


class UniformFedAvg(RecordingFedAvg):
    """FedAvg whose train messages go to the ClientApp action `train_action`, carrying the extra
    `train_records` as well, and average with uniform weights: every reply must state the weight
    `weight_key` = 1 (a node claiming more would move the average beyond its share), and one that
    does not (or refuses, or is malformed) is dropped with the node and the reason named.

    Parameters
    ----------
    train_action : str
        The train messages' type (e.g. ``"train.dpsgd"``).
    train_records : mapping of str to ConfigRecord, optional
        Records added to every train message (e.g. the DP-SGD request).
    weight_key : str
        The reply metric FedAvg weighs by; it must be 1.
    **kwargs
        FedAvg's own arguments.
    """

    def __init__(
        self,
        train_action: str,
        train_records: dict[str, ConfigRecord] | None = None,
        weight_key: str = "weight",
        **kwargs: Any,
    ) -> None:
        super().__init__(weighted_by_key=weight_key, **kwargs)
        self.train_action = train_action
        self.train_records = dict(train_records or {})
        self.last_train: dict[int, MetricRecord] = {}  # each node's latest kept train metrics
        # Every answered (not refused) reply's metrics by node, kept or dropped: a node whose
        # update is dropped still spent what it states.
        self.train_replies: dict[int, list[MetricRecord]] = {}

    def _construct_messages(
        self, record: RecordDict, node_ids: list[int], message_type: str
    ) -> Iterable[Message]:
        if message_type == MessageType.TRAIN:
            record = RecordDict({**dict(record.items()), **self.train_records})
            message_type = self.train_action
        return super()._construct_messages(record, node_ids, message_type)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                kept.append(reply)  # FedAvg logs and skips it
                continue
            reason = refusal(reply)
            if reason is None and isinstance(reply.content.get("metrics"), MetricRecord):
                self.train_replies.setdefault(node, []).append(reply.content["metrics"])
            try:
                if reason is not None:
                    raise InvalidReplyError(node, f"refused: {reason}")
                weight = metric(reply, self.weighted_by_key, low=0.0)
                if weight != 1.0:
                    raise InvalidReplyError(
                        node, f"weight {self.weighted_by_key}={weight:g}, uniform weights need 1"
                    )
            except InvalidReplyError as exc:
                self.errors[node] = exc.problem
                log(WARNING, "%s: dropping node %s's update: %s", self.train_action, node, exc)
                continue
            self.last_train[node] = reply.content["metrics"]
            kept.append(reply)
        if not any(not reply.has_error() for reply in kept):
            return None, None  # nothing to average: the model stays as it was
        return super().aggregate_train(server_round, kept)


def dpsgd_request(config: dict[str, Any]) -> ConfigRecord:
    """The `dpsgd` record of sample-level DP-FedAvg's train messages (`DPSGD_TASK` on the
    client), from the run config."""
    return ConfigRecord(
        {
            "epsilon": config["dp-sample-epsilon"],
            "delta": config["delta"],
            "num-rounds": config["num-server-rounds"],
            "local-epochs": config["local-epochs"],
            "sample-rate": config["dp-sample-rate"],
            "max-grad-norm": config["dp-max-grad-norm"],
            "expected-batch-size": float(config["batch-size"]),
            "learning-rate": config["learning-rate"],
        }
    )


def run_cost(replies: list[MetricRecord], delta: float) -> float:
    """A node's epsilon for this run at `delta`: the DP-SGD steps its replies say it charged
    (noise multiplier, sample rate, steps: message-derived numbers), composed as its ledger
    composes them; inf if a reply does not say. With a fresh ledger this is its
    `epsilon-spent`; on a node with a lifetime ledger `epsilon-spent` also counts earlier runs."""
    try:
        events = [
            PrivacyEvent.dpsgd(
                float(m["noise-multiplier"]), float(m["sample-rate"]), int(m["steps"])
            )
            for m in replies
        ]
        return compose_epsilon(events, delta)
    except (KeyError, TypeError, ValueError, OverflowError):
        return math.inf  # a malformed reply: its cost is unknown, never reported as 0


def run_dp_fedavg_sample(grid: Grid, config: dict[str, Any]) -> RunReport:
    """Sample-level DP-FedAvg: Flower's FedAvg with uniform weights, every client running local
    DP-SGD (Opacus, Poisson sampling at `dp-sample-rate`, per-sample clipping at
    `dp-max-grad-norm`) with the noise it calibrates itself so that the whole run
    (`num-server-rounds` x `local-epochs`) costs it at most `dp-sample-epsilon` at `delta`, charged
    to its own ledger round by round. Record-level add/remove privacy; the clients add the noise,
    so the server is not trusted with anything exact."""
    num_nodes = len(list(grid.get_node_ids()))
    strategy = UniformFedAvg(
        DPSGD_TRAIN,
        {"dpsgd": dpsgd_request(config)},
        fraction_train=config["fraction-train"],
        min_train_nodes=1,
        min_evaluate_nodes=num_nodes,
        min_available_nodes=num_nodes,
    )
    report = run_fedavg_with(grid, config, strategy, strategy, method="dp-fedavg-sample")
    for node in strategy.last_evaluation:
        # A node never sampled to train released nothing private (0).
        replies = strategy.train_replies.get(node, [])
        client = strategy.node_to_client[node]
        report.epsilon_per_client[client] = run_cost(replies, config["delta"])
    report.delta = config["delta"]
    report.extra["privacy-unit"] = (
        "record-level add/remove of one client sample (each client adds the noise: DP-SGD "
        "with Poisson sampling, every round composed in its own ledger)"
    )
    noise = sorted({float(m["noise-multiplier"]) for m in strategy.last_train.values()})
    report.settings.update(
        {
            "dp-sample-epsilon": config["dp-sample-epsilon"],
            "dp-sample-rate": config["dp-sample-rate"],
            "dp-max-grad-norm": config["dp-max-grad-norm"],
            "delta": config["delta"],
            "noise-multiplier": noise[0] if len(noise) == 1 else noise,
        }
    )
    return report
