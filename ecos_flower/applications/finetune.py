"""DP last-layer fine-tuning on the client: freeze the feature extractor, train only the
classifier head on the private train split with DP-SGD through Opacus.

Full-batch DP-SGD (every step uses the whole split: the largest batch there is, q = 1): each step
releases the summed per-sample gradients, clipped to `max_grad_norm` (L2 sensitivity
max_grad_norm to adding or removing one sample), plus N(0, (z max_grad_norm)^2), divided by a
PUBLIC `normaliser` (the expected batch size, given by the caller: never the private split's size,
which Opacus would otherwise divide by, so that the released head's scale - its noise std
z max_grad_norm lr / normaliser per weight - would tell |D| from |D| - 1; DESIGN 2.4). The
learning rate absorbs the scale: normaliser = the typical client size reproduces the usual
averaged-gradient step on a client of that size. T such steps are exactly one Gaussian
mechanism with noise multiplier z / sqrt(T), which is what the client's ledger is charged.
So z is calibrated exactly: the analytic Gaussian multiplier of one release at the target,
times sqrt(T) (`calibrate_noise`). Opacus' RDP accountant still reports the epsilon
of the T steps (`epsilon_opacus`, for reference: RDP is looser, so it reads above the target).

Total (DESIGN 2.4): samples with a non-finite (or absurdly large) feature or an out-of-range
label are dropped before training (a per-sample filter); with no usable sample left, each step
still releases the noise (the clipped sum of no gradients is zero), so the output never depends
on the data through an exception or a skipped release.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ecos_flower.applications.linear_head import usable_labels, usable_samples
from ecos_flower.models import batched_apply
from ecos_flower.privacy import _opacus  # noqa: F401  (imports Opacus without its logging side effect)
from ecos_flower.privacy.gaussian import analytic_gaussian_sigma

if TYPE_CHECKING:  # annotations only: `make_private_head` imports Opacus where it runs
    from opacus import GradSampleModule, PrivacyEngine
    from opacus.optimizers import DPOptimizer

# Raw feature rows with an entry above this are dropped (per sample, data-independent bound) so
# that logits and per-sample gradients of a float32 head stay finite: a NaN gradient would pass
# Opacus' clipping and poison the released sum.
FEATURE_LIMIT = 1e12

# The default `normaliser` of the head fits: a fixed, data-independent constant standing for the
# expected size of a client's train split (the order of this project's scenarios' clients). A
# caller that knows a better public estimate (the server's, from the scenario) passes it.
DEFAULT_NORMALISER = 100.0


def check_normaliser(normaliser: float) -> float:
    """`normaliser` as a float; raises ValueError unless positive and finite (it is a public
    setting, so refusing it depends on no private data)."""
    real = isinstance(normaliser, numbers.Real) and not isinstance(normaliser, bool)
    value = float(normaliser) if real else math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"normaliser must be a positive finite number, got {normaliser!r}")
    return value


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
    seed: int,
    normaliser: float | None = None,
) -> tuple[PrivacyEngine, GradSampleModule, DPOptimizer, DataLoader]:
    """Opacus' PrivacyEngine around `head` with full-batch steps (q = 1): per-sample gradients
    clipped to `max_grad_norm`, Gaussian noise of std noise_multiplier * max_grad_norm, drawn
    from a generator seeded with the caller's `seed` (required: privacy noise has no default),
    the noisy sum divided by `normaliser` (Opacus' `expected_batch_size`, with the per-sample
    gradients of the mean loss rescaled to those of each sample's own loss as usual).

    Anything released must pass a public `normaliser`. None keeps Opacus' own choice, the
    dataset's size: a private quantity, there only to inspect Opacus' averaging in tests.
    With no samples, Opacus is given one placeholder row; `private_step` never trains on it
    (pass it `batch=None`)."""
    from opacus import PrivacyEngine

    if len(features) == 0:
        features = torch.zeros(1, features.shape[1])
        labels = torch.zeros(1, dtype=torch.long)
    dataset = TensorDataset(features.float(), labels.long())
    loader = DataLoader(dataset, batch_size=len(dataset), shuffle=False)
    optimiser = torch.optim.SGD(head.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(int(seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # secure-RNG advice: the caller seeds from its CSPRNG
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
    if normaliser is not None:
        # DPOptimizer.scale_grad divides the noisy sum by expected_batch_size (full batches
        # accumulate one iteration): a public constant instead of len(dataset).
        optimiser.expected_batch_size = check_normaliser(normaliser)
    return engine, module, optimiser, loader


def full_batch(loader: DataLoader, num_samples: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The one full batch of `loader`, or None when there are no samples (see `private_step`)."""
    if num_samples == 0:
        return None
    ((x, y),) = list(loader)
    return x, y


def private_step(
    module: nn.Module,
    optimiser: DPOptimizer,
    batch: tuple[torch.Tensor, torch.Tensor] | None,
    loss_fn: nn.Module,
) -> bool:
    """Per-sample gradients of `batch`, then Opacus' clip, noise and division by the
    normaliser (`pre_step`);
    True when the noisy gradient is in `.grad`. `batch=None` (no samples): the per-sample
    gradients are one zero row, so the release is the noise alone, as the sum over no samples."""
    optimiser.zero_grad()
    if batch is None:
        for parameter in module.parameters():
            if parameter.requires_grad:
                parameter.grad_sample = torch.zeros(
                    (1, *parameter.shape), dtype=parameter.dtype, device=parameter.device
                )
    else:
        x, y = batch
        loss_fn(module(x), y).backward()
    return bool(optimiser.pre_step())


def calibrate_noise(epsilon: float, delta: float, steps: int) -> float:
    """Noise multiplier per full-batch step so that `steps` steps cost exactly `epsilon`.

    T full-batch steps of multiplier z are one Gaussian release of multiplier z / sqrt(T), so
    z = sqrt(T) times the analytic Gaussian multiplier of one (epsilon, delta) release (tight;
    Opacus' RDP calibration needs about 9 % more noise for the same charge)."""
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps}")
    return analytic_gaussian_sigma(float(epsilon), float(delta), 1.0) * math.sqrt(int(steps))


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
    seed: int,
    normaliser: float = DEFAULT_NORMALISER,
) -> FinetuneResult:
    """Train a linear head on (features, labels) with full-batch DP-SGD at (epsilon, delta).

    Each step is head -= learning_rate * (clipped gradient sum + noise) / `normaliser`: a public,
    data-independent constant (the expected client size, `DEFAULT_NORMALISER` unless the caller
    passes its own estimate), never the number of private samples.

    The head starts at zero (the DP linear-probe recipe) or at a copy of `init` (continue from the
    received model's head). `noise_multiplier` (per step) skips the calibration: the caller
    already calibrated it with `calibrate_noise` (and charged its ledger). `seed` seeds the
    privacy noise (required; the node draws it from its CSPRNG). Unusable samples (non-finite or
    |x| > FEATURE_LIMIT features, labels outside 0..num_classes-1) are dropped."""
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a positive finite number, got {epsilon}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    normaliser = check_normaliser(normaliser)
    keep = usable_samples(features, labels, num_classes, max_abs=FEATURE_LIMIT)
    x, y = features[keep].float(), usable_labels(labels, keep)
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
        x,
        y,
        noise_multiplier=z,
        max_grad_norm=max_grad_norm,
        learning_rate=learning_rate,
        seed=seed,
        normaliser=normaliser,
    )
    batch = full_batch(loader, len(x))
    loss_fn = nn.CrossEntropyLoss()
    module.train()
    with warnings.catch_warnings():
        # Features carry no gradient: Opacus' full backward hook says so once; nothing is wrong.
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(steps):
            if private_step(module, optimiser, batch, loss_fn):
                optimiser.original_optimizer.step()
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
