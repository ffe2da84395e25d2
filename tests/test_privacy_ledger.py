"""The node's lifetime privacy ledger: composition of every mechanism, refusal at the limit,
persistence, and detection of tampering, rollback and deletion."""

from __future__ import annotations

import json
import math
import os
import shutil
import time

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import PLDAccountant
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ecos_flower.privacy import (
    BudgetExceededError,
    LedgerCorruptError,
    NodeLedger,
    PrivacyEvent,
    analytic_gaussian_epsilon,
    analytic_gaussian_sigma,
    compose_epsilon,
)
from ecos_flower.privacy import ledger as ledger_module
from ecos_flower.privacy._opacus import compute_rdp, get_privacy_spent

DELTA = 1e-5


def _chain_hash(previous: str, event_dict: dict) -> str:
    fields = {k: event_dict[k] for k in ledger_module._EVENT_FIELDS}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return ledger_module.hashlib.sha256(f"{previous}\n{canonical}".encode()).hexdigest()


def _rehash(data: dict) -> dict:
    """Recompute the chain after an edit, as a careful tamperer would."""
    previous = ledger_module.GENESIS_HASH
    for item in data["events"]:
        previous = _chain_hash(previous, item)
        item["hash"] = previous
    data["head"] = previous
    data["sequence"] = len(data["events"])
    return data


# ------------------------------------------------------------------------------------- events
@pytest.mark.parametrize(
    "make",
    [
        lambda: PrivacyEvent.gaussian(0.0),
        lambda: PrivacyEvent.gaussian(-1.0),
        lambda: PrivacyEvent.gaussian(math.nan),
        lambda: PrivacyEvent.gaussian(math.inf),
        lambda: PrivacyEvent.laplace(0.0),
        lambda: PrivacyEvent.laplace(-0.5),
        lambda: PrivacyEvent.laplace(math.inf),
        lambda: PrivacyEvent.dpsgd(1.0, 0.0, 10),
        lambda: PrivacyEvent.dpsgd(1.0, 1.5, 10),
        lambda: PrivacyEvent.dpsgd(1.0, 0.1, 0),
        lambda: PrivacyEvent.dpsgd(1.0, 0.1, 2.5),
        lambda: PrivacyEvent.dpsgd(1.0, 0.1, True),
        lambda: PrivacyEvent.dpsgd(-1.0, 0.1, 10),
        lambda: PrivacyEvent("exponential", epsilon=1.0),
        lambda: PrivacyEvent("gaussian", noise_multiplier=2.0, epsilon=-1.0),
        lambda: PrivacyEvent("laplace", epsilon=1.0, steps=3),
        lambda: PrivacyEvent.gaussian("2.0"),
    ],
)
def test_invalid_events_are_rejected(make) -> None:
    with pytest.raises(ValueError):
        make()


def test_event_constructors() -> None:
    g = PrivacyEvent.gaussian(3, note="knn votes")
    assert (g.kind, g.noise_multiplier, g.note) == ("gaussian", 3.0, "knn votes")
    assert isinstance(g.noise_multiplier, float)
    lap = PrivacyEvent.laplace(0.5)
    assert (lap.kind, lap.epsilon, lap.noise_multiplier) == ("laplace", 0.5, 0.0)
    s = PrivacyEvent.dpsgd(1.1, 0.01, np.int64(30))
    assert (s.kind, s.sampling_rate, s.steps) == ("dpsgd", 0.01, 30)
    assert type(s.steps) is int


# -------------------------------------------------------------------------------- composition
@pytest.mark.parametrize("zs", [[2.0], [4.0] * 6, [1.5, 3.0, 10.0, 0.9], [50.0] * 500])
def test_all_gaussian_is_exact_gdp(zs) -> None:
    ledger = NodeLedger(None, math.inf, DELTA)
    for z in zs:
        ledger.charge(PrivacyEvent.gaussian(z))
    z_eff = sum(z**-2 for z in zs) ** -0.5
    assert ledger.epsilon_spent() == pytest.approx(
        analytic_gaussian_epsilon(z_eff, DELTA), rel=1e-9
    )


def test_calibrated_gaussian_costs_exactly_its_epsilon_and_composes() -> None:
    z = analytic_gaussian_sigma(1.0, DELTA)
    ledger = NodeLedger(None, 10.0, DELTA)
    assert ledger.charge(PrivacyEvent.gaussian(z)) == pytest.approx(1.0, rel=1e-9)
    for _ in range(3):
        ledger.charge(PrivacyEvent.gaussian(z))
    # 4 releases at multiplier z == one at z/2, exactly; sub-linear growth.
    assert ledger.epsilon_spent() == pytest.approx(
        analytic_gaussian_epsilon(z / 2, DELTA), rel=1e-9
    )
    assert ledger.epsilon_spent() < 4.0


