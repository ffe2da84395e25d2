"""The DSSGD participant: keep the local model in `context.state`, overwrite the downloaded
entries, train one local epoch, charge the pure-DP ledger (SVT uploads), reply with a sparse upload.

The local model lives in `context.state` (a flat float32 vector), so the same handler works in
Flower's simulation engine and on a real SuperNode. On first contact the participant builds the
run's model from the shared seed (the server starts from the same initial parameters) and then
applies the download.

The participant owns its budget: with DP on (the sparse vector technique), the true epsilon of
each upload is charged to the node's one lifetime ledger (`ecos_flower.flower.release`) before the
participant reads its data, and an upload past the node's `epsilon-limit` (node config only) is
refused. A node under the private policy refuses uploads without the SVT. Every task is checked
before anything is allocated, and refused with a reason when it is absurd.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from torch import nn

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
from ecos_flower.flower.client_data import client_shard
from ecos_flower.flower.release import Refused, ReleaseBoundary, guarded
from ecos_flower.flower.validation import checked_numpy
from ecos_flower.models import build_model, evaluate_accuracy
from ecos_flower.privacy.ledger import PrivacyEvent

# Bounds a participant enforces before it allocates anything (node config may change them).
DEFAULT_LIMITS = {"max-params": 50_000_000, "max-classes": 100_000}
UPLOAD_MODES = ("largest", "threshold")
SVT_SPLITS = ("published", "corrected")
STATE_PARAMS = "dssgd-local"  # ArrayRecord {"params": flat float32 local model}
STATE_INFO = "dssgd-local-info"  # ConfigRecord {"steps", "num-params", "model"}


class TaskRejected(Refused):
    """A DSSGD task this participant will not run (absurd settings or a malformed download): a
    refusal that depends on the message only."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"task rejected: {reason}")


def seeded_model(
    name: str, seed: int, num_classes: int, in_channels: int, image_size: int
) -> nn.Module:
    """The run's initial model: the same parameters on the server and on every participant.

    Seeds a forked torch RNG, so the caller's random state is left as it was.
    """
    return build_model(name, num_classes, in_channels, image_size, seed=int(seed))


def _limit(node_config: dict[str, Any], key: str) -> int:
    return int(node_config.get(key, DEFAULT_LIMITS[key]))


