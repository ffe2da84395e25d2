"""The server loop of the sampling methods: ECOS and its baselines select a proxy set from the
public pool, the cloud trains the task model on it, and every client evaluates that model.

Only the public pool is read on the server; clients' shards are touched only by their ClientApps.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.serverapp import Grid
from flwr.supercore import log

from ecos_flower.data import Federation, load_federation
from ecos_flower.ecos import (
    EcosSampler,
    InDomainSampler,
    KCenterSampler,
    RandomSampler,
    cached_features,
    compress,
    domain_precision,
    make_extractor,
)
from ecos_flower.flower.applications import (
    APPLICATION_FUNCTIONS,
    evaluate_model,
)
from ecos_flower.flower.ecos_strategy import EcosStrategy
from ecos_flower.flower.payload import MeteredGrid
from ecos_flower.flower.report import RunReport, no_results_message
from ecos_flower.flower.settings import client_config
from ecos_flower.flower.validation import drop_events, too_few_message
from ecos_flower.models import build_model, train_epochs

SAMPLING_METHODS = ("ecos", "oracle", "random", "kcenter", "in-domain")


class PhaseTimer:
    """Wall-clock seconds per named phase, for the report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        log(INFO, "[%s] ...", name)
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        log(INFO, "[%s] %.2f s", name, self.seconds[name])


def build_extractor(config: dict[str, Any], federation: Federation):  # noqa: ANN201
    """The server's feature map phi, fitted on the labelled public pool (no privacy cost)."""
    kind = str(config["extractor"])
    seed, device = int(config["seed"]), str(config["device"])
    if kind == "supervised":
        extractor = make_extractor(
            kind, epochs=int(config["extractor-epochs"]), seed=seed, device=device
        )
    elif kind == "random":
        extractor = make_extractor(kind, seed=seed, device=device)
    elif kind == "pca":
        extractor = make_extractor(kind, n_components=int(config["pca-components"]), seed=seed)
    else:
        raise ValueError(
            f"extractor {kind!r} is not available from the run config; "
            "choose supervised, random or pca"
        )
    pool = federation.pool
    return extractor.fit(pool.images, pool.labels)


def run_sampling(grid: Grid, config: dict[str, Any]) -> RunReport:
    """Select `budget` pool samples with the configured method, train in the cloud, evaluate."""
    method = str(config["method"])
    if method not in SAMPLING_METHODS:
        raise ValueError(f"{method!r} is not a sampling method ({', '.join(SAMPLING_METHODS)})")
    start, timer = time.time(), PhaseTimer()
    seed, budget = int(config["seed"]), int(config["budget"])
    federation = load_federation(
        config["scenario"],
        data_root=config["data-root"] or None,
        num_clients=config.get("num-clients"),
    )
    pool = federation.pool
    metered = MeteredGrid(grid)
    strategy = EcosStrategy(
        epsilon=float(config["epsilon"]),
        delta=float(config["delta"]),
        noise=method == "ecos",
        score_mode=str(config["score-mode"]),
        radius=float(config["radius"]) if config["score-mode"] == "radius" else None,
        max_per_sample=int(config["max-per-sample"]),
        threshold_multiple=float(config["threshold-multiple"]),
    )
    strategy.summary()
    extra: dict[str, Any] = {}
    # Rounds go on with the clients that answer (others crash, time out or disconnect) as long
    # as at least `min-clients` do; `dropped` names who dropped out, when and why.
    min_clients = int(config.get("min-clients", 1))
    dropped: list[dict[str, Any]] = []
    extra["dropped"] = dropped
    cache = Path(config["feature-cache"]) if config["feature-cache"] else None
    features: np.ndarray | None = None
    extractor = None
    if method in ("ecos", "oracle", "kcenter"):
        with timer("extractor"):
            extractor = build_extractor(config, federation)
        with timer("pool-features"):
            features = cached_features(extractor, pool.images, cache, key="pool", progress=True)
    if method in ("ecos", "oracle"):
        k = int(config["num-centroids"])
        with timer("compress"):
            compression = compress(features, k, seed=seed)
        with timer("query"):
            messages = strategy.configure_query(
                1, compression.centroids, extractor, client_config(config), metered
            )
            replies = metered.send_and_receive(messages, timeout=float(config["timeout"]))
            aggregated = strategy.aggregate_query(1, replies, k)
        dropped += drop_events(
            "query",
            1,
            [m.metadata.dst_node_id for m in messages],
            set(strategy.accepted_scores) | set(strategy.refused),
            strategy.rejected,
        )
        if aggregated is None:
            refused = "; ".join(f"node {n}: {r}" for n, r in strategy.refused.items())
            raise RuntimeError(
                "no client answered the ECOS query validly ("
                + too_few_message("query", 0, max(min_clients, 1), dropped)
                + (f"; refused: {refused}" if refused else "")
                + ")"
            )
        if len(strategy.accepted_scores) < min_clients:
            raise RuntimeError(
                too_few_message("ECOS query", len(strategy.accepted_scores), min_clients, dropped)
            )
        sampler = EcosSampler(features, compression, aggregated, seed=seed)
        extra.update(
            {
                "answered": len(strategy.accepted_scores),
                "rejected": [str(e) for e in strategy.rejected],
                "refused": {str(k): v for k, v in strategy.refused.items()},
                "extractor-bytes": extractor.num_bytes(),
            }
        )
    elif method == "random":
        sampler = RandomSampler(len(pool), seed=seed)
    elif method == "kcenter":
        sampler = KCenterSampler(features, seed=seed)
    else:
        sampler = InDomainSampler(pool.domains.numpy(), _client_domain_id(federation), seed=seed)
    with timer("select"):
        selected = np.asarray(sampler.select(budget), dtype=np.int64)
    if federation.client_domain in pool.domain_names:
        extra["domain-precision"] = domain_precision(
            selected, pool.domains.numpy(), _client_domain_id(federation)
        )
    extra["selected"] = int(len(selected))
    extra["selection-sha256"] = hashlib.sha256(np.sort(selected).tobytes()).hexdigest()[:16]
    with timer("cloud-training"):
        context = SelectionContext(
            config, federation, selected, metered, strategy, features, extractor
        )
        model = use_selection(context)
    extra.update(context.extra)
    with timer("evaluate"):  # (clients fine-tune the head with DP first, if configured)
        rejected_before = len(strategy.rejected)
        messages, evaluate_extra = evaluate_model(
            strategy, model, config, metered, pool.images, selected
        )
        extra.update(evaluate_extra)
    dropped += drop_events(
        "evaluate",
        1,
        [m.metadata.dst_node_id for m in messages],
        strategy.evaluated_nodes,
        strategy.rejected[rejected_before:],
        strategy.node_to_client,
    )
    if not strategy.accuracy:
        raise RuntimeError(no_results_message({e.node_id: e.problem for e in strategy.rejected}))
    if len(strategy.evaluated_nodes) < min_clients:
        raise RuntimeError(
            too_few_message("evaluation", len(strategy.evaluated_nodes), min_clients, dropped)
        )
    report = RunReport(method=method, seed=seed, scenario=str(config["scenario"]))
    report.accuracy_per_client = dict(strategy.accuracy)
    if method == "ecos":
        report.epsilon_per_client = dict(strategy.epsilon_spent)
        report.delta = float(config["delta"])
    elif method in ("random", "kcenter"):
        # The selection never looks at client data; an application's charges (private kNN, DP
        # fine-tuning) are the clients' whole cost.
        report.epsilon_per_client = {
            c: strategy.epsilon_spent.get(c, 0.0) for c in strategy.accuracy
        }
        if strategy.epsilon_spent:
            report.delta = float(config["delta"])
    report.add_traffic(metered, strategy.node_to_client)
    report.phase_seconds = timer.seconds
    report.wall_s = time.time() - start
    report.extra = extra
    keys = (
        "budget",
        "num-centroids",
        "epsilon",
        "delta",
        "score-mode",
        "threshold-multiple",
        "extractor",
        "cloud-epochs",
        "model",
        "learning-rate",
        "batch-size",
        "application",
        "finetune-epsilon",
        "finetune-method",
    )
    report.settings = {key: config[key] for key in keys}
    return report


