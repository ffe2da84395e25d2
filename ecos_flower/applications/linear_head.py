"""The space DP least squares and DP-FC fit a classifier head in, and Opacus' accounting of
full-batch Gaussian releases.

Each feature vector x becomes z = [x / scale, 1] / ||[x / scale, 1]||: unit norm (so one sample's
contribution to any statistic is bounded without clipping) and carrying the bias. A head U
(classes x (d + 1)) on z predicts argmax U z, and since z is a positive multiple of
[x / scale, 1], that is exactly the prediction of the `nn.Linear` with weight U[:, :d] / scale and
bias U[:, d] on the raw features: the fitted head drops into the model unchanged. `scale` must
not come from private data (the server sends the median feature norm of public samples).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ecos_flower.privacy import _opacus  # noqa: F401  (imports Opacus without its logging side effect)
from ecos_flower.privacy.gaussian import analytic_gaussian_sigma


def normalized_with_bias(features: torch.Tensor, scale: float) -> torch.Tensor:
    """Rows z = [x / scale, 1] / ||[x / scale, 1]|| in float64 (unit L2 norm by construction).

    Each row is first divided by its largest entry (when above 1) so the norm cannot overflow;
    a row with a NaN or infinite entry (or one that overflows x / scale) comes out non-finite,
    for `usable_samples` to drop."""
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"feature scale must be a positive finite number, got {scale}")
    if features.ndim != 2:
        raise ValueError(f"features must be a matrix (n x d), got shape {tuple(features.shape)}")
    x = features.double() / scale
    z = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    z = z / z.abs().amax(dim=1, keepdim=True).clamp(min=1.0)
    return z / z.norm(dim=1, keepdim=True)


def usable_samples(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    max_abs: float = math.inf,
) -> torch.Tensor:
    """Boolean mask of the samples a DP fit uses: every feature finite (and |x| <= `max_abs`),
    label an integer in 0..num_classes-1. A per-sample filter: whether one sample is kept
    depends on that sample only, so the add/remove sensitivity of what follows is unchanged and
    no private value can make the fit raise (DESIGN 2.4: mechanisms are total)."""
    if features.ndim != 2 or labels.ndim != 1 or len(features) != len(labels):
        raise ValueError(
            f"features {tuple(features.shape)} and labels {tuple(labels.shape)} do not match"
        )
    values = features.double()
    keep = torch.isfinite(values).all(dim=1)
    if math.isfinite(max_abs) and values.shape[1]:
        keep &= values.abs().amax(dim=1) <= max_abs
    if labels.dtype.is_floating_point or labels.dtype.is_complex:
        real = labels.real.double() if labels.dtype.is_complex else labels.double()
        keep &= torch.isfinite(real) & (real == torch.round(real))
        real = torch.where(keep, real, torch.zeros_like(real))
        keep &= (real >= 0) & (real < num_classes)
    else:
        wide = labels.long()
        keep &= (wide >= 0) & (wide < num_classes)
    return keep


def usable_labels(labels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The kept labels (see `usable_samples`) as int64."""
    kept = labels[keep]
    return (kept.real if kept.dtype.is_complex else kept).double().long()


def head_from_augmented(weights: torch.Tensor, scale: float) -> nn.Linear:
    """The `nn.Linear` on raw features that predicts like `weights` (classes x (d + 1)) on z."""
    classes, d = weights.shape[0], weights.shape[1] - 1
    head = nn.Linear(d, classes)
    with torch.no_grad():
        head.weight.copy_((weights[:, :d] / scale).float())
        head.bias.copy_(weights[:, d].float())
    return head


def augmented_from_head(head: nn.Linear, scale: float) -> torch.Tensor:
    """The inverse of `head_from_augmented`: `head` as weights on z (same predictions)."""
    weight, bias = head.weight.detach().double(), head.bias.detach().double()
    return torch.cat([weight * scale, bias[:, None]], dim=1)


def public_feature_scale(features: torch.Tensor) -> float:
    """The median L2 norm of (public) feature rows: the `scale` the server sends to clients."""
    norms = features.double().norm(dim=1)
    scale = float(norms.median()) if len(norms) else 0.0
    return scale if scale > 0 else 1.0


def opacus_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Opacus' RDP accountant on (noise multiplier, sample rate, steps) releases, at `delta`."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(float(z), float(q), int(t)) for z, q, t in history]
    return float(accountant.get_epsilon(delta=float(delta)))


def whole_run_noise_multiplier(
    epsilon: float, delta: float, noise_multiplier: float | None = None
) -> float:
    """The single-Gaussian-equivalent noise multiplier of a fitting run at (epsilon, delta):
    the exact (analytic Gaussian) calibration of one release, unless the caller already
    calibrated (and charged) it."""
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a positive finite number, got {epsilon}")
    if noise_multiplier is not None:
        return noise_multiplier
    return analytic_gaussian_sigma(epsilon, delta, 1.0)
