"""A Flower-free DSSGD simulation (and its standalone / centralized baselines) on in-memory tensors.

It drives the same functions the Flower strategy and ClientApp use (ParameterServer, apply_download,
local_step), so the two share one code path.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from ecos_flower.dssgd.participant import (
    apply_download,
    flatten_params,
    load_flat_params,
    local_step,
)
from ecos_flower.dssgd.server import ParameterServer
from ecos_flower.dssgd.svt import SvtSplit
from ecos_flower.models.training import evaluate_accuracy, train_epochs

Dataset = tuple[torch.Tensor, torch.Tensor]
Schedule = Literal["round-robin", "random", "parallel"]


@dataclass(frozen=True)
class DSSGDConfig:
    """Protocol and training settings (defaults: the 'Measured here' setting of DESIGN 2.2).

    `epochs` is the number of local epochs (participant steps) per participant: round-robin runs
    epochs * N participant steps in the order 0..N-1; random draws a fresh random order of all N
    every
    pass; parallel has every participant download the same server state, then applies the uploads in
    arrival (random) order.
    """

    epochs: int = 20
    schedule: Schedule = "round-robin"
    theta_u: float = 0.1
    theta_d: float = 1.0
    mode: Literal["largest", "threshold"] = "largest"
    gamma: float | None = None
    tau: float = 0.0
    dp_epsilon: float | None = None  # per participant per epoch
    svt_split: SvtSplit = "published"
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    beta: float | None = None
    decay_every: int = 0
    seed: int = 0
    device: str = "cpu"


def _download_bytes(num_entries: int, num_params: int) -> int:
    """Bytes of a download: sparse (int64 index + float32 value) or dense float32, whichever is
    smaller."""
    return min(12 * num_entries, 4 * num_params)


def run_dssgd(
    train_sets: Sequence[Dataset],
    test_sets: Sequence[Dataset],
    model_fn: Callable[[int], nn.Module],
    config: DSSGDConfig,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Simulate DSSGD; returns accuracies (per participant on its own test set, server model),
    epsilon
    per participant (basic composition over its steps), bytes up/down and wall time."""
    if len(train_sets) != len(test_sets):
        raise ValueError("need one test set per participant")
    start = time.perf_counter()
    n_part = len(train_sets)
    rng = np.random.default_rng(config.seed)
    initial = model_fn(config.seed)
    server = ParameterServer(flatten_params(initial), config.beta, config.decay_every)
    models = [model_fn(config.seed) for _ in range(n_part)]
    for m in models:
        load_flat_params(m, server.params)
    # Research simulator: each participant's SVT epsilons under basic composition (pure DP).
    epsilon_spent = [0.0] * n_part
    bytes_up = bytes_down = 0
    step_counter = [0] * n_part

    def one_step(i: int, download) -> None:
        nonlocal bytes_up, bytes_down
        apply_download(models[i], download)
        bytes_down += _download_bytes(len(download), server.num_params)
        images, labels = train_sets[i]
        update, eps = local_step(
            models[i],
            images,
            labels,
            epochs=1,
            batch_size=config.batch_size,
            lr=config.lr,
            momentum=config.momentum,
            seed=config.seed * 1_000_003 + i * 10_007 + step_counter[i],
            theta_u=config.theta_u,
            mode=config.mode,
            gamma=config.gamma,
            tau=config.tau,
            dp_epsilon=config.dp_epsilon,
            svt_split=config.svt_split,
            rng=rng,
            device=config.device,
        )
        if eps > 0:
            epsilon_spent[i] += eps
        step_counter[i] += 1
        bytes_up += update.nbytes
        server_apply.append(update)

    server_apply: list = []
    for epoch in range(config.epochs):
        if config.schedule == "round-robin":
            order = list(range(n_part))
        elif config.schedule in ("random", "parallel"):
            order = rng.permutation(n_part).tolist()
        else:
            raise ValueError(f"unknown schedule {config.schedule!r}")
        if config.schedule == "parallel":
            download = server.download(config.theta_d)
            for i in order:
                one_step(i, download)
            for update in server_apply:  # arrival order = the random order
                server.apply(update)
            server_apply.clear()
        else:
            for i in order:
                one_step(i, server.download(config.theta_d))
                server.apply(server_apply.pop())
        if progress is not None:
            progress(epoch)
    accs = [
        evaluate_accuracy(m, *test_sets[i], device=config.device)[0] for i, m in enumerate(models)
    ]
    server_model = model_fn(config.seed)
    load_flat_params(server_model, server.params)
    server_acc = [evaluate_accuracy(server_model, *t, device=config.device)[0] for t in test_sets]
    return {
        "method": "dssgd",
        "config": asdict(config),
        "participant_accuracy": accs,
        "mean_participant_accuracy": float(np.mean(accs)),
        "server_accuracy": float(np.mean(server_acc)),
        "epsilon_per_participant": epsilon_spent,
        "bytes_up": int(bytes_up),
        "bytes_down": int(bytes_down),
        "num_params": server.num_params,
        "seconds": time.perf_counter() - start,
    }


def run_standalone(
    train_sets: Sequence[Dataset],
    test_sets: Sequence[Dataset],
    model_fn: Callable[[int], nn.Module],
    config: DSSGDConfig,
) -> dict:
    """Each participant trains alone for `config.epochs` epochs; accuracy on its own test set."""
    start = time.perf_counter()
    accs = []
    for i, (images, labels) in enumerate(train_sets):
        model = model_fn(config.seed)
        train_epochs(
            model,
            images,
            labels,
            epochs=config.epochs,
            batch_size=config.batch_size,
            learning_rate=config.lr,
            momentum=config.momentum,
            seed=config.seed * 1_000_003 + i,
            device=config.device,
        )
        accs.append(evaluate_accuracy(model, *test_sets[i], device=config.device)[0])
    return {
        "method": "standalone",
        "participant_accuracy": accs,
        "mean_participant_accuracy": float(np.mean(accs)),
        "seconds": time.perf_counter() - start,
    }


def run_centralized(
    train_sets: Sequence[Dataset],
    test_sets: Sequence[Dataset],
    model_fn: Callable[[int], nn.Module],
    config: DSSGDConfig,
) -> dict:
    """One model trained on the union of all training sets for `config.epochs` epochs."""
    start = time.perf_counter()
    images = torch.cat([x for x, _ in train_sets])
    labels = torch.cat([y for _, y in train_sets])
    model = model_fn(config.seed)
    train_epochs(
        model,
        images,
        labels,
        epochs=config.epochs,
        batch_size=config.batch_size,
        learning_rate=config.lr,
        momentum=config.momentum,
        seed=config.seed,
        device=config.device,
    )
    accs = [evaluate_accuracy(model, *t, device=config.device)[0] for t in test_sets]
    return {
        "method": "centralized",
        "participant_accuracy": accs,
        "mean_participant_accuracy": float(np.mean(accs)),
        "seconds": time.perf_counter() - start,
    }
