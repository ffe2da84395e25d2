"""The deployment a data owner runs: three SuperNodes over TLS with node authentication, each
node's data in its own folder of a different size (one lacks a class), held with its policy and
ledger by the node's own worker (`ecos-flower node-worker`); the server owns only the public pool
(`pool`). ECOS and then DSSGD run end to end on the same SuperLink."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ecos_flower.testing.deployment import LocalDeployment, _descendants, generate_certificates
from ecos_flower.testing.scenarios import write_tiny_deployment

pytestmark = pytest.mark.deployment

KEEP = (1.0, 0.6, 0.3)  # each node keeps this share of every class folder
MISSING = "3"  # node 2 has no images of this class


def shrink(folder: Path, share: float) -> int:
    """Keep the first `share` of the images in each class folder; returns the images kept."""
    kept = 0
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(class_dir.glob("*.png"))
        keep = max(1, round(share * len(files)))
        for extra in files[keep:]:
            extra.unlink()
        kept += keep
    return kept


def test_three_own_folders_over_tls_with_workers_run_ecos_and_dssgd(tmp_path, app_dir):
    pool, nodes = write_tiny_deployment(tmp_path / "data", 3)
    sizes = [shrink(folder, share) for folder, share in zip(nodes, KEEP, strict=True)]
    sizes[2] -= len(list((nodes[2] / MISSING).glob("*.png")))
    shutil.rmtree(nodes[2] / MISSING)
    assert len(set(sizes)) == 3
    ledgers = tmp_path / "ledgers"
    workers = [
        {
            "data": str(folder),
            "split-seed": 10 + i,
            "ledger-path": str(ledgers / f"node-{i}.json"),
            "epsilon-limit": 3.0,
            "report-metrics": True,  # the operator opts in to exact test metrics
        }
        for i, folder in enumerate(nodes)
    ]
    certs = generate_certificates(tmp_path / "certs")
    deployment = LocalDeployment(
        tmp_path / "deploy",
        [{} for _ in nodes],  # the SuperNodes know only their worker's socket
        certificates=certs,
        supernode_auth=True,
        workers=workers,
    )
    common = {"pool": str(pool)}
    with deployment:
        ecos = deployment.run(
            app_dir,
            {
                **common,
                "method": "ecos",
                "extractor": "pca",
                "pca-components": 16,
                "budget": 150,
                "num-centroids": 8,
                "cloud-epochs": 20,
                "epsilon": 1.0,
                "results-dir": str(tmp_path / "ecos"),
            },
            timeout=600,
        )
        assert ecos.returncode == 0, ecos.stdout + ecos.stderr + deployment.logs()
        assert (tmp_path / "ecos" / "results.json").is_file(), ecos.stdout + deployment.logs()
        dssgd = deployment.run(
            app_dir,
            {
                **common,
                "method": "dssgd",
                "model": "paper-mlp",
                "dssgd-epochs": 1,
                "dssgd-schedule": "parallel",
                "dssgd-epsilon": 0.9,
                "gamma": 0.001,
                "tau": 0.0001,
                "results-dir": str(tmp_path / "dssgd"),
            },
            timeout=600,
        )
        started = [p.pid for p in deployment.processes]
        worker_logs = [p.log_path.read_text() for p in deployment.workers]
    logs = deployment.logs()
    assert dssgd.returncode == 0, dssgd.stdout + dssgd.stderr + logs

    (record,) = json.loads((tmp_path / "ecos" / "results.json").read_text())
    assert len(record["accuracy_per_client"]) == 3
    # 10 classes (chance 0.1); each node evaluates on the test part it split off itself
    assert record["accuracy_mean"] > 0.4, record["accuracy_per_client"]
    # the server cannot know which pool samples are client-like: simulation only
    assert record["extra"].get("domain-precision") is None
    assert "domain-precision-note" in record["extra"]
    assert set(record["accuracy_per_client"]) == set(record["epsilon_per_client"])
    results = tmp_path / "dssgd" / "results.json"
    assert results.is_file(), dssgd.stdout + logs  # flwr run exits 0 even when the run failed
    (trained,) = json.loads(results.read_text())
    assert len(trained["accuracy_per_client"]) == 3
    # Every node's upload was taken (a deployed node's 64-bit id once overflowed its seed, and
    # every step was refused after its charge) and each node states what its ledger spent.
    assert trained["extra"]["uploads-accepted"] == 3, trained["extra"]
    assert all(eps > 1.0 for eps in trained["epsilon_per_client"].values())  # ECOS 1 + SVT

    # Every message was answered by the node's worker (the relay only forwarded it), and each
    # worker charged its own ledger for both runs: one Gaussian query, one SVT upload.
    for text in worker_logs:
        assert "handled query.ecos" in text and "handled train.dssgd" in text
    for i in range(3):
        kinds = [e["kind"] for e in json.loads((ledgers / f"node-{i}.json").read_text())["events"]]
        assert kinds[0] == "gaussian" and "laplace" in kinds[1:], kinds
    for pid in started:
        assert not _descendants(pid)