def test_full_batch_dpsgd_is_one_gaussian() -> None:
    full = compose_epsilon([PrivacyEvent.dpsgd(2.0, 1.0, 16)], DELTA)
    assert full == pytest.approx(analytic_gaussian_epsilon(2.0 / 4.0, DELTA), rel=1e-9)
    mixed = compose_epsilon([PrivacyEvent.dpsgd(2.0, 1.0, 16), PrivacyEvent.gaussian(1.0)], DELTA)
    assert mixed == pytest.approx(analytic_gaussian_epsilon(1.0 / math.sqrt(5.0), DELTA), rel=1e-9)


def _mixed_events() -> list[PrivacyEvent]:
    return (
        [PrivacyEvent.gaussian(8.0)] * 3
        + [PrivacyEvent.laplace(0.05)] * 20
        + [PrivacyEvent.dpsgd(1.1, 0.02, 200)] * 2
    )


def test_mixed_composition_matches_dp_accounting_pld_accountant() -> None:
    events = _mixed_events()
    ours = compose_epsilon(events, DELTA)
    accountant = PLDAccountant(value_discretization_interval=1e-4)
    accountant.compose(
        dp_accounting.ComposedDpEvent(
            [
                dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(8.0), 3),
                dp_accounting.SelfComposedDpEvent(dp_accounting.LaplaceDpEvent(1 / 0.05), 20),
                dp_accounting.SelfComposedDpEvent(
                    dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(1.1)),
                    400,
                ),
            ]
        )
    )
    reference = accountant.get_epsilon(DELTA)
    assert ours == pytest.approx(reference, rel=2e-3)


def test_mixed_is_between_its_parts_and_their_sum() -> None:
    gauss = [PrivacyEvent.gaussian(8.0)] * 3
    lap = [PrivacyEvent.laplace(0.05)] * 20
    sgd = [PrivacyEvent.dpsgd(1.1, 0.02, 200)] * 2
    mixed = compose_epsilon(gauss + lap + sgd, DELTA)
    parts = [compose_epsilon(p, DELTA) for p in (gauss, lap, sgd)]
    assert all(mixed >= part for part in parts)
    # Basic composition at split delta: (e1, d/2) + (0.05 * 20, 0) + (e3, d/2) is (sum, d).
    upper = compose_epsilon(gauss, DELTA / 2) + 20 * 0.05 + compose_epsilon(sgd, DELTA / 2)
    assert mixed <= upper
    assert mixed < sum(parts)  # PLD composes better than adding epsilons


def test_laplace_only_is_at_most_basic_composition() -> None:
    one = compose_epsilon([PrivacyEvent.laplace(0.5)], DELTA)
    assert 0.49 <= one <= 0.5
    many = compose_epsilon([PrivacyEvent.laplace(0.1)] * 100, DELTA)
    assert many <= 10.0
    assert many < 0.6 * 10.0  # advanced composition beats the sum for many small releases
    few = [PrivacyEvent.laplace(e) for e in (0.25, 0.5, 0.125)]
    assert 0.5 <= compose_epsilon(few, DELTA) <= 0.875


def test_subsampled_dpsgd_is_tighter_than_opacus_rdp() -> None:
    z, q, steps = 1.0, 0.01, 1000
    ours = compose_epsilon([PrivacyEvent.dpsgd(z, q, steps)], DELTA)
    orders = [1 + x / 10 for x in range(1, 100)] + list(range(12, 256))
    rdp = compute_rdp(q=q, noise_multiplier=z, steps=steps, orders=orders)
    opacus, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=DELTA)
    assert 0.7 * opacus <= ours <= opacus


def test_equal_events_are_grouped_into_one_evaluation() -> None:
    ledger_module._group_pld.cache_clear()
    ledger_module._epsilon_of_key.cache_clear()
    events = [PrivacyEvent.laplace(0.02)] * 500 + [PrivacyEvent.dpsgd(1.3, 0.05, 10)] * 50
    epsilon = compose_epsilon(events, DELTA)
    assert 0 < epsilon < 10.0
    info = ledger_module._group_pld.cache_info()
    assert info.misses <= 2 * 2  # one PLD per group (and per discretisation interval at most)
    assert compose_epsilon(list(reversed(events)), DELTA) == epsilon  # cached: order-free key
    assert ledger_module._epsilon_of_key.cache_info().hits >= 1


