"""The ECOS client: check the query, score the local shard, charge the ledger, add noise, reply.

The client owns its budget: its epsilon limit and ledger file come from its node config when set
(deployment), and the ledger refuses any query that would take it past the limit.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore import log

from ecos_flower.ecos import coverage_scores, extractor_from_arrays, score_sensitivity
from ecos_flower.flower.client_data import client_shard
from ecos_flower.flower.validation import checked_numpy
from ecos_flower.privacy import BudgetExceededError, PrivacyLedger, analytic_gaussian_sigma

# Bounds a client enforces before it allocates anything for a query (node config may change them).
DEFAULT_LIMITS = {"max-centroids": 20_000, "max-dim": 4_096, "max-extractor-params": 50_000_000}
DEFAULT_EPSILON_LIMIT = 10.0
DEFAULT_LEDGER_DELTA = 1e-5  # the delta at which the ledger reports its epsilon
DEFAULT_MAX_DELTA = 1e-4  # the largest per-query delta a node accepts unless configured
EXTRACTOR_STATE_KEY = "ecos-extractor"


class QueryRejected(ValueError):
    """A query this client will not answer (absurd sizes, bad privacy parameters)."""


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
    if "client-epsilon-limit" in query:
        limit = _number(query, "client-epsilon-limit")
        if not (math.isfinite(limit) and limit > 0):
            raise QueryRejected(f"client-epsilon-limit={limit} must be a positive finite number")
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


def ledger_for(context: Context, query: ConfigRecord) -> PrivacyLedger:
    """This node's ledger: node config `ledger-path` (persists across runs) or a per-run file."""
    node_config = context.node_config
    # The node's own settings rule. Without them the server's suggested limit can only lower the
    # node's default, never raise it (a hostile server must not buy itself more budget).
    delta = float(node_config.get("delta", DEFAULT_LEDGER_DELTA))
    if "epsilon-limit" in node_config:
        limit = float(node_config["epsilon-limit"])
    else:
        suggested = float(query.get("client-epsilon-limit", DEFAULT_EPSILON_LIMIT))
        limit = min(DEFAULT_EPSILON_LIMIT, suggested)
    path = node_config.get("ledger-path")
    if not path:
        base = Path(os.environ.get("FLWR_HOME", tempfile.gettempdir())) / "ecos-ledgers"
        path = base / f"run-{context.run_id}-node-{context.node_id}.json"
    return PrivacyLedger.open_or_create(
        path, limit, delta, accountant=str(node_config.get("accountant", "gdp"))
    )


def _extractor(msg: Message, context: Context, query: ConfigRecord):  # noqa: ANN202
    """The feature extractor: from this message, or from the node's state if sent before."""
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


def handle_ecos_query(msg: Message, context: Context) -> Message:
    """Answer one `query.ecos`: K noisy coverage counts of the local training shard."""
    query = msg.content.get("ecos")
    # A refused query leaves the node's state as it was (no half-accepted extractor).
    kept = {k: context.state.get(k) for k in (EXTRACTOR_STATE_KEY, EXTRACTOR_STATE_KEY + "-config")}

    def refuse(reason: str) -> Message:
        for key, record in kept.items():
            if record is None:
                context.state.pop(key, None)
            else:
                context.state[key] = record
        return _refusal(msg, reason, context.node_id)

    try:
        centroids = read_centroids(msg, query, context.node_config)
        config = msg.content.get("config")
        if not isinstance(config, ConfigRecord):
            raise QueryRejected("query has no ConfigRecord 'config'")
        extractor = _extractor(msg, context, query)
    except QueryRejected as exc:
        return refuse(f"query rejected: {exc}")
    try:
        shard = client_shard(config, context.node_config)
    except (ValueError, OSError, KeyError, TypeError) as exc:  # a config naming no usable data
        return refuse(f"query rejected: this node's data cannot be loaded: {exc}")
    try:
        features = extractor.transform(shard.train.images, progress=False)
    except Exception as exc:  # weights that do not fit this node's images
        reason = f"query rejected: extractor does not apply to this node's data: {exc}"
        return refuse(reason)
    if features.ndim != 2 or features.shape[1] != centroids.shape[1]:
        reason = (
            f"query rejected: extractor gives features of shape {features.shape[1:]}, the "
            f"centroids have dim {centroids.shape[1]}"
        )
        return refuse(reason)
    if not np.all(np.isfinite(features)):  # e.g. a shipped scale that overflows float32
        return refuse("query rejected: extractor gives non-finite features on this node's data")
    mode = str(query.get("score-mode", "nearest"))
    max_per_sample = int(query.get("max-per-sample", 1))
    radius = float(query["radius"]) if "radius" in query else None
    scores = coverage_scores(
        features, centroids, mode=mode, radius=radius, max_per_sample=max_per_sample
    )
    sensitivity = score_sensitivity(mode, max_per_sample)
    metrics: dict[str, float | int] = {
        "num-examples": len(shard.train),
        "partition-id": int(context.node_config["partition-id"]),
        "sensitivity": sensitivity,
    }
    if bool(query.get("noise", True)):
        epsilon, delta = float(query["epsilon"]), float(query["delta"])
        sigma = analytic_gaussian_sigma(epsilon, delta, sensitivity)
        try:
            ledger = ledger_for(context, query)
            spent = ledger.charge(sigma / sensitivity, note=f"ecos query, run {context.run_id}")
        except BudgetExceededError as exc:
            return refuse(str(exc))
        rng = noise_generator(context.node_config, release_index=len(ledger.releases))
        scores = scores + rng.normal(0.0, sigma, size=scores.shape)
        metrics.update(
            {
                "sigma": sigma,
                "epsilon-spent": spent,
                "delta": ledger.delta,
                "epsilon-limit": ledger.epsilon_limit,
            }
        )
    else:
        metrics["sigma"] = 0.0  # oracle query: exact counts, no privacy (epsilon infinite)
    content = RecordDict(
        {
            "scores": ArrayRecord([scores.astype(np.float64)]),
            "metrics": MetricRecord(metrics),
        }
    )
    return Message(content=content, reply_to=msg)


def noise_generator(node_config: dict[str, Any], release_index: int) -> np.random.Generator:
    """Fresh OS entropy, unless the node's operator set a private `noise-seed` (experiments that
    must repeat): then one stream per release, so no two releases ever share their noise."""
    if "noise-seed" in node_config:
        return np.random.default_rng([int(node_config["noise-seed"]), int(release_index)])
    return np.random.default_rng(int.from_bytes(os.urandom(16), "little"))


def _refusal(msg: Message, reason: str, node_id: int | None = None) -> Message:
    """A reply that refuses the message with `reason` (logged on the node as well)."""
    log(WARNING, "node %s refuses %s: %s", node_id, msg.metadata.message_type, reason)
    return Message(content=RecordDict({"refusal": ConfigRecord({"reason": reason})}), reply_to=msg)