def _number(task: ConfigRecord, key: str) -> float:
    """A numeric task field; bool and text are refused."""
    if key not in task:
        raise TaskRejected(f"task has no {key!r}")
    value = task[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TaskRejected(f"{key}={value!r} is not a number")
    return float(value)


def _integer(task: ConfigRecord, key: str, low: int, high: int) -> int:
    value = _number(task, key)
    if not (value.is_integer() and low <= value <= high):
        raise TaskRejected(f"{key}={value:g} must be an integer in {low}..{high}")
    return int(value)


def check_task(task: ConfigRecord, node_config: dict[str, Any]) -> None:
    """Refuse absurd or unsafe DSSGD settings with a reason, before any work is done."""
    for key in ("theta-u", "theta-d"):
        theta = _number(task, key)
        if not 0.0 < theta <= 1.0:
            raise TaskRejected(f"{key}={theta:g} must lie in (0, 1]")
    _integer(task, "num-params", 1, _limit(node_config, "max-params"))
    _integer(task, "num-classes", 2, _limit(node_config, "max-classes"))
    mode = task.get("upload-mode", "largest")
    if mode not in UPLOAD_MODES:
        raise TaskRejected(f"unknown upload-mode {mode!r}; expected one of {UPLOAD_MODES}")
    tau = _number(task, "tau") if "tau" in task else 0.0
    if not (math.isfinite(tau) and tau >= 0):
        raise TaskRejected(f"tau={tau} must be a finite number >= 0")
    if "gamma" in task:
        gamma = _number(task, "gamma")
        if not (math.isfinite(gamma) and gamma > 0):
            raise TaskRejected(f"gamma={gamma} must be a positive finite number")
    if "dp-epsilon" in task:
        epsilon = _number(task, "dp-epsilon")
        if not (math.isfinite(epsilon) and epsilon > 0):
            raise TaskRejected(f"dp-epsilon={epsilon} must be a positive finite number")
        if "gamma" not in task:
            raise TaskRejected("the DP (SVT) upload needs a clip bound gamma")
        split = task.get("svt-split", "published")
        if split not in SVT_SPLITS:
            raise TaskRejected(f"unknown svt-split {split!r}; expected one of {SVT_SPLITS}")
    if "epoch" in task:
        _integer(task, "epoch", 0, 10**9)


def check_config(config: object) -> ConfigRecord:
    """The client config of a DSSGD message: model name, batch size, learning rate, checked."""
    if not isinstance(config, ConfigRecord):
        raise TaskRejected("task has no ConfigRecord 'config'")
    if not isinstance(config.get("model"), str):
        raise TaskRejected(f"model={config.get('model')!r} is not a model name")
    _integer(config, "batch-size", 1, 1_000_000)
    rate = _number(config, "learning-rate")
    if not (math.isfinite(rate) and rate > 0):
        raise TaskRejected(f"learning-rate={rate} must be a positive finite number")
    if "seed" in config:
        _integer(config, "seed", 0, 2**63 - 1)
    return config


def read_download(msg: Message, task: ConfigRecord) -> SparseUpdate:
    """The server's download (indices int64, values float32), checked against the task's sizes."""
    record = msg.content.get("download")
    if not isinstance(record, ArrayRecord):
        raise TaskRejected("task has no ArrayRecord 'download'")
    num_params = int(task["num-params"])
    expected = fraction_count(float(task["theta-d"]), num_params)
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
                f"{float(task['theta-d']):g} of {num_params} parameters"
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


def _task_shape(shard) -> tuple[int, int]:  # noqa: ANN001 - ClientShard
    images = shard.train.images
    return int(images.shape[1]), int(images.shape[-1])


def local_model(
    context: Context, config: ConfigRecord, task: ConfigRecord, shard
) -> tuple[nn.Module, int]:  # noqa: ANN001 - ClientShard
    """The participant's model and its step count: from `context.state`, or the seeded initial
    model on first contact. Raises TaskRejected if its size does not match the task."""
    in_channels, image_size = _task_shape(shard)
    name = str(config["model"])
    model = seeded_model(
        name, int(config.get("seed", 0)), int(task["num-classes"]), in_channels, image_size
    )
    size = sum(p.numel() for p in model.parameters())
    if size != int(task["num-params"]):
        raise TaskRejected(
            f"num-params={int(task['num-params'])} but this node's {name} has {size} parameters"
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


def answer_dssgd_train(msg: Message, context: Context, boundary: ReleaseBoundary) -> Message:
    """One participant step (`train.dssgd`): download, one local epoch, select, upload. With the
    SVT, the upload's true cost is charged before the participant reads its data."""
    task = msg.content.get("dssgd")
    if not isinstance(task, ConfigRecord):
        raise TaskRejected("no ConfigRecord 'dssgd'")
    check_task(task, context.node_config)
    config = check_config(msg.content.get("config"))
    download = read_download(msg, task)
    num_params, theta_u = int(task["num-params"]), float(task["theta-u"])
    dp_epsilon = float(task["dp-epsilon"]) if "dp-epsilon" in task else None
    gamma = float(task["gamma"]) if "gamma" in task else None
    split = str(task.get("svt-split", "published"))
    epoch = int(task.get("epoch", 0))
    mechanism = "dssgd-svt" if dp_epsilon is not None else "dssgd-exact"
    boundary.admit(mechanism)
    metrics: dict[str, float | int] = {**boundary.node_label()}
    index = node_index(context)
    seed = int(config.get("seed", 0))
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
    shard = client_shard(config, context.node_config)
    model, steps = local_model(context, config, task, shard)
    apply_download(model, download)
    update, epsilon = local_step(
        model,
        shard.train.images,
        shard.train.labels,
        epochs=1,
        batch_size=int(config["batch-size"]),
        lr=float(config["learning-rate"]),
        seed=seed * 1_000_003 + index * 10_007 + steps,
        theta_u=theta_u,
        mode=str(task.get("upload-mode", "largest")),
        gamma=gamma,
        tau=float(task.get("tau", 0.0)),
        dp_epsilon=dp_epsilon,
        svt_split=split,
        rng=rng,
        device=str(config.get("device", "cpu")),
    )
    save_local_model(context, model, steps + 1, str(config["model"]))
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


def answer_dssgd_evaluate(msg: Message, context: Context, boundary: ReleaseBoundary) -> Message:
    """Score both the local model and the server's global model on this node's test split (exact
    metrics: released only if the node's policy reports metrics)."""
    task = msg.content.get("dssgd")
    if not isinstance(task, ConfigRecord):
        raise TaskRejected("no ConfigRecord 'dssgd'")
    num_params = _integer(task, "num-params", 1, _limit(context.node_config, "max-params"))
    _integer(task, "num-classes", 2, _limit(context.node_config, "max-classes"))
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
    config = check_config(msg.content.get("config"))
    boundary.admit("evaluation-metrics")
    shard = client_shard(config, context.node_config)
    model, steps = local_model(context, config, task, shard)
    server_model = build_model(str(config["model"]), int(task["num-classes"]), *_task_shape(shard))
    load_flat_params(server_model, params)
    device = str(config.get("device", "cpu"))
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


handle_dssgd_train = guarded(answer_dssgd_train)


handle_dssgd_evaluate = guarded(answer_dssgd_evaluate)
