"""DSSGD over a real gRPC deployment on loopback: flower-superlink, two flower-supernodes,
`flwr run`; each SuperNode keeps its local model in its own state and charges its own ledger."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flower_helpers import tiny_scenario

from ecos_flower.testing.deployment import LocalDeployment, _descendants

pytestmark = pytest.mark.deployment


def test_dssgd_with_dp_runs_over_grpc_with_two_supernodes(tmp_path, app_dir):
    scenario = tiny_scenario(tmp_path, num_clients=2)
    ledgers = tmp_path / "ledgers"
    node_configs = [
        {
            "partition-id": i,
            "num-partitions": 2,
            "epsilon-limit": 100.0,
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
                "method": "dssgd",
                "model": "paper-mlp",
                "dssgd-epochs": 2,
                "dssgd-schedule": "parallel",
                "dssgd-epsilon": 9.0,
                "gamma": 0.001,
                "tau": 0.0001,
                "results-dir": str(out),
            },
            timeout=300,
        )
        started = [p.pid for p in deployment.processes]
    assert result.returncode == 0, result.stdout + result.stderr + deployment.logs()
    (record,) = json.loads((out / "results.json").read_text())
    assert record["method"] == "dssgd"
    assert sorted(record["accuracy_per_client"]) == ["0", "1"]
    extra = record["extra"]
    # Parallel: both nodes step in each of the 2 rounds (each message starts a ClientApp process,
    # so this keeps the test short; round-robin would take twice as many sequential rounds).
    assert extra["server-rounds"] == 2 and extra["uploads-accepted"] == 4
    assert sorted(extra["server-accuracy-per-client"]) == ["0", "1"]
    # Each SuperNode's local model took both of its steps: its state persisted across messages.
    assert extra["local-steps-per-client"] == {"0": 2, "1": 2}
    assert record["delta"] == 1e-5  # the nodes' ledgers state their totals at their delta
    for client in ("0", "1"):
        # Two SVT steps at epsilon 9 with the published split cost 5/9 x 9 = 5 each; the ledger
        # composes them to at most 10.
        assert 5.0 < record["epsilon_per_client"][client] <= 10.0 * (1 + 1e-9)
        assert record["extra"]["epsilon-this-run"][client] == pytest.approx(10.0)
        assert 0 < record["bytes_up_per_client"][client] < record["bytes_down_per_client"][client]
    for i in range(2):
        stored = json.loads((ledgers / f"node-{i}.json").read_text())
        assert [e["kind"] for e in stored["events"]] == ["laplace", "laplace"]
    # Every process the test started (and their children) is gone.
    for pid in started:
        assert not _descendants(pid)
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )
