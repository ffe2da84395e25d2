"""The ecos-flower ClientApp: one app whose handlers serve every method (FedAvg, ECOS, DSSGD).

Every handler answers through the node's release boundary (`ecos_flower.flower.release`): the
node's own policy decides what it answers, its one lifetime ledger is charged before its data is
read, and a reply carries only the fields `ecos_flower.privacy.policy.MECHANISMS` declares.
"""

from __future__ import annotations

import os
import time

from flwr.app import ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from ecos_flower.flower.application_client import handle_finetune_evaluate, handle_knn_query
from ecos_flower.flower.baseline_client import handle_data_upload, handle_local_training
from ecos_flower.flower.client_data import client_shard
from ecos_flower.flower.dssgd_client import handle_dssgd_evaluate, handle_dssgd_train
from ecos_flower.flower.ecos_client import handle_ecos_query
from ecos_flower.flower.release import ReleaseBoundary, guarded, refusal
from ecos_flower.models import build_model, evaluate_accuracy, set_torch_threads, train_epochs
from ecos_flower.privacy.policy import NodePolicy, PolicyError


def torch_threads_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the handler with the node's torch thread count: node config `torch-threads`, else the
    run's setting, capped at this machine's cores (several simulated clients on a small machine
    run 50-70x slower when each uses every core)."""
    config = msg.content.get("config") if msg.has_content() else None
    wanted = context.node_config.get("torch-threads")
    if wanted is None and config is not None:
        wanted = config.get("torch-threads", 1)
    try:
        threads = int(wanted or 1)
    except (TypeError, ValueError):
        threads = 1
    set_torch_threads(max(1, min(threads, os.cpu_count() or 1)))
    return call_next(msg, context)


def compute_time_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Research nodes only: add the handler's wall time to the reply as metric `compute-s` (the
    comparison's client compute cost). A private node sends no timing."""
    start = time.perf_counter()
    reply = call_next(msg, context)
    try:
        research = NodePolicy.from_node_config(context.node_config).research
    except PolicyError:
        research = False
    if research and reply.has_content() and isinstance(reply.content.get("metrics"), MetricRecord):
        reply.content["metrics"]["compute-s"] = time.perf_counter() - start
    return reply


def dp_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's `fixedclipping_mod`, run only where the node's policy answers client-level
    DP-FedAvg (Flower's mod turns any reply without arrays, a refusal included, into an error)."""
    try:
        reason = NodePolicy.from_node_config(context.node_config).refusal("clipped-update")
    except PolicyError as exc:
        reason = f"this node's privacy configuration is invalid: {exc}"
    if reason is not None:
        return refusal(msg, reason, context.node_id)
    return fixedclipping_mod(msg, context, call_next)


app = ClientApp(mods=[torch_threads_mod, compute_time_mod])


def _task_model(config, shard):  # noqa: ANN001, ANN202 - ConfigRecord, ClientShard
    images = shard.train.images
    return build_model(
        str(config["model"]),
        num_classes=int(config.get("num-classes", 10)),
        in_channels=images.shape[1],
        image_size=images.shape[-1],
    )


def _train(msg: Message, context: Context, boundary: ReleaseBoundary, mechanism: str) -> Message:
    boundary.admit(mechanism)
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
    if mechanism == "model-update":
        metrics = {"train-loss": loss, "num-examples": len(shard.train)}
    else:  # client-level DP-FedAvg: uniform weights, as Flower's noise calibration assumes
        metrics = {"num-examples": 1}
    arrays = ArrayRecord(model.state_dict())
    return boundary.reply(mechanism, {"arrays": arrays}, {**boundary.node_label(), **metrics})


@app.train()
@guarded
def train(msg: Message, context: Context, boundary: ReleaseBoundary) -> Message:
    """FedAvg local training: load the global model, train on the local shard, return it (not
    private: a private node refuses it unless its node config allows `model-update`)."""
    return _train(msg, context, boundary, "model-update")


@app.evaluate()
@guarded
def evaluate(msg: Message, context: Context, boundary: ReleaseBoundary) -> Message:
    """Score the model the server sent on this client's own test split (exact metrics: only if
    the node's policy reports them)."""
    boundary.admit("evaluation-metrics")
    config = msg.content["config"]
    shard = client_shard(config, context.node_config)
    model = _task_model(config, shard)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    accuracy, loss = evaluate_accuracy(
        model, shard.test.images, shard.test.labels, device=str(config.get("device", "cpu"))
    )
    metrics = {**boundary.node_label(), "accuracy": accuracy, "loss": loss}
    return boundary.reply("evaluation-metrics", {}, metrics)


@app.train("dpfedavg", mods=[dp_clipping_mod])
@guarded
def dp_fedavg_train(msg: Message, context: Context, boundary: ReleaseBoundary) -> Message:
    """Client-level DP-FedAvg: FedAvg's training, Flower's `fixedclipping_mod` clips the update
    and the server adds the noise (central DP, a trusted aggregator: a private node refuses it
    unless its node config allows `clipped-update`)."""
    return _train(msg, context, boundary, "clipped-update")


# The project's protocol handlers, each answered through the release boundary (see their modules).
app.query("ecos")(handle_ecos_query)
app.query("knn")(handle_knn_query)
app.train("dssgd")(handle_dssgd_train)
app.evaluate("dssgd")(handle_dssgd_evaluate)
app.evaluate("finetune")(handle_finetune_evaluate)
app.train("local")(handle_local_training)  # reference point `local`: accuracy only
app.query("upload")(handle_data_upload)  # reference point `centralized`: raw data, no privacy
