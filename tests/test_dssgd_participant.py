"""Participant helpers and the in-memory DSSGD driver (the Flower strategy on an in-process
grid) on a tiny synthetic task."""

from __future__ import annotations

import numpy as np
import pytest
from dssgd_helpers import tiny_data, tiny_model

from ecos_flower.dssgd.participant import (
    apply_download,
    flatten_params,
    load_flat_params,
    local_step,
)
from ecos_flower.dssgd.simulate import DSSGDConfig, simulate_centralized, simulate_standalone
from ecos_flower.dssgd.sparse import SparseUpdate
from ecos_flower.flower.dssgd_simulation import simulate_dssgd


def test_flatten_load_download():
    model = tiny_model()
    flat = flatten_params(model)
    assert flat.dtype == np.float32 and flat.size == sum(p.numel() for p in model.parameters())
    load_flat_params(model, np.zeros_like(flat))
    assert not flatten_params(model).any()
    apply_download(
        model, SparseUpdate(np.array([0, 5], np.int64), np.array([1.0, 2.0], np.float32))
    )
    out = flatten_params(model)
    assert out[0] == 1.0 and out[5] == 2.0 and np.count_nonzero(out) == 2
    with pytest.raises(ValueError):
        load_flat_params(model, np.zeros(3, np.float32))


@pytest.mark.parametrize("mode", ["largest", "threshold"])
def test_local_step_modes(mode):
    model = tiny_model()
    x, y = tiny_data(64, 0)
    before = flatten_params(model)
    upd, eps = local_step(
        model,
        x,
        y,
        batch_size=16,
        learning_rate=0.05,
        seed=0,
        theta_u=0.1,
        mode=mode,
        gamma=0.01,
        tau=0.0,
    )
    assert eps == 0.0
    assert 0 < len(upd) <= int(np.ceil(0.1 * before.size))
    assert np.all(np.abs(upd.values) <= 0.01 + 1e-7)
    assert not np.array_equal(flatten_params(model), before)  # local model keeps full training


def test_local_step_dp():
    model = tiny_model()
    x, y = tiny_data(64, 0)
    upd, eps = local_step(
        model,
        x,
        y,
        batch_size=16,
        seed=0,
        theta_u=0.1,
        gamma=1e-3,
        tau=1e-4,
        dp_epsilon=3.0,
        rng=np.random.default_rng(0),
    )
    assert eps == pytest.approx(3.0 * 5 / 9)  # the true SVT cost, eps1/2 + eps2/2
    with pytest.raises(ValueError, match="gamma"):
        local_step(model, x, y, theta_u=0.1, dp_epsilon=1.0)


@pytest.mark.parametrize("schedule", ["round-robin", "random", "parallel"])
def test_driver_runs_and_collaboration_helps(schedule):
    trains = [tiny_data(24, s) for s in range(4)]
    tests = [tiny_data(60, 100 + s) for s in range(4)]
    config = DSSGDConfig(epochs=3, schedule=schedule, theta_u=0.5, batch_size=8, seed=0)
    out = simulate_dssgd(trains, tests, tiny_model, config)
    assert len(out["participant_accuracy"]) == 4
    assert out["bytes_up"] > 0 and out["bytes_down"] > 0
    assert out["epsilon_per_participant"] == [0.0] * 4
    assert 0.0 <= out["server_accuracy"] <= 1.0
    dp = simulate_dssgd(
        trains,
        tests,
        tiny_model,
        DSSGDConfig(epochs=2, schedule=schedule, theta_u=0.1, gamma=1e-3, tau=1e-4, dp_epsilon=1.0),
    )
    assert dp["epsilon_per_participant"] == [pytest.approx(2 * 5 / 9)] * 4


def test_baselines():
    trains = [tiny_data(24, s) for s in range(3)]
    tests = [tiny_data(60, 100 + s) for s in range(3)]
    config = DSSGDConfig(epochs=2, batch_size=8)
    assert len(simulate_standalone(trains, tests, tiny_model, config)["participant_accuracy"]) == 3
    pooled = simulate_centralized(trains, tests, tiny_model, config)
    assert 0 <= pooled["mean_participant_accuracy"] <= 1
