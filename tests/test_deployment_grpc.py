"""Real deployment over gRPC on loopback: flower-superlink, two flower-supernodes, `flwr run`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flower_helpers import tiny_scenario

from ecos_flower.testing.deployment import LocalDeployment, _descendants

pytestmark = pytest.mark.deployment


def test_ecos_runs_over_grpc_with_two_supernodes_and_per_node_budgets(tmp_path, app_dir):
    scenario = tiny_scenario(tmp_path, num_clients=2)
    ledgers = tmp_path / "ledgers"
    node_configs = [
        {
            "partition-id": i,
            "num-partitions": 2,
            "epsilon-limit": 3.0,
            "ledger-path": str(ledgers / f"node-{i}.json"),
            "report-metrics": True,  # a deployed node sends exact test metrics only if told to
        }
        for i in range(2)
    ]
    out = tmp_path / "out"
    deployment = LocalDeployment(tmp_path / "deploy", node_configs)
    with deployment:
        result = deployment.run(
            app_dir,
            {
                "scenario": str(scenario),
                "method": "ecos",
                "extractor": "pca",
                "pca-components": 16,
                "budget": 60,
                "num-centroids": 8,
                "cloud-epochs": 2,
                "epsilon": 1.0,
                "results-dir": str(out),
            },
            timeout=400,
        )
        started = [p.pid for p in deployment.processes]
    assert result.returncode == 0, result.stdout + result.stderr + deployment.logs()
    (record,) = json.loads((out / "results.json").read_text())
    assert record["method"] == "ecos"
    assert sorted(record["accuracy_per_client"]) == ["0", "1"]
    for client in ("0", "1"):
        assert record["epsilon_per_client"][client] == pytest.approx(1.0, rel=1e-6)
        assert 0 < record["bytes_up_per_client"][client] < 2_000
    # Each SuperNode charged its own on-disk ledger, named in its node config.
    for i in range(2):
        stored = json.loads((ledgers / f"node-{i}.json").read_text())
        assert len(stored["events"]) == 1 and stored["events"][0]["kind"] == "gaussian"
    # Every process the test started (and their children) is gone.
    for pid in started:
        assert not _descendants(pid)
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )
