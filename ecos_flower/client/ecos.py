"""The ECOS client: check the query, admit it under the node's policy, charge the node's ledger,
then score the local shard and release the counts with Gaussian noise.

The node owns its budget: its epsilon limit and ledger come from its node config only (see
`ecos_flower.privacy.policy`); the server's message can neither lower the noise nor raise the
limit. Replies are built by the release boundary (`ecos_flower.client.release`); the query's
fields are declared once, in `ecos_flower.client.messages.ECOS_QUERY`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message

from ecos_flower.client.data import LoadData, check_data_source, client_shard, node_feature_cache
from ecos_flower.client.messages import ECOS_QUERY, MAX_CENTROIDS, MAX_DIM, QueryRejected
from ecos_flower.client.release import ReleaseBoundary, guarded
from ecos_flower.ecos import FeatureExtractor, coverage_scores, score_sensitivity
from ecos_flower.ecos.feature_space import features_of
from ecos_flower.ecos.features import check_arrays_fit, extractor_class, extractor_digest
from ecos_flower.flower.validation import checked_numpy, declared_shape
from ecos_flower.privacy.gaussian import analytic_gaussian_sigma
from ecos_flower.privacy.ledger import PrivacyEvent

# Bounds a client enforces before it allocates anything for a query (node config may change them;
# `torchvision-archs`, a comma-separated allow-list, is unset by default: any torchvision
# classification architecture within `max-extractor-params`).
DEFAULT_LIMITS = {
    MAX_CENTROIDS.key: int(MAX_CENTROIDS.default),
    MAX_DIM.key: int(MAX_DIM.default),
    "max-extractor-params": 50_000_000,
}
EXTRACTOR_STATE_KEY = "ecos-extractor"


def _limit(node_config: Mapping[str, Any], key: str) -> int:
    return int(node_config.get(key, DEFAULT_LIMITS[key]))


def check_declared(array: np.ndarray, shape: tuple[int, ...], what: str) -> None:
    """Refuse an array that is not the `shape` of finite floats the parsed query declares."""
    if array.shape != shape:
        raise QueryRejected(f"{what} have shape {array.shape}, query says {shape}")
    if array.dtype.kind != "f" or not np.all(np.isfinite(array)):
        raise QueryRejected(f"{what} must be finite floating-point numbers")


def declared_array(
    msg: Message, record_name: str, array_name: str, shape: tuple[int, ...], what: str = ""
) -> np.ndarray:
    """The one array `array_name` of the message's ArrayRecord `record_name`, decoded only after
    its header shows at most the declared `shape`'s number of values (the size the query
    declared and the node's limits allowed: a tiny payload must not make the node allocate
    gigabytes), then checked to be that shape of finite floats."""
    what = what or array_name
    record = msg.content.get(record_name)
    if not isinstance(record, ArrayRecord) or list(record.keys()) != [array_name]:
        raise QueryRejected(f"query has no ArrayRecord {record_name!r} holding {array_name!r}")
    try:
        array = checked_numpy(record[array_name], math.prod(shape), what)
    except ValueError as exc:
        raise QueryRejected(str(exc)) from exc
    check_declared(array, shape, what)
    return array


def read_centroids(msg: Message, query: Mapping[str, Any]) -> np.ndarray:
    """The centroids of the parsed `query` (`ECOS_QUERY.parse`), checked against it."""
    return declared_array(msg, "centroids", "centroids", (query["num-centroids"], query["dim"]))


def check_source(
    config: ConfigRecord, node_config: Mapping[str, Any], load_data: LoadData = client_shard
) -> None:
    """Refuse (before any charge) a message that names no data for this node (the scenario
    loader's check; a user's own `load_data` is not second-guessed)."""
    try:
        check_data_source(config, node_config, load_data)
    except ValueError as exc:
        raise QueryRejected(str(exc)) from exc


def read_extractor(
    msg: Message, context: Context, query: Mapping[str, Any], dim: int
) -> FeatureExtractor:
    """The feature extractor the parsed `query` names (its `extractor-hash`, `-kind` and
    `-config`): from this message, or from the node's state if sent before.

    Nothing is built before the architecture passed the node's limits: its declared size
    (`FeatureExtractor.declared_size`, from the config and the arrays' .npy headers alone) is
    held against `max-extractor-params` and its output dimension against `max-dim` and the
    query's `dim`; a torchvision architecture must be in the node's `torchvision-archs` (if
    set); the shipped arrays' names and shapes must be the architecture's state dict (from a
    meta-device module). Only then are the arrays decoded and the extractor built.

    A query without weights for an extractor this node does not hold is answered only for a
    kind that ships by name (a pretrained extractor): built from the node's own weights file
    after the same limits, refused (naming both digests) unless that file and the build are
    the ones the query names."""
    digest = query["extractor-hash"]
    if "extractor" in msg.content:
        record = msg.content["extractor"]
        if not isinstance(record, ArrayRecord):
            raise QueryRejected(f"extractor is a {type(record).__name__}, not an ArrayRecord")
        kind, config_text = query["extractor-kind"], query["extractor-config"]
        extractor = _checked_extractor(record, kind, config_text, context.node_config, dim)
        # Kept only once it loaded: a bad extractor never replaces a good one in the state.
        context.state[EXTRACTOR_STATE_KEY] = record
        context.state[EXTRACTOR_STATE_KEY + "-config"] = ConfigRecord(
            {"hash": digest, "kind": kind, "config": config_text}
        )
        return extractor
    saved = context.state.get(EXTRACTOR_STATE_KEY + "-config")
    if saved is None or saved["hash"] != digest:
        return _local_extractor(query, context.node_config, dim)
    return _checked_extractor(
        context.state[EXTRACTOR_STATE_KEY],
        str(saved["kind"]),
        str(saved["config"]),
        context.node_config,
        dim,
    )


def _allowed_archs(node_config: Mapping[str, Any]) -> list[str] | None:
    """The node's `torchvision-archs` allow-list (comma-separated), or None if it sets none."""
    value = node_config.get("torchvision-archs")
    if value is None:
        return None
    return [name.strip() for name in str(value).split(",") if name.strip()]


def _parsed_config(kind: str, config_text: str) -> tuple[type[FeatureExtractor], dict[str, Any]]:
    try:
        config = json.loads(config_text)
        return extractor_class(kind, config), config
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise QueryRejected(f"extractor config refused: {exc}") from exc


def _local_extractor(
    query: Mapping[str, Any], node_config: Mapping[str, Any], dim: int
) -> FeatureExtractor:
    """The extractor a query names without weights, from this node's own files (see
    `read_extractor`)."""
    kind, digest = query["extractor-kind"], query["extractor-hash"]
    cls, config = _parsed_config(kind, query["extractor-config"])
    if not cls.ships_by_name:
        raise QueryRejected("query names an extractor this node has not received")
    _check_size(cls, kind, config, {}, node_config, dim)
    try:
        extractor = cls.from_local(config)
    except ValueError as exc:  # no such file here, or a different one (both digests named)
        raise QueryRejected(f"extractor refused: {exc}") from exc
    local = extractor_digest(extractor)
    if local != digest:
        raise QueryRejected(
            f"{kind} extractor digest mismatch: the query names {digest}, this node's own "
            f"build is {local}"
        )
    return extractor


def _checked_extractor(
    record: ArrayRecord,
    kind: str,
    config_text: str,
    node_config: Mapping[str, Any],
    dim: int,
) -> FeatureExtractor:
    cls, config = _parsed_config(kind, config_text)
    try:  # the .npy headers only: nothing is decoded yet
        shapes = {
            name: declared_shape(array, f"extractor array {name!r}")
            for name, array in record.items()
        }
    except ValueError as exc:
        raise QueryRejected(f"extractor refused: {exc}") from exc
    _check_size(cls, kind, config, shapes, node_config, dim)
    try:
        check_arrays_fit(cls.declared_arrays(config, shapes), shapes)
    except ValueError as exc:
        raise QueryRejected(str(exc)) from exc
    try:  # each array decoded at exactly its declared (and now checked) size
        arrays = {
            name: checked_numpy(array, math.prod(shapes[name]), f"extractor array {name!r}")
            for name, array in record.items()
        }
    except ValueError as exc:
        raise QueryRejected(str(exc)) from exc
    try:
        extractor = cls.from_arrays(arrays, config)
    except Exception as exc:  # whatever the extractor code raises on bad weights
        raise QueryRejected(f"extractor does not load: {type(exc).__name__}: {exc}") from exc
    out = extractor.output_dim()
    if out is not None and out != dim:
        raise QueryRejected(f"extractor gives {out}-dimensional features, the query says dim={dim}")
    return extractor


def _check_size(
    cls: type[FeatureExtractor],
    kind: str,
    config: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    node_config: Mapping[str, Any],
    dim: int,
) -> None:
    """Refuse an architecture outside the node's limits, from its declared size alone."""
    if kind == "torchvision":
        allowed = _allowed_archs(node_config)
        if allowed is not None and config.get("arch") not in allowed:
            raise QueryRejected(
                f"torchvision architecture {config.get('arch')!r} is not in this node's "
                f"torchvision-archs={','.join(allowed) or '(none)'}"
            )
    try:
        parameters, output = cls.declared_size(config, shapes)
    except ValueError as exc:
        raise QueryRejected(f"extractor refused: {exc}") from exc
    limit = _limit(node_config, "max-extractor-params")
    if parameters > limit:
        raise QueryRejected(
            f"the {kind} extractor's architecture has {parameters} parameters, above this "
            f"node's max-extractor-params={limit}"
        )
    max_dim = _limit(node_config, MAX_DIM.key)
    if output is not None and output > max_dim:
        raise QueryRejected(
            f"the {kind} extractor gives {output}-dimensional features, above this node's "
            f"{MAX_DIM.key}={max_dim}"
        )
    if output is not None and output != dim:
        raise QueryRejected(
            f"extractor gives {output}-dimensional features, the query says dim={dim}"
        )


def answer_ecos_query(
    msg: Message, context: Context, boundary: ReleaseBoundary, load_data: LoadData = client_shard
) -> Message:
    """Answer one `query.ecos`: K noisy coverage counts of the local training shard.

    Order: parse the message (message-only refusals), admit the mechanism under the node's
    policy, charge the ledger, and only then read the data; the scoring is total (samples with
    non-finite features are dropped), so no data-dependent branch exists after the charge. A
    query that is not answered leaves the node's state as it was (no half-accepted extractor).
    """
    kept = {k: context.state.get(k) for k in (EXTRACTOR_STATE_KEY, EXTRACTOR_STATE_KEY + "-config")}
    try:
        return _answer_ecos_query(msg, context, boundary, load_data)
    except Exception:
        for key, record in kept.items():
            if record is None:
                context.state.pop(key, None)
            else:
                context.state[key] = record
        raise


def _answer_ecos_query(
    msg: Message, context: Context, boundary: ReleaseBoundary, load_data: LoadData
) -> Message:
    query = ECOS_QUERY.parse(msg.content.get("ecos"), context.node_config)
    centroids = read_centroids(msg, query)
    config = msg.content.get("config")
    if not isinstance(config, ConfigRecord):
        raise QueryRejected("query has no ConfigRecord 'config'")
    noisy = query["noise"]
    mechanism = "ecos-counts" if noisy else "exact-counts"
    boundary.admit(mechanism)
    extractor = read_extractor(msg, context, query, dim=centroids.shape[1])
    check_source(config, context.node_config, load_data)
    mode, max_per_sample, radius = query["score-mode"], query["max-per-sample"], query["radius"]
    sensitivity = score_sensitivity(mode, max_per_sample)
    metrics: dict[str, float | int] = {**boundary.node_label(), "sensitivity": sensitivity}
    sigma = 0.0
    if noisy:
        sigma = analytic_gaussian_sigma(query["epsilon"], query["delta"], sensitivity)
        event = PrivacyEvent.gaussian(sigma / sensitivity, note=f"ecos query, run {context.run_id}")
        spent, noise = boundary.charge(event)
        metrics.update(boundary.budget_metrics(spent))
    metrics["sigma"] = sigma
    # Charged (if private): only from here on is the node's data read.
    shard = load_data(config, context.node_config)
    features = features_of(
        extractor, shard.train.images, node_feature_cache(context.node_config), key="query"
    )
    if features.ndim != 2 or features.shape[1] != centroids.shape[1]:
        raise ValueError(f"extractor features {features.shape[1:]} vs centroids {centroids.shape}")
    scores = coverage_scores(
        features, centroids, mode=mode, radius=radius, max_per_sample=max_per_sample
    )
    if noisy:
        scores = noise.gaussian_release(scores, sigma)  # OpenDP's float-safe sampler (fresh)
    records = {"scores": ArrayRecord([np.asarray(scores, dtype=np.float64)])}
    return boundary.reply(mechanism, records, metrics)


def ecos_handler(load_data: LoadData = client_shard) -> Callable[[Message, Context], Message]:
    """The `query.ecos` handler, reading this node's data with `load_data(config, node_config)`
    (after the charge); register it with `app.query("ecos")(ecos_handler(my_loader))`."""

    def handle_ecos_query(msg: Message, context: Context, boundary: ReleaseBoundary) -> Message:
        return answer_ecos_query(msg, context, boundary, load_data)

    return guarded(handle_ecos_query)


handle_ecos_query = ecos_handler()
"""`query.ecos` on the project's scenarios (`client_shard`)."""
