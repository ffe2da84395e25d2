"""Run settings (declared in ecos_flower/config.py, re-exported here); path lookup; the
clients' part of the run config; waiting for nodes."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord
from flwr.serverapp import Grid

import ecos_flower

# Every run-config key is declared once, in ecos_flower/config.py (type, default, constraint,
# help); these names are re-exported so `from ecos_flower.flower.settings import ...` keeps working.
from ecos_flower.config import (  # noqa: F401
    DEFAULT_RUN_CONFIG,
    SETTINGS,
    RunConfigError,
    Setting,
    merge_run_config,
    validate_layer,
)

PACKAGE_ROOT = Path(ecos_flower.__file__).resolve().parent.parent


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
    "num-classes",
    "class-names",
    "image-size",
    "channels",
    "model",
    "seed",
    "local-epochs",
    "batch-size",
    "learning-rate",
    "device",
    "torch-threads",
    "head-extractor",  # set by the server for a head model (`ecos_flower.flower.task_space`)
)


def client_config(config: Mapping[str, Any]) -> ConfigRecord:
    """The part of the run config every ClientApp needs, sent inside each message. Besides run
    config keys it carries what `server_app.run_method` sets from the federation, not from any
    run config: `num-classes`, `class-names` (JSON list, the pool's class names in label order)
    and the scenario's `image-size` / `channels` (a node reading its own data needs all three)."""
    # With a server-owned pool there is no scenario to point nodes at: they read their own data.
    omit = ("scenario", "data-root") if config.get("pool") else ()
    return ConfigRecord({k: config[k] for k in CLIENT_KEYS if k in config and k not in omit})


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
