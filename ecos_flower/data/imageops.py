"""Torch image ops shared by the loaders: scale to [0, 1], resize, convert channels."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# ITU-R BT.601 luma weights, the same as PIL's convert("L").
_LUMA = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32).view(1, 3, 1, 1)


def to_float_images(array: np.ndarray | torch.Tensor, scale: float) -> torch.Tensor:
    """(N, H, W), (N, H, W, C) or (N, C, H, W) array -> float32 (N, C, H, W) / `scale`."""
    t = torch.as_tensor(np.asarray(array)).to(torch.float32) / float(scale)
    if t.dim() == 3:
        t = t.unsqueeze(1)
    elif t.dim() == 4 and t.shape[-1] in (1, 3, 4) and t.shape[1] not in (1, 3, 4):
        t = t.permute(0, 3, 1, 2)
    return t.contiguous()


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey <-> RGB for (N, C, H, W) images (RGBA: alpha dropped); channels is 1 or 3."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    c = images.shape[1]
    if c == 4:
        images, c = images[:, :3], 3
    if c == channels:
        return images
    if c == 1:
        return images.expand(-1, 3, -1, -1).contiguous()
    if c == 3:
        return (images * _LUMA).sum(dim=1, keepdim=True)
    raise ValueError(f"cannot convert {c}-channel images to {channels} channels")


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) to (N, C, size, size); antialiased when shrinking."""
    if images.shape[-2:] == (size, size):
        return images
    shrink = images.shape[-1] > size or images.shape[-2] > size
    out = F.interpolate(
        images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink
    )
    return out.clamp_(0.0, 1.0)


def standardize(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """Resize then convert channels, returning float32 (N, channels, size, size) in [0, 1]."""
    return convert_channels(resize(images, size), channels).to(torch.float32).contiguous()
