"""Run settings: `[tool.flwr.app.config]` defaults merged with a run's overrides; path lookup."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord
from flwr.serverapp import Grid

import ecos_flower

# Kept in code as well as in pyproject.toml so an installed wheel (no pyproject at hand) has them;
# a test checks that both agree.
DEFAULT_RUN_CONFIG: dict[str, Any] = {
    "scenario": "simulations/embedded.toml",
    "data-root": "",
    "method": "ecos",
    "seed": 0,
    "model": "small-cnn",
    "num-server-rounds": 3,
    "local-epochs": 1,
    "batch-size": 32,
    "learning-rate": 0.05,
    "fraction-train": 1.0,
    "device": "cpu",
    "torch-threads": 1,
    "results-dir": "",
    # Seconds to wait for the scenario's number of nodes to connect (deployment) before starting
    # with those that did; the clients' data is then split into that many shards.
    "node-wait": 30.0,
    # Fewest clients whose results a round needs: rounds go on without clients that crash, time
    # out or disconnect (the report's extra["dropped"] names them) while at least this many answer.
    "min-clients": 1,
    # Sampling methods (ecos, oracle, random, kcenter, in-domain)
    "budget": 500,
    "num-centroids": 50,
    "epsilon": 1.0,
    "delta": 1e-5,
    "score-mode": "nearest",
    "radius": 0.0,
    "max-per-sample": 1,
    "threshold-multiple": 2.0,
    "extractor": "random",
    "extractor-epochs": 5,
    "pca-components": 64,
    "cloud-epochs": 30,
    "application": "supervised",
    # Applications (see strategies/*-semi, *-distill, *-knn, ecos-finetune, dp-linear-probe).
    # semi-supervised: pseudo-labelling rounds, confidence threshold, epochs per round, and how
    # many unlabelled pool samples to draw (0: all).
    "semi-rounds": 2,
    "semi-threshold": 0.95,
    "semi-epochs": 3,
    "semi-max-unlabelled": 4000,
    # Which unlabelled samples: pool (a random draw) | near-selection (closest to the selection).
    "semi-unlabelled": "pool",
    # distill (and dp-linear-probe's backbone): the model trained on the whole labelled pool, its
    # epochs, and the distillation temperature.
    "teacher-model": "wide-cnn",
    "teacher-epochs": 3,
    "distill-temperature": 4.0,
    # private-knn: neighbours (knn-k, or knn-k-per-query > 0: that fraction of the queried
    # samples), vote mode (query: sensitivity sqrt(2n); capped: sqrt(k)), epsilon of the vote
    # release per client, and the kept-sample threshold in aggregate-noise stds.
    "knn-k": 30,
    "knn-k-per-query": 0.0,
    "knn-mode": "capped",
    "knn-epsilon": 1.0,
    "knn-threshold": 2.0,
    # Feature map the clients label in: run (the run's extractor, ECOS's phi) | supervised |
    # random | pca (a map of its own, fitted on the public pool and shipped with the query).
    "knn-extractor": "run",
    # DP last-layer fine-tuning on the clients before evaluation (> 0: on, at this epsilon):
    # method dp-sgd | dp-least-squares | dp-fc; full-batch steps (dp-sgd, dp-fc), clipping
    # norm, learning rate, head init zero | received (dp-sgd, dp-fc); dp-least-squares' ridge in
    # multiples of the noise's sigma sqrt(d); dp-fc's share of the budget for the covariance and
    # the floor on its eigenvalues.
    "finetune-epsilon": 0.0,
    "finetune-method": "dp-sgd",
    "finetune-steps": 100,
    "finetune-clip": 1.0,
    "finetune-lr": 1.0,
    "finetune-init": "zero",
    "finetune-ridge": 1.0,
    "finetune-covariance-share": 0.3,
    "finetune-floor": 0.01,
    "finetune-normaliser": 100.0,
    "feature-cache": "",
    "timeout": 3600.0,
    # DSSGD: local epochs per participant (server rounds are derived), schedule, up/download
    # fractions, upload selection and clipping (gamma 0: none), SVT privacy per participant per
    # epoch (dssgd-epsilon 0: no DP), and the stat decay (every 0: never).
    "dssgd-epochs": 20,
    "dssgd-schedule": "round-robin",
    "theta-u": 0.1,
    "theta-d": 1.0,
    "upload-mode": "largest",
    "gamma": 0.0,
    "tau": 0.0,
    "dssgd-epsilon": 0.0,
    "svt-split": "published",
    "stat-beta": 1.0,
    "stat-decay-every": 0,
    "evaluate-every": 0,
    # Reference points: local training epochs (method local), and DP-FedAvg's Gaussian noise
    # multiplier and client-side clipping norm (method dp-fedavg); a target epsilon > 0 for the
    # whole run calibrates the noise multiplier instead.
    "local-train-epochs": 30,
    "dp-noise-multiplier": 1.0,
    "dp-clipping-norm": 1.0,
    "dp-target-epsilon": 0.0,
}

PACKAGE_ROOT = Path(ecos_flower.__file__).resolve().parent.parent


def merge_run_config(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults, then each layer in order; unknown keys pass through (methods add their own)."""
    merged = dict(DEFAULT_RUN_CONFIG)
    for layer in layers:
        merged.update(layer)
    return merged


def resolve_path(value: str | Path, what: str = "scenario") -> Path:
    """Find a file named in a run config: absolute, or relative to the working directory or the
    project root (where `flwr run .` installs the app). FileNotFoundError names the tries."""
    path = Path(value).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, PACKAGE_ROOT / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"{what} file {str(value)!r} not found (looked at: {tried})")


CLIENT_KEYS = (
    "scenario",
    "data-root",
    "num-clients",
    "model",
    "seed",
    "local-epochs",
    "batch-size",
    "learning-rate",
    "device",
    "torch-threads",
)


def client_config(config: Mapping[str, Any]) -> ConfigRecord:
    """The part of the run config every ClientApp needs, sent inside each message."""
    return ConfigRecord({key: config[key] for key in CLIENT_KEYS if key in config})


def wait_for_nodes(grid: Grid, expected: int, timeout: float, settle: float = 3.0) -> list[int]:
    """Node ids once `expected` nodes are connected, or once some are and their number has not
    changed for `settle` seconds, or at `timeout`. Raises if no node connected at all."""
    deadline = time.monotonic() + timeout
    last_count, last_change = -1, time.monotonic()
    while True:
        nodes = sorted(grid.get_node_ids())
        now = time.monotonic()
        if len(nodes) != last_count:
            last_count, last_change = len(nodes), now
        if len(nodes) >= expected or (nodes and now - last_change >= settle) or now >= deadline:
            break
        time.sleep(0.2)
    if not nodes:
        raise RuntimeError(f"no node connected within {timeout:.0f} s")
    return nodes
