"""A secure real deployment on loopback: TLS (certificates generated here) and SuperNode
authentication (registered keys). One SuperLink serves an ECOS run and then a DSSGD run (two
`flwr run` calls); meanwhile SuperNodes with an unregistered key, with no key, and without TLS
try to join and are refused."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import pytest
from flower_helpers import tiny_scenario

from ecos_flower.testing.deployment import (
    LocalDeployment,
    _descendants,
    generate_certificates,
    generate_supernode_key,
    wait_for_log,
)

pytestmark = pytest.mark.deployment


def test_generated_certificates_verify_for_loopback(tmp_path):
    certs = generate_certificates(tmp_path / "certs")
    context = ssl.create_default_context(cafile=str(certs["ca"]))
    context.load_cert_chain(certs["server-cert"], certs["server-key"])  # key matches the cert
    text = certs["server-cert"].read_text()
    assert text.startswith("-----BEGIN CERTIFICATE-----")
    for name in ("ca-key", "server-key"):
        assert certs[name].stat().st_mode & 0o077 == 0  # private keys: owner only
    private, public = generate_supernode_key(tmp_path / "keys", "node")
    assert private.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")


def test_ecos_and_dssgd_over_tls_with_supernode_auth_refusing_intruders(tmp_path, app_dir):
    scenario = tiny_scenario(tmp_path, num_clients=2)
    ledgers = tmp_path / "ledgers"
    certs = generate_certificates(tmp_path / "certs")
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
    deployment = LocalDeployment(
        tmp_path / "deploy", node_configs, certificates=certs, supernode_auth=True
    )
    intruder = {"partition-id": 0, "num-partitions": 2}
    with deployment:
        # Three SuperNodes that must not join: an unregistered key, no key, no TLS.
        stray_key, _ = generate_supernode_key(tmp_path / "stray", "stray")
        unregistered = deployment.start_supernode(intruder, name="unregistered", auth_key=stray_key)
        keyless = deployment.start_supernode(intruder, name="keyless")
        plaintext = deployment.start_supernode(intruder, name="plaintext", tls=False)

        ecos = deployment.run(
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
                "results-dir": str(tmp_path / "ecos"),
            },
            timeout=300,
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

        dssgd = deployment.run(
            app_dir,
            {
                "scenario": str(scenario),
                "method": "dssgd",
                "model": "paper-mlp",
                "dssgd-epochs": 1,
                "dssgd-schedule": "parallel",
                "dssgd-epsilon": 0.9,
                "gamma": 0.001,
                "tau": 0.0001,
                "results-dir": str(tmp_path / "dssgd"),
            },
            timeout=300,
        )
        nodes = deployment.flwr("supernode", "ls", "local-grpc", "--format", "json")
        started = [p.pid for p in deployment.processes]
    logs = deployment.logs()
    assert dssgd.returncode == 0, dssgd.stdout + dssgd.stderr + logs

    # Every intruder was refused for its own reason.
    assert all(refusals.values()), (refusals, logs)
    superlink_log = (tmp_path / "deploy" / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in superlink_log
    assert "ApiError:2001" in superlink_log  # keyless self-registration disabled

    # Only the two registered SuperNodes are known to the SuperLink, and both took part.
    assert nodes.returncode == 0, nodes.stdout + nodes.stderr
    listed = json.loads(nodes.stdout[nodes.stdout.index("{") :])
    assert len(listed["nodes"]) == 2, listed

    (ecos_record,) = json.loads((tmp_path / "ecos" / "results.json").read_text())
    assert sorted(ecos_record["accuracy_per_client"]) == ["0", "1"]
    assert ecos_record["extra"]["answered"] == 2
    for client in ("0", "1"):
        assert ecos_record["epsilon_per_client"][client] == pytest.approx(1.0, rel=1e-6)

    (dssgd_record,) = json.loads((tmp_path / "dssgd" / "results.json").read_text())
    assert sorted(dssgd_record["accuracy_per_client"]) == ["0", "1"]
    assert dssgd_record["extra"]["uploads-accepted"] == 2
    for client in ("0", "1"):
        # One SVT step at epsilon 0.9 with the published split really costs 5/9 x 0.9 = 0.5; it
        # composes with the ECOS query's 1 in the node's one lifetime ledger (at most 1.5).
        assert dssgd_record["extra"]["epsilon-this-run"][client] == pytest.approx(0.5)
        assert 1.0 < dssgd_record["epsilon_per_client"][client] <= 1.5 * (1 + 1e-9)

    for i in range(2):  # one ledger per node: the ECOS query (Gaussian), the SVT upload (Laplace)
        stored = json.loads((ledgers / f"node-{i}.json").read_text())
        assert [e["kind"] for e in stored["events"]] == ["gaussian", "laplace"]

    for pid in started:
        assert not _descendants(pid)
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )
