"""Cross-domain digits with no external files: styled variants of scikit-learn's load_digits.

Every variant starts from the same 1,797 8x8 images (values / 16), upscaled bilinearly to the
requested size, so the variants share source digits and differ only in style. Each variant's
randomness uses its own fixed seed: a variant is a fixed data set, whatever the scenario seed.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from .imageops import resize


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)  # (1797, 8, 8) in [0, 1]
    return images, bunch.target.astype(np.int64)


def sklearn_digits(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """load_digits as float32 (N, 1, size, size) in [0, 1] plus int64 labels."""
    images, labels = _digits()
    x = resize(torch.from_numpy(images.copy()).unsqueeze(1), size)
    return x, torch.from_numpy(labels.copy())


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x


def _inverted(x: torch.Tensor) -> torch.Tensor:
    """Dark digit on a white background."""
    return 1.0 - x


def _noisy_background(x: torch.Tensor) -> torch.Tensor:
    """Bright digit over a per-sample texture: smooth blobs plus pixel noise, at most 0.6 bright."""
    gen = torch.Generator().manual_seed(1001)
    n, _, s, _ = x.shape
    blobs = resize(torch.rand(n, 1, 4, 4, generator=gen), s)
    grain = torch.rand(n, 1, s, s, generator=gen)
    background = 0.6 * (0.65 * blobs + 0.35 * grain)
    return (x + (1.0 - x) * background).clamp(0.0, 1.0)


def _thick_rotated(x: torch.Tensor) -> torch.Tensor:
    """Bolder strokes (cross-shaped dilation), shrunk to 75 % and rotated 20-45 degrees either way
    by a fixed per-sample angle; shrinking keeps the rotated digit inside the frame."""
    gen = torch.Generator().manual_seed(1002)
    n, _, s, _ = x.shape
    r = max(1, s // 16)  # dilation radius grows with the image so the effect looks alike
    k = 2 * r + 1
    thick = torch.maximum(
        F.max_pool2d(x, (k, 1), stride=1, padding=(r, 0)),
        F.max_pool2d(x, (1, k), stride=1, padding=(0, r)),
    )
    magnitude = 20.0 + 25.0 * torch.rand(n, generator=gen)
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.deg2rad(sign * magnitude)
    cos, sin = torch.cos(theta) / 0.75, torch.sin(theta) / 0.75
    zero = torch.zeros(n)
    mats = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(mats, list(thick.shape), align_corners=False)
    out = F.grid_sample(thick, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.clamp(0.0, 1.0)


def _edges(x: torch.Tensor) -> torch.Tensor:
    """Hollow outlines: Sobel gradient magnitude, scaled per image to peak at 1."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3)
    gx = F.conv2d(x, kx, padding=1)
    gy = F.conv2d(x, kx.transpose(2, 3), padding=1)
    mag = torch.sqrt(gx * gx + gy * gy)
    peak = mag.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    return mag / peak


VARIANTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "plain": _plain,
    "inverted": _inverted,
    "noisy-background": _noisy_background,
    "thick-rotated": _thick_rotated,
    "edges": _edges,
}


def embedded_digits(variant: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One styled variant of load_digits: float32 (1797, 1, size, size) in [0, 1], int64 labels."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown embedded variant {variant!r}; known: {', '.join(VARIANTS)}")
    x, labels = sklearn_digits(size)
    return VARIANTS[variant](x).contiguous(), labels