event_strategy = st.one_of(
    # Ranges cross the switches between accounting paths (PLD, basic composition, RDP).
    st.builds(PrivacyEvent.gaussian, st.floats(0.05, 50.0)),
    st.builds(PrivacyEvent.laplace, st.floats(0.01, 30.0)),
    st.builds(PrivacyEvent.dpsgd, st.floats(0.2, 3.0), st.floats(0.001, 1.0), st.integers(1, 200)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(event_strategy, min_size=1, max_size=6))
def test_epsilon_spent_is_monotone_in_events_added(events) -> None:
    ledger = NodeLedger(None, math.inf, DELTA)
    previous = ledger.epsilon_spent()
    assert previous == 0.0
    for event in events:
        after = ledger.charge(event)
        assert after >= previous
        assert ledger.epsilon_spent() == after
        previous = after


# -------------------------------------------------------------------------------- the limit
def test_epsilon_if_does_not_record() -> None:
    ledger = NodeLedger(None, 5.0, DELTA)
    projected = ledger.epsilon_if(PrivacyEvent.gaussian(3.0))
    assert ledger.epsilon_spent() == 0.0 and not ledger.events
    assert ledger.charge(PrivacyEvent.gaussian(3.0, note="q1")) == pytest.approx(projected)
    assert ledger.events[0].note == "q1"


@pytest.mark.parametrize("on_disk", [False, True])
def test_refuses_past_the_limit_and_records_nothing(tmp_path, on_disk) -> None:
    path = tmp_path / "ledger.json" if on_disk else None
    ledger = NodeLedger(path, 2.0, DELTA)
    event = PrivacyEvent.gaussian(4.0, note="patient-1234 votes")
    count = 0
    while ledger.epsilon_if(event) <= 2.0:
        ledger.charge(event)
        count += 1
        assert count < 100
    spent = ledger.epsilon_spent()
    before = path.read_bytes() if on_disk else None
    with pytest.raises(BudgetExceededError) as info:
        ledger.charge(event)
    message = str(info.value)
    assert "limit epsilon=2" in message and "spent" in message and "requested" in message
    assert "patient" not in message  # no notes or data in errors
    assert ledger.epsilon_spent() == spent and len(ledger.events) == count
    assert ledger.remaining() == pytest.approx(2.0 - spent)
    if on_disk:
        assert path.read_bytes() == before
        assert len(NodeLedger.open(path, 2.0, DELTA).events) == count
    # Another mechanism is refused too: one budget for everything the node runs.
    with pytest.raises(BudgetExceededError):
        ledger.charge(PrivacyEvent.laplace(1.0))
    with pytest.raises(BudgetExceededError):
        ledger.charge(PrivacyEvent.dpsgd(0.8, 0.5, 50))


def test_infinite_limit_never_refuses() -> None:
    ledger = NodeLedger(None, math.inf, DELTA)
    for _ in range(5):
        ledger.charge(PrivacyEvent.gaussian(0.1))
        ledger.charge(PrivacyEvent.laplace(50.0))
    assert ledger.epsilon_spent() > 100.0 and len(ledger.events) == 10
    assert ledger.remaining() == math.inf


def test_invalid_settings() -> None:
    for limit in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError):
            NodeLedger(None, limit, DELTA)
    for delta in (0.0, 1.0, -1e-5, math.nan):
        with pytest.raises(ValueError):
            NodeLedger(None, 1.0, delta)
    with pytest.raises(TypeError):
        NodeLedger(None, 1.0, DELTA).charge(3.0)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- persistence
def test_persistence_round_trip(tmp_path) -> None:
    path = tmp_path / "node-3" / "ledger.json"
    ledger = NodeLedger.open(path, 30.0, DELTA)
    assert path.is_file() and ledger.witness_path.is_file()
    assert ledger.events == () and ledger.epsilon_spent() == 0.0
    events = [
        PrivacyEvent.gaussian(2.5, note="round 1"),
        PrivacyEvent.laplace(0.2, note="svt upload"),
        PrivacyEvent.dpsgd(1.2, 0.05, 40, note="finetune"),
    ]
    for event in events:
        ledger.charge(event)
    spent = ledger.epsilon_spent()
    del ledger

    again = NodeLedger.open(path, 30.0, DELTA)
    assert again.events == tuple(events)
    assert again.epsilon_spent() == pytest.approx(spent)
    data = json.loads(path.read_text())
    assert data["format_version"] == 2 and data["sequence"] == 3 and len(data["events"]) == 3
    witness = json.loads(again.witness_path.read_text())
    assert witness["sequence"] == 3 and witness["head"] == data["head"]
    # A second handle sees charges made through the first one (the file is the truth).
    other = NodeLedger(path, 30.0, DELTA)
    again.charge(PrivacyEvent.gaussian(5.0))
    assert len(other.events) == 4
    assert other.epsilon_spent() == pytest.approx(again.epsilon_spent())


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "ledger.json"
    ledger = NodeLedger(path, 10.0, DELTA)
    ledger.charge(PrivacyEvent.gaussian(3.0))
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("simulated crash during rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        ledger.charge(PrivacyEvent.gaussian(3.0))
    monkeypatch.undo()
    assert path.read_bytes() == before
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ledger.json", "ledger.json.lock", "ledger.json.witness"]
    assert len(NodeLedger.open(path, 10.0, DELTA).events) == 1


def test_crash_between_ledger_and_witness_is_recovered(tmp_path, monkeypatch) -> None:
    path = tmp_path / "ledger.json"
    ledger = NodeLedger(path, 10.0, DELTA)
    ledger.charge(PrivacyEvent.gaussian(3.0))
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(".witness"):
            raise OSError("simulated crash before the witness")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="before the witness"):
        ledger.charge(PrivacyEvent.gaussian(3.0))
    monkeypatch.undo()
    # The ledger is one ahead of its witness: that is a crash, not a rollback; it is kept
    # (the charge counts) and the witness is brought up to date.
    assert json.loads(ledger.witness_path.read_text())["sequence"] == 1
    resumed = NodeLedger.open(path, 10.0, DELTA)
    assert len(resumed.events) == 2
    assert json.loads(resumed.witness_path.read_text())["sequence"] == 2


def test_lost_witness_is_rewritten(tmp_path) -> None:
    path = tmp_path / "ledger.json"
    NodeLedger(path, 10.0, DELTA).charge(PrivacyEvent.gaussian(3.0))
    (tmp_path / "ledger.json.witness").unlink()
    ledger = NodeLedger.open(path, 10.0, DELTA)
    assert len(ledger.events) == 1
    assert json.loads(ledger.witness_path.read_text())["sequence"] == 1


# ------------------------------------------------------------------- tampering and rollback
@pytest.fixture
def stored(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = NodeLedger(path, 50.0, DELTA)
    ledger.charge(PrivacyEvent.gaussian(3.0, note="first"))
    ledger.charge(PrivacyEvent.laplace(0.5, note="second"))
    ledger.charge(PrivacyEvent.dpsgd(1.0, 0.1, 20, note="third"))
    return path


def _expect_corrupt(path, match: str | None = None) -> None:
    before = path.read_bytes() if path.exists() else None
    with pytest.raises(LedgerCorruptError, match=match) as info:
        NodeLedger.open(path, 50.0, DELTA)
    for word in ("first", "second", "third", str(path)):
        assert word not in str(info.value)
    after = path.read_bytes() if path.exists() else None
    assert after == before  # untouched, never reset


@pytest.mark.parametrize(
    "field, value",
    [
        ("epsilon", -0.5),
        ("epsilon", 0.0),
        ("noise_multiplier", -3.0),
        ("kind", "exponential"),
        ("sampling_rate", 2.0),
        ("steps", 0),
    ],
)
@pytest.mark.parametrize("rehash", [False, True])
def test_tampered_parameters_are_rejected(stored, field, value, rehash) -> None:
    data = json.loads(stored.read_text())
    index = {"epsilon": 1, "kind": 1}.get(field, 0 if field == "noise_multiplier" else 2)
    data["events"][index][field] = value
    if rehash:  # even with a recomputed chain and witness, the parameter itself is refused
        _rehash(data)
        witness_path = stored.with_name(stored.name + ".witness")
        witness = json.loads(witness_path.read_text())
        witness["head"] = data["head"]
        witness_path.write_text(json.dumps(witness))
    stored.write_text(json.dumps(data))
    _expect_corrupt(stored)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_rejected(stored, constant) -> None:
    text = stored.read_text().replace('"epsilon":0.5', f'"epsilon":{constant}')
    assert constant in text
    stored.write_text(text)
    _expect_corrupt(stored)


def test_broken_hash_chain_is_rejected(stored) -> None:
    data = json.loads(stored.read_text())
    data["events"][1]["epsilon"] = 0.05  # a cheaper release, chain not recomputed
    stored.write_text(json.dumps(data))
    _expect_corrupt(stored, "tampered")


def test_removed_event_is_rejected(stored) -> None:
    data = json.loads(stored.read_text())
    del data["events"][1]  # hashes of later events no longer chain
    data["sequence"] = 2
    stored.write_text(json.dumps(data))
    _expect_corrupt(stored)


def test_truncated_and_rehashed_ledger_is_a_rollback(stored) -> None:
    data = json.loads(stored.read_text())
    data["events"] = data["events"][:1]
    stored.write_text(json.dumps(_rehash(data)))
    _expect_corrupt(stored, "rolled back")


def test_rolled_back_copy_is_rejected(stored, tmp_path) -> None:
    backup = tmp_path / "backup.json"
    shutil.copy(stored, backup)
    NodeLedger.open(stored, 50.0, DELTA).charge(PrivacyEvent.gaussian(2.0))
    shutil.copy(backup, stored)
    _expect_corrupt(stored, "rolled back")
    with pytest.raises(LedgerCorruptError):
        NodeLedger(stored, 50.0, DELTA)


def test_replaced_ledger_of_the_same_length_is_rejected(stored, tmp_path) -> None:
    other_path = tmp_path / "other" / "ledger.json"
    other = NodeLedger(other_path, 50.0, DELTA)
    for _ in range(3):
        other.charge(PrivacyEvent.gaussian(40.0))
    shutil.copy(other_path, stored)
    _expect_corrupt(stored, "rolled back")


def test_deleted_ledger_with_witness_is_rejected(stored) -> None:
    stored.unlink()
    _expect_corrupt(stored, "deleted")
    assert not stored.exists()  # not recreated empty


def test_unreadable_witness_is_rejected(stored) -> None:
    stored.with_name(stored.name + ".witness").write_text("{oops")
    _expect_corrupt(stored, "witness")


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "",
        "[]",
        json.dumps({"format_version": 1, "releases": []}),  # the old Gaussian ledger
        json.dumps({"kind": "pure-dp", "epsilon_limit": None, "charges": []}),  # old pure-DP
        json.dumps({"format": "ecos-flower-node-ledger", "format_version": 99, "events": []}),
    ],
)
def test_unreadable_file_is_an_error_not_a_reset(tmp_path, content) -> None:
    path = tmp_path / "ledger.json"
    path.write_text(content)
    _expect_corrupt(path, "refusing to reset")


