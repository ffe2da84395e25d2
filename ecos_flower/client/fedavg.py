"""Client handlers of FedAvg (`train`, `evaluate`) and client-level DP-FedAvg (`train.dpfedavg`,
registered with `dp_clipping_mod`): load the global model, train or score it on the local shard.

Neither FedAvg reply is private: a node under the private policy refuses `train` unless its node
config allows `model-update`, reports exact metrics only with `report-metrics = true`, and
answers DP-FedAvg (central DP, a trusted aggregator) only if it allows `clipped-update`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message
from torch import nn

from ecos_flower.client.data import LoadData, client_shard, task_inputs
from ecos_flower.client.messages import MODEL_CONFIG
from ecos_flower.client.release import ReleaseBoundary, guarded
from ecos_flower.data import ClientShard
from ecos_flower.models import build_model, evaluate_accuracy, train_epochs


def task_model(fields: Mapping[str, Any], shard: ClientShard) -> nn.Module:
    """The model the parsed config names (`MODEL_CONFIG`: `model`, `num-classes`), shaped for
    this node's images."""
    images = shard.train.images
    return build_model(
        fields["model"],
        num_classes=fields["num-classes"],
        in_channels=images.shape[1],
        image_size=images.shape[-1],
    )


def answer_train(
    msg: Message,
    context: Context,
    boundary: ReleaseBoundary,
    mechanism: str = "model-update",
    load_data: LoadData = client_shard,
) -> Message:
    """FedAvg local training (`mechanism` "model-update"), or DP-FedAvg's ("clipped-update"):
    load the global model, train on the local shard, return it."""
    boundary.admit(mechanism)
    config = msg.content["config"]
    fields = MODEL_CONFIG.parse(config, context.node_config)
    shard = task_inputs(load_data(config, context.node_config), config, context.node_config)
    model = task_model(fields, shard)
    received = msg.content["arrays"]
    model.load_state_dict(received.to_torch_state_dict())
    loss = train_epochs(
        model,
        shard.train.images,
        shard.train.labels,
        epochs=int(config["local-epochs"]),
        batch_size=int(config["batch-size"]),
        learning_rate=float(config["learning-rate"]),
        seed=int(config.get("seed", 0)) * 1_000 + int(config.get("server-round", 0)),
        device=str(config.get("device", "cpu")),
    )
    if mechanism == "model-update":
        metrics = {"train-loss": loss, "num-examples": len(shard.train)}
    else:  # client-level DP-FedAvg: uniform weights, as Flower's noise calibration assumes
        metrics = {"num-examples": 1}
    # A model that diverged (non-finite parameters, e.g. local SGD from a noisy DP-FedAvg model)
    # goes back as the model received: a zero update, which any clipping norm admits, instead of
    # a NaN that would end the federation's model. A function of the update only, like clipping.
    finite = all(
        torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point()
    )
    arrays = ArrayRecord(model.state_dict()) if finite else received
    return boundary.reply(mechanism, {"arrays": arrays}, {**boundary.node_label(), **metrics})


def answer_evaluate(
    msg: Message, context: Context, boundary: ReleaseBoundary, load_data: LoadData = client_shard
) -> Message:
    """Score the model the server sent on this client's own test split (exact metrics: only if
    the node's policy reports them)."""
    boundary.admit("evaluation-metrics")
    config = msg.content["config"]
    fields = MODEL_CONFIG.parse(config, context.node_config)
    shard = task_inputs(load_data(config, context.node_config), config, context.node_config)
    model = task_model(fields, shard)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    accuracy, loss = evaluate_accuracy(
        model, shard.test.images, shard.test.labels, device=str(config.get("device", "cpu"))
    )
    metrics = {**boundary.node_label(), "accuracy": accuracy, "loss": loss}
    return boundary.reply("evaluation-metrics", {}, metrics)


def fedavg_train_handler(
    load_data: LoadData = client_shard,
) -> Callable[[Message, Context], Message]:
    """FedAvg's `train` handler, reading this node's data with `load_data(config, node_config)`."""

    def train(msg: Message, context: Context, boundary: ReleaseBoundary) -> Message:
        return answer_train(msg, context, boundary, "model-update", load_data)

    return guarded(train)


def fedavg_evaluate_handler(
    load_data: LoadData = client_shard,
) -> Callable[[Message, Context], Message]:
    """FedAvg's `evaluate` handler, reading this node's data with `load_data`."""

    def evaluate(msg: Message, context: Context, boundary: ReleaseBoundary) -> Message:
        return answer_evaluate(msg, context, boundary, load_data)

    return guarded(evaluate)


def dp_fedavg_train_handler(
    load_data: LoadData = client_shard,
) -> Callable[[Message, Context], Message]:
    """Client-level DP-FedAvg's `train.dpfedavg` handler: FedAvg's training, to be registered
    with `dp_clipping_mod` (Flower's `fixedclipping_mod` clips the update, the server adds the
    noise)."""

    def dp_fedavg_train(msg: Message, context: Context, boundary: ReleaseBoundary) -> Message:
        return answer_train(msg, context, boundary, "clipped-update", load_data)

    return guarded(dp_fedavg_train)


handle_fedavg_train = fedavg_train_handler()
"""FedAvg's `train` on the project's scenarios (`client_shard`)."""

handle_fedavg_evaluate = fedavg_evaluate_handler()
"""FedAvg's `evaluate` on the project's scenarios (`client_shard`)."""

handle_dp_fedavg_train = dp_fedavg_train_handler()
"""DP-FedAvg's `train.dpfedavg` on the project's scenarios (register with `dp_clipping_mod`)."""
