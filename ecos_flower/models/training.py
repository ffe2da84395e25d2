"""Plain supervised train/evaluate loops over in-memory tensors, seeded and device-configurable."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def set_torch_threads(num_threads: int) -> None:
    """Use `num_threads` intra-op threads; 1 per simulated client avoids oversubscription."""
    if num_threads > 0 and torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)


def train_epochs(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 1,
    batch_size: int = 32,
    learning_rate: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str = "cpu",
) -> float:
    """Train `model` in place with SGD; return the mean loss of the last epoch."""
    if len(images) == 0:
        raise ValueError("cannot train on an empty dataset")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    model.to(device).train()
    optimiser = torch.optim.SGD(
        model.parameters(), lr=learning_rate, momentum=momentum, weight_decay=weight_decay
    )
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    last_loss = float("nan")
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        total, count = 0.0, 0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            x, y = images[idx].to(device), labels[idx].to(device)
            optimiser.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimiser.step()
            total += loss.item() * len(idx)
            count += len(idx)
        last_loss = total / count
    return last_loss


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int = 512,
    device: str = "cpu",
) -> tuple[float, float]:
    """Return (accuracy, mean cross-entropy loss) of `model` on (images, labels)."""
    if len(images) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    model.to(device).eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    correct, loss = 0, 0.0
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device)
        logits = model(x)
        loss += loss_fn(logits, y).item()
        correct += (logits.argmax(dim=1) == y).sum().item()
    return correct / len(images), loss / len(images)


@torch.no_grad()
def batched_apply(
    forward: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    *,
    batch_size: int = 1024,
    device: str = "cpu",
) -> torch.Tensor:
    """`forward` (a model in eval mode, or e.g. its `embed`) over `images` in batches on `device`;
    outputs concatenated on the CPU (an empty tensor for no images)."""
    outputs = [
        forward(images[i : i + batch_size].to(device)).cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(outputs) if outputs else torch.empty(0)
