"""examples/quickstart.py, exactly as a Flower user copies it, through Flower's Ray simulation:
its ServerApp runs ECOS then DSSGD on the example's own data and writes what it found."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from flwr.simulation import run_simulation

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"

pytestmark = pytest.mark.simulation


def _load_example():
    spec = importlib.util.spec_from_file_location("quickstart", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_quickstart_app_runs_ecos_and_dssgd_in_flowers_simulation(
    tmp_path, flwr_home, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # the ServerApp writes results/quickstart.json here
    monkeypatch.syspath_prepend(str(EXAMPLE.parent))  # Ray's workers import the example too
    monkeypatch.setenv("PYTHONPATH", str(EXAMPLE.parent))
    example = _load_example()
    run_simulation(
        server_app=example.server,
        client_app=example.client,
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1}},
    )
    results = json.loads((tmp_path / "results" / "quickstart.json").read_text())
    ecos, dssgd = results["ecos"], results["dssgd"]
    assert ecos["accuracy"] > 0.3  # ten classes: chance is 0.1
    assert len(ecos["epsilon-spent"]) == 3
    assert all(0 < e <= 1.0 + 1e-9 for e in ecos["epsilon-spent"])  # one query at epsilon 1
    assert math.isfinite(dssgd["accuracy"]) and 0 <= dssgd["accuracy"] <= 1
    spent = {k: v for k, v in dssgd.items() if k.startswith("epsilon-spent/client-")}
    assert sorted(spent) == [f"epsilon-spent/client-{i}" for i in range(3)]
    assert all(v > 1.0 for v in spent.values())  # the ECOS query plus two SVT uploads each
