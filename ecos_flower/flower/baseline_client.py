"""Client handlers of the reference points: `local` (train alone, report accuracy) and
`centralized` (upload the raw training shard: the non-private upper bound, with its real cost).
Neither is private: a node under the private policy refuses both unless its operator opts in
(`report-metrics = true` for `local`, `allow = "raw-upload"` for the upload)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message

from ecos_flower.flower.client_data import client_shard
from ecos_flower.flower.release import ReleaseBoundary, guarded
from ecos_flower.models import build_model, evaluate_accuracy, train_epochs


def answer_local_training(msg: Message, context: Context, boundary: ReleaseBoundary) -> Message:
    """Train a fresh task model on this client's own shard only; reply with its test accuracy."""
    boundary.admit("evaluation-metrics")
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
    metrics = {**boundary.node_label(), "accuracy": accuracy, "loss": loss}
    return boundary.reply("evaluation-metrics", {}, metrics)


def answer_data_upload(msg: Message, context: Context, boundary: ReleaseBoundary) -> Message:
    """Send the raw training shard to the server (what `centralized` assumes clients would do)."""
    boundary.admit("raw-upload")
    config = msg.content["config"]
    shard = client_shard(config, context.node_config)
    data = ArrayRecord(
        {
            "images": Array(np.ascontiguousarray(shard.train.images.numpy())),
            "labels": Array(np.ascontiguousarray(shard.train.labels.numpy())),
        }
    )
    return boundary.reply("raw-upload", {"data": data}, boundary.node_label())


handle_local_training = guarded(answer_local_training)


handle_data_upload = guarded(answer_data_upload)
