"""DP-FC: logistic regression on the head's features by full-batch DP-SGD (Opacus), with every
noisy gradient preconditioned by the inverse of a DP feature covariance.

Two kinds of Gaussian release, composed exactly (1 / z^2 = 1 / z_cov^2 + T / z_step^2):
- the covariance G = Z^T Z of the unit-norm rows z (`linear_head`); one sample changes it by
  z z^T, Frobenius norm 1, so sensitivity 1; noise of std z_cov on the upper triangle, mirrored;
- T full-batch DP-SGD steps through Opacus (per-sample gradients clipped to `clip`, noise of std
  z_step * clip on their sum).
The preconditioner multiplies the already-noised gradient, so it is post-processing and may be
reused for every class and step. Opacus has no preconditioning hook, hence the few lines below
that run its `pre_step` (clip, noise, divide by the normaliser) and then the plain optimiser on
P-scaled gradients.

No private count enters a release or what is computed from one: the noisy gradient sum and the
noisy covariance are both divided by the same PUBLIC `normaliser` (the expected client size,
`finetune.DEFAULT_NORMALISER` unless the caller passes its estimate), never by the number of
samples n (DESIGN 2.4: dividing by n would let the released head's scale tell |D| from |D| - 1).

Total (DESIGN 2.4): samples with a non-finite feature or a label outside 0..classes-1 are
dropped (a per-sample filter); with none left, both releases are still made (noise only).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ecos_flower.applications.dp_least_squares import floored_inverse, symmetric_gaussian
from ecos_flower.applications.finetune import (
    DEFAULT_NORMALISER,
    FinetuneResult,
    check_normaliser,
    full_batch,
    make_private_head,
    private_step,
)
from ecos_flower.applications.linear_head import (
    augmented_from_head,
    head_from_augmented,
    normalized_with_bias,
    opacus_epsilon,
    usable_labels,
    usable_samples,
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
    """Z^T Z (symmetrised) plus symmetric Gaussian noise of std `sigma`: exactly symmetric.

    Non-finite rows are dropped and rows above norm 1 scaled to norm 1 (per sample), so one
    sample moves Z^T Z by at most 1 in Frobenius norm whatever it holds."""
    rows = rows.double()
    rows = rows[torch.isfinite(rows).all(dim=1)]
    rows = rows / rows.norm(dim=1, keepdim=True).clamp(min=1.0)
    gram = rows.T @ rows
    return (gram + gram.T) / 2 + symmetric_gaussian(rows.shape[1], sigma, generator)


def preconditioner(noisy_gram: torch.Tensor, normaliser: float, floor: float) -> torch.Tensor:
    """(G~ / normaliser)^-1 with eigenvalues floored at `floor` (noise can make G~ indefinite);
    never raises on a finite G~ (post-processing, see `floored_inverse`).

    `normaliser` must be public (the one the gradient sums are divided by, never the private
    sample count): the floor then bounds the covariance per expected sample."""
    if not floor > 0:
        raise ValueError(f"floor must be > 0, got {floor}")
    return floored_inverse(noisy_gram.double() / check_normaliser(normaliser), floor)


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
    seed: int,
    normaliser: float = DEFAULT_NORMALISER,
) -> FinetuneResult:
    """A head trained by DP-FC at (epsilon, delta), from zero or from `init` (received head).

    Each step is U -= learning_rate * (clipped gradient sum + noise) / `normaliser` @ P with
    P = (G~ / `normaliser`)^-1 floored: `normaliser` is a public, data-independent constant (the
    expected client size), never the number of private samples.

    `noise_multiplier` is the whole run's single-Gaussian equivalent (what the ledger is
    charged); the exact (analytic Gaussian) calibration unless given. `seed` seeds the privacy
    noise (required). Unusable samples (non-finite features, labels outside
    0..num_classes-1) are dropped."""
    total = whole_run_noise_multiplier(epsilon, delta, noise_multiplier)
    normaliser = check_normaliser(normaliser)
    z_cov, z_step = split_noise(total, steps, covariance_share)
    generator = torch.Generator().manual_seed(int(seed))
    rows = normalized_with_bias(features, scale)
    keep = usable_samples(rows, labels, num_classes)
    rows, targets = rows[keep], usable_labels(labels, keep)
    precondition = preconditioner(dp_covariance(rows, z_cov, generator), normaliser, floor).float()
    head = nn.Linear(rows.shape[1], num_classes, bias=False)
    with torch.no_grad():
        if init is None:
            head.weight.zero_()
        else:
            head.weight.copy_(augmented_from_head(init, scale).float())
    _, module, optimiser, loader = make_private_head(
        head,
        rows.float(),
        targets,
        noise_multiplier=z_step,
        max_grad_norm=clip,
        learning_rate=learning_rate,
        seed=int(torch.randint(2**62, (1,), generator=generator)),
        normaliser=normaliser,
    )
    batch = full_batch(loader, len(rows))
    loss_fn = nn.CrossEntropyLoss()
    module.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # rows carry no gradient (see finetune.py)
        for _ in range(steps):
            # Opacus: clip per sample, add noise, divide by the normaliser (False only with
            # virtual steps, which full batches never take)
            if not private_step(module, optimiser, batch, loss_fn):
                continue
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
