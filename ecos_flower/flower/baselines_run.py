"""Server loops of the reference points every comparison needs: `local` (each client alone),
`centralized` (all client data pooled in the cloud: the non-private upper bound) and
`dp-fedavg` (Flower's FedAvg inside Flower's central-DP wrapper with client-side fixed clipping)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

from ecos_flower.data.federation import derive_seed
from ecos_flower.data.pool import server_federation
from ecos_flower.flower.fedavg import UniformFedAvg, run_fedavg_with
from ecos_flower.flower.payload import MeteredGrid
from ecos_flower.flower.report import RunReport, no_results_message
from ecos_flower.flower.settings import client_config
from ecos_flower.flower.validation import (
    InvalidReplyError,
    claimed_client,
    first_reply_per_node,
    metric,
    reply_record,
)
from ecos_flower.models import build_model, train_epochs
from ecos_flower.privacy.gaussian import analytic_gaussian_epsilon, analytic_gaussian_sigma
from ecos_flower.strategy.evaluation import evaluate_round

DP_FEDAVG_TRAIN = "train.dpfedavg"


def run_local(grid: Grid, config: dict[str, Any]) -> RunReport:
    """Every client trains alone on its shard; nothing but its test accuracy leaves it."""
    start = time.time()
    metered = MeteredGrid(grid)
    content = RecordDict(
        {
            "config": ConfigRecord(
                {**client_config(config), "local-train-epochs": config["local-train-epochs"]}
            )
        }
    )
    messages = [
        Message(content, node, "train.local", group_id="1") for node in metered.get_node_ids()
    ]
    replies, _ = first_reply_per_node(metered.send_and_receive(messages, timeout=config["timeout"]))
    report = RunReport(method="local", seed=config["seed"], scenario=config["scenario"])
    node_to_client, errors = {}, {}
    for reply in replies:
        try:
            accuracy = metric(reply, "accuracy", low=0.0, high=1.0)
            client = claimed_client(reply, node_to_client)
        except InvalidReplyError as exc:
            errors[exc.node_id] = exc.problem
            continue
        report.accuracy_per_client[client] = accuracy
        report.epsilon_per_client[client] = 0.0  # only an accuracy figure is reported
        node_to_client[reply.metadata.src_node_id] = client
    if not report.accuracy_per_client:
        raise RuntimeError(no_results_message(errors))
    report.add_traffic(metered, node_to_client)
    report.wall_s = time.time() - start
    report.settings = {
        k: config[k] for k in ("model", "local-train-epochs", "batch-size", "learning-rate")
    }
    return report


def run_centralized(grid: Grid, config: dict[str, Any]) -> RunReport:
    """Clients upload their raw training data (metered); the cloud trains on the union; every
    client evaluates the result. The non-private upper bound, with the real cost of uploading."""
    start = time.time()
    metered = MeteredGrid(grid)
    content = RecordDict({"config": client_config(config)})
    messages = [
        Message(content, node, "query.upload", group_id="1") for node in metered.get_node_ids()
    ]
    replies, _ = first_reply_per_node(metered.send_and_receive(messages, timeout=config["timeout"]))
    images, labels = [], []
    for reply in replies:
        try:
            record = reply_record(reply, "data", ArrayRecord)
            x, y = record["images"].numpy(), record["labels"].numpy()
            if x.ndim != 4 or y.shape != (x.shape[0],) or not np.isfinite(x).all():
                raise InvalidReplyError(reply.metadata.src_node_id, "malformed data upload")
        except (InvalidReplyError, KeyError):
            continue
        images.append(torch.from_numpy(np.array(x, dtype=np.float32)))
        labels.append(torch.from_numpy(np.array(y, dtype=np.int64)))
    if not images:
        raise RuntimeError("no client uploaded its data")
    pooled_x, pooled_y = torch.cat(images), torch.cat(labels)
    federation = server_federation(config)
    model = build_model(
        config["model"],
        federation.num_classes,
        pooled_x.shape[1],
        pooled_x.shape[-1],
        seed=config["seed"],
    )
    train_epochs(
        model,
        pooled_x,
        pooled_y,
        epochs=config["cloud-epochs"],
        batch_size=config["batch-size"],
        learning_rate=config["learning-rate"],
        seed=config["seed"],
        device=config["device"],
    )
    evaluation = evaluate_round(
        metered,
        ArrayRecord(model.state_dict()),
        client_config(config),
        timeout=config["timeout"],
    )
    if not evaluation.accuracy:
        raise RuntimeError(no_results_message({e.node_id: e.problem for e in evaluation.rejected}))
    report = RunReport(method="centralized", seed=config["seed"], scenario=config["scenario"])
    report.accuracy_per_client = dict(evaluation.accuracy)
    report.add_traffic(metered, evaluation.node_to_client)
    report.wall_s = time.time() - start
    report.extra = {"pooled-samples": int(len(pooled_y))}
    report.settings = {
        k: config[k] for k in ("model", "cloud-epochs", "batch-size", "learning-rate")
    }
    return report


class SeededServerNoise(DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed-clipping DP wrapper whose server noise can be replayed.

    Flower 1.39 draws the aggregate's Gaussian noise from numpy's global RNG
    (`flwr.supercore.differential_privacy.add_gaussian_noise_inplace`) and takes no seed. With
    `noise_seed >= 0` each round's aggregation runs under a global RNG seeded from
    (noise_seed, round), and the caller's global RNG state is restored afterwards; with -1 the
    wrapper is Flower's, unchanged (fresh entropy). Subclassing keeps Flower's clipping checks,
    accountant and noise calibration instead of re-implementing them.

    Parameters
    ----------
    noise_seed : int
        -1 for fresh entropy, else the seed of every round's noise.
    *args, **kwargs
        What `DifferentialPrivacyClientSideFixedClipping` takes.
    """

    def __init__(self, noise_seed: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.noise_seed = int(noise_seed)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.noise_seed < 0:
            return super().aggregate_train(server_round, replies)
        saved = np.random.get_state()
        np.random.seed(derive_seed(self.noise_seed, server_round))
        try:
            return super().aggregate_train(server_round, replies)
        finally:
            np.random.set_state(saved)


def run_dp_fedavg(grid: Grid, config: dict[str, Any]) -> RunReport:
    """Flower's DifferentialPrivacyClientSideFixedClipping around FedAvg (all nodes every round,
    so no sampling amplification): central DP at the client level with a trusted aggregator (the
    server adds the noise; the clients send their clipped updates exactly). Every client reports
    the weight 1, so the average is unweighted, as the noise calibration (clipping norm over the
    number of clients) assumes. Client-level epsilon from the exact composition of the per-round
    Gaussian releases (noise multiplier z each round: together one of z / sqrt(R))."""
    rounds = config["num-server-rounds"]
    z = config["dp-noise-multiplier"]
    if config["dp-target-epsilon"] > 0:
        # R Gaussian releases with multiplier z compose exactly into one with z / sqrt(R):
        # calibrate that one to the target with the analytic Gaussian mechanism.
        z = analytic_gaussian_sigma(config["dp-target-epsilon"], config["delta"]) * math.sqrt(
            rounds
        )
    num_nodes = len(list(grid.get_node_ids()))
    # Train messages go to the handler with Flower's `fixedclipping_mod`; uniform weights: a reply
    # whose `num-examples` is not 1 is dropped, the node named (the noise, clipping norm / number
    # of clients, is calibrated for an unweighted average; a node claiming a large weight would
    # move it beyond its share and spend more privacy than reported).
    inner = UniformFedAvg(
        DP_FEDAVG_TRAIN,
        weight_key="num-examples",
        fraction_train=1.0,
        min_train_nodes=num_nodes,
        min_evaluate_nodes=num_nodes,
        min_available_nodes=num_nodes,
    )
    strategy = SeededServerNoise(
        config["dp-server-noise-seed"],
        inner,
        noise_multiplier=z,
        clipping_norm=config["dp-clipping-norm"],
        num_sampled_clients=num_nodes,
    )
    report = run_fedavg_with(grid, config, strategy, inner, method="dp-fedavg")
    epsilon = analytic_gaussian_epsilon(z / math.sqrt(rounds), config["delta"])
    report.epsilon_per_client = dict.fromkeys(report.accuracy_per_client, epsilon)
    report.extra["privacy-unit"] = (
        "one whole client (central DP, trusted aggregator adds the noise)"
    )
    report.delta = config["delta"]
    report.settings.update(
        {"dp-noise-multiplier": z, "dp-clipping-norm": config["dp-clipping-norm"]}
    )
    return report
