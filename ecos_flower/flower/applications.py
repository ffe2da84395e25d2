"""Server side of the applications: what the cloud does with the selected proxy set (entries of
`sampling_run.APPLICATIONS`), the private-kNN query round, DP fine-tuning as the evaluate round,
and the `dp-linear-probe` method."""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore import log

from ecos_flower.applications import (
    aggregate_votes,
    distill,
    head_features,
    pseudo_label_train,
    public_feature_scale,
)
from ecos_flower.flower.ecos_strategy import EcosStrategy, extractor_digest
from ecos_flower.flower.settings import client_config
from ecos_flower.flower.validation import (
    InvalidReplyError,
    first_reply_per_node,
    metric,
    refusal,
    single_array,
)
from ecos_flower.models import build_model, train_epochs

if TYPE_CHECKING:
    from ecos_flower.data import Federation
    from ecos_flower.flower.report import RunReport
    from ecos_flower.flower.sampling_run import SelectionContext

# Models trained on the whole labelled pool (teacher, linear-probe backbone), per process: a
# comparison trains each once per seed and reuses it across methods and budgets.
_POOL_MODELS: dict[tuple, dict[str, torch.Tensor]] = {}


def pool_model(config: dict[str, Any], federation: Federation, name: str) -> torch.nn.Module:
    """Model `name` trained on the whole labelled public pool (`teacher-epochs`; no privacy cost:
    the pool is public), cached per process."""
    pool, seed = federation.pool, int(config["seed"])
    epochs = int(config["teacher-epochs"])
    key = (
        str(config["scenario"]),
        len(pool),
        federation.num_classes,
        name,
        epochs,
        float(config["learning-rate"]),
        int(config["batch-size"]),
        seed,
    )
    model = build_model(
        name, federation.num_classes, pool.images.shape[1], pool.images.shape[-1], seed=seed
    )
    if key in _POOL_MODELS:
        model.load_state_dict(_POOL_MODELS[key])
        return model.eval()
    start = time.perf_counter()
    train_epochs(
        model,
        pool.images,
        pool.labels,
        epochs=epochs,
        batch_size=max(int(config["batch-size"]), 64),
        learning_rate=float(config["learning-rate"]),
        seed=seed,
        device=str(config["device"]),
    )
    log(
        INFO,
        "trained %s on the whole pool (%d samples) in %.1f s",
        name,
        len(pool),
        time.perf_counter() - start,
    )
    _POOL_MODELS[key] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model.eval()


def _task_model(context: SelectionContext) -> torch.nn.Module:
    images = context.federation.pool.images
    return build_model(
        str(context.config["model"]),
        context.federation.num_classes,
        images.shape[1],
        images.shape[-1],
        seed=int(context.config["seed"]),
    )


# --------------------------------------------------------------- 1. semi-supervised
def _nearest_to_selection(context: SelectionContext, rest: np.ndarray, limit: int) -> np.ndarray:
    """The `limit` unselected pool samples closest (in the run's feature space) to any selected
    sample: unlabelled data like the proxy set, for every selection method alike."""
    from ecos_flower.ecos import cached_features
    from ecos_flower.flower.sampling_run import build_extractor

    features = context.features
    if features is None:
        config = context.config
        extractor = context.extractor or build_extractor(config, context.federation)
        cache = config["feature-cache"] or None
        features = cached_features(extractor, context.federation.pool.images, cache, key="pool")
    chosen = np.asarray(features[context.selected], dtype=np.float32)
    distance = np.full(len(rest), np.inf, dtype=np.float32)
    for start in range(0, len(chosen), 512):
        block = chosen[start : start + 512]
        candidates = np.asarray(features[rest], dtype=np.float32)
        d2 = (candidates**2).sum(1)[:, None] - 2.0 * candidates @ block.T + (block**2).sum(1)
        distance = np.minimum(distance, d2.min(axis=1))
    return np.sort(rest[np.argsort(distance, kind="stable")[:limit]])


