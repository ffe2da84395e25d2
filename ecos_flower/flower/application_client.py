"""Client handlers of the applications: private-kNN labelling (`query.knn`) and DP last-layer
fine-tuning before evaluation (`evaluate.finetune`). Both charge this node's privacy ledger
(`ledger_for`) before anything is released, and refuse past its limit."""

from __future__ import annotations

import math

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from ecos_flower.applications import (
    KNN_MODES,
    dp_finetune_head,
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


def _node_limit(context: Context, key: str) -> int:
    return int(context.node_config.get(key, KNN_LIMITS[key]))


def _check_privacy(query: ConfigRecord) -> tuple[float, float]:
    epsilon, delta = float(query.get("epsilon", -1)), float(query.get("delta", -1))
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise QueryRejected(f"epsilon={epsilon} must be a positive finite number")
    if not 0 < delta < 1:
        raise QueryRejected(f"delta={delta} must lie in (0, 1)")
    return epsilon, delta


def check_knn_query(query: ConfigRecord, features: np.ndarray, context: Context) -> None:
    """Refuse absurd or unsafe kNN queries before any work is done."""
    n, d = int(query.get("num-queries", -1)), int(query.get("dim", -1))
    if not 1 <= n <= _node_limit(context, "max-knn-queries"):
        raise QueryRejected(f"num-queries={n} outside 1..{_node_limit(context, 'max-knn-queries')}")
    if features.shape != (n, d):
        raise QueryRejected(f"query features have shape {features.shape}, query says ({n}, {d})")
    if features.dtype.kind != "f" or not np.all(np.isfinite(features)):
        raise QueryRejected("query features must be finite floating-point numbers")
    k = int(query.get("k", -1))
    if not 1 <= k <= _node_limit(context, "max-knn-k"):
        raise QueryRejected(f"k={k} outside 1..{_node_limit(context, 'max-knn-k')}")
    if str(query.get("mode", "")) not in KNN_MODES:
        raise QueryRejected(f"unknown kNN mode {query.get('mode')!r}")
    if not 2 <= int(query.get("num-classes", -1)) <= 10_000:
        raise QueryRejected(f"num-classes={query.get('num-classes')} outside 2..10000")
    _check_privacy(query)


def read_query_features(msg: Message, query: ConfigRecord, context: Context) -> np.ndarray:
    """The selected samples' features, decoded only after their declared size passed the
    node's limits (a tiny payload must not make the client allocate gigabytes)."""
    n, d = int(query.get("num-queries", -1)), int(query.get("dim", -1))
    if not 1 <= n <= _node_limit(context, "max-knn-queries"):
        raise QueryRejected(f"num-queries={n} outside 1..{_node_limit(context, 'max-knn-queries')}")
    if not 1 <= d <= 4_096:
        raise QueryRejected(f"dim={d} outside 1..4096")
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
        features = read_query_features(msg, query, context)
        check_knn_query(query, features, context)
        extractor = _extractor(msg, context, query)
    except QueryRejected as exc:
        return _refusal(msg, f"kNN query rejected: {exc}")
    shard = client_shard(msg.content["config"], context.node_config)
    own = extractor.transform(shard.train.images, progress=False)
    if own.shape[1] != features.shape[1]:
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


def handle_finetune_evaluate(msg: Message, context: Context) -> Message:
    """`evaluate.finetune`: fine-tune the received model's classifier head on the private train
    split with DP-SGD (Opacus), charge the ledger, report the fine-tuned model's test accuracy
    (and the received model's). Past the budget it refuses the fine-tuning and reports the
    received model's accuracy only (`finetuned` = 0, reason in ConfigRecord `finetune-refusal`)."""
    config, spec = msg.content["config"], msg.content["finetune"]
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
        epsilon, delta = _check_privacy(spec)
        steps = int(spec.get("steps", 100))
        if not 1 <= steps <= _node_limit(context, "max-finetune-steps"):
            raise QueryRejected(
                f"steps={steps} outside 1..{_node_limit(context, 'max-finetune-steps')}"
            )
        z = calibrate_noise(epsilon, delta, steps)
        ledger = ledger_for(context, spec)
        spent = ledger.charge(
            z / math.sqrt(steps),
            note=f"DP head fine-tuning ({steps} full-batch steps, z={z:.4g}), run {context.run_id}",
        )
    except (QueryRejected, BudgetExceededError) as exc:
        metrics.update({"accuracy": received, "finetuned": 0})
        content["finetune-refusal"] = ConfigRecord({"reason": str(exc)})
    else:
        seed = int(noise_generator(context.node_config, len(ledger.releases)).integers(2**62))
        init = None if str(spec.get("init", "zero")) == "zero" else model.classifier
        result = dp_finetune_head(
            head_features(model, shard.train.images, device=device),
            shard.train.labels,
            model.classifier.out_features,
            epsilon=epsilon,
            delta=delta,
            steps=steps,
            max_grad_norm=float(spec.get("clip", 1.0)),
            learning_rate=float(spec.get("learning-rate", 1.0)),
            init=init,
            noise_multiplier=z,
            seed=seed,
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
                "steps": steps,
                "delta": ledger.delta,
            }
        )
    content["metrics"] = MetricRecord(metrics)
    return Message(content=content, reply_to=msg)
