"""Pure epsilon-DP ledger: basic composition, refusal, per-epoch history, atomic JSON
persistence."""

from __future__ import annotations

import json
import math

import pytest

from ecos_flower.privacy.pure_dp import PureBudgetExceededError, PureDPLedger


def test_compose_and_refuse():
    ledger = PureDPLedger(epsilon_limit=1.0)
    ledger.charge(0.4, "a", epoch=0)
    ledger.charge(0.4, "b", epoch=1)
    with pytest.raises(PureBudgetExceededError, match="limit"):
        ledger.charge(0.3, "c", epoch=2)
    assert ledger.spent == pytest.approx(0.8)
    assert len(ledger.charges) == 2
    ledger.charge(0.2, "fits exactly", epoch=1)
    assert ledger.per_epoch() == {0: pytest.approx(0.4), 1: pytest.approx(0.6)}
    assert ledger.remaining == pytest.approx(0.0)


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_rejects_bad_epsilon(bad):
    with pytest.raises(ValueError):
        PureDPLedger().charge(bad)


def test_round_trip_and_atomic(tmp_path):
    ledger = PureDPLedger(epsilon_limit=10.0)
    ledger.charge(1.5, "svt", epoch=0)
    ledger.charge(2.0, "svt")
    path = tmp_path / "sub" / "ledger.json"
    ledger.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["ledger.json"]  # no temp file left
    again = PureDPLedger.load(path)
    assert again.spent == pytest.approx(3.5) and again.epsilon_limit == 10.0
    assert again.charges == ledger.charges
    unlimited = PureDPLedger()
    unlimited.save(path)
    assert json.loads(path.read_text())["epsilon_limit"] is None
    assert math.isinf(PureDPLedger.load(path).epsilon_limit)


def test_load_rejects_other_documents(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"kind": "gaussian"}))
    with pytest.raises(ValueError):
        PureDPLedger.load(path)
