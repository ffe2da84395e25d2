"""Label outsourcing with semi-supervised learning: pseudo-labelling with a confidence threshold.

Train on the labelled selection; then, for a few rounds, label the unlabelled pool with the
current model, keep the predictions whose softmax confidence reaches `threshold`, and continue
training on the labelled selection plus those pseudo-labelled samples (self-training, Lee 2013).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ecos_flower.models import batched_apply, train_epochs


@dataclass
class PseudoLabelStats:
    """Per round: how many unlabelled samples were pseudo-labelled (and, when the true labels
    are known to the caller for diagnostics, how many of those were right)."""

    kept: list[int] = field(default_factory=list)
    correct: list[int] = field(default_factory=list)


def predict_proba(
    model: nn.Module, images: torch.Tensor, *, batch_size: int = 1024, device: str = "cpu"
) -> torch.Tensor:
    """Softmax probabilities of `model` on `images` (n, classes)."""
    logits = batched_apply(model.to(device).eval(), images, batch_size=batch_size, device=device)
    return torch.softmax(logits, dim=1) if len(logits) else logits


def pseudo_label_train(
    model: nn.Module,
    labelled_images: torch.Tensor,
    labels: torch.Tensor,
    unlabelled_images: torch.Tensor,
    *,
    rounds: int = 2,
    threshold: float = 0.95,
    epochs: int = 30,
    round_epochs: int = 3,
    batch_size: int = 32,
    learning_rate: float = 0.05,
    seed: int = 0,
    device: str = "cpu",
    unlabelled_truth: torch.Tensor | None = None,
    max_repeat: int = 10,
) -> PseudoLabelStats:
    """Supervised training (`epochs`) then `rounds` of pseudo-labelling, each followed by
    `round_epochs` epochs on labelled (repeated, see below) + confident pseudo-labelled samples.
    Trains `model` in place; `unlabelled_truth` (optional) only feeds the diagnostics in the
    returned stats."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    common = {"batch_size": batch_size, "learning_rate": learning_rate, "device": device}
    train_epochs(model, labelled_images, labels, epochs=epochs, seed=seed, **common)
    stats = PseudoLabelStats()
    for r in range(rounds):
        if len(unlabelled_images) == 0:
            break
        confidence, guess = predict_proba(model, unlabelled_images, device=device).max(dim=1)
        keep = confidence >= threshold
        stats.kept.append(int(keep.sum()))
        if unlabelled_truth is not None:
            stats.correct.append(int((guess[keep] == unlabelled_truth[keep]).sum()))
        if not keep.any():
            break
        # Repeat the labelled samples so they stay about half of what the model sees (at most
        # `max_repeat` copies): confident but wrong pseudo-labels must not swamp the true ones.
        repeat = max(1, min(max_repeat, math.ceil(int(keep.sum()) / len(labels))))
        images = torch.cat([labelled_images.repeat(repeat, 1, 1, 1), unlabelled_images[keep]])
        targets = torch.cat([labels.repeat(repeat), guess[keep]])
        train_epochs(model, images, targets, epochs=round_epochs, seed=seed + 1 + r, **common)
    return stats