def test_charge_on_a_tampered_file_is_refused(stored) -> None:
    ledger = NodeLedger.open(stored, 50.0, DELTA)
    data = json.loads(stored.read_text())
    data["events"][0]["noise_multiplier"] = 300.0
    stored.write_text(json.dumps(data))
    with pytest.raises(LedgerCorruptError):
        ledger.charge(PrivacyEvent.gaussian(3.0))
    with pytest.raises(LedgerCorruptError):
        ledger.epsilon_spent()


@pytest.mark.parametrize(
    "event",
    [
        PrivacyEvent.gaussian(1e-9),
        PrivacyEvent.laplace(5e11),
        PrivacyEvent.dpsgd(1e-6, 0.5, 10_000),
        PrivacyEvent.gaussian(0.05),
        PrivacyEvent.dpsgd(0.1, 0.01, 100),
        PrivacyEvent.dpsgd(1.0, 0.5, 10**12),
        PrivacyEvent.dpsgd(0.8, 0.999, 10**6),
    ],
)
def test_near_noiseless_events_are_bounded_quickly(event) -> None:
    # A hostile server can ask for these; the ledger must bound them without huge PLD arrays.
    others = [PrivacyEvent.laplace(0.5), PrivacyEvent.dpsgd(1.0, 0.01, 100)]
    start = time.perf_counter()
    epsilon = compose_epsilon([event, *others], DELTA)
    assert time.perf_counter() - start < 5.0
    assert epsilon >= compose_epsilon([event], DELTA)
    assert epsilon >= compose_epsilon(others, DELTA)
    assert math.isfinite(epsilon) and epsilon > 20.0


def test_very_many_dpsgd_steps_fall_back_to_a_valid_rdp_bound() -> None:
    # 1e12 steps would need a PLD of hundreds of TiB; the RDP bound is valid and computed fast.
    z, q, steps = 1.0, 1e-6, 10**12
    start = time.perf_counter()
    epsilon = compose_epsilon([PrivacyEvent.dpsgd(z, q, steps)], DELTA)
    assert time.perf_counter() - start < 5.0
    orders = list(range(2, 65))
    rdp = compute_rdp(q=q, noise_multiplier=z, steps=steps, orders=orders)
    opacus, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=DELTA)
    assert epsilon == pytest.approx(opacus, rel=0.05)
