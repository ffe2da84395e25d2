"""Client handlers of the reference points: `local` (train alone, report accuracy) and
`centralized` (upload the raw training shard: the non-private upper bound, with its real cost).
Neither is private: a node under the private policy refuses both unless its operator opts in
(`report-metrics = true` for `local`, `allow = "raw-upload"` for the upload)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message

from ecos_flower.client.data import LoadData, client_shard, task_inputs
from ecos_flower.client.messages import MODEL_CONFIG
from ecos_flower.client.release import ReleaseBoundary, guarded
from ecos_flower.models import build_model, evaluate_accuracy, train_epochs


def answer_local_training(
    msg: Message, context: Context, boundary: ReleaseBoundary, load_data: LoadData = client_shard
) -> Message:
    """Train a fresh task model on this client's own shard only; reply with its test accuracy."""
    boundary.admit("evaluation-metrics")
    config = msg.content["config"]
    task_model = MODEL_CONFIG.parse(config, context.node_config)
    shard = task_inputs(load_data(config, context.node_config), config, context.node_config)
    images = shard.train.images
    model = build_model(
        task_model["model"],
        task_model["num-classes"],
        images.shape[1],
        images.shape[-1],
        seed=int(config.get("seed", 0)),
    )
    device = str(config.get("device", "cpu"))
    train_epochs(
        model,
        images,
        shard.train.labels,
        epochs=int(config["local-train-epochs"]),
        batch_size=int(config["batch-size"]),
        learning_rate=float(config["learning-rate"]),
        seed=int(config.get("seed", 0)),
        device=device,
    )
    accuracy, loss = evaluate_accuracy(model, shard.test.images, shard.test.labels, device=device)
    metrics = {**boundary.node_label(), "accuracy": accuracy, "loss": loss}
    return boundary.reply("evaluation-metrics", {}, metrics)


def answer_data_upload(
    msg: Message, context: Context, boundary: ReleaseBoundary, load_data: LoadData = client_shard
) -> Message:
    """Send the raw training shard to the server (what `centralized` assumes clients would do)."""
    boundary.admit("raw-upload")
    config = msg.content["config"]
    shard = task_inputs(load_data(config, context.node_config), config, context.node_config)
    data = ArrayRecord(
        {
            "images": Array(np.ascontiguousarray(shard.train.images.numpy())),
            "labels": Array(np.ascontiguousarray(shard.train.labels.numpy())),
        }
    )
    return boundary.reply("raw-upload", {"data": data}, boundary.node_label())


def local_training_handler(
    load_data: LoadData = client_shard,
) -> Callable[[Message, Context], Message]:
    """The `train.local` handler (reference point `local`), reading this node's data with
    `load_data(config, node_config)`."""

    def handle_local_training(msg: Message, context: Context, boundary: ReleaseBoundary) -> Message:
        return answer_local_training(msg, context, boundary, load_data)

    return guarded(handle_local_training)


def data_upload_handler(
    load_data: LoadData = client_shard,
) -> Callable[[Message, Context], Message]:
    """The `query.upload` handler (reference point `centralized`), reading with `load_data`."""

    def handle_data_upload(msg: Message, context: Context, boundary: ReleaseBoundary) -> Message:
        return answer_data_upload(msg, context, boundary, load_data)

    return guarded(handle_data_upload)


handle_local_training = local_training_handler()
"""`train.local` on the project's scenarios (`client_shard`)."""

handle_data_upload = data_upload_handler()
"""`query.upload` on the project's scenarios (`client_shard`)."""
