"""DSSGD on in-memory tensors through the Flower strategy: `Dssgd.start()` on an `InProcessGrid`
whose nodes run a minimal ClientApp over the given train and test sets.

The research driver of `simulations/dssgd_mnist.py`: no scenario files, no ledgers, no node
policies; the participants' local models stay in memory between their steps. The schedule, the
download, the upload checks and the evaluation are the strategy's, the participant step is
`ecos_flower.dssgd.local_step`, so this and the Flower apps share one DSSGD.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.logger import LOGGER_NAME
from torch import nn

from ecos_flower.dssgd import (
    SparseUpdate,
    apply_download,
    flatten_params,
    load_flat_params,
    local_step,
)
from ecos_flower.dssgd.simulate import DSSGDConfig
from ecos_flower.flower.dssgd_run import RoundMeter
from ecos_flower.flower.inprocess import InProcessGrid
from ecos_flower.models.training import evaluate_accuracy
from ecos_flower.strategy import Dssgd
from ecos_flower.strategy.dssgd import per_client

Dataset = tuple[torch.Tensor, torch.Tensor]


def _download(msg: Message, num_params: int) -> SparseUpdate:
    record = msg.content["download"]
    values = record["values"].numpy()
    if "indices" in record:
        return SparseUpdate(record["indices"].numpy(), values)
    return SparseUpdate(np.arange(num_params, dtype=np.int64), values)


def memory_client_app(
    train_sets: Sequence[Dataset],
    test_sets: Sequence[Dataset],
    model_fn: Callable[[int], nn.Module],
    config: DSSGDConfig,
) -> Callable[[Message, Context], Message]:
    """A ClientApp callable for the in-process grid: node `partition-id` i trains on
    `train_sets[i]` and is scored on `test_sets[i]`; its local model lives in this closure."""
    models: dict[int, nn.Module] = {}
    steps: dict[int, int] = {}
    spent: dict[int, float] = {}

    def app(msg: Message, context: Context) -> Message:
        index = int(context.node_config["partition-id"])
        task = msg.content["dssgd"]
        if index not in models:  # first contact: the run's initial model
            models[index] = model_fn(config.seed)
        model = models[index]
        label = {"partition-id": index}
        if msg.metadata.message_type == "evaluate.dssgd":
            server_model = model_fn(config.seed)
            load_flat_params(server_model, msg.content["global"]["params"].numpy())
            images, labels = test_sets[index]
            metrics = {
                **label,
                "accuracy": evaluate_accuracy(model, images, labels, device=config.device)[0],
                "server-accuracy": evaluate_accuracy(
                    server_model, images, labels, device=config.device
                )[0],
                "local-steps": steps.get(index, 0),
            }
            return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
        apply_download(model, _download(msg, int(task["num-params"])))
        done = steps.get(index, 0)
        dp_epsilon = float(task["dp-epsilon"]) if "dp-epsilon" in task else None
        images, labels = train_sets[index]
        update, epsilon = local_step(
            model,
            images,
            labels,
            epochs=1,
            batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            momentum=config.momentum,
            seed=config.seed * 1_000_003 + index * 10_007 + done,
            theta_u=float(task["theta-u"]),
            mode=str(task["upload-mode"]),  # type: ignore[arg-type]
            gamma=float(task["gamma"]) if "gamma" in task else None,
            tau=float(task["tau"]),
            dp_epsilon=dp_epsilon,
            svt_split=str(task["svt-split"]),  # type: ignore[arg-type]
            rng=np.random.default_rng([config.seed, index, done]),
            device=config.device,
        )
        steps[index] = done + 1
        spent[index] = spent.get(index, 0.0) + epsilon
        metrics = {**label, "epsilon-epoch": float(epsilon), "local-steps": done + 1}
        if dp_epsilon is not None:  # basic composition of this participant's SVT uploads
            metrics.update({"epsilon-spent": spent[index], "delta": 0.0})
        upload = ArrayRecord(
            {
                "indices": Array(np.ascontiguousarray(update.indices, dtype=np.int64)),
                "values": Array(np.ascontiguousarray(update.values, dtype=np.float32)),
            }
        )
        content = RecordDict({"upload": upload, "metrics": MetricRecord(metrics)})
        return Message(content, reply_to=msg)

    return app


def simulate_dssgd(
    train_sets: Sequence[Dataset],
    test_sets: Sequence[Dataset],
    model_fn: Callable[[int], nn.Module],
    config: DSSGDConfig,
) -> dict:
    """Simulate DSSGD for `config.epochs` local epochs per participant; returns accuracies (per
    participant on its own test set, server model), epsilon per participant (basic composition
    over its steps), train bytes up/down as serialised on the wire, and wall time."""
    if len(train_sets) != len(test_sets):
        raise ValueError("need one test set per participant")
    start = time.perf_counter()
    strategy = Dssgd(
        theta_u=config.theta_u,
        theta_d=config.theta_d,
        schedule=config.schedule,
        upload_mode=config.mode,
        gamma=config.gamma,
        tau=config.tau,
        dp_epsilon=config.dp_epsilon,
        svt_split=config.svt_split,
        beta=config.beta,
        decay_every=config.decay_every,
        seed=config.seed,
        num_classes=_num_outputs(model_fn(config.seed)),
    )
    app = memory_client_app(train_sets, test_sets, model_fn, config)
    grid = RoundMeter(InProcessGrid(app, len(train_sets)))
    initial = ArrayRecord({"params": Array(flatten_params(model_fn(config.seed)))})
    logger = logging.getLogger(LOGGER_NAME)
    level = logger.level
    logger.setLevel(logging.WARNING)  # Flower's loop logs every round at INFO
    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=strategy.num_rounds(config.epochs, len(train_sets)),
            train_config=ConfigRecord(),
            evaluate_config=ConfigRecord(),
        )
    finally:
        logger.setLevel(level)
    final = result.evaluate_metrics_clientapp[max(result.evaluate_metrics_clientapp)]
    accuracy = per_client(final, "accuracy")
    clients = range(len(train_sets))
    epsilon = per_client(final, "epsilon-run")
    sizes = [size for per_node in grid.train_bytes.values() for size in per_node]
    return {
        "method": "dssgd",
        "config": asdict(config),
        "participant_accuracy": [accuracy[i] for i in clients],
        "mean_participant_accuracy": float(final["accuracy"]),
        "server_accuracy": float(final["server-accuracy"]),
        "epsilon_per_participant": [epsilon.get(i, 0.0) for i in clients],
        "bytes_up": int(sum(up for up, _ in sizes)),
        "bytes_down": int(sum(down for _, down in sizes)),
        "num_params": strategy.num_params,
        "seconds": time.perf_counter() - start,
    }


def _num_outputs(model: nn.Module) -> int:
    """The model's number of classes: the width of its last linear layer."""
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ValueError("the DSSGD model has no linear output layer to count classes by")
    return int(linear[-1].out_features)
