"""Two real processes share one node ledger (Flower starts a fresh ClientApp process per message,
so two runs can query a node at once): no charge is lost, and at the limit exactly one of two
simultaneous queries is answered."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import queue

import pytest

from ecos_flower.privacy import BudgetExceededError, NodeLedger, PrivacyEvent

DELTA = 1e-5
CHARGES_PER_PROCESS = 200
RACES = 20
TIMEOUT = 60.0


def _charge_many(path: str, tag: str, count: int, start, results) -> None:
    ledger = NodeLedger(path, math.inf, DELTA)
    start.wait(TIMEOUT)
    for i in range(count):
        ledger.charge(PrivacyEvent.gaussian(30.0 + i % 7, note=f"{tag}-{i}"))
    results.put(tag)


def _race_worker(tag: str, commands, barrier, results) -> None:
    while True:
        command = commands.get(timeout=TIMEOUT)
        if command is None:
            return
        path, limit = command
        ledger = NodeLedger(path, limit, DELTA)  # both open before the race, like two messages
        event = PrivacyEvent.gaussian(2.0, note=tag)
        barrier.wait(TIMEOUT)
        try:
            ledger.charge(event)
            results.put((path, tag, "answered"))
        except BudgetExceededError:
            results.put((path, tag, "refused"))


def _get(results, n: int) -> list:
    out = []
    for _ in range(n):
        try:
            out.append(results.get(timeout=TIMEOUT))
        except queue.Empty:  # pragma: no cover - a hung worker is a failure, not a pass
            pytest.fail("a worker process did not report back")
    return out


def test_two_processes_charging_200_each_lose_nothing(tmp_path) -> None:
    ctx = mp.get_context("spawn")
    path = str(tmp_path / "ledger.json")
    NodeLedger(path, math.inf, DELTA)
    start = ctx.Event()
    results = ctx.Queue()
    workers = [
        ctx.Process(target=_charge_many, args=(path, tag, CHARGES_PER_PROCESS, start, results))
        for tag in ("p0", "p1")
    ]
    for w in workers:
        w.start()
    start.set()
    assert sorted(_get(results, 2)) == ["p0", "p1"]
    for w in workers:
        w.join(TIMEOUT)
        assert w.exitcode == 0

    ledger = NodeLedger.open(path, math.inf, DELTA)  # verifies the hash chain and witness
    notes = [e.note for e in ledger.events]
    expected = {f"{tag}-{i}" for tag in ("p0", "p1") for i in range(CHARGES_PER_PROCESS)}
    assert len(notes) == 2 * CHARGES_PER_PROCESS and set(notes) == expected
    data = json.loads((tmp_path / "ledger.json").read_text())
    assert data["sequence"] == 2 * CHARGES_PER_PROCESS
    assert json.loads((tmp_path / "ledger.json.witness").read_text())["sequence"] == 400
    # Each process's own charges are in its order; the two interleave.
    for tag in ("p0", "p1"):
        mine = [int(n.split("-")[1]) for n in notes if n.startswith(tag)]
        assert mine == list(range(CHARGES_PER_PROCESS))


def test_at_the_limit_exactly_one_of_two_simultaneous_charges_is_answered(tmp_path) -> None:
    ctx = mp.get_context("spawn")
    commands = [ctx.Queue(), ctx.Queue()]
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    workers = [
        ctx.Process(target=_race_worker, args=(f"w{i}", commands[i], barrier, results))
        for i in range(2)
    ]
    for w in workers:
        w.start()
    outcomes = []
    try:
        for race in range(RACES):
            path = str(tmp_path / f"race-{race}" / "ledger.json")
            setup = NodeLedger(path, math.inf, DELTA)
            for _ in range(race % 4):  # some history, so the room is not always the first charge
                setup.charge(PrivacyEvent.gaussian(5.0))
            # Room for exactly one more release of multiplier 2: the second must be refused.
            limit = setup.epsilon_if(PrivacyEvent.gaussian(2.0))
            for q in commands:
                q.put((path, limit))
            got = _get(results, 2)
            assert {p for p, _, _ in got} == {path}
            answered = sorted(outcome for _, _, outcome in got)
            outcomes.append(answered)
            assert answered == ["answered", "refused"], f"race {race}: {answered}"
            final = NodeLedger.open(path, limit, DELTA)
            assert len(final.events) == race % 4 + 1
            assert final.epsilon_spent() <= limit
    finally:
        for q in commands:
            q.put(None)
        for w in workers:
            w.join(TIMEOUT)
            if w.is_alive():  # pragma: no cover
                w.kill()
    assert len(outcomes) == RACES
    assert all(w.exitcode == 0 for w in workers)
