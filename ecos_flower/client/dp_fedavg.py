"""Sample-level DP-FedAvg on the client (`train.dpsgd`): every round, local DP-SGD through Opacus
with Poisson sampling, the noise calibrated and charged by the node itself.

Privacy unit: record-level add/remove of one client sample (Opacus' unit under Poisson sampling).
The node adds the noise; the server sees only noised models, so it need not be trusted (unlike
client-level DP-FedAvg, `ecos_flower.client.fedavg`, where the server adds the noise).

What the charge depends on. The request (`DPSGD_TASK`) declares the run's target epsilon at
delta, its number of rounds R, the local epochs E and a public Poisson rate q. The client's
dataset size n is private, so q is never batch / n (as Opacus derives it from a DataLoader): it
is the declared q, every step includes each usable sample independently with probability q, and a
local epoch is int(1 / q) steps whatever n is (each sample is visited once per epoch in
expectation, as in Opacus' `UniformWithReplacementSampler`). So the round's steps S = E int(1/q),
the noise multiplier z (`calibrate_dpsgd`: within 0.1 % of the smallest z whose R S steps the
ledger composes to at most the target) and the charge `PrivacyEvent.dpsgd(z, q, S)` follow from
the message alone, and are charged before the data is read. The ledger groups the rounds'
equal (z, q) events, so after R rounds it holds exactly the calibrated R S steps: the run costs
at most the target (plus whatever else the node ran). A server that lies about R only changes
the noise of its own rounds: each is charged as what it really is, and the node's limit stops it.

What the model carries. The noisy sum of clipped per-sample gradients is divided by the public
`expected-batch-size` (the run's `batch-size`), never by n or by the drawn batch's size, which
would put n into the noise's scale (DESIGN 2.4). The reply's weight is the constant 1 (uniform
FedAvg), and it carries no loss, size or timing.

Total (DESIGN 2.4). Samples with a non-finite or absurd pixel, or a label outside
0..num-classes-1, are dropped before training (a per-sample filter, `usable_samples`); a sample
whose per-sample gradient is non-finite (a crafted model can overflow on chosen pixels) is dropped
from that step only; an empty Poisson batch (or no usable sample at all) still releases the
step's noise. No exception or skipped release depends on one sample.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from torch import nn

from ecos_flower.applications.finetune import make_private_head, private_step
from ecos_flower.applications.linear_head import usable_labels, usable_samples
from ecos_flower.client.data import LoadData, client_shard, task_inputs
from ecos_flower.client.ecos import check_source
from ecos_flower.client.fedavg import task_model
from ecos_flower.client.messages import DPSGD_TASK, MODEL_CONFIG, TaskRejected
from ecos_flower.client.release import ReleaseBoundary, guarded
from ecos_flower.privacy.ledger import PrivacyEvent, compose_epsilon

MECHANISM = "dpsgd-update"

# Pixels beyond this (in absolute value) mark a sample as unusable: a per-sample, data-independent
# bound that keeps a float32 network's activations finite on honest models.
PIXEL_LIMIT = 1e6

# The noise multipliers `calibrate_dpsgd` searches: below Z_MIN the ledger counts a step as
# full-batch anyway (no amplification), and at Z_MAX a step releases next to nothing.
Z_MIN, Z_MAX = 0.05, 1e4
CALIBRATION_TOLERANCE = 1e-3  # relative width of the final bracket [z, z (1 + tol)]

MAX_TOTAL_STEPS = 100_000  # node config `max-dpsgd-steps`: the run's steps R E int(1/q)


def steps_per_epoch(sample_rate: float) -> int:
    """DP-SGD steps of one local epoch at Poisson rate q: int(1/q), independent of the dataset's
    size (Opacus' convention for Poisson sampling)."""
    return max(1, int(1.0 / sample_rate))


@functools.lru_cache(maxsize=256)
def calibrate_dpsgd(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The noise multiplier z whose `steps` Poisson-subsampled Gaussian steps at rate
    `sample_rate` cost at most `epsilon` at `delta`, by the node ledger's own composition
    (`compose_epsilon`, Google's PLD accountant: a pessimistic, near-tight bound).

    Bisection in log z over [Z_MIN, Z_MAX] (the cost falls as z grows) down to a relative width of
    `CALIBRATION_TOLERANCE`, keeping the feasible end: the result's cost is <= `epsilon`, and
    z (1 - tol) would cost more (unless z is Z_MIN, which already costs less). Deterministic, so
    every round and every node with the same request get the same z (and the ledger groups them).
    Raises ValueError when even Z_MAX costs more than `epsilon` (a target too small to reach)."""

    def cost(z: float) -> float:
        return compose_epsilon((PrivacyEvent.dpsgd(z, sample_rate, steps),), delta)

    low, high = Z_MIN, Z_MAX
    if cost(low) <= epsilon:
        return low
    if not cost(high) <= epsilon:
        raise ValueError(
            f"epsilon={epsilon:g} at delta={delta:g} is out of reach for {steps} DP-SGD steps at "
            f"sample-rate {sample_rate:g} (noise multiplier {Z_MAX:g} costs more)"
        )
    while high / low > 1.0 + CALIBRATION_TOLERANCE:
        middle = math.sqrt(low * high)
        if cost(middle) <= epsilon:
            high = middle
        else:
            low = middle
    return high


@dataclass(frozen=True)
class DpSgdPlan:
    """A parsed `train.dpsgd` request turned into this round's DP-SGD: everything here follows
    from the message (and the node's limits), never from the data.

    Attributes
    ----------
    noise_multiplier : float
        z of every step, calibrated to the run's target (`calibrate_dpsgd`).
    sample_rate : float
        The declared Poisson rate q.
    steps : int
        This round's steps, local-epochs * int(1/q) (the charge's `steps`).
    total_steps : int
        The run's steps, num-rounds * steps (what the target covers).
    """

    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    total_steps: int
    max_grad_norm: float
    expected_batch_size: float
    learning_rate: float

    @classmethod
    def from_task(cls, task: Mapping[str, Any], node_config: Mapping[str, Any]) -> DpSgdPlan:
        """The plan of a parsed `DPSGD_TASK`; TaskRejected (message-only) when the run is longer
        than the node's `max-dpsgd-steps` or its target cannot be reached."""
        q = task["sample-rate"]
        steps = task["local-epochs"] * steps_per_epoch(q)
        total = task["num-rounds"] * steps
        limit = int(node_config.get("max-dpsgd-steps", MAX_TOTAL_STEPS))
        if total > limit:
            raise TaskRejected(
                f"num-rounds x local-epochs x int(1/sample-rate) = {total} DP-SGD steps, above "
                f"this node's max-dpsgd-steps={limit}"
            )
        try:
            z = calibrate_dpsgd(task["epsilon"], task["delta"], q, total)
        except ValueError as exc:
            raise TaskRejected(str(exc)) from exc
        return cls(
            epsilon=task["epsilon"],
            delta=task["delta"],
            noise_multiplier=z,
            sample_rate=q,
            steps=steps,
            total_steps=total,
            max_grad_norm=task["max-grad-norm"],
            expected_batch_size=task["expected-batch-size"],
            learning_rate=task["learning-rate"],
        )

    def event(self, note: str = "") -> PrivacyEvent:
        """This round's charge."""
        return PrivacyEvent.dpsgd(self.noise_multiplier, self.sample_rate, self.steps, note=note)


def _drop_non_finite_samples(module: nn.Module) -> None:
    """Zero the per-sample gradients of every sample with a non-finite entry in any of them: one
    sample's overflow (a crafted model) must not poison the step's release, and zeroing touches
    that sample's own contribution only."""
    samples = [
        p.grad_sample for p in module.parameters() if getattr(p, "grad_sample", None) is not None
    ]
    if not samples:
        return
    finite = torch.ones(len(samples[0]), dtype=torch.bool, device=samples[0].device)
    for grad in samples:
        # A sample's sum is non-finite if any entry is (or if they overflow together: dropping
        # that sample too is still a per-sample rule); 3x cheaper than isfinite().all().
        finite &= torch.isfinite(grad.reshape(len(grad), -1).sum(dim=1))
    if not bool(finite.all()):
        for grad in samples:
            grad[~finite] = 0.0


def _dp_step(
    module: nn.Module,
    optimiser: Any,
    batch: tuple[torch.Tensor, torch.Tensor] | None,
    loss_fn: nn.Module,
) -> bool:
    """One DP-SGD release: per-sample gradients of `batch` (None: an empty draw, the release is
    the noise alone, `private_step`), non-finite samples dropped, then Opacus' clip, noise and
    division by the public normaliser. True when the noisy gradient is in `.grad`."""
    if batch is None:
        return private_step(module, optimiser, None, loss_fn)
    optimiser.zero_grad()
    x, y = batch
    loss_fn(module(x), y).backward()
    _drop_non_finite_samples(module)
    return bool(optimiser.pre_step())


def dpsgd_train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    plan: DpSgdPlan,
    *,
    noise_seed: int,
    sampling_seed: int,
    device: str = "cpu",
) -> nn.Module:
    """Train `model` in place with `plan.steps` DP-SGD steps through Opacus: Poisson batches at
    rate `plan.sample_rate` (the draws from a generator seeded with `sampling_seed`: privacy
    randomness, the caller's CSPRNG), per-sample gradients clipped to `plan.max_grad_norm`,
    Gaussian noise of std z * max_grad_norm (from `noise_seed`), the sum divided by the public
    `plan.expected_batch_size`. Already charged; returns `model`."""
    x_all = images.float()
    keep = usable_samples(x_all.reshape(len(x_all), -1), labels, num_classes, max_abs=PIXEL_LIMIT)
    x, y = x_all[keep].to(device), usable_labels(labels, keep).to(device)
    model.to(device).train()
    # Opacus' engine around the model, with the public normaliser (`make_private_head` works for
    # any Opacus-compatible module); its DataLoader is not used: the steps draw their own
    # Poisson batches below, at the declared rate rather than batch / n.
    _, module, optimiser, _ = make_private_head(
        model,
        x,
        y,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        learning_rate=plan.learning_rate,
        seed=noise_seed,
        normaliser=plan.expected_batch_size,
    )
    sampler = torch.Generator().manual_seed(int(sampling_seed))
    loss_fn = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Opacus' notes on hooks; nothing is wrong
        for _ in range(plan.steps):
            # Always draw n uniforms (even n = 0), so the draw's cost does not depend on a branch.
            chosen = torch.rand(len(x), generator=sampler) < plan.sample_rate
            index = chosen.nonzero().flatten().to(device)
            batch = (x[index], y[index]) if len(index) else None
            if _dp_step(module, optimiser, batch, loss_fn):
                optimiser.original_optimizer.step()
    return model


def answer_dpsgd_train(
    msg: Message, context: Context, boundary: ReleaseBoundary, load_data: LoadData = client_shard
) -> Message:
    """One round of sample-level DP-FedAvg: parse the request (`DPSGD_TASK`, `MODEL_CONFIG`),
    admit `dpsgd-update`, calibrate z and charge this round's steps to the node's ledger, and only
    then read the data, train the received model with DP-SGD and return it."""
    config = msg.content.get("config")
    arrays = msg.content.get("arrays")
    if not isinstance(config, ConfigRecord) or not isinstance(arrays, ArrayRecord):
        raise TaskRejected("message has no ConfigRecord 'config' and ArrayRecord 'arrays'")
    fields = MODEL_CONFIG.parse(config, context.node_config)
    task = DPSGD_TASK.parse(msg.content.get("dpsgd"), context.node_config)
    boundary.admit(MECHANISM)
    check_source(config, context.node_config, load_data)
    plan = DpSgdPlan.from_task(task, context.node_config)
    note = (
        f"sample-level DP-FedAvg round {config.get('server-round', '?')} "
        f"({plan.steps} of {plan.total_steps} steps), run {context.run_id}"
    )
    spent, noise = boundary.charge(plan.event(note))
    # Charged: only from here on is the node's data read.
    shard = task_inputs(load_data(config, context.node_config), config, context.node_config)
    model = task_model(fields, shard)
    model.load_state_dict(arrays.to_torch_state_dict())
    noise_seed, sampling_seed = (int(s) for s in noise.generator.integers(2**62, size=2))
    dpsgd_train(
        model,
        shard.train.images,
        shard.train.labels,
        fields["num-classes"],
        plan,
        noise_seed=noise_seed,
        sampling_seed=sampling_seed,
        device=str(config.get("device", "cpu")),
    )
    metrics = {
        **boundary.node_label(),
        "weight": 1,  # uniform FedAvg: the server learns no size
        "noise-multiplier": plan.noise_multiplier,
        "sample-rate": plan.sample_rate,
        "steps": plan.steps,
        **boundary.budget_metrics(spent),
    }
    model.cpu()
    return boundary.reply(MECHANISM, {"arrays": ArrayRecord(model.state_dict())}, metrics)


def dpsgd_train_handler(
    load_data: LoadData = client_shard,
) -> Callable[[Message, Context], Message]:
    """Sample-level DP-FedAvg's `train.dpsgd` handler, reading this node's data with
    `load_data(config, node_config)` (after the charge); register it with
    `app.train("dpsgd")(dpsgd_train_handler(...))`."""

    def dpsgd_train_message(msg: Message, context: Context, boundary: ReleaseBoundary) -> Message:
        return answer_dpsgd_train(msg, context, boundary, load_data)

    return guarded(dpsgd_train_message)


handle_dpsgd_train = dpsgd_train_handler()
"""`train.dpsgd` on the project's scenarios (`client_shard`)."""
