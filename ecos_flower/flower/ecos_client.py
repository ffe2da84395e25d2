"""The ECOS client: check the query, admit it under the node's policy, charge the node's ledger,
then score the local shard and release the counts with Gaussian noise.

The node owns its budget: its epsilon limit and ledger come from its node config only (see
`ecos_flower.privacy.policy`); the server's message can neither lower the noise nor raise the
limit. Replies are built by the release boundary (`ecos_flower.flower.release`).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message

from ecos_flower.ecos import coverage_scores, extractor_from_arrays, score_sensitivity
from ecos_flower.flower.client_data import check_data_source, client_shard
from ecos_flower.flower.release import Refused, ReleaseBoundary, guarded
from ecos_flower.flower.validation import checked_numpy
from ecos_flower.privacy.gaussian import analytic_gaussian_sigma
from ecos_flower.privacy.ledger import PrivacyEvent

# Bounds a client enforces before it allocates anything for a query (node config may change them).
DEFAULT_LIMITS = {"max-centroids": 20_000, "max-dim": 4_096, "max-extractor-params": 50_000_000}
DEFAULT_MAX_DELTA = 1e-4  # the largest per-query delta a node accepts unless configured
EXTRACTOR_STATE_KEY = "ecos-extractor"


class QueryRejected(Refused):
    """A query this client will not answer (absurd sizes, bad privacy parameters): a refusal
    that depends on the message only."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"query rejected: {reason}")


def _limit(node_config: dict[str, Any], key: str) -> int:
    return int(node_config.get(key, DEFAULT_LIMITS[key]))


