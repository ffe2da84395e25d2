"""Client handlers of the applications: private-kNN labelling (`query.knn`) and DP last-layer
fine-tuning before evaluation (`evaluate.finetune`: DP-SGD, DP least squares or DP-FC). Both go
through the node's release boundary (`ecos_flower.client.release`): admitted by the node's
policy, charged to its one lifetime ledger before its data is read, refused past its limit. The
requests' fields are declared once, in `ecos_flower.client.messages` (`KNN_QUERY`,
`FINETUNE_REQUEST`, `MODEL_CONFIG`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message

from ecos_flower.applications import (
    DEFAULT_NORMALISER,
    FinetuneResult,
    dp_fc_head,
    dp_finetune_head,
    dp_least_squares_head,
    head_features,
    knn_sensitivity,
    knn_votes,
)
from ecos_flower.applications.finetune import calibrate_noise
from ecos_flower.client.data import LoadData, client_shard, node_feature_cache, task_inputs
from ecos_flower.client.ecos import check_declared, check_source, declared_array, read_extractor
from ecos_flower.client.messages import (
    FINETUNE_REQUEST,
    KNN_QUERY,
    MODEL_CONFIG,
    QueryRejected,
)
from ecos_flower.client.release import Refused, ReleaseBoundary, guarded
from ecos_flower.ecos.feature_space import features_of
from ecos_flower.models import build_model, evaluate_accuracy
from ecos_flower.privacy.gaussian import analytic_gaussian_sigma
from ecos_flower.privacy.ledger import PrivacyEvent


def check_knn_query(
    query: object, features: np.ndarray, node_config: Mapping[str, Any]
) -> dict[str, Any]:
    """The `knn` record parsed (`KNN_QUERY`) and the decoded features checked against it:
    refuses absurd or unsafe kNN queries before any work is done."""
    parsed = KNN_QUERY.parse(query, node_config)
    check_declared(features, (parsed["num-queries"], parsed["dim"]), "query features")
    return parsed


def read_query_features(msg: Message, query: Mapping[str, Any]) -> np.ndarray:
    """The selected samples' features for the parsed `query` (`declared_array`)."""
    shape = (query["num-queries"], query["dim"])
    return declared_array(msg, "queries", "features", shape, "query features")


def answer_knn_query(
    msg: Message, context: Context, boundary: ReleaseBoundary, load_data: LoadData = client_shard
) -> Message:
    """Answer one `query.knn`: noisy label-vote histograms (n x classes) for the server's
    selected samples, from this client's labelled training shard, in the shared feature space.
    Charged before the data is read; the votes are total (samples with non-finite features or
    labels outside 0..num-classes-1 are dropped; ties are broken by sample order)."""
    query = KNN_QUERY.parse(msg.content.get("knn"), context.node_config)
    features = read_query_features(msg, query)
    config = msg.content.get("config")
    if not isinstance(config, ConfigRecord):
        raise QueryRejected("query has no ConfigRecord 'config'")
    boundary.admit("knn-votes")
    extractor = read_extractor(msg, context, query, dim=features.shape[1])
    check_source(config, context.node_config, load_data)
    k, mode, num_classes = query["k"], query["mode"], query["num-classes"]
    sensitivity = knn_sensitivity(mode, k, len(features))
    epsilon, delta = query["epsilon"], query["delta"]
    sigma = analytic_gaussian_sigma(epsilon, delta, sensitivity)
    event = PrivacyEvent.gaussian(
        sigma / sensitivity, note=f"kNN votes ({len(features)} samples), run {context.run_id}"
    )
    spent, noise = boundary.charge(event)
    # Charged: only from here on is the node's data read.
    shard = load_data(config, context.node_config)
    own = features_of(
        extractor, shard.train.images, node_feature_cache(context.node_config), key="knn"
    )
    if own.ndim != 2 or own.shape[1] != features.shape[1]:
        raise ValueError(f"extractor features {own.shape[1:]} vs query dim {features.shape[1]}")
    votes = knn_votes(own, shard.train.labels.numpy(), features, k, num_classes, mode)
    noisy = votes + noise.gaussian(sigma, votes.shape)
    metrics = {
        **boundary.node_label(),
        "sensitivity": sensitivity,
        "sigma": sigma,
        **boundary.budget_metrics(spent),
    }
    return boundary.reply("knn-votes", {"votes": ArrayRecord([noisy.astype(np.float64)])}, metrics)


