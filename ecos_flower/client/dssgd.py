"""The DSSGD participant: keep the local model in `context.state`, overwrite the downloaded
entries, train one local epoch, charge the pure-DP ledger (SVT uploads), reply with a sparse upload.

The local model lives in `context.state` (a flat float32 vector), so the same handler works in
Flower's simulation engine and on a real SuperNode. On first contact the participant builds the
run's model from the shared seed (the server starts from the same initial parameters) and then
applies the download.

The participant owns its budget: with DP on (the sparse vector technique), the true epsilon of
each upload is charged to the node's one lifetime ledger (`ecos_flower.client.release`) before the
participant reads its data, and an upload past the node's `epsilon-limit` (node config only) is
refused. A node under the private policy refuses uploads without the SVT. Every task is checked
before anything is allocated, and refused with a reason when it is absurd; the task's and the
config's fields are declared once, in `ecos_flower.client.messages` (`DSSGD_TASK`,
`DSSGD_EVALUATION`, `DSSGD_CONFIG`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from torch import nn

from ecos_flower.client.data import LoadData, check_data_source, client_shard, task_inputs
from ecos_flower.client.messages import DSSGD_CONFIG, DSSGD_EVALUATION, DSSGD_TASK, TaskRejected
from ecos_flower.client.release import ReleaseBoundary, guarded
from ecos_flower.data import ClientShard
from ecos_flower.data.federation import derive_seed
from ecos_flower.dssgd import (
    InvalidUpdateError,
    SparseUpdate,
    apply_download,
    flatten_params,
    fraction_count,
    load_flat_params,
    local_step,
    svt_scales,
    upload_count,
    validate_sparse_update,
)
from ecos_flower.flower.validation import checked_numpy
from ecos_flower.models import build_model, evaluate_accuracy, seeded_model
from ecos_flower.privacy.ledger import PrivacyEvent

STATE_PARAMS = "dssgd-local"  # ArrayRecord {"params": flat float32 local model}
STATE_INFO = "dssgd-local-info"  # ConfigRecord {"steps", "num-params", "model"}


def check_task(task: object, node_config: Mapping[str, Any]) -> dict[str, Any]:
    """The `dssgd` record of a `train.dssgd` message, parsed (`DSSGD_TASK`): refuses absurd or
    unsafe settings with a reason, before any work is done."""
    return DSSGD_TASK.parse(task, node_config)


def check_config(config: object) -> dict[str, Any]:
    """The client config of a DSSGD message (`DSSGD_CONFIG`: model name, batch size, learning
    rate, seed), parsed; the record's other keys (device, scenario) are read where used."""
    return DSSGD_CONFIG.parse(config, {})


def read_download(msg: Message, task: Mapping[str, Any]) -> SparseUpdate:
    """The server's download (indices int64, values float32), checked against the parsed task's
    sizes."""
    record = msg.content.get("download")
    if not isinstance(record, ArrayRecord):
        raise TaskRejected("task has no ArrayRecord 'download'")
    num_params = task["num-params"]
    expected = fraction_count(task["theta-d"], num_params)
    dense = expected == num_params  # a full download carries the values alone, in index order
    names = ["values"] if dense else ["indices", "values"]
    if sorted(record.keys()) != names:
        raise TaskRejected(
            f"download holds {sorted(record.keys())}, expected {' and '.join(names)}"
        )
    if dense:
        try:
            values = checked_numpy(record["values"], expected, "download values")
        except ValueError as exc:
            raise TaskRejected(str(exc)) from exc
        if values.shape != (expected,) or values.dtype != np.float32:
            raise TaskRejected(
                f"download values have shape {values.shape} and dtype {values.dtype}, "
                f"expected ({expected},) float32"
            )
        try:
            return validate_sparse_update(np.arange(num_params, dtype=np.int64), values, num_params)
        except InvalidUpdateError as exc:
            raise TaskRejected(f"bad download: {exc}") from exc
    for name in ("indices", "values"):
        shape = tuple(record[name].shape)
        if shape != (expected,):
            raise TaskRejected(
                f"download {name} have shape {shape}, expected ({expected},) for theta-d="
                f"{task['theta-d']:g} of {num_params} parameters"
            )
    try:  # headers checked before decoding: no allocation beyond the expected size
        indices = checked_numpy(record["indices"], expected, "download indices")
        values = checked_numpy(record["values"], expected, "download values")
    except ValueError as exc:
        raise TaskRejected(str(exc)) from exc
    if indices.shape != (expected,) or values.shape != (expected,):
        raise TaskRejected(
            f"download arrays have shapes {indices.shape}/{values.shape}, expected ({expected},)"
        )
    if indices.dtype != np.int64 or values.dtype != np.float32:
        raise TaskRejected(
            f"download dtypes are {indices.dtype}/{values.dtype}, expected int64/float32"
        )
    try:
        return validate_sparse_update(indices, values, num_params)
    except InvalidUpdateError as exc:
        raise TaskRejected(f"bad download: {exc}") from exc


