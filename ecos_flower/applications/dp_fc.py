"""DP-FC: logistic regression on the head's features by full-batch DP-SGD (Opacus), with every
noisy gradient preconditioned by the inverse of a DP feature covariance.

Two kinds of Gaussian release, composed exactly (1 / z^2 = 1 / z_cov^2 + T / z_step^2):
- the covariance G = Z^T Z of the unit-norm rows z (`linear_head`); one sample changes it by
  z z^T, Frobenius norm 1, so sensitivity 1; noise of std z_cov on the upper triangle, mirrored;
- T full-batch DP-SGD steps through Opacus (per-sample gradients clipped to `clip`, noise of std
  z_step * clip on their sum).
The preconditioner multiplies the already-noised gradient, so it is post-processing and may be
reused for every class and step. Opacus has no preconditioning hook, hence the few lines below
that run its `pre_step` (clip, noise, average) and then the plain optimiser on P-scaled gradients.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ecos_flower.applications.dp_least_squares import symmetric_gaussian
from ecos_flower.applications.finetune import FinetuneResult, make_private_head
from ecos_flower.applications.linear_head import (
    augmented_from_head,
    head_from_augmented,
    normalized_with_bias,
    opacus_epsilon,
    whole_run_noise_multiplier,
)


def split_noise(
    noise_multiplier: float, steps: int, covariance_share: float
) -> tuple[float, float]:
    """(z_cov, z_step) such that the covariance release and `steps` full-batch steps together
    are one Gaussian release of `noise_multiplier`; the covariance takes `covariance_share` of
    the 1 / z^2 budget."""
    if not 0 < covariance_share < 1:
        raise ValueError(f"covariance-share must lie in (0, 1), got {covariance_share}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    z_cov = noise_multiplier / math.sqrt(covariance_share)
    z_step = noise_multiplier * math.sqrt(steps / (1.0 - covariance_share))
    return z_cov, z_step


def dp_covariance(rows: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Z^T Z plus symmetric Gaussian noise of std `sigma` (rows must have norm <= 1)."""
    if len(rows) and float(rows.norm(dim=1).max()) > 1 + 1e-9:
        raise ValueError("rows must have L2 norm <= 1 (use normalized_with_bias)")
    rows = rows.double()
    return rows.T @ rows + symmetric_gaussian(rows.shape[1], sigma, generator)


def preconditioner(noisy_gram: torch.Tensor, num_examples: int, floor: float) -> torch.Tensor:
    """(G~ / n)^-1 with eigenvalues floored at `floor` (noise can make G~ indefinite).

    n is treated as public, as Opacus does when it averages a batch of the dataset's size."""
    if not floor > 0:
        raise ValueError(f"floor must be > 0, got {floor}")
    values, vectors = torch.linalg.eigh(noisy_gram / max(num_examples, 1))
    return (vectors / torch.clamp(values, min=floor)) @ vectors.T


def dp_fc_head(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    epsilon: float,
    delta: float,
    scale: float,
    steps: int = 10,
    learning_rate: float = 0.1,
    clip: float = 1.0,
    covariance_share: float = 0.3,
    floor: float = 1e-3,
    init: nn.Linear | None = None,
    noise_multiplier: float | None = None,
    seed: int = 0,
) -> FinetuneResult:
    """A head trained by DP-FC at (epsilon, delta), from zero or from `init` (received head).

    `noise_multiplier` is the whole run's single-Gaussian equivalent (what the ledger is
    charged); calibrated with Opacus' RDP accountant unless given."""
    total = whole_run_noise_multiplier(epsilon, delta, noise_multiplier)
    z_cov, z_step = split_noise(total, steps, covariance_share)
    generator = torch.Generator().manual_seed(int(seed))
    rows = normalized_with_bias(features, scale)
    precondition = preconditioner(dp_covariance(rows, z_cov, generator), len(rows), floor).float()
    head = nn.Linear(rows.shape[1], num_classes, bias=False)
    with torch.no_grad():
        if init is None:
            head.weight.zero_()
        else:
            head.weight.copy_(augmented_from_head(init, scale).float())
    _, module, optimiser, loader = make_private_head(
        head,
        rows.float(),
        labels,
        noise_multiplier=z_step,
        max_grad_norm=clip,
        learning_rate=learning_rate,
        seed=int(torch.randint(2**62, (1,), generator=generator)),
    )
    loss_fn = nn.CrossEntropyLoss()
    module.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # rows carry no gradient (see finetune.py)
        for _ in range(steps):
            for x, y in loader:
                optimiser.zero_grad()
                loss_fn(module(x), y).backward()
                if not optimiser.pre_step():  # Opacus: clip per sample, add noise, average
                    continue  # (only with virtual steps, which full batches never take)
                for parameter in module.parameters():
                    parameter.grad = parameter.grad @ precondition
                optimiser.original_optimizer.step()
    weights = module.state_dict()["_module.weight"].double()
    return FinetuneResult(
        head=head_from_augmented(weights, scale),
        noise_multiplier=z_step,
        steps=int(steps),
        sample_rate=1.0,
        epsilon_opacus=opacus_epsilon([(z_cov, 1.0, 1), (z_step, 1.0, steps)], delta),
        delta=float(delta),
        effective_noise_multiplier=total,
    )
