"""One DSSGD participant step: download, local SGD, select/clip (or SVT), upload.

Also the flat-parameter helpers: a model's trainable parameters as one vector, and back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from ecos_flower.dssgd.selection import clip, select_largest, select_threshold
from ecos_flower.dssgd.sparse import SparseUpdate
from ecos_flower.dssgd.svt import SvtSplit, svt_select
from ecos_flower.models.training import train_epochs
from ecos_flower.privacy.noise import NoiseSource

SelectionMode = Literal["largest", "threshold"]


def flatten_params(model: nn.Module) -> np.ndarray:
    """All trainable parameters as one float32 numpy vector (a copy)."""
    with torch.no_grad():
        vec = parameters_to_vector(model.parameters()).detach().cpu()
    return vec.numpy().astype(np.float32, copy=True)


def load_flat_params(model: nn.Module, vec: np.ndarray) -> None:
    """Overwrite all parameters of `model` from a flat vector (same order as `flatten_params`)."""
    vec = np.asarray(vec, dtype=np.float32)
    expected = sum(p.numel() for p in model.parameters())
    if vec.shape != (expected,):
        raise ValueError(f"expected a flat vector of {expected} parameters, got shape {vec.shape}")
    device = next(model.parameters()).device
    with torch.no_grad():
        vector_to_parameters(torch.from_numpy(vec.copy()).to(device), model.parameters())


def apply_download(model: nn.Module, download: SparseUpdate) -> None:
    """Overwrite the downloaded entries of the model's flat parameters with the server's values."""
    flat = flatten_params(model)
    if download.indices.size and (download.indices.max() >= flat.shape[0]):
        raise ValueError("download index out of range for this model")
    flat[download.indices] = download.values
    load_flat_params(model, flat)


def local_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 1,
    batch_size: int = 32,
    learning_rate: float = 0.05,
    momentum: float = 0.9,
    seed: int = 0,
    theta_u: float = 0.1,
    mode: SelectionMode = "largest",
    gamma: float | None = None,
    tau: float = 0.0,
    dp_epsilon: float | None = None,
    svt_split: SvtSplit = "published",
    rng: np.random.Generator | NoiseSource | None = None,
    device: str = "cpu",
    on_loss: Callable[[float], None] | None = None,
) -> tuple[SparseUpdate, float]:
    """Train `model` in place (after the download), then choose what to upload.

    Without DP: select theta_u of delta_w by `mode` ("largest" |delta_w|, or random entries with
    |delta_w| > tau), then clip the values to [-gamma, gamma] (gamma None: no clipping); epsilon 0.
    With `dp_epsilon`: the sparse vector technique (needs gamma); returns the epsilon it really
    costs (eps1 / 2 + eps2 / 2, see `ecos_flower.dssgd.svt`). Its privacy noise comes only from
    the caller's `rng` (a `NoiseSource`, e.g. `NoiseSource.fresh()`, or a numpy Generator): a
    missing `rng` with DP on is a TypeError, never a default seed. `seed` drives only the
    training shuffle (and, without DP, the "threshold" mode's random choice when `rng` is None).
    The participant keeps its fully trained local model; only the returned update is shared.
    `on_loss`, if given, receives the mean training loss of the last local epoch.
    """
    if dp_epsilon is not None:
        if gamma is None:
            raise ValueError("the DP (SVT) upload needs a clip bound gamma")
        if rng is None:
            raise TypeError(
                "the DP (SVT) upload needs the caller's noise source: pass rng=NoiseSource.fresh()"
                " (or a CSPRNG-seeded Generator); privacy noise never defaults to a seed"
            )
    before = flatten_params(model)
    loss = train_epochs(
        model,
        images,
        labels,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        momentum=momentum,
        seed=seed,
        device=device,
    )
    if on_loss is not None:
        on_loss(loss)
    delta = flatten_params(model) - before
    if dp_epsilon is not None:
        assert gamma is not None and rng is not None  # checked before training
        return svt_select(
            delta, theta_u, epsilon=dp_epsilon, gamma=gamma, tau=tau, rng=rng, split=svt_split
        )
    if mode == "largest":
        chosen = select_largest(delta, theta_u)
    elif mode == "threshold":
        if rng is None:
            choice_rng = np.random.default_rng(seed)  # not privacy noise: no DP in this branch
        elif isinstance(rng, NoiseSource):
            choice_rng = rng.generator
        else:
            choice_rng = rng
        chosen = select_threshold(delta, theta_u, tau, choice_rng)
    else:
        raise ValueError(f"mode must be 'largest' or 'threshold', got {mode!r}")
    values = clip(chosen.values, gamma).astype(np.float32)
    return SparseUpdate(chosen.indices, values), 0.0