def node_index(context: Context) -> int:
    """This participant's index for its local training seed: its simulation `partition-id`, else
    its node id (a deployed node has no partition id)."""
    return int(context.node_config.get("partition-id", context.node_id))


def _task_shape(shard: ClientShard) -> tuple[int, int]:
    images = shard.train.images
    return int(images.shape[1]), int(images.shape[-1])


def local_model(
    context: Context, config: Mapping[str, Any], task: Mapping[str, Any], shard: ClientShard
) -> tuple[nn.Module, int]:
    """The participant's model and its step count: from `context.state`, or the seeded initial
    model on first contact (parsed `config` and `task`). Raises TaskRejected if its size does not
    match the task."""
    in_channels, image_size = _task_shape(shard)
    name = config["model"]
    model = seeded_model(name, config["seed"], task["num-classes"], in_channels, image_size)
    size = sum(p.numel() for p in model.parameters())
    if size != task["num-params"]:
        raise TaskRejected(
            f"num-params={task['num-params']} but this node's {name} has {size} parameters"
        )
    steps = 0
    if STATE_PARAMS in context.state:
        info = context.state[STATE_INFO]
        if int(info["num-params"]) != size or str(info["model"]) != name:
            raise TaskRejected(
                f"the local model in this node's state is a {info['model']} with "
                f"{int(info['num-params'])} parameters, the task wants {name} with {size}"
            )
        load_flat_params(model, context.state[STATE_PARAMS]["params"].numpy())
        steps = int(info["steps"])
    return model, steps


def save_local_model(context: Context, model: nn.Module, steps: int, name: str) -> None:
    """Keep the trained local model (flat) and its step count in the node's state."""
    flat = flatten_params(model)
    context.state[STATE_PARAMS] = ArrayRecord({"params": Array(flat)})
    context.state[STATE_INFO] = ConfigRecord(
        {"steps": steps, "num-params": int(flat.shape[0]), "model": name}
    )


def answer_dssgd_train(
    msg: Message, context: Context, boundary: ReleaseBoundary, load_data: LoadData = client_shard
) -> Message:
    """One participant step (`train.dssgd`): download, one local epoch, select, upload. With the
    SVT, the upload's true cost is charged before the participant reads its data."""
    task = check_task(msg.content.get("dssgd"), context.node_config)
    raw_config = msg.content.get("config")
    config = check_config(raw_config)
    download = read_download(msg, task)
    num_params, theta_u = task["num-params"], task["theta-u"]
    dp_epsilon, gamma, split = task["dp-epsilon"], task["gamma"], task["svt-split"]
    epoch = task["epoch"]
    mechanism = "dssgd-svt" if dp_epsilon is not None else "dssgd-exact"
    boundary.admit(mechanism)
    try:  # message and node metadata only (no record is read): before the charge
        check_data_source(raw_config, context.node_config, load_data)
    except ValueError as exc:
        raise TaskRejected(str(exc)) from exc
    metrics: dict[str, float | int] = {**boundary.node_label()}
    index = node_index(context)
    seed = config["seed"]
    steps_before = _steps_in_state(context)
    if dp_epsilon is not None:
        cost = svt_scales(dp_epsilon, upload_count(theta_u, num_params), gamma, split)
        event = PrivacyEvent.laplace(
            cost.epsilon_spent, note=f"dssgd svt upload, epoch {epoch}, run {context.run_id}"
        )
        spent, noise = boundary.charge(event)
        metrics.update(boundary.budget_metrics(spent))
        rng = noise.generator  # fresh (or, research only, replayable) privacy noise
    else:
        spent, rng = 0.0, np.random.default_rng([seed, index, steps_before])
    # Charged (if private): only from here on is the node's data read.
    shard = task_inputs(load_data(raw_config, context.node_config), raw_config, context.node_config)
    model, steps = local_model(context, config, task, shard)
    apply_download(model, download)
    update, epsilon = local_step(
        model,
        shard.train.images,
        shard.train.labels,
        epochs=1,
        batch_size=config["batch-size"],
        learning_rate=config["learning-rate"],
        # one 32-bit training seed per (run seed, participant, step): a deployed node's index
        # is its 64-bit node id, which no arithmetic seed may overflow
        seed=derive_seed(seed, index, steps),
        theta_u=theta_u,
        mode=task["upload-mode"],
        gamma=gamma,
        tau=task["tau"],
        dp_epsilon=dp_epsilon,
        svt_split=split,
        rng=rng,
        device=str(raw_config.get("device", "cpu")),
    )
    save_local_model(context, model, steps + 1, config["model"])
    metrics.update({"epsilon-epoch": float(epsilon), "local-steps": steps + 1})
    upload = ArrayRecord(
        {
            "indices": Array(np.ascontiguousarray(update.indices, dtype=np.int64)),
            "values": Array(np.ascontiguousarray(update.values, dtype=np.float32)),
        }
    )
    return boundary.reply(mechanism, {"upload": upload}, metrics)


