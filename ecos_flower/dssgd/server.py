"""DSSGD parameter server: global parameters, per-parameter update counts, top-theta_d download."""

from __future__ import annotations

from typing import Any

import numpy as np

from ecos_flower.dssgd.sparse import SparseUpdate, validate_sparse_update


def fraction_count(fraction: float, size: int) -> int:
    """ceil(fraction * size), at least 1 when fraction > 0, at most `size`.

    Shared by the upload (theta_u) and the download (theta_d) counts.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if fraction == 0.0 or size == 0:
        return 0
    # The small tolerance keeps e.g. 0.1 * 100 (= 10.000000000000002) from rounding up to 11.
    return int(min(size, max(1, np.ceil(fraction * size - 1e-9))))


class ParameterServer:
    """Global parameters w_g and counters stat_j (how often parameter j was updated).

    `apply` adds an uploaded sparse update; `download(theta_d)` returns the theta_d fraction of
    parameters with the largest counters (ties broken by smaller index, so it is deterministic).
    With `beta` and `decay_every > 0`, the counters are multiplied by beta after every
    `decay_every` applied updates so that recent updates count more.
    """

    def __init__(
        self, initial: np.ndarray, beta: float | None = None, decay_every: int = 0
    ) -> None:
        initial = np.asarray(initial)
        if initial.ndim != 1:
            raise ValueError(f"initial parameters must be a flat vector, got shape {initial.shape}")
        if beta is not None and not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        if decay_every < 0:
            raise ValueError(f"decay_every must be >= 0, got {decay_every}")
        self.params = initial.astype(np.float32, copy=True)
        self.stat = np.zeros(initial.shape[0], dtype=np.float64)
        self.beta = beta
        self.decay_every = decay_every
        self.num_applied = 0

    @property
    def num_params(self) -> int:
        return int(self.params.shape[0])

    def apply(self, update: SparseUpdate) -> None:
        """w_g[j] += value and stat_j += 1 per entry; the update is validated before any change."""
        checked = validate_sparse_update(update.indices, update.values, self.num_params)
        self.params[checked.indices] += checked.values
        self.stat[checked.indices] += 1.0
        self.num_applied += 1
        decays = self.beta is not None and self.decay_every > 0
        if decays and self.num_applied % self.decay_every == 0:
            self.stat *= self.beta

    def download(self, theta_d: float = 1.0) -> SparseUpdate:
        """The theta_d fraction of parameters of largest stat (values: w_g), sorted by index."""
        count = fraction_count(theta_d, self.num_params)
        if count >= self.num_params:
            idx = np.arange(self.num_params, dtype=np.int64)
        else:
            # Largest stat first, then smaller index: lexsort sorts by the last key first.
            order = np.lexsort((np.arange(self.num_params), -self.stat))
            idx = np.sort(order[:count]).astype(np.int64)
        return SparseUpdate(idx, self.params[idx].copy())

    def state_dict(self) -> dict[str, Any]:
        """What resuming needs: copies of params and stat, beta, decay_every, num_applied."""
        return {
            "params": self.params.copy(),
            "stat": self.stat.copy(),
            "beta": self.beta,
            "decay_every": self.decay_every,
            "num_applied": self.num_applied,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ParameterServer:
        """Rebuild a server from `state_dict()` output."""
        server = cls(np.asarray(state["params"]), state["beta"], int(state["decay_every"]))
        stat = np.asarray(state["stat"], dtype=np.float64)
        if stat.shape != server.stat.shape:
            raise ValueError(f"stat shape {stat.shape} does not match params {server.stat.shape}")
        server.stat = stat.copy()
        server.num_applied = int(state["num_applied"])
        return server
