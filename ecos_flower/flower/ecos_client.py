"""The ECOS client: check the query, score the local shard, charge the ledger, add noise, reply.

The client owns its budget: its epsilon limit and ledger file come from its node config when set
(deployment), and the ledger refuses any query that would take it past the limit.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from ecos_flower.ecos import coverage_scores, extractor_from_arrays, score_sensitivity
from ecos_flower.flower.client_data import client_shard
from ecos_flower.privacy import BudgetExceededError, PrivacyLedger, analytic_gaussian_sigma

# Bounds a client enforces before it allocates anything for a query (node config may change them).
DEFAULT_LIMITS = {"max-centroids": 20_000, "max-dim": 4_096, "max-extractor-params": 50_000_000}
DEFAULT_EPSILON_LIMIT = 10.0
EXTRACTOR_STATE_KEY = "ecos-extractor"


class QueryRejected(ValueError):
    """A query this client will not answer (absurd sizes, bad privacy parameters)."""


def _limit(node_config: dict[str, Any], key: str) -> int:
    return int(node_config.get(key, DEFAULT_LIMITS[key]))


def check_query(query: ConfigRecord, centroids: np.ndarray, node_config: dict[str, Any]) -> None:
    """Refuse absurd or unsafe queries with a reason, before any work is done."""
    k, d = (int(query.get("num-centroids", -1)), int(query.get("dim", -1)))
    if not 1 <= k <= _limit(node_config, "max-centroids"):
        raise QueryRejected(f"num-centroids={k} outside 1..{_limit(node_config, 'max-centroids')}")
    if not 1 <= d <= _limit(node_config, "max-dim"):
        raise QueryRejected(f"dim={d} outside 1..{_limit(node_config, 'max-dim')}")
    if centroids.shape != (k, d):
        raise QueryRejected(f"centroids have shape {centroids.shape}, query says ({k}, {d})")
    if centroids.dtype.kind != "f" or not np.all(np.isfinite(centroids)):
        raise QueryRejected("centroids must be finite floating-point numbers")
    noise = bool(query.get("noise", True))
    if noise:
        epsilon, delta = float(query.get("epsilon", -1)), float(query.get("delta", -1))
        if not (math.isfinite(epsilon) and epsilon > 0):
            raise QueryRejected(f"epsilon={epsilon} must be a positive finite number")
        if not 0 < delta < 1:
            raise QueryRejected(f"delta={delta} must lie in (0, 1)")
    mode = str(query.get("score-mode", "nearest"))
    if mode not in ("nearest", "radius"):
        raise QueryRejected(f"unknown score-mode {mode!r}")


def ledger_for(context: Context, query: ConfigRecord) -> PrivacyLedger:
    """This node's ledger: node config `ledger-path` (persists across runs) or a per-run file."""
    node_config = context.node_config
    delta = float(node_config.get("delta", query.get("delta", 1e-5)))
    limit = float(
        node_config.get("epsilon-limit", query.get("client-epsilon-limit", DEFAULT_EPSILON_LIMIT))
    )
    path = node_config.get("ledger-path")
    if not path:
        base = Path(os.environ.get("FLWR_HOME", tempfile.gettempdir())) / "ecos-ledgers"
        path = base / f"run-{context.run_id}-node-{context.node_id}.json"
    return PrivacyLedger.open_or_create(
        path, limit, delta, accountant=str(node_config.get("accountant", "gdp"))
    )


def _extractor(msg: Message, context: Context, query: ConfigRecord):  # noqa: ANN202
    """The feature extractor: from this message, or from the node's state if sent before."""
    digest = str(query["extractor-hash"])
    if "extractor" in msg.content:
        record = msg.content["extractor"]
        total = sum(int(np.prod(a.shape)) for a in record.values())
        if total > _limit(context.node_config, "max-extractor-params"):
            raise QueryRejected(f"extractor has {total} parameters, above the node's limit")
        context.state[EXTRACTOR_STATE_KEY] = record
        context.state[EXTRACTOR_STATE_KEY + "-config"] = ConfigRecord(
            {
                "hash": digest,
                "kind": str(query["extractor-kind"]),
                "config": str(query["extractor-config"]),
            }
        )
    saved = context.state.get(EXTRACTOR_STATE_KEY + "-config")
    if saved is None or saved["hash"] != digest:
        raise QueryRejected("query names an extractor this node has not received")
    arrays = {name: array.numpy() for name, array in context.state[EXTRACTOR_STATE_KEY].items()}
    return extractor_from_arrays(str(saved["kind"]), arrays, json.loads(str(saved["config"])))


def handle_ecos_query(msg: Message, context: Context) -> Message:
    """Answer one `query.ecos`: K noisy coverage counts of the local training shard."""
    query = msg.content["ecos"]
    centroids = np.asarray(msg.content["centroids"]["centroids"].numpy())
    try:
        check_query(query, centroids, context.node_config)
        extractor = _extractor(msg, context, query)
    except QueryRejected as exc:
        return _refusal(msg, f"query rejected: {exc}")
    config = msg.content["config"]
    shard = client_shard(config, context.node_config)
    features = extractor.transform(shard.train.images, progress=False)
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
            return _refusal(msg, str(exc))
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


def _refusal(msg: Message, reason: str) -> Message:
    return Message(content=RecordDict({"refusal": ConfigRecord({"reason": reason})}), reply_to=msg)
