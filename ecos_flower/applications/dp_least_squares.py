"""DP least squares for a classifier head: sufficient-statistics perturbation.

The client computes G = Z^T Z and R = Z^T Y on its unit-norm rows z (see `linear_head`) and
one-hot labels y, adds Gaussian noise once, and solves the ridge system (G~ + lambda I) U^T = R~.
Adding or removing one sample changes G by z z^T (Frobenius norm ||z||^2 = 1) and R by z y^T
(norm ||z|| ||y|| = 1): the released vector (upper triangle of G, all of R) has L2 sensitivity
sqrt(2). The noise on G is drawn on the upper triangle and mirrored, so G~ stays symmetric and
each distinct entry is released once; the exact G is symmetrised too ((G + G^T) / 2: a matrix
product is not bitwise symmetric), so the released G~ is exactly symmetric. Everything after the
release is post-processing, and the solve never raises on a finite noisy input.

Total (DESIGN 2.4): samples with a non-finite row or a label outside 0..classes-1 are dropped,
rows above norm 1 are scaled to norm 1 (per-sample operations, sensitivity unchanged); with no
usable sample the statistics are zero and the noise is still added.
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
    usable_labels,
    usable_samples,
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
    """G and R of rows `z` and integer `labels`. Unusable samples (non-finite row, label outside
    0..num_classes-1) are dropped and rows of norm above 1 are scaled to norm 1, so one sample
    moves (upper G, R) by at most SENSITIVITY whatever it holds."""
    keep = usable_samples(z, labels, num_classes)
    rows = z[keep].double()
    rows = rows / rows.norm(dim=1, keepdim=True).clamp(min=1.0)
    rows = torch.nan_to_num(rows, nan=0.0)  # a row whose norm overflowed: 0 / inf stays finite
    y = torch.nn.functional.one_hot(usable_labels(labels, keep), num_classes).double()
    gram = rows.T @ rows
    return SufficientStatistics(gram=(gram + gram.T) / 2, cross=rows.T @ y)


def symmetric_gaussian(size: int, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """A symmetric matrix whose upper triangle (diagonal included) is i.i.d. N(0, sigma^2)."""
    noise = torch.randn(size, size, generator=generator, dtype=torch.float64) * sigma
    upper = torch.triu(noise)
    return upper + torch.triu(upper, diagonal=1).T


def perturb(stats: SufficientStatistics, sigma: float, generator: torch.Generator):
    """The Gaussian release: symmetric noise on G, i.i.d. noise on R, both of std `sigma`; the
    released G~ is exactly symmetric."""
    gram = (stats.gram + stats.gram.T) / 2  # a no-op on a symmetric G, bit for bit
    noise_r = torch.randn(stats.cross.shape, generator=generator, dtype=torch.float64) * sigma
    return SufficientStatistics(
        gram=gram + symmetric_gaussian(len(gram), sigma, generator),
        cross=stats.cross + noise_r,
    )


def floored_inverse(matrix: torch.Tensor, floor: float) -> torch.Tensor:
    """(M + M^T)/2 inverted with its eigenvalues floored at `floor`, for any finite M: the
    eigen-decomposition is done on M scaled to max |entry| 1 (no overflow), and should it still
    fail the result is the floored inverse of the zero matrix, I / floor. Post-processing of
    released values only: this may branch freely."""
    sym = (matrix + matrix.T) / 2
    identity = torch.eye(len(sym), dtype=torch.float64)
    if not bool(torch.isfinite(sym).all()):
        return identity / floor
    size = float(sym.abs().max()) if sym.numel() else 0.0
    size = size if size > 0 else 1.0
    try:
        values, vectors = torch.linalg.eigh(sym / size)
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        return identity / floor
    inverse = (vectors / torch.clamp(values * size, min=floor)) @ vectors.T
    return inverse if bool(torch.isfinite(inverse).all()) else identity / floor


def solve_ridge(stats: SufficientStatistics, ridge: float) -> torch.Tensor:
    """U (classes x (d+1)) minimising ||Z U^T - Y||^2 + ridge ||U||^2 from (possibly noisy) G, R.

    Noise can make G~ indefinite; eigenvalues of G~ + ridge I are floored at ridge so the solve
    is always well posed, and it never raises on finite input (post-processing, no privacy
    cost); a non-finite result is replaced by zeros."""
    if not ridge > 0:
        raise ValueError(f"ridge must be > 0, got {ridge}")
    dim = len(stats.gram)
    shifted = stats.gram.double() + ridge * torch.eye(dim, dtype=torch.float64)
    cross = torch.nan_to_num(stats.cross.double(), nan=0.0, posinf=0.0, neginf=0.0)
    weights = (floored_inverse(shifted, ridge) @ cross).T
    return torch.nan_to_num(weights, nan=0.0, posinf=0.0, neginf=0.0)


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
    seed: int,
) -> FinetuneResult:
    """A head fitted by DP least squares onto one-hot labels, at (epsilon, delta).

    One Gaussian release of noise multiplier z (sigma = z * sqrt(2)); z is the exact (analytic
    Gaussian) calibration unless the caller passes it (after charging its ledger). `seed` seeds
    the privacy noise (required). Unusable samples are dropped (see `sufficient_statistics`)."""
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
