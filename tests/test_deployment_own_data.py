"""The deployment a data owner runs: three SuperNodes over TLS with node authentication, each
node's data in its own folder of a different size (one lacks a class), held with its policy and
ledger by the node's own worker (`ecos-flower node-worker`); the server owns only the public pool
(`pool`). ECOS and then DSSGD run end to end on the same SuperLink, while SuperNodes with an
unregistered key, with no key and without TLS try to join and are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ecos_flower.testing.deployment import (
    LocalDeployment,
    _descendants,
    generate_certificates,
    generate_supernode_key,
    wait_for_log,
)
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
        # Three SuperNodes that must not join: an unregistered key, no key, no TLS.
        stray_key, _ = generate_supernode_key(tmp_path / "stray", "stray")
        unregistered = deployment.start_supernode({}, name="unregistered", auth_key=stray_key)
        keyless = deployment.start_supernode({}, name="keyless")
        plaintext = deployment.start_supernode({}, name="plaintext", tls=False)
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
        refusals = {
            "unregistered": wait_for_log(unregistered, ["Failed to activate SuperNode"], 20.0),
            "keyless": wait_for_log(
                keyless, ["SuperNode authentication is enabled. All SuperNodes must be"], 20.0
            ),
            "plaintext": wait_for_log(plaintext, ["Connection attempt failed"], 20.0),
        }
        for process in (unregistered, keyless, plaintext):
            deployment.stop_process(process)
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
        listed = deployment.flwr("supernode", "ls", "local-grpc", "--format", "json")
        started = [p.pid for p in deployment.processes]
        worker_logs = [p.log_path.read_text() for p in deployment.workers]
    logs = deployment.logs()
    assert dssgd.returncode == 0, dssgd.stdout + dssgd.stderr + logs

    # Every intruder was refused for its own reason; only the three registered nodes are known.
    assert all(refusals.values()), (refusals, logs)
    superlink_log = (tmp_path / "deploy" / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in superlink_log
    assert "ApiError:2001" in superlink_log  # keyless self-registration disabled
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert len(json.loads(listed.stdout[listed.stdout.index("{") :])["nodes"]) == 3

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
    for client, eps in trained["epsilon_per_client"].items():
        # One SVT step at epsilon 0.9 with the published split really costs 5/9 x 0.9 = 0.5; it
        # composes with the ECOS query's 1 in the node's one lifetime ledger (at most 1.5).
        assert trained["extra"]["epsilon-this-run"][client] == pytest.approx(0.5)
        assert 1.0 < eps <= 1.5 * (1 + 1e-9)

    # Every message was answered by the node's worker (the relay only forwarded it), and each
    # worker charged its own ledger for both runs: one Gaussian query, one SVT upload.
    for text in worker_logs:
        assert "handled query.ecos" in text and "handled train.dssgd" in text
    for i in range(3):
        kinds = [e["kind"] for e in json.loads((ledgers / f"node-{i}.json").read_text())["events"]]
        assert kinds == ["gaussian", "laplace"], kinds
    for pid in started:
        assert not _descendants(pid)
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )
