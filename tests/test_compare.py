"""`ecos-flower compare`: the results.json schema, the table and plots, errors, reproducibility."""

from __future__ import annotations

import json
import math

import pytest
from flower_helpers import FAST, tiny_scenario

from ecos_flower.cli import main
from ecos_flower.compare import run_compare
from ecos_flower.data import ScenarioError
from ecos_flower.flower.report import RECORD_KEYS

TYPES = {
    "method": str,
    "preset": str,
    "seed": int,
    "accuracy_mean": float,
    "accuracy_per_client": dict,
    "bytes_up_per_client": dict,
    "bytes_down_per_client": dict,
    "client_compute_s": dict,
    "wall_s": float,
    "settings": dict,
}


@pytest.fixture()
def scenario(tmp_path, flwr_home):
    return tiny_scenario(tmp_path)


def test_results_schema_table_and_plots(scenario, tmp_path):
    out = tmp_path / "cmp"
    records = run_compare(
        scenario,
        ["ecos", "random", "local"],
        seeds=2,
        out=out,
        budgets=[30, 60],
        engine="in-process",
        overrides={**FAST, "local-train-epochs": 2},
    )
    stored = json.loads((out / "results.json").read_text())
    assert len(stored) == len(records) == 2 * 2 + 2 * 2 + 2  # local has no budget
    for record in stored:
        assert set(RECORD_KEYS) <= set(record)
        for key, kind in TYPES.items():
            assert isinstance(record[key], kind), (key, record[key])
        assert sorted(record["accuracy_per_client"]) == ["0", "1", "2"]
        assert all(isinstance(v, int) and v > 0 for v in record["bytes_up_per_client"].values())
        epsilon = float(record["epsilon"])  # "inf" is written as a string
        if record["method"] == "ecos":
            assert epsilon == pytest.approx(1.0) and record["delta"] == 1e-5
            assert record["budget"] in (30, 60) and 0 <= record["domain_precision"] <= 1
        elif record["method"] == "local":
            assert record["budget"] is None and epsilon == 0.0
    table = (out / "results.md").read_text()
    rows = (
        "| ecos | record-level | client | 30 | - | 2 |",
        "| ecos | record-level | client | 60 | - | 2 |",
        "| random | none (no DP) | - | 60 | - | 2 |",
        "| local | none (no DP) | - | - | - | 2 |",
    )
    for row in rows:
        assert row in table
    assert "ecos-flower compare" in table  # the command that made it
    for name in ("privacy-utility.png", "accuracy-vs-bytes.png", "accuracy-vs-budget.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_same_seed_same_selection_and_accuracy(scenario, tmp_path):
    runs = []
    for attempt in range(2):
        records = run_compare(
            scenario,
            ["ecos", "kcenter"],
            seeds=1,
            out=tmp_path / str(attempt),
            engine="in-process",
            overrides=FAST,
        )
        runs.append({r["method"]: r for r in records})
    for method in ("ecos", "kcenter"):
        first, second = runs[0][method], runs[1][method]
        assert first["extra"]["selection-sha256"] == second["extra"]["selection-sha256"]
        assert first["accuracy_per_client"] == second["accuracy_per_client"]


def test_different_seeds_select_differently(scenario, tmp_path):
    records = run_compare(
        scenario, ["random"], seeds=2, out=tmp_path, engine="in-process", overrides=FAST
    )
    assert records[0]["extra"]["selection-sha256"] != records[1]["extra"]["selection-sha256"]


def test_unknown_method_names_the_choices(scenario, tmp_path):
    with pytest.raises(ValueError, match=r"unknown method 'fedprox'; choose from .*ecos"):
        run_compare(scenario, ["ecos", "fedprox"], seeds=1, out=tmp_path, engine="in-process")
    assert not (tmp_path / "results.json").exists()  # validated before any run


def test_scenario_errors_are_clear(tmp_path, flwr_home, capsys):
    assert main(["compare", str(tmp_path / "missing.toml"), "--out", str(tmp_path)]) == 2
    assert "missing.toml" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text(tiny_scenario(tmp_path).read_text().replace("share = 0.5", "share = 2.0"))
    with pytest.raises(ScenarioError, match="share"):
        run_compare(bad, ["random"], seeds=1, out=tmp_path / "o", engine="in-process")


def test_inf_epsilon_round_trips_through_json(scenario, tmp_path):
    (record,) = run_compare(
        scenario, ["oracle"], seeds=1, out=tmp_path, engine="in-process", overrides=FAST
    )
    stored = json.loads((tmp_path / "results.json").read_text())[0]
    assert math.isinf(float(stored["epsilon"])) and record["epsilon"] == "inf"
