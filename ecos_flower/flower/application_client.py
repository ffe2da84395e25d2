"""Client handlers of the applications: private-kNN labelling (`query.knn`) and DP last-layer
fine-tuning before evaluation (`evaluate.finetune`: DP-SGD, DP least squares or DP-FC). Both
charge this node's privacy ledger (`ledger_for`) before anything is released, and refuse past its
limit."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from ecos_flower.applications import (
    KNN_MODES,
    FinetuneResult,
    dp_fc_head,
    dp_finetune_head,
    dp_least_squares_head,
    head_features,
    knn_sensitivity,
    knn_votes,
    noisy_votes,
)
from ecos_flower.applications.finetune import calibrate_noise
from ecos_flower.flower.client_data import client_shard
from ecos_flower.flower.ecos_client import (
    QueryRejected,
    _extractor,
    _refusal,
    ledger_for,
    noise_generator,
)
from ecos_flower.flower.validation import checked_numpy
from ecos_flower.models import build_model, evaluate_accuracy
from ecos_flower.privacy import BudgetExceededError, analytic_gaussian_sigma

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


def _check_privacy(query: ConfigRecord) -> tuple[float, float]:
    epsilon, delta = _number(query, "epsilon", -1), _number(query, "delta", -1)
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise QueryRejected(f"epsilon={epsilon} must be a positive finite number")
    if not 0 < delta < 1:
        raise QueryRejected(f"delta={delta} must lie in (0, 1)")
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
    _check_privacy(query)


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


def handle_knn_query(msg: Message, context: Context) -> Message:
    """Answer one `query.knn`: noisy label-vote histograms (n x classes) for the server's
    selected samples, from this client's labelled training shard, in the shared feature space."""
    try:
        query = msg.content.get("knn")
        if not isinstance(query, ConfigRecord):
            raise QueryRejected("query has no ConfigRecord 'knn'")
        features = read_query_features(msg, query, context.node_config)
        check_knn_query(query, features, context.node_config)
        extractor = _extractor(msg, context, query)
    except QueryRejected as exc:
        return _refusal(msg, f"kNN query rejected: {exc}")
    shard = client_shard(msg.content["config"], context.node_config)
    try:
        own = extractor.transform(shard.train.images, progress=False)
    except Exception as exc:  # weights that do not fit this node's images
        return _refusal(msg, f"kNN query rejected: extractor does not apply here: {exc}")
    if not np.all(np.isfinite(own)):
        return _refusal(msg, "kNN query rejected: extractor gives non-finite features here")
    if own.ndim != 2 or own.shape[1] != features.shape[1]:
        return _refusal(
            msg,
            f"kNN query rejected: features have {features.shape[1]} dims, "
            f"this node's extractor gives {own.shape[1]}",
        )
    k, mode = int(query["k"]), str(query["mode"])
    num_classes = int(query["num-classes"])
    votes = knn_votes(own, shard.train.labels.numpy(), features, k, num_classes, mode)
    sensitivity = knn_sensitivity(mode, k, len(features))
    epsilon, delta = _check_privacy(query)
    sigma = analytic_gaussian_sigma(epsilon, delta, sensitivity)
    try:
        ledger = ledger_for(context, query)
        spent = ledger.charge(
            sigma / sensitivity, note=f"kNN votes ({len(features)} samples), run {context.run_id}"
        )
    except BudgetExceededError as exc:
        return _refusal(msg, str(exc))
    rng = noise_generator(context.node_config, release_index=len(ledger.releases))
    noisy = noisy_votes(votes, sigma, rng)
    metrics = MetricRecord(
        {
            "partition-id": int(context.node_config["partition-id"]),
            "num-examples": len(shard.train),
            "sensitivity": sensitivity,
            "sigma": sigma,
            "epsilon-spent": spent,
            "delta": ledger.delta,
            "epsilon-limit": ledger.epsilon_limit,
        }
    )
    content = RecordDict({"votes": ArrayRecord([noisy.astype(np.float64)]), "metrics": metrics})
    return Message(content=content, reply_to=msg)


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
    epsilon, delta = _check_privacy(spec)
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
        **common,
    )


def handle_finetune_evaluate(msg: Message, context: Context) -> Message:
    """`evaluate.finetune`: refit the received model's classifier head on the private train split
    with DP (DP-SGD through Opacus, DP least squares or DP-FC), charge the ledger first, report
    the fine-tuned model's test accuracy (and the received model's). A refused request (bad
    settings, or past the budget) reports the received model's accuracy only (`finetuned` = 0,
    reason in ConfigRecord `finetune-refusal`)."""
    config = msg.content["config"]
    device = str(config.get("device", "cpu"))
    shard = client_shard(config, context.node_config)
    model = _model(config, shard.train.images)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    if not hasattr(model, "embed") or not isinstance(
        getattr(model, "classifier", None), torch.nn.Linear
    ):
        raise ValueError(f"model {config['model']!r} has no embed()/classifier head to fine-tune")
    received, _ = evaluate_accuracy(model, shard.test.images, shard.test.labels, device=device)
    metrics: dict[str, float | int] = {
        "partition-id": int(context.node_config["partition-id"]),
        "num-examples": len(shard.test),
        "accuracy-received": received,
    }
    content = RecordDict()
    try:
        spec = read_finetune_spec(msg.content.get("finetune"), context.node_config)
        noise_multiplier = spec.noise_multiplier
        ledger = ledger_for(context, msg.content["finetune"])
        spent = ledger.charge(
            noise_multiplier,
            note=f"DP head fine-tuning ({spec.method}, {spec.steps} steps, single-release "
            f"z={noise_multiplier:.4g}), run {context.run_id}",
        )
    except (QueryRejected, BudgetExceededError) as exc:
        metrics.update({"accuracy": received, "finetuned": 0})
        content["finetune-refusal"] = ConfigRecord({"reason": str(exc)})
    else:
        seed = int(noise_generator(context.node_config, len(ledger.releases)).integers(2**62))
        features = head_features(model, shard.train.images, device=device)
        result = finetune_head(
            spec, model.classifier, features, shard.train.labels, noise_multiplier, seed
        )
        model.classifier = result.head
        accuracy, loss = evaluate_accuracy(
            model, shard.test.images, shard.test.labels, device=device
        )
        metrics.update(
            {
                "accuracy": accuracy,
                "loss": loss,
                "finetuned": 1,
                "epsilon-spent": spent,
                "finetune-epsilon-opacus": result.epsilon_opacus,
                "noise-multiplier": result.noise_multiplier,
                "steps": result.steps,
                "delta": ledger.delta,
            }
        )
    content["metrics"] = MetricRecord(metrics)
    return Message(content=content, reply_to=msg)