def train_semi_supervised(context: SelectionContext) -> torch.nn.Module:
    """Label outsourcing + pseudo-labelling: the selection with its (outsourced) labels, plus
    `semi-max-unlabelled` samples of the unlabelled rest of the pool: a seeded random draw
    (`semi-unlabelled` = pool) or those nearest to the selection (near-selection)."""
    config, pool = context.config, context.federation.pool
    seed = int(config["seed"])
    chosen = torch.as_tensor(context.selected, dtype=torch.long)
    rest = np.setdiff1d(np.arange(len(pool)), context.selected)
    limit = int(config["semi-max-unlabelled"])
    source = str(config["semi-unlabelled"])
    if source == "near-selection" and 0 < limit < len(rest):
        rest = _nearest_to_selection(context, rest, limit)
    elif source not in ("pool", "near-selection"):
        raise ValueError(f"semi-unlabelled {source!r}: choose pool or near-selection")
    elif 0 < limit < len(rest):
        rest = np.sort(np.random.default_rng(seed).choice(rest, size=limit, replace=False))
    rest_t = torch.as_tensor(rest, dtype=torch.long)
    model = _task_model(context)
    stats = pseudo_label_train(
        model,
        pool.images[chosen],
        pool.labels[chosen],
        pool.images[rest_t],
        rounds=int(config["semi-rounds"]),
        threshold=float(config["semi-threshold"]),
        epochs=int(config["cloud-epochs"]),
        round_epochs=int(config["semi-epochs"]),
        batch_size=int(config["batch-size"]),
        learning_rate=float(config["learning-rate"]),
        seed=seed,
        device=str(config["device"]),
        unlabelled_truth=pool.labels[rest_t],
    )
    context.extra["pseudo-labelled"] = stats.kept
    context.extra["pseudo-label-accuracy"] = [
        c / k if k else None for c, k in zip(stats.correct, stats.kept, strict=False)
    ]
    return model


# ------------------------------------------------------------------- 2. distillation
def train_distilled(context: SelectionContext) -> torch.nn.Module:
    """A `teacher-model` trained on the whole labelled pool, distilled into the task model on the
    selected samples only (their labels are not used)."""
    config, pool = context.config, context.federation.pool
    teacher = pool_model(config, context.federation, str(config["teacher-model"]))
    student = _task_model(context)
    chosen = torch.as_tensor(context.selected, dtype=torch.long)
    loss = distill(
        student,
        teacher,
        pool.images[chosen],
        temperature=float(config["distill-temperature"]),
        epochs=int(config["cloud-epochs"]),
        batch_size=int(config["batch-size"]),
        learning_rate=float(config["learning-rate"]),
        seed=int(config["seed"]),
        device=str(config["device"]),
    )
    context.extra["distill-loss"] = loss
    return student


# ---------------------------------------------------------------- 3. private kNN
def float_matrix(reply: Message, key: str, shape: tuple[int, int]) -> np.ndarray:
    """A finite floating-point matrix of exactly `shape` (float64 copy)."""
    node = reply.metadata.src_node_id
    values = single_array(reply, key, max_elements=shape[0] * shape[1])
    if values.dtype.kind != "f":
        raise InvalidReplyError(node, f"{key!r} has dtype {values.dtype}, expected floating point")
    if values.shape != shape:
        raise InvalidReplyError(node, f"{key!r} has shape {values.shape}, expected {shape}")
    if not np.all(np.isfinite(values)):
        bad = int(np.count_nonzero(~np.isfinite(values)))
        raise InvalidReplyError(node, f"{key!r} has {bad} non-finite values (NaN or inf)")
    return values.astype(np.float64)


def knn_neighbours(config: dict[str, Any], num_queries: int) -> int:
    """k of the kNN votes: `knn-k`, or with `knn-k-per-query` > 0 that fraction of the queried
    samples (at least 1). In capped mode the clients' vote mass (n samples x k votes) spreads over
    the queried samples, so a fixed k gives each fewer votes, hence noisier labels, as the
    selection grows; a k proportional to it keeps the votes per sample about constant."""
    per_query = float(config.get("knn-k-per-query", 0.0))
    if per_query > 0:
        return max(1, round(per_query * num_queries))
    return int(config["knn-k"])


