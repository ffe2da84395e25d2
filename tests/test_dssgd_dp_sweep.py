"""The pure parts of simulations/dssgd_dp_sweep.py: the grid, the per-point summary, the choice of
the best point, and the validation copy of a scenario (no run of Flower here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ecos_flower.data import load_federation, load_scenario

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "simulations" / "dssgd_dp_sweep.py"
spec = importlib.util.spec_from_file_location("dssgd_dp_sweep", SCRIPT)
assert spec is not None and spec.loader is not None
sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep)


def test_grid_is_the_union_of_its_sub_grids_without_repeats() -> None:
    grid = (
        {"a": (1, 2), "b": (10, 20)},
        {"a": (2, 3), "b": (20,)},  # (a=2, b=20) is in both sub-grids
    )
    points = sweep.grid_points(grid)
    assert points == [
        {"a": 1, "b": 10},
        {"a": 1, "b": 20},
        {"a": 2, "b": 10},
        {"a": 2, "b": 20},
        {"a": 3, "b": 20},
    ]


def test_the_committed_grid_is_small_and_uses_declared_settings() -> None:
    from ecos_flower.compare import plan_runs

    points = sweep.grid_points(sweep.GRID)
    assert 1 < len(points) <= 40  # the brief: at most about 40 points
    assert len({tuple(sorted(p.items())) for p in points}) == len(points)
    # Every point is a valid run config of the preset at the sweep's epsilon (merge validates).
    for point in points:
        (run,) = plan_runs(sweep.TUNING, [sweep.PRESET], 1, epsilons=[1.0], overrides=point)
        assert run.config["dssgd-epochs"] == point["dssgd-epochs"]
        # epsilon 1 in total: dssgd-epochs uploads at the corrected split's 1/2 per unit
        assert run.config["dssgd-epsilon"] * point["dssgd-epochs"] * 0.5 == pytest.approx(1.0)


def _record(point: dict, seed: int, accuracy: float) -> dict:
    return {"point": point, "seed": seed, "accuracy_mean": accuracy}


def test_summary_groups_seeds_by_point_and_skips_points_without_runs() -> None:
    a, b, c = {"x": 1}, {"x": 2}, {"x": 3}
    records = [_record(a, 0, 0.2), _record(b, 0, 0.5), _record(a, 1, 0.4), _record(b, 1, 0.7)]
    summary = sweep.summarise(records, [a, b, c])
    assert [s["point"] for s in summary] == [a, b]
    assert summary[0]["accuracies"] == [0.2, 0.4]
    assert summary[0]["mean"] == pytest.approx(0.3)
    assert summary[1]["std"] == pytest.approx(0.1414213, rel=1e-5)  # sample std (ddof 1)


def test_choice_is_the_best_mean_then_the_smaller_spread_then_the_earlier_point() -> None:
    a, b, c = {"x": 1}, {"x": 2}, {"x": 3}
    records = [
        _record(a, 0, 0.30),
        _record(a, 1, 0.50),  # mean 0.4, spread
        _record(b, 0, 0.40),
        _record(b, 1, 0.40),  # mean 0.4, no spread: wins the tie
        _record(c, 0, 0.60),
        _record(c, 1, 0.10),  # best single seed, worse mean
    ]
    assert sweep.choose(sweep.summarise(records, [a, b, c])) == b
    assert sweep.choose(sweep.summarise(records[:2] + records[4:], [a, c])) == a
    with pytest.raises(ValueError, match="no grid point"):
        sweep.choose([])


@given(
    st.lists(
        st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=3),
        min_size=1,
        max_size=12,
    )
)
def test_chosen_point_has_the_highest_mean(accuracies: list[list[float]]) -> None:
    points = [{"x": i} for i in range(len(accuracies))]
    records = [
        _record(point, seed, value)
        for point, values in zip(points, accuracies, strict=True)
        for seed, value in enumerate(values)
    ]
    summary = sweep.summarise(records, points)
    chosen = sweep.choose(summary)
    best = max(s["mean"] for s in summary)
    assert next(s["mean"] for s in summary if s["point"] == chosen) == best
    ranking = sweep.ranked(summary)
    assert [s["mean"] for s in ranking] == sorted((s["mean"] for s in summary), reverse=True)


def test_validation_copy_holds_out_part_of_train_and_never_the_test_split(
    tmp_path: Path,
) -> None:
    original = tmp_path / "embedded.toml"
    original.write_text((ROOT / "simulations" / "embedded.toml").read_text())
    copy = sweep.validation_copy(original, 0.2)
    assert copy.parent == original.parent and copy.name.startswith(".validation-embedded-")
    assert load_scenario(copy).validation_fraction == pytest.approx(0.2)
    real, tuned = load_federation(original), load_federation(copy)
    for shard, held in zip(real.clients, tuned.clients, strict=True):
        # The validation split and the tuning train split together are the real train split:
        # nothing of the real test split is seen while tuning.
        assert len(held.train) + len(held.test) == len(shard.train)
        assert 0 < len(held.test) < len(shard.train)
    with pytest.raises(ValueError, match="already sets validation-fraction"):
        sweep.validation_copy(copy, 0.2)
