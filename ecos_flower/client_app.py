"""The ecos-flower ClientApp: one app whose handlers serve every method (FedAvg, ECOS, DSSGD)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod

from ecos_flower.flower.application_client import handle_finetune_evaluate, handle_knn_query
from ecos_flower.flower.baseline_client import handle_data_upload, handle_local_training
from ecos_flower.flower.client_data import client_shard
from ecos_flower.flower.dssgd_client import handle_dssgd_evaluate, handle_dssgd_train
from ecos_flower.flower.ecos_client import handle_ecos_query
from ecos_flower.models import build_model, evaluate_accuracy, set_torch_threads, train_epochs

app = ClientApp()


def timed(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Run the handler with the run's torch thread count (config `torch-threads`) and add its wall
    time to the reply as metric `compute-s` (the client's compute cost)."""

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        start = time.perf_counter()
        set_torch_threads(int(msg.content["config"].get("torch-threads", 1)))
        reply = handler(msg, context)
        if reply.has_content() and isinstance(reply.content.get("metrics"), MetricRecord):
            reply.content["metrics"]["compute-s"] = time.perf_counter() - start
        return reply

    return wrapper


def _task_model(config, shard):  # noqa: ANN001, ANN202 - ConfigRecord, ClientShard
    images = shard.train.images
    return build_model(
        str(config["model"]),
        num_classes=int(config.get("num-classes", 10)),
        in_channels=images.shape[1],
        image_size=images.shape[-1],
    )


@app.train()
@timed
def train(msg: Message, context: Context) -> Message:
    """FedAvg local training: load the global model, train on the local shard, return it."""
    config = msg.content["config"]
    shard = client_shard(config, context.node_config)
    model = _task_model(config, shard)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
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
    metrics = MetricRecord({"train-loss": loss, "num-examples": len(shard.train)})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
@timed
def evaluate(msg: Message, context: Context) -> Message:
    """Score the model the server sent on this client's own test split."""
    config = msg.content["config"]
    shard = client_shard(config, context.node_config)
    model = _task_model(config, shard)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    accuracy, loss = evaluate_accuracy(
        model, shard.test.images, shard.test.labels, device=str(config.get("device", "cpu"))
    )
    metrics = MetricRecord(
        {
            "accuracy": accuracy,
            "loss": loss,
            "num-examples": len(shard.test),
            "partition-id": int(context.node_config["partition-id"]),
        }
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


@app.query("ecos")
@timed
def ecos_query(msg: Message, context: Context) -> Message:
    """ECOS: noisy coverage counts of this client's data for the server's centroids."""
    return handle_ecos_query(msg, context)


@app.train("dssgd")
@timed
def dssgd_train(msg: Message, context: Context) -> Message:
    """DSSGD: one participant step on the local model kept in this node's state."""
    return handle_dssgd_train(msg, context)


@app.evaluate("dssgd")
@timed
def dssgd_evaluate(msg: Message, context: Context) -> Message:
    """DSSGD: score the local model and the server's global model on the local test split."""
    return handle_dssgd_evaluate(msg, context)


@app.train("dpfedavg", mods=[fixedclipping_mod])
@timed
def dp_fedavg_train(msg: Message, context: Context) -> Message:
    """DP-FedAvg local training: FedAvg's handler; Flower's `fixedclipping_mod` clips the update."""
    return train(msg, context)


@app.train("local")
@timed
def local_train(msg: Message, context: Context) -> Message:
    """Reference point `local`: train alone on the own shard, report test accuracy only."""
    return handle_local_training(msg, context)


@app.query("upload")
@timed
def upload_data(msg: Message, context: Context) -> Message:
    """Reference point `centralized`: send the raw training shard (no privacy)."""
    return handle_data_upload(msg, context)


@app.query("knn")
@timed
def knn_query(msg: Message, context: Context) -> Message:
    """Private kNN labelling: noisy label votes for the server's selected samples."""
    return handle_knn_query(msg, context)


@app.evaluate("finetune")
@timed
def finetune_evaluate(msg: Message, context: Context) -> Message:
    """DP last-layer fine-tuning of the received model, then test accuracy."""
    return handle_finetune_evaluate(msg, context)
