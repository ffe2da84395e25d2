"""A tiny DSSGD task shared by the participant and strategy tests: a 3-class paper MLP on 4x4
inputs, and separable data for it."""

from __future__ import annotations

import torch

from ecos_flower.models.nets import PaperMLP


def tiny_model(seed: int = 0) -> torch.nn.Module:
    """The task model, initialised from `seed`."""
    torch.manual_seed(seed)
    return PaperMLP(3, 1, 4)


def tiny_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` images (1x4x4) whose brightness tells their class (0..2), with noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 1, 4, 4, generator=g) * 0.3 + y.view(-1, 1, 1, 1).float()
    return x, y
