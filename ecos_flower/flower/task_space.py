"""The server's side of head models: what the task model's input is.

With a head model (`linear-head`, `mlp-head`) the task model takes the run extractor's features,
not pixels (`ecos_flower.ecos.feature_space`). The server tells the nodes which extractor, by name
and weights digest (`head-extractor` in every message's config), builds the model for a (D, 1, 1)
input and trains it in the cloud on the pool's features. Methods that never train a model on the
server (FedAvg, DSSGD) need only the input shape.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ecos_flower.data import Federation
from ecos_flower.ecos.feature_space import (
    HEAD_EXTRACTOR_KEY,
    head_extractor_text,
    in_feature_space,
    local_head_extractor,
)
from ecos_flower.ecos.features import FeatureExtractor
from ecos_flower.models import HEAD_MODELS


def is_head(config: dict[str, Any]) -> bool:
    """Whether the run's task model is a head on pretrained features."""
    return config["model"] in HEAD_MODELS


def name_head_extractor(config: dict[str, Any], federation: Federation) -> None:
    """Set `head-extractor` in `config` (what every node is told) from the run's `extractor`;
    ValueError before any message if that extractor is not one nodes build themselves."""
    from ecos_flower.flower.selection import build_extractor

    if not is_head(config):
        return
    kind = config["extractor"]
    try:
        config[HEAD_EXTRACTOR_KEY] = head_extractor_text(build_extractor(config, federation))
    except ValueError as error:
        raise ValueError(f"model {config['model']!r} with extractor {kind!r}: {error}") from None


def head_extractor(config: dict[str, Any]) -> FeatureExtractor:
    """The head's extractor on the server (the server holds the same weights file)."""
    return local_head_extractor(config)


def task_federation(config: dict[str, Any], federation: Federation) -> Federation:
    """`federation` with its pool as the task model takes it: in feature space for a head model
    (cached under `feature-cache`, shared with ECOS's pool features of the same extractor)."""
    if not is_head(config):
        return federation
    cache = config["feature-cache"] or None
    pool = in_feature_space(
        federation.pool, head_extractor(config), cache, key="pool", progress=True
    )
    return dataclasses.replace(federation, pool=pool)


def task_input_shape(config: dict[str, Any], federation: Federation) -> tuple[int, int]:
    """(channels, image size) of the task model's input: the pool's images, or (D, 1) for a
    head on D-dimensional features (known without computing any feature)."""
    if not is_head(config):
        return federation.channels, federation.image_size
    dim = head_extractor(config).output_dim()
    if dim is None:  # pragma: no cover - every by-name extractor declares its dimension
        raise ValueError(f"extractor {config['extractor']!r} does not declare its output size")
    return int(dim), 1
