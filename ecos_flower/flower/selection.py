"""What the sampling methods and the applications share: the server's feature map, the context
the step after selection gets, and the task model it trains.

Both `sampling_run` (the run) and `applications` (what the cloud does with the selection) import
this module; neither imports the other's internals through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ecos_flower.config import TORCHVISION_PREFIX
from ecos_flower.data import Federation, ImageSet
from ecos_flower.ecos import FeatureExtractor, make_extractor
from ecos_flower.flower.payload import MeteredGrid
from ecos_flower.models import build_model
from ecos_flower.strategy.ecos_query import ExtractorDelivery


def build_extractor(config: dict[str, Any], federation: Federation) -> FeatureExtractor:
    """The server's feature map phi, fitted on the labelled public pool (no privacy cost)."""
    kind = config["extractor"]
    seed, device = config["seed"], config["device"]
    if kind == "supervised":
        extractor = make_extractor(
            kind, epochs=config["extractor-epochs"], seed=seed, device=device
        )
    elif kind == "random":
        extractor = make_extractor(kind, seed=seed, device=device)
    elif kind == "pca":
        extractor = make_extractor(kind, n_components=config["pca-components"], seed=seed)
    elif kind == "efficientnet-lite0":  # frozen: "fitting" loads the installed weights file
        extractor = make_extractor(kind, device=device)
    elif kind.startswith(TORCHVISION_PREFIX):
        weights = config.get("extractor-weights", "")
        if not weights:
            raise ValueError(f"extractor {kind!r} needs extractor-weights: a local state-dict file")
        arch = kind.removeprefix(TORCHVISION_PREFIX)
        extractor = make_extractor("torchvision", weights_path=weights, arch=arch, device=device)
    else:
        raise ValueError(
            f"extractor {kind!r} is not available from the run config; "
            "choose supervised, random, pca, efficientnet-lite0 or torchvision:<arch>"
        )
    pool = federation.pool
    if pool.is_lazy:
        if kind in ("supervised", "pca"):
            raise ValueError(
                f"extractor {kind!r} fits on the pixels of the whole pool, which is lazy "
                "(an image-folder domain with lazy = true): use a pretrained extractor "
                "(efficientnet-lite0 or torchvision:<arch> with extractor-weights), or drop "
                "lazy from the pool's domains"
            )
        # The other kinds read no pixels to fit (random: the channel count): one decoded row
        # stands for the pool.
        return extractor.fit(pool.images[:1], pool.labels[:1])
    return extractor.fit(pool.images, pool.labels)


@dataclass
class SelectionContext:
    """What the step after selection may use: the run config, the federation (only its public
    pool on the server, as images: what feature maps take), `task_pool` (the same pool as the
    task model takes it: the extractor's features for a head model; None when that is the
    images, see `training_pool`), the selected pool indices, the metered grid (an application
    may query clients, e.g. private kNN labelling), the pool features and the extractor (None
    for methods without one), and `delivery`: which nodes already hold which extractor (shared
    with the strategy's query, so a kNN query does not ship the same weights twice).

    An application writes what it measured into `extra` (report extras), and the ledger totals
    its own client rounds reported into `epsilon_spent` (client -> epsilon) and the nodes that
    answered into `node_to_client`; the run composes those with the strategy's figures."""

    config: dict[str, Any]
    federation: Federation
    selected: np.ndarray
    grid: MeteredGrid
    features: np.ndarray | None
    extractor: FeatureExtractor | None = None
    delivery: ExtractorDelivery = field(default_factory=ExtractorDelivery)
    extra: dict[str, Any] = field(default_factory=dict)
    epsilon_spent: dict[int, float] = field(default_factory=dict)
    node_to_client: dict[int, int] = field(default_factory=dict)
    task_pool: ImageSet | None = None

    @property
    def training_pool(self) -> ImageSet:
        """The pool the task model trains on: `task_pool`, or the pool's images."""
        return self.federation.pool if self.task_pool is None else self.task_pool


def task_model(context: SelectionContext) -> torch.nn.Module:
    """A freshly initialised task model (`model` of the run config) for the shape of what it
    takes (`training_pool`: images, or features for a head)."""
    images = context.training_pool.images
    return build_model(
        context.config["model"],
        context.federation.num_classes,
        images.shape[1],
        images.shape[-1],
        seed=context.config["seed"],
    )
