"""Server side of the applications: what the cloud does with the selected proxy set (entries of
`sampling_run.APPLICATIONS`), the private-kNN query round (`PrivateKnnRound`), the `finetune`
record of DP fine-tuning (sent by the evaluate round of `ecos_flower.strategy.evaluation`), and
the `dp-linear-probe` method.

Shared pieces (the context, the extractor, the task model) come from `flower.selection`; this
module does not import the sampling run, which imports it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

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
from ecos_flower.data import Federation
from ecos_flower.data.pool import server_federation
from ecos_flower.ecos import FeatureExtractor, cached_features
from ecos_flower.flower.payload import MeteredGrid
from ecos_flower.flower.report import RunReport, no_results_message
from ecos_flower.flower.selection import SelectionContext, build_extractor, task_model
from ecos_flower.flower.settings import client_config
from ecos_flower.flower.task_space import task_federation
from ecos_flower.flower.timing import PhaseTimer
from ecos_flower.flower.validation import (
    InvalidReplyError,
    ReplyTally,
    claimed_client,
    first_reply_per_node,
    metric,
    refusal,
    single_array,
    too_few_message,
)
from ecos_flower.models import build_model, train_epochs
from ecos_flower.strategy.ecos_query import ExtractorDelivery, extractor_digest, wire_array
from ecos_flower.strategy.evaluation import evaluate_round

# Models trained on the whole labelled pool (teacher, linear-probe backbone), per process: a
# comparison trains each once per seed and reuses it across methods and budgets.
_POOL_MODELS: dict[tuple, dict[str, torch.Tensor]] = {}


def pool_model(config: dict[str, Any], federation: Federation, name: str) -> torch.nn.Module:
    """Model `name` trained on the whole labelled public pool (`teacher-epochs`; no privacy cost:
    the pool is public), cached per process."""
    pool, seed = federation.pool, config["seed"]
    epochs = config["teacher-epochs"]
    key = (
        config["scenario"],
        config.get("pool", ""),
        tuple(pool.images.shape),  # pixels or a head's features
        federation.num_classes,
        name,
        epochs,
        config["learning-rate"],
        config["batch-size"],
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
        batch_size=max(config["batch-size"], 64),
        learning_rate=config["learning-rate"],
        seed=seed,
        device=config["device"],
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


# --------------------------------------------------------------- 1. semi-supervised
def _nearest_to_selection(context: SelectionContext, rest: np.ndarray, limit: int) -> np.ndarray:
    """The `limit` unselected pool samples closest (in the run's feature space) to any selected
    sample: unlabelled data like the proxy set, for every selection method alike."""
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
    config, pool = context.config, context.training_pool
    seed = config["seed"]
    chosen = torch.as_tensor(context.selected, dtype=torch.long)
    rest = np.setdiff1d(np.arange(len(pool)), context.selected)
    limit = config["semi-max-unlabelled"]
    source = config["semi-unlabelled"]
    if source == "near-selection" and 0 < limit < len(rest):
        rest = _nearest_to_selection(context, rest, limit)
    elif source not in ("pool", "near-selection"):
        raise ValueError(f"semi-unlabelled {source!r}: choose pool or near-selection")
    elif 0 < limit < len(rest):
        rest = np.sort(np.random.default_rng(seed).choice(rest, size=limit, replace=False))
    rest_t = torch.as_tensor(rest, dtype=torch.long)
    model = task_model(context)
    stats = pseudo_label_train(
        model,
        pool.images[chosen],
        pool.labels[chosen],
        pool.images[rest_t],
        rounds=config["semi-rounds"],
        threshold=config["semi-threshold"],
        epochs=config["cloud-epochs"],
        round_epochs=config["semi-epochs"],
        batch_size=config["batch-size"],
        learning_rate=config["learning-rate"],
        seed=seed,
        device=config["device"],
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
    selected samples only (their labels are not used). Each model sees the pool as it takes it
    (a head: the extractor's features), so a pixel teacher can teach a head and back."""
    config = context.config
    teacher_federation = task_federation(
        {**config, "model": config["teacher-model"]}, context.federation
    )
    teacher = pool_model(config, teacher_federation, config["teacher-model"])
    student = task_model(context)
    chosen = torch.as_tensor(context.selected, dtype=torch.long)
    loss = distill(
        student,
        teacher,
        context.training_pool.images[chosen],
        teacher_images=teacher_federation.pool.images[chosen],
        temperature=config["distill-temperature"],
        epochs=config["cloud-epochs"],
        batch_size=config["batch-size"],
        learning_rate=config["learning-rate"],
        seed=config["seed"],
        device=config["device"],
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
    per_query = config["knn-k-per-query"]
    if per_query > 0:
        return max(1, round(per_query * num_queries))
    return config["knn-k"]


class PrivateKnnRound(ReplyTally):
    """One private-kNN labelling round: a `query.knn` per node (the queried samples' features,
    the vote settings, the extractor's weights for nodes that lack them), the vote replies
    validated (shape, finite, noise claimed; a rejection names the node).

    Its own state, read-only: `epsilon_spent` (client -> the ledger total it reported),
    `node_to_client`, `rejected` and `refused` (node -> the client's stated reason)."""

    def __init__(
        self,
        config: Mapping[str, Any],
        num_classes: int,
        grid: Any = None,
        delivery: ExtractorDelivery | None = None,
    ) -> None:
        super().__init__()
        self._config, self._num_classes, self._grid = config, int(num_classes), grid
        self._delivery = delivery if delivery is not None else ExtractorDelivery()
        self._digest = ""

    def messages(
        self,
        extractor: FeatureExtractor,
        query_features: np.ndarray,
        *,
        ship_extractor: bool = False,
    ) -> list[Message]:
        """One `query.knn` per node of the grid; the extractor goes to nodes that do not hold it
        (or, with `ship_extractor`, to every node: a feature map of its own for labelling)."""
        config = self._config
        self._digest = extractor_digest(extractor)
        knn = ConfigRecord(
            {
                "num-queries": int(query_features.shape[0]),
                "dim": int(query_features.shape[1]),
                "k": knn_neighbours(config, int(query_features.shape[0])),
                "mode": config["knn-mode"],
                "num-classes": self._num_classes,
                "epsilon": config["knn-epsilon"],
                "delta": config["delta"],
                "extractor-hash": self._digest,
                "extractor-kind": extractor.kind,
                "extractor-config": json.dumps(extractor.config(), default=str),
            }
        )
        queries = ArrayRecord({"features": Array(np.ascontiguousarray(query_features, np.float32))})
        weights = ArrayRecord({k: wire_array(v) for k, v in extractor.to_arrays().items()})
        messages = []
        for node in self._grid.get_node_ids():
            content = RecordDict({"queries": queries, "knn": knn, "config": client_config(config)})
            if ship_extractor or self._delivery.needs(node, self._digest):
                content["extractor"] = weights
            messages.append(Message(content, node, "query.knn", group_id="knn"))
        return messages

    def aggregate(
        self, replies: Iterable[Message], shape: tuple[int, int]
    ) -> tuple[list[np.ndarray], list[float]]:
        """The valid vote matrices and their noise stds; refusals and rejections are recorded."""
        kept, duplicates = first_reply_per_node(replies)
        self._reject(duplicates)
        votes, sigmas = [], []
        for reply in kept:
            node = reply.metadata.src_node_id
            reason = refusal(reply)
            if reason is not None:
                self._refused[node] = reason
                log(WARNING, "node %s refused the kNN query: %s", node, reason)
                continue
            try:
                matrix = float_matrix(reply, "votes", shape)
                client = claimed_client(reply, self._clients)
                sigma = metric(reply, "sigma", low=0.0)
                spent = metric(reply, "epsilon-spent", low=0.0)
                if sigma <= 0:
                    raise InvalidReplyError(
                        node, "reply claims no noise (sigma=0) in a private query"
                    )
            except InvalidReplyError as exc:
                self._reject([exc])
                continue
            votes.append(matrix)
            sigmas.append(sigma)
            self._spent[client] = spent
            self._clients[node] = client
            self._delivery.delivered(node, self._digest)
        return votes, sigmas

    def run(
        self,
        extractor: FeatureExtractor,
        query_features: np.ndarray,
        *,
        ship_extractor: bool = False,
    ) -> tuple[list[np.ndarray], list[float]]:
        """Send the query, wait up to the run's `timeout`, return `aggregate`'s votes."""
        messages = self.messages(extractor, query_features, ship_extractor=ship_extractor)
        replies = self._grid.send_and_receive(messages, timeout=self._config["timeout"])
        shape = (int(query_features.shape[0]), self._num_classes)
        return self.aggregate(replies, shape)


_LABELLING_EXTRACTORS: dict[tuple, Any] = {}


def _labelling_extractor(config: dict[str, Any], federation: Federation, kind: str) -> Any:
    """The `knn-extractor` feature map, fitted on the public pool, cached per process."""
    key = (
        config["scenario"],
        len(federation.pool),
        kind,
        config["extractor-epochs"],
        config["pca-components"],
        config["seed"],
    )
    if key not in _LABELLING_EXTRACTORS:
        _LABELLING_EXTRACTORS[key] = build_extractor({**config, "extractor": kind}, federation)
    return _LABELLING_EXTRACTORS[key]


def train_private_knn(context: SelectionContext) -> torch.nn.Module:
    """Clients label the selected samples by private kNN; the cloud trains on the voted labels
    (only the samples whose top vote clears `knn-threshold` x the aggregate noise std). The
    clients' ledger totals go into `context.epsilon_spent`. The feature maps take the pool's
    images; the task model trains on `training_pool` (features for a head)."""
    config, pool = context.config, context.federation.pool
    chosen = torch.as_tensor(context.selected, dtype=torch.long)
    kind = config["knn-extractor"]
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
    knn = PrivateKnnRound(config, context.federation.num_classes, context.grid, context.delivery)
    votes, sigmas = knn.run(extractor, query_features, ship_extractor=own_map)
    refused = knn.refused
    context.epsilon_spent.update(knn.epsilon_spent)
    context.node_to_client.update(knn.node_to_client)
    min_clients = max(config["min-clients"], 1)
    if len(votes) < min_clients:
        rejected = [{"node": e.node_id, "reason": e.problem} for e in knn.rejected]
        raise RuntimeError(
            too_few_message("kNN labelling", len(votes), min_clients, rejected, refused)
        )
    labels, kept = aggregate_votes(votes, sigmas, config["knn-threshold"])
    truth = pool.labels[chosen].numpy()
    pool = context.training_pool
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
    model = task_model(context)
    keep = chosen[torch.as_tensor(kept)]
    train_epochs(
        model,
        pool.images[keep],
        torch.as_tensor(labels[kept], dtype=torch.long),
        epochs=config["cloud-epochs"],
        batch_size=config["batch-size"],
        learning_rate=config["learning-rate"],
        seed=config["seed"],
        device=config["device"],
    )
    return model


# ------------------------------------------------------- 4. DP last-layer fine-tuning
def finetune_enabled(config: dict[str, Any]) -> bool:
    return config["finetune-epsilon"] > 0


def finetune_record(config: dict[str, Any], feature_scale: float) -> ConfigRecord:
    """The `finetune` ConfigRecord of a run config: what every client is asked to do.

    `feature_scale` is the median feature norm of public samples under the sent model (see
    `public_feature_scale`): DP least squares and DP-FC normalise features with it, and it must
    not come from the clients' private data."""
    return ConfigRecord(
        {
            "method": config["finetune-method"],
            "epsilon": config["finetune-epsilon"],
            "delta": config["delta"],
            "steps": config["finetune-steps"],
            "clip": config["finetune-clip"],
            "learning-rate": config["finetune-lr"],
            "init": config["finetune-init"],
            "ridge": config["finetune-ridge"],
            "covariance-share": config["finetune-covariance-share"],
            "floor": config["finetune-floor"],
            "feature-scale": float(feature_scale),
            "normaliser": config["finetune-normaliser"],
        }
    )


def public_feature_scale_of(model: torch.nn.Module, images: torch.Tensor, device: str) -> float:
    """The median norm of `model.embed` on public images (at most 2,000 of them): the scale
    DP least squares and DP-FC normalise client features by."""
    sample = images[: min(len(images), 2_000)]
    return public_feature_scale(head_features(model, sample, device=device))


def run_dp_linear_probe(grid: Any, config: dict[str, Any]) -> RunReport:
    """Method `dp-linear-probe`: the cloud trains the task model on the whole labelled public
    pool; every client fine-tunes its classifier head with DP-SGD and reports test accuracy."""
    if not finetune_enabled(config):
        raise ValueError("dp-linear-probe needs finetune-epsilon > 0")
    start, timer = time.time(), PhaseTimer()
    # The pool as the task model takes it (a head model: the extractor's features).
    federation = task_federation(config, server_federation(config))
    metered = MeteredGrid(grid)
    with timer("cloud-training"):
        model = pool_model(config, federation, config["model"])
    with timer("evaluate"):
        scale = public_feature_scale_of(model, federation.pool.images, config["device"])
        evaluation = evaluate_round(
            metered,
            ArrayRecord(model.state_dict()),
            client_config(config),
            timeout=config["timeout"],
            finetune=finetune_record(config, scale),
        )
    if not evaluation.accuracy:
        raise RuntimeError(no_results_message({e.node_id: e.problem for e in evaluation.rejected}))
    report = RunReport(method="dp-linear-probe", seed=config["seed"], scenario=config["scenario"])
    spent = evaluation.epsilon_spent
    report.accuracy_per_client = dict(evaluation.accuracy)
    report.epsilon_per_client = {c: spent.get(c, 0.0) for c in evaluation.accuracy}
    report.delta = config["delta"]
    report.add_traffic(metered, evaluation.node_to_client)
    report.phase_seconds = timer.seconds
    report.wall_s = time.time() - start
    report.extra = evaluation.finetune_summary()
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


APPLICATION_FUNCTIONS = {
    "semi-supervised": train_semi_supervised,
    "distill": train_distilled,
    "private-knn": train_private_knn,
}
