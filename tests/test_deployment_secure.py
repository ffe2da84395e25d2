"""The certificates and keys of a secure deployment (TLS with a private CA, SuperNode keys). The
secure deployment itself, with intruders refused, runs in tests/test_deployment_own_data.py."""

from __future__ import annotations

import ssl

import pytest

from ecos_flower.testing.deployment import (
    generate_certificates,
    generate_supernode_key,
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
