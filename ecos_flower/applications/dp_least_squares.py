"""DP least squares for a classifier head: sufficient-statistics perturbation.

The client computes G = Z^T Z and R = Z^T Y on its unit-norm rows z (see `linear_head`) and
one-hot labels y, adds Gaussian noise once, and solves the ridge system (G~ + lambda I) U^T = R~.
Adding or removing one sample changes G by z z^T (Frobenius norm ||z||^2 = 1) and R by z y^T
(norm ||z|| ||y|| = 1): the released vector (upper triangle of G, all of R) has L2 sensitivity
sqrt(2). The noise on G is drawn on the upper triangle and mirrored, so G~ stays symmetric and
each distinct entry is released once. Everything after the release is post-processing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ecos_flower.applications.finetune import FinetuneResult
from ecos_flower.applications.linear_head import (
    head_from_augmented,
    normalized_with_bias,
    opacus_epsilon,
    whole_run_noise_multiplier,
)

SENSITIVITY = math.sqrt(2.0)  # L2 norm of (z z^T upper triangle, z y^T) for ||z|| = ||y|| = 1


@dataclass
class SufficientStatistics:
    """G = Z^T Z ((d+1) x (d+1), symmetric) and R = Z^T Y ((d+1) x classes)."""

    gram: torch.Tensor
    cross: torch.Tensor


def sufficient_statistics(
    z: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> SufficientStatistics:
    """G and R of rows `z` (norm <= 1) and integer `labels` in 0..num_classes-1 (both checked)."""
    if z.ndim != 2 or len(z) != len(labels):
        raise ValueError(f"z {tuple(z.shape)} and labels {tuple(labels.shape)} do not match")
    if len(z) and float(z.norm(dim=1).max()) > 1 + 1e-9:
        raise ValueError("rows of z must have L2 norm <= 1 (use normalized_with_bias)")
    if len(labels) and not (int(labels.min()) >= 0 and int(labels.max()) < num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    y = torch.nn.functional.one_hot(labels.long(), num_classes).double()
    z = z.double()
    return SufficientStatistics(gram=z.T @ z, cross=z.T @ y)


def symmetric_gaussian(size: int, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """A symmetric matrix whose upper triangle (diagonal included) is i.i.d. N(0, sigma^2)."""
    noise = torch.randn(size, size, generator=generator, dtype=torch.float64) * sigma
    upper = torch.triu(noise)
    return upper + torch.triu(upper, diagonal=1).T


def perturb(stats: SufficientStatistics, sigma: float, generator: torch.Generator):
    """The Gaussian release: symmetric noise on G, i.i.d. noise on R, both of std `sigma`."""
    noise_r = torch.randn(stats.cross.shape, generator=generator, dtype=torch.float64) * sigma
    return SufficientStatistics(
        gram=stats.gram + symmetric_gaussian(len(stats.gram), sigma, generator),
        cross=stats.cross + noise_r,
    )


def solve_ridge(stats: SufficientStatistics, ridge: float) -> torch.Tensor:
    """U (classes x (d+1)) minimising ||Z U^T - Y||^2 + ridge ||U||^2 from (possibly noisy) G, R.

    Noise can make G~ indefinite; eigenvalues of G~ + ridge I are floored at ridge so the solve
    is always well posed (post-processing, no privacy cost)."""
    if not ridge > 0:
        raise ValueError(f"ridge must be > 0, got {ridge}")
    values, vectors = torch.linalg.eigh(stats.gram)
    inverse = 1.0 / torch.clamp(values + ridge, min=ridge)
    return ((vectors * inverse) @ vectors.T @ stats.cross).T


def default_ridge(sigma: float, dim: int, multiple: float) -> float:
    """`multiple` times sigma sqrt(dim): about half the spectral norm of the noise on G."""
    return float(multiple) * sigma * math.sqrt(dim)


def dp_least_squares_head(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    epsilon: float,
    delta: float,
    scale: float,
    ridge_multiple: float = 1.0,
    noise_multiplier: float | None = None,
    seed: int = 0,
) -> FinetuneResult:
    """A head fitted by DP least squares onto one-hot labels, at (epsilon, delta).

    One Gaussian release of noise multiplier z (sigma = z * sqrt(2)); z is calibrated with
    Opacus' RDP accountant unless the caller passes it (after charging its ledger)."""
    z_mult = whole_run_noise_multiplier(epsilon, delta, noise_multiplier)
    sigma = z_mult * SENSITIVITY
    rows = normalized_with_bias(features, scale)
    stats = sufficient_statistics(rows, labels, num_classes)
    noisy = perturb(stats, sigma, torch.Generator().manual_seed(int(seed)))
    weights = solve_ridge(noisy, default_ridge(sigma, rows.shape[1], ridge_multiple))
    return FinetuneResult(
        head=head_from_augmented(weights, scale),
        noise_multiplier=z_mult,
        steps=1,
        sample_rate=1.0,
        epsilon_opacus=opacus_epsilon([(z_mult, 1.0, 1)], delta),
        delta=float(delta),
        effective_noise_multiplier=z_mult,
    )