def _model(model: Mapping[str, Any], images: torch.Tensor) -> torch.nn.Module:
    return build_model(
        model["model"],
        num_classes=model["num-classes"],
        in_channels=images.shape[1],
        image_size=images.shape[-1],
    )


@dataclass
class FinetuneSpec:
    """A validated `finetune` ConfigRecord (the server's request; this node checks every field)."""

    method: str
    epsilon: float
    delta: float
    steps: int
    clip: float
    learning_rate: float
    init: str
    ridge: float
    covariance_share: float
    floor: float
    feature_scale: float
    normaliser: float = DEFAULT_NORMALISER

    @property
    def noise_multiplier(self) -> float:
        """The whole fine-tuning as one Gaussian release (the ledger's charge), calibrated with
        Opacus' RDP accountant: T full-batch DP-SGD steps of z compose to z / sqrt(T); DP least
        squares is one release; DP-FC's releases are split from one (see `dp_fc.split_noise`)."""
        if self.method == "dp-sgd":
            return calibrate_noise(self.epsilon, self.delta, self.steps) / math.sqrt(self.steps)
        return calibrate_noise(self.epsilon, self.delta, 1)


def read_finetune_spec(spec: object, node_config: Mapping[str, Any]) -> FinetuneSpec:
    """Parse and bound-check the request (`FINETUNE_REQUEST`); raises QueryRejected naming the
    bad field."""
    fields = FINETUNE_REQUEST.parse(spec, node_config)
    return FinetuneSpec(**{name.replace("-", "_"): value for name, value in fields.items()})


def finetune_head(
    spec: FinetuneSpec,
    received: torch.nn.Linear,
    features: torch.Tensor,
    labels: torch.Tensor,
    noise_multiplier: float,
    seed: int,
) -> FinetuneResult:
    """Run the requested DP head fitting on this node's frozen features (the received model's
    `embed` of its train split), starting from zero or the `received` head; already charged."""
    classes = received.out_features
    init = None if spec.init == "zero" else received
    common = {"epsilon": spec.epsilon, "delta": spec.delta, "seed": seed}
    if spec.method == "dp-least-squares":
        return dp_least_squares_head(
            features,
            labels,
            classes,
            scale=spec.feature_scale,
            ridge_multiple=spec.ridge,
            noise_multiplier=noise_multiplier,
            **common,
        )
    if spec.method == "dp-fc":
        return dp_fc_head(
            features,
            labels,
            classes,
            scale=spec.feature_scale,
            steps=spec.steps,
            learning_rate=spec.learning_rate,
            clip=spec.clip,
            covariance_share=spec.covariance_share,
            floor=spec.floor,
            init=init,
            noise_multiplier=noise_multiplier,
            normaliser=spec.normaliser,
            **common,
        )
    return dp_finetune_head(
        features,
        labels,
        classes,
        steps=spec.steps,
        max_grad_norm=spec.clip,
        learning_rate=spec.learning_rate,
        init=init,
        noise_multiplier=noise_multiplier * math.sqrt(spec.steps),
        normaliser=spec.normaliser,
        **common,
    )


