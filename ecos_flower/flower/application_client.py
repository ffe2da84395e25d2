"""Client handlers of the applications: private-kNN labelling (`query.knn`) and DP last-layer
fine-tuning before evaluation (`evaluate.finetune`: DP-SGD, DP least squares or DP-FC). Both go
through the node's release boundary (`ecos_flower.flower.release`): admitted by the node's
policy, charged to its one lifetime ledger before its data is read, refused past its limit."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message

from ecos_flower.applications import (
    DEFAULT_NORMALISER,
    KNN_MODES,
    FinetuneResult,
    dp_fc_head,
    dp_finetune_head,
    dp_least_squares_head,
    head_features,
    knn_sensitivity,
    knn_votes,
)
from ecos_flower.applications.finetune import calibrate_noise
from ecos_flower.flower.client_data import client_shard
from ecos_flower.flower.ecos_client import (
    DEFAULT_MAX_DELTA,
    QueryRejected,
    _extractor,
    check_source,
)
from ecos_flower.flower.release import Refused, ReleaseBoundary, guarded
from ecos_flower.flower.validation import checked_numpy
from ecos_flower.models import build_model, evaluate_accuracy
from ecos_flower.privacy.gaussian import analytic_gaussian_sigma
from ecos_flower.privacy.ledger import PrivacyEvent

KNN_LIMITS = {"max-knn-queries": 100_000, "max-knn-k": 1_000, "max-finetune-steps": 10_000}


def _node_limit(node_config: Mapping[str, Any], key: str) -> int:
    """This node's limit `key` (its node config, else the default in KNN_LIMITS)."""
    return int(node_config.get(key, KNN_LIMITS[key]))


