"""The server run of the sampling methods: ECOS and its baselines select a proxy set from the
public pool, the cloud trains the task model on it, and every client evaluates that model.

The protocol is `ecos_flower.strategy.Ecos.start()`; this module builds the strategy from the run
config and turns its Result into the run's report. Random, K-Center and In-domain are `Ecos` with
a `selector` (they share every step after selection; only the selection skips the query) and the
oracle is `Ecos(noise=False)`. Only the public pool is read on the server (the server-owned
pool file when run-config `pool` is set); clients' shards are touched only by their ClientApps.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from ecos_flower.data import Federation, ImageSet
from ecos_flower.data.pool import server_federation
from ecos_flower.ecos import (
    InDomainSampler,
    KCenterSampler,
    RandomSampler,
    domain_precision,
)
from ecos_flower.ecos.feature_space import features_of
from ecos_flower.flower.applications import (
    APPLICATION_FUNCTIONS,
    finetune_enabled,
    finetune_record,
    public_feature_scale_of,
)
from ecos_flower.flower.payload import MeteredGrid
from ecos_flower.flower.report import RunReport
from ecos_flower.flower.selection import SelectionContext, build_extractor, task_model
from ecos_flower.flower.settings import client_config
from ecos_flower.flower.task_space import task_federation
from ecos_flower.flower.timing import PhaseTimer
from ecos_flower.models import train_epochs
from ecos_flower.strategy.ecos import Ecos, EcosResult, per_client
from ecos_flower.strategy.ecos_query import ExtractorDelivery

SAMPLING_METHODS = ("ecos", "oracle", "random", "kcenter", "in-domain")

__all__ = [
    "APPLICATIONS",
    "SAMPLING_METHODS",
    "PhaseTimer",
    "SelectionContext",
    "build_extractor",
    "run_sampling",
    "train_on_selection",
    "use_selection",
]


def run_sampling(grid: Grid, config: dict[str, Any]) -> RunReport:
    """Select `budget` pool samples with the configured method, train in the cloud, evaluate."""
    method = config["method"]
    if method not in SAMPLING_METHODS:
        raise ValueError(f"{method!r} is not a sampling method ({', '.join(SAMPLING_METHODS)})")
    start, timer = time.time(), PhaseTimer()
    seed = config["seed"]
    federation = server_federation(config)
    pool = federation.pool
    metered = MeteredGrid(grid)
    cache = Path(config["feature-cache"]) if config["feature-cache"] else None
    features, extractor = None, None
    if method in ("ecos", "oracle", "kcenter"):
        with timer("extractor"):
            extractor = build_extractor(config, federation)
        with timer("pool-features"):
            features = features_of(extractor, pool.images, cache, key="pool", progress=True)
    selector = {
        "random": lambda: RandomSampler(len(pool), seed=seed),
        "kcenter": lambda: KCenterSampler(features, seed=seed),
        "in-domain": lambda: InDomainSampler(
            pool.domains.numpy(), _client_domain_id(federation), seed=seed
        ),
    }.get(method, lambda: None)()
    delivery = ExtractorDelivery(by_name=config["extractor-shipping"] == "by-name")
    # The cloud trains the task model on the pool as that model takes it (a head: features);
    # feature maps (kNN labelling, near-selection) still read the pool's images.
    task_pool = task_federation(config, federation).pool
    cloud = _CloudStep(config, federation, task_pool, metered, features, extractor, delivery)
    strategy = Ecos(
        budget=config["budget"],
        pool=pool,
        extractor=extractor if selector is None else None,
        pool_features=features if selector is None else None,
        num_centroids=config["num-centroids"],
        epsilon=config["epsilon"],
        delta=config["delta"],
        noise=method == "ecos",
        score_mode=config["score-mode"],
        radius=config["radius"] if config["score-mode"] == "radius" else None,
        max_per_sample=config["max-per-sample"],
        threshold_multiple=config["threshold-multiple"],
        max_count_per_node=config["max-client-count"],
        selector=selector,
        fit_fn=cloud.fit,
        finetune_fn=cloud.finetune if finetune_enabled(config) else None,
        min_answers=max(config["min-clients"], 1),
        seed=seed,
        delivery=delivery,
    )
    result = strategy.start(
        metered, ArrayRecord(), timeout=config["timeout"], train_config=client_config(config)
    )
    timer.seconds.update(result.phase_seconds)
    return _report(method, config, federation, metered, result, cloud, extractor, timer, start)


class _CloudStep:
    """The run's `fit_fn` (the configured application on the selection) and `finetune_fn`
    (the `finetune` record, normalised by the selection's features under the trained model)."""

    def __init__(
        self,
        config: dict[str, Any],
        federation: Federation,
        task_pool: ImageSet,
        grid: MeteredGrid,
        features: np.ndarray | None,
        extractor: Any,
        delivery: ExtractorDelivery,
    ) -> None:
        self.config, self.federation, self.grid = config, federation, grid
        self.task_pool = task_pool
        self.features, self.extractor, self.delivery = features, extractor, delivery
        self.context: SelectionContext | None = None
        self.model: torch.nn.Module | None = None

    def fit(self, selection: np.ndarray) -> ArrayRecord:
        self.context = SelectionContext(
            self.config,
            self.federation,
            selection,
            self.grid,
            self.features,
            self.extractor,
            self.delivery,
            task_pool=self.task_pool,
        )
        self.model = use_selection(self.context)
        return ArrayRecord(self.model.state_dict())

    def finetune(self, selection: np.ndarray, arrays: ArrayRecord) -> ConfigRecord:
        images = self.task_pool.images[selection]
        scale = public_feature_scale_of(self.model, images, self.config["device"])
        return finetune_record(self.config, scale)


def _report(
    method: str,
    config: dict[str, Any],
    federation: Federation,
    metered: MeteredGrid,
    result: EcosResult,
    cloud: _CloudStep,
    extractor: Any,
    timer: PhaseTimer,
    start: float,
) -> RunReport:
    """The Result (and the application's own rounds) as the run's report."""
    pool, selected = federation.pool, result.selection
    query = result.train_metrics_clientapp[1]
    evaluation = result.evaluate_metrics_clientapp[1]
    context = cloud.context
    extra: dict[str, Any] = {"dropped": result.dropped}
    if method in ("ecos", "oracle"):
        extra.update(
            {
                "answered": int(query["answered"]),
                "rejected": [str(e) for e in result.rejected["query"]],
                "refused": {str(k): v for k, v in result.refused.items()},
                "clipped": result.clipped,
                "extractor-bytes": extractor.num_bytes(),
            }
        )
    if federation.client_domain is None:
        extra["domain-precision"] = None
        extra["domain-precision-note"] = (
            "not computed: the server owns only its pool (run-config `pool`) and does not know "
            "which pool samples are of the clients' domain"
        )
    elif federation.client_domain in pool.domain_names:
        extra["domain-precision"] = domain_precision(
            selected, pool.domains.numpy(), _client_domain_id(federation)
        )
    extra["selected"] = int(len(selected))
    extra["selection-sha256"] = hashlib.sha256(np.sort(selected).tobytes()).hexdigest()[:16]
    extra.update(context.extra)
    extra.update(result.finetune)
    # Each client's ledger total as last reported: the query, then the application's rounds
    # (private kNN), then DP fine-tuning.
    spent = per_client(query, "epsilon-spent")
    spent.update(context.epsilon_spent)
    spent.update(per_client(evaluation, "finetune-epsilon-spent", "finetune-client-ids"))
    accuracy = per_client(evaluation, "accuracy-per-client")
    report = RunReport(method=method, seed=config["seed"], scenario=config["scenario"])
    report.accuracy_per_client = accuracy
    if method == "ecos":
        report.epsilon_per_client = spent
        report.delta = config["delta"]
    elif method in ("random", "kcenter"):
        # The selection never looks at client data; an application's charges (private kNN, DP
        # fine-tuning) are the clients' whole cost.
        report.epsilon_per_client = {c: spent.get(c, 0.0) for c in accuracy}
        if spent:
            report.delta = config["delta"]
    node_to_client = dict(result.node_to_client)
    node_to_client.update(context.node_to_client)
    report.add_traffic(metered, node_to_client)
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
        "max-client-count",
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


def train_on_selection(context: SelectionContext) -> torch.nn.Module:
    """Label outsourcing: train the task model on the selected samples with their pool labels."""
    config, pool = context.config, context.training_pool
    model = task_model(context)
    chosen = context.selected.tolist()
    train_epochs(
        model,
        pool.images[chosen],
        pool.labels[chosen],
        epochs=config["cloud-epochs"],
        batch_size=config["batch-size"],
        learning_rate=config["learning-rate"],
        seed=config["seed"],
        device=config["device"],
    )
    return model


# How the cloud uses the proxy set; applications register more entries (run-config `application`).
APPLICATIONS: dict[str, Callable[[SelectionContext], torch.nn.Module]] = {
    "supervised": train_on_selection,
    **APPLICATION_FUNCTIONS,
}


def use_selection(context: SelectionContext) -> torch.nn.Module:
    """Run the configured application on the selection; returns the model clients evaluate."""
    name = context.config["application"]
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