def answer_finetune_evaluate(
    msg: Message, context: Context, boundary: ReleaseBoundary, load_data: LoadData = client_shard
) -> Message:
    """`evaluate.finetune`: refit the received model's classifier head on the private train split
    with DP (DP-SGD through Opacus, DP least squares or DP-FC), charged to the ledger first, and
    report the fine-tuned model's test accuracy (and the received model's). The accuracies are
    exact test-set metrics: the node releases them only if its policy reports metrics. A fit the
    node will not run (bad settings, or past its budget) reports the received model's accuracy
    only (`finetuned` = 0, the reason in ConfigRecord `finetune-refusal`); the reason depends on
    the message and the ledger only."""
    config = msg.content.get("config")
    arrays = msg.content.get("arrays")
    if not isinstance(config, ConfigRecord) or not isinstance(arrays, ArrayRecord):
        raise QueryRejected("message has no ConfigRecord 'config' and ArrayRecord 'arrays'")
    task_model = MODEL_CONFIG.parse(config, context.node_config)
    boundary.admit("evaluation-metrics")
    check_source(config, context.node_config, load_data)
    spent = noise = spec = None
    try:
        spec = read_finetune_spec(msg.content.get("finetune"), context.node_config)
        boundary.admit("dp-head-fit")
        event = PrivacyEvent.gaussian(
            spec.noise_multiplier,
            note=f"DP head fine-tuning ({spec.method}, {spec.steps} steps, single-release "
            f"z={spec.noise_multiplier:.4g}), run {context.run_id}",
        )
        spent, noise = boundary.charge(event)
        reason = ""
    except Refused as exc:  # the received model is still scored
        reason = exc.reason
    device = str(config.get("device", "cpu"))
    shard = task_inputs(load_data(config, context.node_config), config, context.node_config)
    model = _model(task_model, shard.train.images)
    model.load_state_dict(arrays.to_torch_state_dict())
    if not hasattr(model, "embed") or not isinstance(
        getattr(model, "classifier", None), torch.nn.Linear
    ):
        raise ValueError(f"model {config['model']!r} has no embed()/classifier head to fine-tune")
    received, _ = evaluate_accuracy(model, shard.test.images, shard.test.labels, device=device)
    metrics: dict[str, float | int] = {**boundary.node_label(), "accuracy-received": received}
    if noise is None or spec is None:
        metrics.update({"accuracy": received, "finetuned": 0})
        records = {"finetune-refusal": ConfigRecord({"reason": reason})}
        return boundary.reply("dp-head-fit", records, metrics)
    seed = int(noise.generator.integers(2**62))
    features = head_features(model, shard.train.images, device=device)
    result = finetune_head(
        spec, model.classifier, features, shard.train.labels, spec.noise_multiplier, seed
    )
    model.classifier = result.head
    accuracy, loss = evaluate_accuracy(model, shard.test.images, shard.test.labels, device=device)
    metrics.update(
        {
            "accuracy": accuracy,
            "loss": loss,
            "finetuned": 1,
            "finetune-epsilon-opacus": result.epsilon_opacus,
            "noise-multiplier": result.noise_multiplier,
            "steps": result.steps,
            **boundary.budget_metrics(spent),
        }
    )
    return boundary.reply("dp-head-fit", {}, metrics)


def knn_handler(load_data: LoadData = client_shard) -> Callable[[Message, Context], Message]:
    """The `query.knn` handler, reading this node's labelled data with `load_data(config,
    node_config)` (after the charge); register it with `app.query("knn")(knn_handler(...))`."""

    def handle_knn_query(msg: Message, context: Context, boundary: ReleaseBoundary) -> Message:
        return answer_knn_query(msg, context, boundary, load_data)

    return guarded(handle_knn_query)


def finetune_handler(load_data: LoadData = client_shard) -> Callable[[Message, Context], Message]:
    """The `evaluate.finetune` handler, reading this node's data with `load_data`."""

    def handle_finetune_evaluate(
        msg: Message, context: Context, boundary: ReleaseBoundary
    ) -> Message:
        return answer_finetune_evaluate(msg, context, boundary, load_data)

    return guarded(handle_finetune_evaluate)


handle_knn_query = knn_handler()
"""`query.knn` on the project's scenarios (`client_shard`)."""

handle_finetune_evaluate = finetune_handler()
"""`evaluate.finetune` on the project's scenarios (`client_shard`)."""
