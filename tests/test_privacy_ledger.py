"""The client's privacy ledger: RDP accounting via Opacus, refusal at the limit, persistence."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from ecos_flower.privacy import (
    BudgetExceededError,
    LedgerCorruptError,
    PrivacyLedger,
    analytic_gaussian_epsilon,
    analytic_gaussian_sigma,
)


@pytest.mark.parametrize("z", [0.8, 2.0, 3.73, 10.0])
def test_opacus_rdp_matches_closed_form(z: float) -> None:
    orders = [1.5, 2.0, 4.0, 16.0, 64.0]
    rdp = compute_rdp(q=1.0, noise_multiplier=z, steps=1, orders=orders)
    assert np.allclose(rdp, [a / (2 * z * z) for a in orders], rtol=1e-12)


def test_single_release_epsilon_matches_rdp_conversion() -> None:
    z, delta = 3.0, 1e-5
    ledger = PrivacyLedger(100.0, delta)
    ledger.charge(z)
    orders = np.array(ledger.orders)
    expected, _ = get_privacy_spent(orders=orders, rdp=orders / (2 * z * z), delta=delta)
    assert ledger.epsilon_spent() == pytest.approx(expected, rel=1e-12)
    # RDP is valid but looser than the exact analytic epsilon of one Gaussian release.
    assert ledger.epsilon_spent() >= analytic_gaussian_epsilon(z, delta)
    assert ledger.epsilon_spent() <= 1.3 * analytic_gaussian_epsilon(z, delta)


def test_composition_grows_and_k_releases_equal_one_with_scaled_noise() -> None:
    ledger = PrivacyLedger(1e6, 1e-5)
    spent = [ledger.epsilon_spent()]
    for _ in range(6):
        ledger.charge(4.0)
        spent.append(ledger.epsilon_spent())
    assert spent[0] == 0.0
    assert all(b > a for a, b in zip(spent, spent[1:], strict=False))
    # k Gaussian releases with multiplier z compose like one with z / sqrt(k) (RDP is additive).
    single = PrivacyLedger(1e6, 1e-5)
    single.charge(4.0 / np.sqrt(6))
    assert spent[-1] == pytest.approx(single.epsilon_spent(), rel=1e-9)
    # Sub-linear growth: far better than 6 x the first release.
    assert spent[-1] < 6 * spent[1]


def test_gdp_accountant_is_exact_and_tighter() -> None:
    z = analytic_gaussian_sigma(1.0, 1e-5)
    gdp = PrivacyLedger(10.0, 1e-5, accountant="gdp")
    rdp = PrivacyLedger(10.0, 1e-5)
    assert gdp.charge(z) == pytest.approx(1.0, rel=1e-9)
    rdp.charge(z)
    assert rdp.epsilon_spent() > 1.0
    for _ in range(3):
        gdp.charge(z)
        rdp.charge(z)
    # 4 releases at multiplier z == one at z/2, exactly.
    assert gdp.epsilon_spent() == pytest.approx(analytic_gaussian_epsilon(z / 2, 1e-5), rel=1e-9)
    assert gdp.epsilon_spent() < rdp.epsilon_spent()
    with pytest.raises(ValueError):
        PrivacyLedger(1.0, 1e-5, accountant="moments")


def test_epsilon_if_does_not_record() -> None:
    ledger = PrivacyLedger(5.0, 1e-5)
    projected = ledger.epsilon_if(3.0)
    assert ledger.epsilon_spent() == 0.0 and not ledger.releases
    assert ledger.charge(3.0, note="q1") == pytest.approx(projected)
    assert ledger.releases[0].note == "q1"


def test_refuses_at_limit_and_records_nothing() -> None:
    ledger = PrivacyLedger(2.0, 1e-5)
    z = 4.0
    count = 0
    while ledger.can_afford(z):
        ledger.charge(z)
        count += 1
        assert count < 100
    spent = ledger.epsilon_spent()
    assert count >= 1 and spent <= 2.0
    with pytest.raises(BudgetExceededError) as info:
        ledger.charge(z)
    message = str(info.value)
    assert "limit epsilon=2" in message and "spent" in message and "requested" in message
    assert ledger.epsilon_spent() == spent and len(ledger.releases) == count
    assert ledger.remaining() == pytest.approx(2.0 - spent)
    with pytest.raises(ValueError):
        ledger.charge(0.0)
    with pytest.raises(ValueError):
        ledger.charge(float("nan"))


def test_persistence_across_restart(tmp_path) -> None:
    path = tmp_path / "client-3" / "ledger.json"
    ledger = PrivacyLedger(3.0, 1e-5, path)
    assert path.is_file()
    ledger.charge(2.5, note="round 1")
    ledger.charge(2.5, note="round 2")
    spent = ledger.epsilon_spent()
    del ledger

    # A constructor on an existing file refuses instead of silently starting from zero.
    with pytest.raises(FileExistsError):
        PrivacyLedger(3.0, 1e-5, path)
    restored = PrivacyLedger.load(path, 3.0, 1e-5)
    assert restored.epsilon_spent() == pytest.approx(spent)
    assert [r.note for r in restored.releases] == ["round 1", "round 2"]
    restored.charge(5.0)
    again = PrivacyLedger.open_or_create(path, 3.0, 1e-5)
    assert len(again.releases) == 3
    assert again.epsilon_spent() == pytest.approx(restored.epsilon_spent())
    data = json.loads(path.read_text())
    assert data["format_version"] == 1 and len(data["releases"]) == 3

    fresh = PrivacyLedger.open_or_create(tmp_path / "new.json", 3.0, 1e-5)
    assert fresh.epsilon_spent() == 0.0 and (tmp_path / "new.json").is_file()
    with pytest.raises(FileNotFoundError):
        PrivacyLedger.load(tmp_path / "missing.json", 3.0, 1e-5)


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "",
        "[]",
        json.dumps({"format_version": 99, "releases": []}),
        json.dumps({"format_version": 1}),
        json.dumps({"format_version": 1, "releases": [{"noise_multiplier": -1}]}),
        json.dumps({"format_version": 1, "releases": [{"note": "x"}]}),
    ],
)
def test_corrupt_file_is_an_error_not_a_reset(tmp_path, content: str) -> None:
    path = tmp_path / "ledger.json"
    path.write_text(content)
    with pytest.raises(LedgerCorruptError, match="refusing to reset"):
        PrivacyLedger.load(path, 3.0, 1e-5)
    with pytest.raises(LedgerCorruptError):
        PrivacyLedger.open_or_create(path, 3.0, 1e-5)
    assert path.read_text() == content  # untouched


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(10.0, 1e-5, path)
    ledger.charge(3.0)
    before = path.read_text()

    def crash(*args, **kwargs):
        raise OSError("simulated crash during rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        ledger.charge(3.0)
    monkeypatch.undo()
    # The old file is intact, no temporary file is left, and the failed charge was not recorded.
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json"]
    assert len(ledger.releases) == 1
    assert len(PrivacyLedger.load(path, 10.0, 1e-5).releases) == 1


def test_invalid_settings() -> None:
    with pytest.raises(ValueError):
        PrivacyLedger(0.0, 1e-5)
    with pytest.raises(ValueError):
        PrivacyLedger(1.0, 0.0)
    with pytest.raises(ValueError):
        PrivacyLedger(1.0, 1e-5, orders=[0.5, 2.0])