def _number(record: ConfigRecord, key: str, default: float, kind: type = float) -> Any:
    """`record[key]` as a number of `kind`; QueryRejected (not a crash) for lists, bytes, NaN
    as an int, or anything else a hostile server may send."""
    value = record.get(key, default)
    if isinstance(value, (list, bytes, str)):
        raise QueryRejected(f"{key}={value!r} is not a number")
    try:
        return kind(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise QueryRejected(f"{key}={value!r} is not a number: {exc}") from exc


def _check_privacy(
    query: ConfigRecord, node_config: Mapping[str, Any] | None = None
) -> tuple[float, float]:
    epsilon, delta = _number(query, "epsilon", -1), _number(query, "delta", -1)
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise QueryRejected(f"epsilon={epsilon} must be a positive finite number")
    if not 0 < delta < 1:
        raise QueryRejected(f"delta={delta} must lie in (0, 1)")
    max_delta = float((node_config or {}).get("max-delta", DEFAULT_MAX_DELTA))
    if delta > max_delta:  # a large delta buys a small sigma: the node decides what it accepts
        raise QueryRejected(f"delta={delta:g} above this node's max-delta={max_delta:g}")
    return epsilon, delta


def _query_size(query: ConfigRecord, node_config: Mapping[str, Any]) -> tuple[int, int]:
    """(num-queries, dim) of a kNN query, within this node's limits."""
    n, d = _number(query, "num-queries", -1, int), _number(query, "dim", -1, int)
    limit = _node_limit(node_config, "max-knn-queries")
    if not 1 <= n <= limit:
        raise QueryRejected(f"num-queries={n} outside 1..{limit}")
    if not 1 <= d <= 4_096:
        raise QueryRejected(f"dim={d} outside 1..4096")
    return n, d


def check_knn_query(
    query: ConfigRecord, features: np.ndarray, node_config: Mapping[str, Any]
) -> None:
    """Refuse absurd or unsafe kNN queries before any work is done."""
    n, d = _query_size(query, node_config)
    if features.shape != (n, d):
        raise QueryRejected(f"query features have shape {features.shape}, query says ({n}, {d})")
    if features.dtype.kind != "f" or not np.all(np.isfinite(features)):
        raise QueryRejected("query features must be finite floating-point numbers")
    k = _number(query, "k", -1, int)
    if not 1 <= k <= _node_limit(node_config, "max-knn-k"):
        raise QueryRejected(f"k={k} outside 1..{_node_limit(node_config, 'max-knn-k')}")
    if str(query.get("mode", "")) not in KNN_MODES:
        raise QueryRejected(f"unknown kNN mode {query.get('mode')!r}")
    if not 2 <= _number(query, "num-classes", -1, int) <= 10_000:
        raise QueryRejected(f"num-classes={query.get('num-classes')} outside 2..10000")
    _check_privacy(query, node_config)


def read_query_features(
    msg: Message, query: ConfigRecord, node_config: Mapping[str, Any]
) -> np.ndarray:
    """The selected samples' features, decoded only after their declared size passed the
    node's limits (a tiny payload must not make the client allocate gigabytes)."""
    n, d = _query_size(query, node_config)
    record = msg.content.get("queries")
    if not isinstance(record, ArrayRecord) or list(record.keys()) != ["features"]:
        raise QueryRejected("query has no ArrayRecord 'queries' holding 'features'")
    try:
        return checked_numpy(record["features"], n * d, "query features")
    except ValueError as exc:
        raise QueryRejected(str(exc)) from exc


def answer_knn_query(msg: Message, context: Context, boundary: ReleaseBoundary) -> Message:
    """Answer one `query.knn`: noisy label-vote histograms (n x classes) for the server's
    selected samples, from this client's labelled training shard, in the shared feature space.
    Charged before the data is read; the votes are total (samples with non-finite features or
    labels outside 0..num-classes-1 are dropped; ties are broken by sample order)."""
    query = msg.content.get("knn")
    if not isinstance(query, ConfigRecord):
        raise QueryRejected("query has no ConfigRecord 'knn'")
    features = read_query_features(msg, query, context.node_config)
    check_knn_query(query, features, context.node_config)
    config = msg.content.get("config")
    if not isinstance(config, ConfigRecord):
        raise QueryRejected("query has no ConfigRecord 'config'")
    boundary.admit("knn-votes")
    extractor = _extractor(msg, context, query, dim=features.shape[1])
    check_source(config, context.node_config)
    k, mode = int(query["k"]), str(query["mode"])
    num_classes = int(query["num-classes"])
    sensitivity = knn_sensitivity(mode, k, len(features))
    epsilon, delta = _check_privacy(query, context.node_config)
    sigma = analytic_gaussian_sigma(epsilon, delta, sensitivity)
    event = PrivacyEvent.gaussian(
        sigma / sensitivity, note=f"kNN votes ({len(features)} samples), run {context.run_id}"
    )
    spent, noise = boundary.charge(event)
    # Charged: only from here on is the node's data read.
    shard = client_shard(config, context.node_config)
    own = np.asarray(extractor.transform(shard.train.images, progress=False))
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


def _model(config: ConfigRecord, images: torch.Tensor) -> torch.nn.Module:
    return build_model(
        str(config["model"]),
        num_classes=int(config.get("num-classes", 10)),
        in_channels=images.shape[1],
        image_size=images.shape[-1],
    )


FINETUNE_METHODS = ("dp-sgd", "dp-least-squares", "dp-fc")


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


def read_finetune_spec(spec: Any, node_config: Mapping[str, Any]) -> FinetuneSpec:
    """Parse and bound-check the request; raises QueryRejected naming the bad field."""
    if not isinstance(spec, ConfigRecord):
        raise QueryRejected("message has no ConfigRecord 'finetune'")
    epsilon, delta = _check_privacy(spec, node_config)
    method = str(spec.get("method", "dp-sgd"))
    if method not in FINETUNE_METHODS:
        raise QueryRejected(f"unknown method {method!r}; this node offers {FINETUNE_METHODS}")
    parsed = FinetuneSpec(
        method=method,
        epsilon=epsilon,
        delta=delta,
        steps=_number(spec, "steps", 100, int),
        clip=_number(spec, "clip", 1.0),
        learning_rate=_number(spec, "learning-rate", 1.0),
        init=str(spec.get("init", "zero")),
        ridge=_number(spec, "ridge", 1.0),
        covariance_share=_number(spec, "covariance-share", 0.3),
        floor=_number(spec, "floor", 0.01),
        feature_scale=_number(spec, "feature-scale", 1.0),
        normaliser=_number(spec, "normaliser", DEFAULT_NORMALISER),
    )
    limit = _node_limit(node_config, "max-finetune-steps")
    if not 1 <= parsed.steps <= limit:
        raise QueryRejected(f"steps={parsed.steps} outside 1..{limit}")
    if parsed.init not in ("zero", "received"):
        raise QueryRejected(f"init={parsed.init!r} must be 'zero' or 'received'")
    positive = {
        "clip": parsed.clip,
        "learning-rate": parsed.learning_rate,
        "ridge": parsed.ridge,
        "floor": parsed.floor,
        "feature-scale": parsed.feature_scale,
        "normaliser": parsed.normaliser,
    }
    for name, value in positive.items():
        if not (math.isfinite(value) and value > 0):
            raise QueryRejected(f"{name}={value} must be a positive finite number")
    if not 0 < parsed.covariance_share < 1:
        raise QueryRejected(f"covariance-share={parsed.covariance_share} must lie in (0, 1)")
    return parsed


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


def answer_finetune_evaluate(msg: Message, context: Context, boundary: ReleaseBoundary) -> Message:
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
    boundary.admit("evaluation-metrics")
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
    shard = client_shard(config, context.node_config)
    model = _model(config, shard.train.images)
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


handle_knn_query = guarded(answer_knn_query)


handle_finetune_evaluate = guarded(answer_finetune_evaluate)
