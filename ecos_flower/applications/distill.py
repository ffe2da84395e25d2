"""Model compression by distillation (Hinton, Vinyals & Dean 2015): a larger teacher, trained on
the whole labelled public pool, teaches the small task model on the selected proxy set only. The
student never sees a label: its loss is KL(teacher || student) on temperature-softened logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ecos_flower.models import batched_apply, train_epochs


def train_teacher(
    teacher: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 3,
    batch_size: int = 64,
    learning_rate: float = 0.05,
    seed: int = 0,
    device: str = "cpu",
) -> nn.Module:
    """Supervised training of the teacher on the labelled pool (in place); returns it."""
    train_epochs(
        teacher,
        images,
        labels,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        device=device,
    )
    return teacher.eval()


def distill(
    student: nn.Module,
    teacher: nn.Module,
    images: torch.Tensor,
    *,
    teacher_images: torch.Tensor | None = None,
    temperature: float = 4.0,
    epochs: int = 30,
    batch_size: int = 32,
    learning_rate: float = 0.05,
    momentum: float = 0.9,
    max_grad_norm: float = 10.0,
    seed: int = 0,
    device: str = "cpu",
) -> float:
    """Train `student` in place to match the teacher's softened outputs on `images` (unlabelled);
    returns the last epoch's mean distillation loss. `teacher_images` are the same samples as
    the teacher takes them, when its input differs from the student's (e.g. pixels for a CNN
    teacher, pretrained features for a head student); default `images`.

    The KL is scaled by T, so its gradient in the logits, (q_student - q_teacher), has the scale of
    cross-entropy's and the task's learning rate fits (Hinton et al.'s T^2 balances soft and hard
    losses; there is no hard loss here, and T^2 made SGD at lr 0.05 diverge on the real digits).
    Gradients are clipped to `max_grad_norm` as a safety net."""
    if len(images) == 0:
        raise ValueError("cannot distil on an empty set")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if teacher_images is not None and len(teacher_images) != len(images):
        raise ValueError(
            f"teacher_images holds {len(teacher_images)} samples, images {len(images)}"
        )
    teacher_input = images if teacher_images is None else teacher_images
    logits = batched_apply(teacher.to(device).eval(), teacher_input, device=device)
    targets = F.softmax(logits / temperature, dim=1)
    student.to(device).train()
    optimiser = torch.optim.SGD(student.parameters(), lr=learning_rate, momentum=momentum)
    generator = torch.Generator().manual_seed(seed)
    last = float("nan")
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            log_p = F.log_softmax(student(images[idx].to(device)) / temperature, dim=1)
            loss = F.kl_div(log_p, targets[idx].to(device), reduction="batchmean")
            loss = loss * temperature
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), max_grad_norm)
            optimiser.step()
            total += loss.item() * len(idx)
        last = total / len(images)
    return last