def configure_knn(
    context: SelectionContext,
    extractor: Any,
    query_features: np.ndarray,
    *,
    ship_extractor: bool = False,
) -> list[Message]:
    """One `query.knn` per node: the selected samples' features, the vote settings, and the
    extractor's weights for nodes that have not received them (in the ECOS query), or for every
    node with `ship_extractor` (a feature map of its own for labelling)."""
    config, strategy = context.config, context.strategy
    knn = ConfigRecord(
        {
            "num-queries": int(query_features.shape[0]),
            "dim": int(query_features.shape[1]),
            "k": knn_neighbours(config, int(query_features.shape[0])),
            "mode": str(config["knn-mode"]),
            "num-classes": int(context.federation.num_classes),
            "epsilon": float(config["knn-epsilon"]),
            "delta": float(config["delta"]),
            "extractor-hash": extractor_digest(extractor),
            "extractor-kind": extractor.kind,
            "extractor-config": _json(extractor.config()),
        }
    )
    queries = ArrayRecord({"features": Array(np.ascontiguousarray(query_features, np.float32))})
    weights = ArrayRecord(
        {k: Array(np.ascontiguousarray(v)) for k, v in extractor.to_arrays().items()}
    )
    messages = []
    for node in context.grid.get_node_ids():
        content = RecordDict({"queries": queries, "knn": knn, "config": client_config(config)})
        if ship_extractor or node not in strategy._extractor_sent:
            content["extractor"] = weights
        messages.append(Message(content, node, "query.knn", group_id="knn"))
    return messages


def aggregate_knn(
    strategy: EcosStrategy, replies: Iterable[Message], shape: tuple[int, int]
) -> tuple[list[np.ndarray], list[float], dict[int, str]]:
    """Validate the vote replies (shape, finite, noise claimed, node named on rejection); record
    each answering client's ledger total in `strategy.epsilon_spent`."""
    kept, duplicates = first_reply_per_node(replies)
    strategy._reject_all(duplicates)
    votes, sigmas, refused = [], [], {}
    for reply in kept:
        node = reply.metadata.src_node_id
        reason = refusal(reply)
        if reason is not None:
            refused[node] = reason
            log(WARNING, "node %s refused the kNN query: %s", node, reason)
            continue
        try:
            matrix = float_matrix(reply, "votes", shape)
            client = int(metric(reply, "partition-id", low=0))
            sigma = metric(reply, "sigma", low=0.0)
            spent = metric(reply, "epsilon-spent", low=0.0)
            if sigma <= 0:
                raise InvalidReplyError(node, "reply claims no noise (sigma=0) in a private query")
        except InvalidReplyError as exc:
            strategy._reject_all([exc])
            continue
        votes.append(matrix)
        sigmas.append(sigma)
        strategy.epsilon_spent[client] = spent
        strategy.node_to_client[node] = client
        strategy._extractor_sent.add(node)
    return votes, sigmas, refused


_LABELLING_EXTRACTORS: dict[tuple, Any] = {}


def _labelling_extractor(config: dict[str, Any], federation: Federation, kind: str) -> Any:
    """The `knn-extractor` feature map, fitted on the public pool, cached per process."""
    from ecos_flower.flower.sampling_run import build_extractor

    key = (
        str(config["scenario"]),
        len(federation.pool),
        kind,
        int(config["extractor-epochs"]),
        int(config["pca-components"]),
        int(config["seed"]),
    )
    if key not in _LABELLING_EXTRACTORS:
        _LABELLING_EXTRACTORS[key] = build_extractor({**config, "extractor": kind}, federation)
    return _LABELLING_EXTRACTORS[key]