def _number(query: ConfigRecord, key: str, default: float | None = None) -> float:
    """A numeric query field (bool, text and lists refused); `default` when absent."""
    if key not in query:
        if default is None:
            raise QueryRejected(f"query has no {key!r}")
        return float(default)
    value = query[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise QueryRejected(f"{key}={value!r} is not a number")
    return float(value)


def _integer(query: ConfigRecord, key: str, low: int, high: int, default: int | None = None) -> int:
    value = _number(query, key, default)
    if not (math.isfinite(value) and value.is_integer() and low <= value <= high):
        shown = int(value) if math.isfinite(value) and value.is_integer() else value
        raise QueryRejected(f"{key}={shown} outside {low}..{high}")
    return int(value)


def _text(query: ConfigRecord, key: str, default: str | None = None) -> str:
    if key not in query:
        if default is None:
            raise QueryRejected(f"query has no {key!r}")
        return default
    value = query[key]
    if not isinstance(value, str):
        raise QueryRejected(f"{key}={value!r} is not text")
    return value


def _flag(query: ConfigRecord, key: str, default: bool) -> bool:
    value = query.get(key, default)
    if not isinstance(value, bool):
        raise QueryRejected(f"{key}={value!r} is not true or false")
    return value


def check_query(query: ConfigRecord, centroids: np.ndarray, node_config: dict[str, Any]) -> None:
    """Refuse absurd or unsafe queries with a reason, before any work is done."""
    check_query_fields(query, node_config)
    k, d = int(query["num-centroids"]), int(query["dim"])
    if centroids.shape != (k, d):
        raise QueryRejected(f"centroids have shape {centroids.shape}, query says ({k}, {d})")
    if centroids.dtype.kind != "f" or not np.all(np.isfinite(centroids)):
        raise QueryRejected("centroids must be finite floating-point numbers")


def check_query_fields(query: ConfigRecord, node_config: dict[str, Any]) -> tuple[int, int]:
    """The query's settings, checked field by field (types, ranges, the node's size limits);
    returns the declared (num-centroids, dim). Nothing is decoded or allocated here."""
    if not isinstance(query, ConfigRecord):
        raise QueryRejected(f"query settings are a {type(query).__name__}, not a ConfigRecord")
    k = _integer(query, "num-centroids", 1, _limit(node_config, "max-centroids"), default=-1)
    d = _integer(query, "dim", 1, _limit(node_config, "max-dim"), default=-1)
    if _flag(query, "noise", True):
        epsilon = _number(query, "epsilon", -1.0)
        delta = _number(query, "delta", -1.0)
        if not (math.isfinite(epsilon) and epsilon > 0):
            raise QueryRejected(f"epsilon={epsilon} must be a positive finite number")
        if not 0 < delta < 1:
            raise QueryRejected(f"delta={delta} must lie in (0, 1)")
        max_delta = float(node_config.get("max-delta", DEFAULT_MAX_DELTA))
        if delta > max_delta:
            # A large delta buys a small sigma: the node, not the server, decides what it accepts.
            raise QueryRejected(f"delta={delta:g} above this node's max-delta={max_delta:g}")
    mode = _text(query, "score-mode", "nearest")
    if mode not in ("nearest", "radius"):
        raise QueryRejected(f"unknown score-mode {mode!r}")
    _integer(query, "max-per-sample", 1, k, default=1)
    if mode == "radius":
        radius = _number(query, "radius")
        if not (math.isfinite(radius) and radius >= 0):
            raise QueryRejected(f"radius={radius} must be a finite number >= 0")
    elif "radius" in query:
        raise QueryRejected("radius is only used with score-mode 'radius'")
    for key in ("extractor-hash", "extractor-kind", "extractor-config"):
        _text(query, key)
    return k, d


def read_centroids(msg: Message, query: ConfigRecord, node_config: dict[str, Any]) -> np.ndarray:
    """The query's centroids, decoded only after the declared sizes passed the node's limits."""
    k, d = check_query_fields(query, node_config)
    record = msg.content.get("centroids")
    if not isinstance(record, ArrayRecord) or list(record.keys()) != ["centroids"]:
        raise QueryRejected("query has no ArrayRecord 'centroids' holding 'centroids'")
    try:
        centroids = checked_numpy(record["centroids"], k * d, "centroids")
    except ValueError as exc:
        raise QueryRejected(str(exc)) from exc
    check_query(query, centroids, node_config)
    return centroids


def check_source(config: ConfigRecord, node_config: dict[str, Any]) -> None:
    """Refuse (before any charge) a message that names no data for this node."""
    try:
        check_data_source(config, node_config)
    except ValueError as exc:
        raise QueryRejected(str(exc)) from exc


def _extractor(msg: Message, context: Context, query: ConfigRecord, dim: int):  # noqa: ANN202
    """The feature extractor: from this message, or from the node's state if sent before; its
    output dimension (where its weights tell it) must be the query's `dim`."""
    extractor = _load_extractor(msg, context, query)
    out = extractor.output_dim()
    if out is not None and out != dim:
        raise QueryRejected(f"extractor gives {out}-dimensional features, the query says dim={dim}")
    return extractor


def _load_extractor(msg: Message, context: Context, query: ConfigRecord):  # noqa: ANN202
    digest = _text(query, "extractor-hash")
    if "extractor" in msg.content:
        record = msg.content["extractor"]
        if not isinstance(record, ArrayRecord):
            raise QueryRejected(f"extractor is a {type(record).__name__}, not an ArrayRecord")
        budget = _limit(context.node_config, "max-extractor-params")
        try:  # every header checked against what is left of the limit before decoding
            arrays = {}
            for name, array in record.items():
                arrays[name] = checked_numpy(array, budget, f"extractor array {name!r}")
                budget -= arrays[name].size
        except ValueError as exc:
            raise QueryRejected(f"{exc} (the node's extractor parameter limit)") from exc
        kind, config_text = _text(query, "extractor-kind"), _text(query, "extractor-config")
        try:
            extractor = extractor_from_arrays(kind, arrays, json.loads(config_text))
        except Exception as exc:  # whatever the extractor code raises on bad weights
            raise QueryRejected(f"extractor does not load: {type(exc).__name__}: {exc}") from exc
        # Kept only once it loaded: a bad extractor never replaces a good one in the state.
        context.state[EXTRACTOR_STATE_KEY] = record
        context.state[EXTRACTOR_STATE_KEY + "-config"] = ConfigRecord(
            {"hash": digest, "kind": kind, "config": config_text}
        )
        return extractor
    saved = context.state.get(EXTRACTOR_STATE_KEY + "-config")
    if saved is None or saved["hash"] != digest:
        raise QueryRejected("query names an extractor this node has not received")
    arrays = {name: array.numpy() for name, array in context.state[EXTRACTOR_STATE_KEY].items()}
    return extractor_from_arrays(str(saved["kind"]), arrays, json.loads(str(saved["config"])))


def answer_ecos_query(msg: Message, context: Context, boundary: ReleaseBoundary) -> Message:
    """Answer one `query.ecos`: K noisy coverage counts of the local training shard.

    Order: parse the message (message-only refusals), admit the mechanism under the node's
    policy, charge the ledger, and only then read the data; the scoring is total (samples with
    non-finite features are dropped), so no data-dependent branch exists after the charge. A
    query that is not answered leaves the node's state as it was (no half-accepted extractor).
    """
    kept = {k: context.state.get(k) for k in (EXTRACTOR_STATE_KEY, EXTRACTOR_STATE_KEY + "-config")}
    try:
        return _answer_ecos_query(msg, context, boundary)
    except Exception:
        for key, record in kept.items():
            if record is None:
                context.state.pop(key, None)
            else:
                context.state[key] = record
        raise


def _answer_ecos_query(msg: Message, context: Context, boundary: ReleaseBoundary) -> Message:
    query = msg.content.get("ecos")
    centroids = read_centroids(msg, query, context.node_config)
    config = msg.content.get("config")
    if not isinstance(config, ConfigRecord):
        raise QueryRejected("query has no ConfigRecord 'config'")
    noisy = _flag(query, "noise", True)
    mechanism = "ecos-counts" if noisy else "exact-counts"
    boundary.admit(mechanism)
    extractor = _extractor(msg, context, query, dim=centroids.shape[1])
    check_source(config, context.node_config)
    mode = str(query.get("score-mode", "nearest"))
    max_per_sample = int(query.get("max-per-sample", 1))
    radius = float(query["radius"]) if "radius" in query else None
    sensitivity = score_sensitivity(mode, max_per_sample)
    metrics: dict[str, float | int] = {**boundary.node_label(), "sensitivity": sensitivity}
    sigma = 0.0
    if noisy:
        sigma = analytic_gaussian_sigma(float(query["epsilon"]), float(query["delta"]), sensitivity)
        event = PrivacyEvent.gaussian(sigma / sensitivity, note=f"ecos query, run {context.run_id}")
        spent, noise = boundary.charge(event)
        metrics.update(boundary.budget_metrics(spent))
    metrics["sigma"] = sigma
    # Charged (if private): only from here on is the node's data read.
    shard = client_shard(config, context.node_config)
    features = np.asarray(extractor.transform(shard.train.images, progress=False))
    if features.ndim != 2 or features.shape[1] != centroids.shape[1]:
        raise ValueError(f"extractor features {features.shape[1:]} vs centroids {centroids.shape}")
    scores = coverage_scores(
        features, centroids, mode=mode, radius=radius, max_per_sample=max_per_sample
    )
    if noisy:
        scores = noise.gaussian_release(scores, sigma)  # OpenDP's float-safe sampler (fresh)
    records = {"scores": ArrayRecord([np.asarray(scores, dtype=np.float64)])}
    return boundary.reply(mechanism, records, metrics)


handle_ecos_query = guarded(answer_ecos_query)
