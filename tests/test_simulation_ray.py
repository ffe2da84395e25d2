"""The default app through Flower's real simulation engine (Ray), as `ecos-flower run` runs it."""

from __future__ import annotations

import json

import pytest
from flower_helpers import FAST, tiny_scenario

from ecos_flower.cli import main

pytestmark = pytest.mark.simulation


def test_ecos_through_ray_simulation_writes_a_full_report(tmp_path, flwr_home, capsys):
    scenario = tiny_scenario(tmp_path, num_clients=3)
    out = tmp_path / "out"
    args = ["run", "--scenario", str(scenario), "--out", str(out), "--set", 'method="ecos"']
    for key, value in FAST.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "ecos: mean accuracy" in printed
    (record,) = json.loads((out / "results.json").read_text())
    assert sorted(record["accuracy_per_client"]) == ["0", "1", "2"]
    assert all(v == pytest.approx(1.0) for v in record["epsilon_per_client"].values())
    assert all(0 < v < 2_000 for v in record["bytes_up_per_client"].values())
    assert record["extra"]["answered"] == 3


def test_dssgd_through_ray_simulation_keeps_local_models_across_rounds(tmp_path, flwr_home):
    scenario = tiny_scenario(tmp_path, num_clients=2)
    out = tmp_path / "out"
    args = [
        "run",
        "--scenario",
        str(scenario),
        "--out",
        str(out),
        "--preset",
        "strategies/dssgd.toml",
        "--set",
        "dssgd-epochs=2",
        "--set",
        "theta-u=0.1",
    ]
    assert main(args) == 0
    (record,) = json.loads((out / "results.json").read_text())
    assert record["method"] == "dssgd"
    assert sorted(record["accuracy_per_client"]) == ["0", "1"]
    # Round-robin, 2 epochs each: every participant made 2 local steps, kept in its node state.
    assert record["extra"]["local-steps-per-client"] == {"0": 2, "1": 2}
    model_bytes = 4 * record["extra"]["num-params"]
    for client in ("0", "1"):
        # Two sparse uploads of 10 % of the parameters (indices + values), far below the model.
        assert record["bytes_up_per_client"][client] < model_bytes
