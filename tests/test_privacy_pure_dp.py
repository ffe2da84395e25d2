"""Pure epsilon-DP (Laplace / sparse-vector) releases in the node's one ledger: composition no
worse than the sum of epsilons, refusal at the limit, one budget shared with every other mechanism,
and durable persistence (ported from the former PureDPLedger tests)."""

from __future__ import annotations

import json
import math

import pytest

from ecos_flower.privacy import (
    BudgetExceededError,
    LedgerCorruptError,
    NodeLedger,
    PrivacyEvent,
    analytic_gaussian_sigma,
)
from ecos_flower.privacy import ledger as ledger_module

# A tiny delta makes the PLD bound for a few Laplace releases essentially their sum.
DELTA = 1e-12


def test_compose_and_refuse() -> None:
    ledger = NodeLedger(None, 1.0, DELTA)
    ledger.charge(PrivacyEvent.laplace(0.25, "a"))
    ledger.charge(PrivacyEvent.laplace(0.5, "b"))
    with pytest.raises(BudgetExceededError, match="limit"):
        ledger.charge(PrivacyEvent.laplace(0.5, "c"))
    spent = ledger.epsilon_spent()
    assert 0.7 <= spent <= 0.75
    assert [e.note for e in ledger.events] == ["a", "b"]
    ledger.charge(PrivacyEvent.laplace(0.25, "fits"))
    assert ledger.epsilon_spent() <= 1.0
    assert ledger.remaining() == pytest.approx(1.0 - ledger.epsilon_spent())


@pytest.mark.parametrize("bad", [-1.0, 0.0, math.nan, math.inf])
def test_rejects_bad_epsilon(bad) -> None:
    with pytest.raises(ValueError):
        PrivacyEvent.laplace(bad)


def test_one_budget_for_pure_and_gaussian_releases() -> None:
    # The audit: two ledgers with one limit each let a node spend twice its limit.
    ledger = NodeLedger(None, 2.0, 1e-5)
    ledger.charge(PrivacyEvent.laplace(1.5, "dssgd uploads"))
    z = analytic_gaussian_sigma(1.0, 1e-5)  # a Gaussian release worth epsilon = 1 on its own
    with pytest.raises(BudgetExceededError):
        ledger.charge(PrivacyEvent.gaussian(z, "ecos counts"))
    assert len(ledger.events) == 1
    z_small = analytic_gaussian_sigma(0.3, 1e-5)
    assert ledger.charge(PrivacyEvent.gaussian(z_small)) <= 2.0


def test_round_trip_and_atomic(tmp_path) -> None:
    path = tmp_path / "sub" / "ledger.json"
    ledger = NodeLedger(path, 10.0, DELTA)
    ledger.charge(PrivacyEvent.laplace(1.5, "svt"))
    ledger.charge(PrivacyEvent.laplace(2.0, "svt"))
    names = sorted(p.name for p in path.parent.iterdir())
    assert names == ["ledger.json", "ledger.json.lock", "ledger.json.witness"]  # no temp file
    again = NodeLedger.open(path, 10.0, DELTA)
    assert again.events == ledger.events
    assert 3.4 <= again.epsilon_spent() <= 3.5
    # An unlimited ledger on the same file keeps the record (the limit is not stored).
    unlimited = NodeLedger.open(path, math.inf, DELTA)
    assert len(unlimited.events) == 2
    unlimited.charge(PrivacyEvent.laplace(100.0))
    assert math.isinf(unlimited.epsilon_limit)


def test_directory_is_fsynced_after_each_write(tmp_path, monkeypatch) -> None:
    # The audit: the pure-DP ledger skipped the directory fsync.
    synced = []
    real = ledger_module._fsync_folder
    monkeypatch.setattr(ledger_module, "_fsync_folder", lambda f: (synced.append(f), real(f)))
    NodeLedger(tmp_path / "ledger.json", 10.0, DELTA).charge(PrivacyEvent.laplace(0.5))
    # Creation writes ledger + witness, the charge again: a folder fsync after each rename.
    assert synced == [tmp_path] * 4


def test_load_rejects_other_documents(tmp_path) -> None:
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"kind": "gaussian"}))
    with pytest.raises(LedgerCorruptError):
        NodeLedger.open(path, 1.0, DELTA)