def train_private_knn(context: SelectionContext) -> torch.nn.Module:
    """Clients label the selected samples by private kNN; the cloud trains on the voted labels
    (only the samples whose top vote clears `knn-threshold` x the aggregate noise std)."""
    from ecos_flower.flower.sampling_run import build_extractor

    config, pool = context.config, context.federation.pool
    chosen = torch.as_tensor(context.selected, dtype=torch.long)
    kind = str(config["knn-extractor"])
    own_map = kind != "run"
    if own_map:  # a feature map for labelling only (e.g. class-aware: supervised on the pool)
        extractor = _labelling_extractor(config, context.federation, kind)
        query_features = extractor.transform(pool.images[chosen], progress=False)
    else:
        extractor = context.extractor
        if extractor is None:  # random selection: build the same feature map ECOS would ship
            extractor = build_extractor(config, context.federation)
        if context.features is not None:
            query_features = context.features[context.selected]
        else:
            query_features = extractor.transform(pool.images[chosen], progress=False)
    shape = (len(context.selected), int(context.federation.num_classes))
    messages = configure_knn(context, extractor, query_features, ship_extractor=own_map)
    replies = context.grid.send_and_receive(messages, timeout=float(config["timeout"]))
    votes, sigmas, refused = aggregate_knn(context.strategy, replies, shape)
    min_clients = max(int(config.get("min-clients", 1)), 1)
    if len(votes) < min_clients:
        raise RuntimeError(
            f"kNN labelling: {len(votes)} client(s) answered validly, fewer than "
            f"min-clients={min_clients}; refused: "
            + (", ".join(f"node {n}: {r}" for n, r in refused.items()) or "none")
        )
    labels, kept = aggregate_votes(votes, sigmas, float(config["knn-threshold"]))
    truth = pool.labels[chosen].numpy()
    context.extra.update(
        {
            "knn-answered": len(votes),
            "knn-k-used": knn_neighbours(config, len(context.selected)),
            "knn-refused": {str(n): r for n, r in refused.items()},
            "knn-labelled": int(kept.sum()),
            # Diagnostic only: the pool's own labels are the server's, never the clients'.
            "knn-label-accuracy": float(np.mean(labels[kept] == truth[kept])),
        }
    )
    model = _task_model(context)
    keep = chosen[torch.as_tensor(kept)]
    train_epochs(
        model,
        pool.images[keep],
        torch.as_tensor(labels[kept], dtype=torch.long),
        epochs=int(config["cloud-epochs"]),
        batch_size=int(config["batch-size"]),
        learning_rate=float(config["learning-rate"]),
        seed=int(config["seed"]),
        device=str(config["device"]),
    )
    return model


# ------------------------------------------------------- 4. DP last-layer fine-tuning
def finetune_enabled(config: dict[str, Any]) -> bool:
    return float(config.get("finetune-epsilon", 0.0)) > 0


def finetune_record(config: dict[str, Any], feature_scale: float) -> ConfigRecord:
    """The `finetune` ConfigRecord of a run config: what every client is asked to do.

    `feature_scale` is the median feature norm of public samples under the sent model (see
    `public_feature_scale`): DP least squares and DP-FC normalise features with it, and it must
    not come from the clients' private data."""
    return ConfigRecord(
        {
            "method": str(config["finetune-method"]),
            "epsilon": float(config["finetune-epsilon"]),
            "delta": float(config["delta"]),
            "steps": int(config["finetune-steps"]),
            "clip": float(config["finetune-clip"]),
            "learning-rate": float(config["finetune-lr"]),
            "init": str(config["finetune-init"]),
            "ridge": float(config["finetune-ridge"]),
            "covariance-share": float(config["finetune-covariance-share"]),
            "floor": float(config["finetune-floor"]),
            "feature-scale": float(feature_scale),
            "normaliser": float(config["finetune-normaliser"]),
        }
    )


def finetune_messages(
    messages: Iterable[Message], config: dict[str, Any], feature_scale: float
) -> list[Message]:
    """Turn evaluate messages into `evaluate.finetune` ones carrying `finetune_record`."""
    spec = finetune_record(config, feature_scale)
    out = []
    for message in messages:
        content = RecordDict(
            {
                "arrays": message.content["arrays"],
                "config": message.content["config"],
                "finetune": spec,
            }
        )
        out.append(
            Message(
                content,
                message.metadata.dst_node_id,
                "evaluate.finetune",
                group_id=message.metadata.group_id,
            )
        )
    return out


def public_feature_scale_of(model: torch.nn.Module, images: torch.Tensor, device: str) -> float:
    """The median norm of `model.embed` on public images (at most 2,000 of them): the scale
    DP least squares and DP-FC normalise client features by."""
    sample = images[: min(len(images), 2_000)]
    return public_feature_scale(head_features(model, sample, device=device))