def _steps_in_state(context: Context) -> int:
    info = context.state.get(STATE_INFO)
    return int(info["steps"]) if info is not None else 0


def answer_dssgd_evaluate(
    msg: Message, context: Context, boundary: ReleaseBoundary, load_data: LoadData = client_shard
) -> Message:
    """Score both the local model and the server's global model on this node's test split (exact
    metrics: released only if the node's policy reports metrics)."""
    task = DSSGD_EVALUATION.parse(msg.content.get("dssgd"), context.node_config)
    num_params = task["num-params"]
    record = msg.content.get("global")
    if not isinstance(record, ArrayRecord) or list(record.keys()) != ["params"]:
        raise TaskRejected("task has no ArrayRecord 'global' holding 'params'")
    if tuple(record["params"].shape) != (num_params,):
        raise TaskRejected(
            f"global params have shape {tuple(record['params'].shape)}, expected ({num_params},)"
        )
    try:
        params = checked_numpy(record["params"], num_params, "global params")
    except ValueError as exc:
        raise TaskRejected(str(exc)) from exc
    if params.shape != (num_params,):
        raise TaskRejected(f"global params have shape {params.shape}, expected ({num_params},)")
    if params.dtype != np.float32 or not np.all(np.isfinite(params)):
        raise TaskRejected("global params must be finite float32 numbers")
    raw_config = msg.content.get("config")
    config = check_config(raw_config)
    boundary.admit("evaluation-metrics")
    shard = task_inputs(load_data(raw_config, context.node_config), raw_config, context.node_config)
    model, steps = local_model(context, config, task, shard)
    server_model = build_model(config["model"], task["num-classes"], *_task_shape(shard))
    load_flat_params(server_model, params)
    device = str(raw_config.get("device", "cpu"))
    accuracy, loss = evaluate_accuracy(model, shard.test.images, shard.test.labels, device=device)
    server_accuracy, server_loss = evaluate_accuracy(
        server_model, shard.test.images, shard.test.labels, device=device
    )
    metrics = {
        **boundary.node_label(),
        "accuracy": accuracy,
        "loss": loss,
        "server-accuracy": server_accuracy,
        "server-loss": server_loss,
        "local-steps": steps,
    }
    return boundary.reply("evaluation-metrics", {}, metrics)


def dssgd_train_handler(
    load_data: LoadData = client_shard,
) -> Callable[[Message, Context], Message]:
    """The `train.dssgd` handler, reading this node's data with `load_data(config, node_config)`
    (after the charge); register it with `app.train("dssgd")(dssgd_train_handler(my_loader))`."""

    def handle_dssgd_train(msg: Message, context: Context, boundary: ReleaseBoundary) -> Message:
        return answer_dssgd_train(msg, context, boundary, load_data)

    return guarded(handle_dssgd_train)


def dssgd_evaluate_handler(
    load_data: LoadData = client_shard,
) -> Callable[[Message, Context], Message]:
    """The `evaluate.dssgd` handler, reading this node's data with `load_data`."""

    def handle_dssgd_evaluate(msg: Message, context: Context, boundary: ReleaseBoundary) -> Message:
        return answer_dssgd_evaluate(msg, context, boundary, load_data)

    return guarded(handle_dssgd_evaluate)


handle_dssgd_train = dssgd_train_handler()
"""`train.dssgd` on the project's scenarios (`client_shard`)."""

handle_dssgd_evaluate = dssgd_evaluate_handler()
"""`evaluate.dssgd` on the project's scenarios (`client_shard`)."""
