"""DP last-layer fine-tuning on the client: freeze the feature extractor, train only the
classifier head on the private train split with DP-SGD through Opacus.

Full-batch DP-SGD (every step uses the whole split: the largest batch there is, q = 1): each step
releases the summed per-sample gradients, clipped to `max_grad_norm` (L2 sensitivity
max_grad_norm to adding or removing one sample), plus N(0, (z max_grad_norm)^2). T such steps are
exactly one Gaussian mechanism with noise multiplier z / sqrt(T), which is what the client's
ledger is charged; Opacus' RDP accountant reports the epsilon of the T steps, and z is calibrated
by Opacus so that this epsilon meets the target.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ecos_flower.models import batched_apply
from ecos_flower.privacy import _opacus  # noqa: F401  (imports Opacus without its logging side effect)


@dataclass
class FinetuneResult:
    """The fine-tuned head and the privacy of its training."""

    head: nn.Linear
    noise_multiplier: float  # per step
    steps: int
    sample_rate: float
    epsilon_opacus: float  # Opacus' RDP accountant, at `delta`
    delta: float
    # All the releases as one Gaussian mechanism of this noise multiplier (the ledger's charge):
    # Gaussian releases compose exactly, 1 / z_eff^2 = sum of 1 / z_i^2.
    effective_noise_multiplier: float


def head_features(
    model: nn.Module, images: torch.Tensor, *, batch_size: int = 512, device: str = "cpu"
) -> torch.Tensor:
    """The frozen extractor's output (the head's input): `model.embed`, batched."""
    model.to(device).eval()
    return batched_apply(model.embed, images, batch_size=batch_size, device=device)


def make_private_head(
    head: nn.Linear,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    learning_rate: float,
    seed: int = 0,
):  # noqa: ANN201 - (PrivacyEngine, GradSampleModule, DPOptimizer, DataLoader)
    """Opacus' PrivacyEngine around `head` with full-batch steps (q = 1): per-sample gradients
    clipped to `max_grad_norm`, Gaussian noise of std noise_multiplier * max_grad_norm."""
    from opacus import PrivacyEngine

    dataset = TensorDataset(features.float(), labels.long())
    loader = DataLoader(dataset, batch_size=len(dataset), shuffle=False)
    optimiser = torch.optim.SGD(head.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(int(seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # secure-RNG advice: we seed on purpose for repeatable runs
        engine = PrivacyEngine(accountant="rdp")
        module, optimiser, loader = engine.make_private(
            module=head,
            optimizer=optimiser,
            data_loader=loader,
            noise_multiplier=float(noise_multiplier),
            max_grad_norm=float(max_grad_norm),
            poisson_sampling=False,
            noise_generator=generator,
        )
    return engine, module, optimiser, loader


def calibrate_noise(epsilon: float, delta: float, steps: int) -> float:
    """Noise multiplier per full-batch step so that `steps` steps cost `epsilon` (Opacus RDP)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=float(epsilon),
            target_delta=float(delta),
            sample_rate=1.0,
            steps=int(steps),
            accountant="rdp",
            epsilon_tolerance=0.005,
        )
    )


def dp_finetune_head(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    epsilon: float,
    delta: float,
    steps: int = 100,
    max_grad_norm: float = 1.0,
    learning_rate: float = 1.0,
    init: nn.Linear | None = None,
    noise_multiplier: float | None = None,
    seed: int = 0,
) -> FinetuneResult:
    """Train a linear head on (features, labels) with full-batch DP-SGD at (epsilon, delta).

    The head starts at zero (the DP linear-probe recipe) or at a copy of `init` (continue from the
    received model's head). `noise_multiplier` (per step) skips the calibration: the caller
    already calibrated it with `calibrate_noise` (and charged its ledger)."""
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a positive finite number, got {epsilon}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    head = nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        if init is None:
            head.weight.zero_()
            head.bias.zero_()
        else:
            head.weight.copy_(init.weight)
            head.bias.copy_(init.bias)
    z = calibrate_noise(epsilon, delta, steps) if noise_multiplier is None else noise_multiplier
    engine, module, optimiser, loader = make_private_head(
        head,
        features,
        labels,
        noise_multiplier=z,
        max_grad_norm=max_grad_norm,
        learning_rate=learning_rate,
        seed=seed,
    )
    loss_fn = nn.CrossEntropyLoss()
    module.train()
    with warnings.catch_warnings():
        # Features carry no gradient: Opacus' full backward hook says so once; nothing is wrong.
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(steps):
            for x, y in loader:
                optimiser.zero_grad()
                loss_fn(module(x), y).backward()
                optimiser.step()
    epsilon_opacus = float(engine.get_epsilon(delta))
    trained = nn.Linear(features.shape[1], num_classes)
    trained.load_state_dict({k.removeprefix("_module."): v for k, v in module.state_dict().items()})
    return FinetuneResult(
        head=trained,
        noise_multiplier=z,
        steps=int(steps),
        sample_rate=1.0,
        epsilon_opacus=epsilon_opacus,
        delta=float(delta),
        effective_noise_multiplier=z / math.sqrt(steps),
    )