def record_finetune(strategy: EcosStrategy, replies: Iterable[Message]) -> dict[str, Any]:
    """After `strategy.aggregate_evaluate`: each fine-tuned client's ledger total into
    `strategy.epsilon_spent`; returns report extras (accuracy before fine-tuning, Opacus' epsilon,
    refusals)."""
    received, opacus, refused = {}, {}, {}
    kept, _ = first_reply_per_node(replies)
    for reply in kept:
        node = reply.metadata.src_node_id
        if node not in strategy.evaluated_nodes:
            continue  # rejected by aggregate_evaluate
        try:
            client = int(metric(reply, "partition-id", low=0))
            received[client] = metric(reply, "accuracy-received", low=0.0, high=1.0)
            if metric(reply, "finetuned", low=0, high=1) == 1:
                strategy.epsilon_spent[client] = metric(reply, "epsilon-spent", low=0.0)
                opacus[client] = metric(reply, "finetune-epsilon-opacus", low=0.0)
            else:
                reason = reply.content.get("finetune-refusal")
                refused[client] = str(reason["reason"]) if reason is not None else "refused"
        except InvalidReplyError as exc:
            strategy._reject_all([exc])
    return {
        "accuracy-before-finetune": float(np.mean(list(received.values()))) if received else None,
        "finetune-epsilon-opacus": max(opacus.values()) if opacus else None,
        "finetune-refused": {str(c): r for c, r in refused.items()},
    }


def evaluate_model(
    strategy: EcosStrategy,
    model: torch.nn.Module,
    config: dict[str, Any],
    grid: Any,
    public_images: torch.Tensor,
    public_indices: np.ndarray | None = None,
) -> tuple[list[Message], dict[str, Any]]:
    """The evaluate round: every client scores `model` on its test split; with finetune-epsilon
    > 0 each first refits the head with DP (`evaluate.finetune`, features normalised by the
    scale of the public images, or of those at `public_indices`). Returns the messages sent and
    the report's extras."""
    messages = strategy.configure_evaluate(
        1, ArrayRecord(model.state_dict()), client_config(config), grid
    )
    if finetune_enabled(config):
        images = public_images if public_indices is None else public_images[public_indices]
        scale = public_feature_scale_of(model, images, str(config["device"]))
        messages = finetune_messages(messages, config, scale)
    replies = list(grid.send_and_receive(messages, timeout=float(config["timeout"])))
    strategy.aggregate_evaluate(1, replies)
    extra = record_finetune(strategy, replies) if finetune_enabled(config) else {}
    return messages, extra


def run_dp_linear_probe(grid: Any, config: dict[str, Any]) -> RunReport:
    """Method `dp-linear-probe`: the cloud trains the task model on the whole labelled public
    pool; every client fine-tunes its classifier head with DP-SGD and reports test accuracy."""
    from ecos_flower.data import load_federation
    from ecos_flower.flower.payload import MeteredGrid
    from ecos_flower.flower.report import RunReport, no_results_message
    from ecos_flower.flower.sampling_run import PhaseTimer

    if not finetune_enabled(config):
        raise ValueError("dp-linear-probe needs finetune-epsilon > 0")
    start, timer = time.time(), PhaseTimer()
    federation = load_federation(
        config["scenario"],
        data_root=config["data-root"] or None,
        num_clients=config.get("num-clients"),
    )
    metered = MeteredGrid(grid)
    strategy = EcosStrategy(delta=float(config["delta"]))
    with timer("cloud-training"):
        model = pool_model(config, federation, str(config["model"]))
    with timer("evaluate"):
        _, extra = evaluate_model(strategy, model, config, metered, federation.pool.images)
    if not strategy.accuracy:
        raise RuntimeError(no_results_message({e.node_id: e.problem for e in strategy.rejected}))
    report = RunReport(
        method="dp-linear-probe", seed=int(config["seed"]), scenario=str(config["scenario"])
    )
    report.accuracy_per_client = dict(strategy.accuracy)
    report.epsilon_per_client = {c: strategy.epsilon_spent.get(c, 0.0) for c in strategy.accuracy}
    report.delta = float(config["delta"])
    report.add_traffic(metered, strategy.node_to_client)
    report.phase_seconds = timer.seconds
    report.wall_s = time.time() - start
    report.extra = extra
    keys = (
        "model",
        "teacher-epochs",
        "finetune-epsilon",
        "finetune-method",
        "finetune-steps",
        "finetune-clip",
        "finetune-lr",
        "finetune-init",
        "delta",
    )
    report.settings = {key: config[key] for key in keys}
    return report


def _json(value: Any) -> str:
    import json

    return json.dumps(value, default=str)


APPLICATION_FUNCTIONS = {
    "semi-supervised": train_semi_supervised,
    "distill": train_distilled,
    "private-knn": train_private_knn,
}