@dataclass
class SelectionContext:
    """What the step after selection may use: the run config, the federation (only its public
    pool on the server), the selected pool indices, the metered grid (an application may query
    clients, e.g. private kNN labelling), the strategy (whose `epsilon_spent` per client an
    application's charges add to), the pool features and the extractor (None for methods without
    one), and `extra`: what the application adds to the run report."""

    config: dict[str, Any]
    federation: Federation
    selected: np.ndarray
    grid: MeteredGrid
    strategy: EcosStrategy
    features: np.ndarray | None
    extractor: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def train_on_selection(context: SelectionContext) -> torch.nn.Module:
    """Label outsourcing: train the task model on the selected samples with their pool labels."""
    config, pool = context.config, context.federation.pool
    seed = int(config["seed"])
    images = pool.images
    model = build_model(
        str(config["model"]),
        context.federation.num_classes,
        images.shape[1],
        images.shape[-1],
        seed=seed,
    )
    chosen = context.selected.tolist()
    train_epochs(
        model,
        images[chosen],
        pool.labels[chosen],
        epochs=int(config["cloud-epochs"]),
        batch_size=int(config["batch-size"]),
        learning_rate=float(config["learning-rate"]),
        seed=seed,
        device=str(config["device"]),
    )
    return model


# How the cloud uses the proxy set; applications register more entries (run-config `application`).
APPLICATIONS: dict[str, Callable[[SelectionContext], torch.nn.Module]] = {
    "supervised": train_on_selection,
    **APPLICATION_FUNCTIONS,
}


def use_selection(context: SelectionContext) -> torch.nn.Module:
    """Run the configured application on the selection; returns the model clients evaluate."""
    name = str(context.config.get("application", "supervised"))
    if name not in APPLICATIONS:
        raise ValueError(f"unknown application {name!r}; choose one of {', '.join(APPLICATIONS)}")
    return APPLICATIONS[name](context)


def _client_domain_id(federation: Federation) -> int:
    names = federation.pool.domain_names
    if federation.client_domain not in names:
        raise ValueError(
            f"the pool holds no part of the clients' domain {federation.client_domain!r}"
        )
    return names.index(federation.client_domain)
