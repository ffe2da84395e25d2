"""Client handlers of the reference points: `local` (train alone, report accuracy) and
`centralized` (upload the raw training shard: the non-private upper bound, with its real cost)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict

from ecos_flower.flower.client_data import client_shard
from ecos_flower.models import build_model, evaluate_accuracy, train_epochs


def handle_local_training(msg: Message, context: Context) -> Message:
    """Train a fresh task model on this client's own shard only; reply with its test accuracy."""
    config = msg.content["config"]
    shard = client_shard(config, context.node_config)
    images = shard.train.images
    model = build_model(
        str(config["model"]),
        int(config.get("num-classes", 10)),
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
    metrics = MetricRecord(
        {
            "accuracy": accuracy,
            "loss": loss,
            "num-examples": len(shard.test),
            "partition-id": int(context.node_config["partition-id"]),
        }
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


def handle_data_upload(msg: Message, context: Context) -> Message:
    """Send the raw training shard to the server (what `centralized` assumes clients would do)."""
    config = msg.content["config"]
    shard = client_shard(config, context.node_config)
    data = ArrayRecord(
        {
            "images": Array(np.ascontiguousarray(shard.train.images.numpy())),
            "labels": Array(np.ascontiguousarray(shard.train.labels.numpy())),
        }
    )
    metrics = MetricRecord(
        {"num-examples": len(shard.train), "partition-id": int(context.node_config["partition-id"])}
    )
    return Message(content=RecordDict({"data": data, "metrics": metrics}), reply_to=msg)
