"""Participant helpers and the in-memory DSSGD driver (the Flower strategy on an in-process
grid) on a tiny synthetic task."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ecos_flower.dssgd.participant import (
    apply_download,
    flatten_params,
    load_flat_params,
    local_step,
)
from ecos_flower.dssgd.simulate import DSSGDConfig, simulate_centralized, simulate_standalone
from ecos_flower.dssgd.sparse import SparseUpdate
from ecos_flower.flower.dssgd_simulation import simulate_dssgd
from ecos_flower.models.nets import PaperMLP


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return PaperMLP(3, 1, 4)


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 1, 4, 4, generator=g) * 0.3 + y.view(-1, 1, 1, 1).float()
    return x, y


def test_flatten_load_download():
    model = _model()
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
    model = _model()
    x, y = _data(64, 0)
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
    model = _model()
    x, y = _data(64, 0)
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
    trains = [_data(24, s) for s in range(4)]
    tests = [_data(60, 100 + s) for s in range(4)]
    config = DSSGDConfig(epochs=3, schedule=schedule, theta_u=0.5, batch_size=8, seed=0)
    out = simulate_dssgd(trains, tests, _model, config)
    assert len(out["participant_accuracy"]) == 4
    assert out["bytes_up"] > 0 and out["bytes_down"] > 0
    assert out["epsilon_per_participant"] == [0.0] * 4
    assert 0.0 <= out["server_accuracy"] <= 1.0
    dp = simulate_dssgd(
        trains,
        tests,
        _model,
        DSSGDConfig(epochs=2, schedule=schedule, theta_u=0.1, gamma=1e-3, tau=1e-4, dp_epsilon=1.0),
    )
    assert dp["epsilon_per_participant"] == [pytest.approx(2 * 5 / 9)] * 4


def test_baselines():
    trains = [_data(24, s) for s in range(3)]
    tests = [_data(60, 100 + s) for s in range(3)]
    config = DSSGDConfig(epochs=2, batch_size=8)
    assert len(simulate_standalone(trains, tests, _model, config)["participant_accuracy"]) == 3
    pooled = simulate_centralized(trains, tests, _model, config)
    assert 0 <= pooled["mean_participant_accuracy"] <= 1
