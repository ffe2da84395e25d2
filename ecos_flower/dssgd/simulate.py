"""Settings of the in-memory DSSGD simulation and its Flower-free baselines (standalone and
centralized training) on in-memory tensors.

DSSGD itself runs through the Flower strategy: `ecos_flower.flower.dssgd_simulation.simulate_dssgd`
drives `ecos_flower.strategy.Dssgd` on an in-process grid (one DSSGD scheduler, not two); this
module stays free of Flower.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from ecos_flower.dssgd.svt import SvtSplit
from ecos_flower.models.training import evaluate_accuracy, train_epochs

Dataset = tuple[torch.Tensor, torch.Tensor]
Schedule = Literal["round-robin", "random", "parallel"]


@dataclass(frozen=True)
class DSSGDConfig:
    """Protocol and training settings (defaults: the 'Measured here' setting of DESIGN 2.2).

    `epochs` is the number of local epochs (participant steps) per participant: round-robin runs
    epochs * N participant steps in the order 0..N-1; random draws a fresh random order of all N
    every pass; parallel has every participant download the same server state, then applies the
    uploads in arrival order (as `ecos_flower.strategy.Dssgd` schedules them).
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
    learning_rate: float = 0.05
    momentum: float = 0.9
    beta: float | None = None
    decay_every: int = 0
    seed: int = 0
    device: str = "cpu"


def simulate_standalone(
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
            learning_rate=config.learning_rate,
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


def simulate_centralized(
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
        learning_rate=config.learning_rate,
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
