"""Faults, in process: clients that crash, time out or disconnect mid-round; privacy ledgers that
crash mid-write; restarted clients; a server that re-sends or repeats queries.

- Up to half of the clients may fail: ECOS and DSSGD rounds go on with the rest while at least
  `min-clients` answer, fail clearly below it, and the report names who dropped and why.
- A node's one lifetime ledger (and its witness) is always the old or the new complete state,
  whatever step of either file's write dies (checked by killing a forked child at each step), and
  a restarted client resumes from it.
- Every answer is charged, before the node reads its data: re-sending or repeating the same query
  cannot make a client spend past its limit, before or after a restart, and a handler that fails
  after the charge keeps it (and answers a refusal that carries no exception text).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from flower_helpers import FAST, run_tiny, tiny_scenario
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict

import ecos_flower.client.ecos as ecos_client
import ecos_flower.privacy.ledger as ledger_module
from ecos_flower.client.dssgd import handle_dssgd_train
from ecos_flower.client.ecos import handle_ecos_query
from ecos_flower.client.release import INTERNAL_FAILURE
from ecos_flower.client_app import app as client_app
from ecos_flower.data import load_federation
from ecos_flower.dssgd import flatten_params
from ecos_flower.ecos import compress, make_extractor
from ecos_flower.flower.dssgd_run import make_strategy
from ecos_flower.flower.inprocess import InProcessGrid, set_server_identity
from ecos_flower.flower.settings import DEFAULT_RUN_CONFIG, client_config, merge_run_config
from ecos_flower.flower.validation import NO_REPLY
from ecos_flower.models import seeded_model
from ecos_flower.privacy import NodeLedger, PrivacyEvent, compose_epsilon
from ecos_flower.strategy.ecos_query import QuerySettings, query_messages

NUM_NODES = 6
CRASH, OFFLINE, LOST = 1, 3, 4  # node indices: raises, never answers, works but reply is lost
DSSGD = {"method": "dssgd", "model": "paper-mlp", "dssgd-epochs": 2, "dssgd-schedule": "parallel"}


class FlakyGrid(InProcessGrid):
    """An in-process grid whose `disconnected` nodes run the message (and spend what it costs)
    but whose reply never reaches the server: a disconnect mid-round."""

    def __init__(self, *args, disconnected=(), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.disconnected = {self.node_ids[i] for i in disconnected}

    def _deliver(self, message: Message) -> Message | None:
        reply = super()._deliver(message)
        return None if message.metadata.dst_node_id in self.disconnected else reply


def _crashing(msg: Message, context: Context) -> Message:
    raise RuntimeError("segfault in the data loader")


def _faulty_grid(tmp_path: Path, num_nodes: int = NUM_NODES) -> FlakyGrid:
    ledgers = {
        i: {"ledger-path": str(tmp_path / "ledgers" / f"node-{i}.json")} for i in range(num_nodes)
    }
    grid = FlakyGrid(
        client_app,
        num_nodes,
        client_apps={CRASH: _crashing},
        node_configs=ledgers,
        disconnected=[LOST],
    )
    grid.offline.add(grid.node_ids[OFFLINE])
    return grid


@pytest.fixture()
def scenario(tmp_path, flwr_home):
    return tiny_scenario(tmp_path, num_clients=NUM_NODES)


def _dropped_reasons(report, phase: str) -> dict[int, str]:
    return {e["node"]: e["reason"] for e in report.extra["dropped"] if e["phase"] == phase}


def _assert_names_the_faulty_nodes(reasons: dict[int, str], grid: FlakyGrid) -> None:
    ids = grid.node_ids
    assert sorted(reasons) == sorted([ids[CRASH], ids[OFFLINE], ids[LOST]])
    assert reasons[ids[CRASH]].startswith("ClientApp error: RuntimeError: segfault")
    assert reasons[ids[OFFLINE]] == NO_REPLY
    assert reasons[ids[LOST]] == NO_REPLY


def test_min_clients_is_a_run_config_key_with_default_one():
    assert DEFAULT_RUN_CONFIG["min-clients"] == 1


# ----------------------------------------------------------------------------- ECOS
def test_ecos_completes_without_half_of_its_clients_and_names_them(scenario, tmp_path):
    grid = _faulty_grid(tmp_path)
    report, _ = run_tiny(scenario, NUM_NODES, grid, method="ecos", **{"min-clients": 3})
    healthy = [0, 2, 5]
    assert report.extra["answered"] == 3
    assert sorted(report.accuracy_per_client) == healthy
    assert sorted(report.epsilon_per_client) == healthy
    _assert_names_the_faulty_nodes(_dropped_reasons(report, "query"), grid)
    _assert_names_the_faulty_nodes(_dropped_reasons(report, "evaluate"), grid)
    # The disconnected client did answer (and paid for it): its ledger holds the release, even
    # though the server never saw its scores. The offline and crashed ones spent nothing.
    ledgers = tmp_path / "ledgers"
    assert len(json.loads((ledgers / f"node-{LOST}.json").read_text())["events"]) == 1
    assert not (ledgers / f"node-{OFFLINE}.json").exists()
    assert not (ledgers / f"node-{CRASH}.json").exists()
    json.dumps(report.to_json())  # the drop report is JSON-ready


def test_ecos_fails_clearly_below_min_clients(scenario, tmp_path):
    grid = _faulty_grid(tmp_path)
    with pytest.raises(RuntimeError) as info:
        run_tiny(scenario, NUM_NODES, grid, method="ecos", **{"min-clients": 4})
    text = str(info.value)
    assert "3 client(s) answered validly, fewer than min-clients=4" in text
    for index in (CRASH, OFFLINE, LOST):
        assert f"node {grid.node_ids[index]}" in text


def test_ecos_evaluation_below_min_clients_fails(scenario, tmp_path):
    """Clients that answer the query but drop before the evaluation round."""
    calls: dict[int, int] = {}

    def flaky(msg: Message, context: Context) -> Message:
        calls[context.node_id] = calls.get(context.node_id, 0) + 1
        if msg.metadata.message_type == "evaluate":
            raise ConnectionError("lost the link")
        return client_app(msg, context)

    grid = InProcessGrid(client_app, 4, client_apps={0: flaky, 1: flaky})
    scenario = tiny_scenario(tmp_path, num_clients=4)
    report, _ = run_tiny(scenario, 4, grid, method="ecos", **{"min-clients": 2})
    assert report.extra["answered"] == 4 and sorted(report.accuracy_per_client) == [2, 3]
    assert sorted(_dropped_reasons(report, "evaluate")) == grid.node_ids[:2]
    grid = InProcessGrid(client_app, 4, client_apps={0: flaky, 1: flaky})
    with pytest.raises(RuntimeError, match="evaluation: 2 client.*min-clients=3"):
        run_tiny(scenario, 4, grid, method="ecos", **{"min-clients": 3})


# ---------------------------------------------------------------------------- DSSGD
def test_dssgd_completes_without_half_of_its_participants_and_names_them(scenario, tmp_path):
    grid = _faulty_grid(tmp_path)
    report, _ = run_tiny(scenario, NUM_NODES, grid, **DSSGD, **{"min-clients": 3})
    assert report.extra["uploads-accepted"] == 3 * 2  # three healthy nodes, two rounds
    assert sorted(report.accuracy_per_client) == [0, 2, 5]
    for server_round in (1, 2):
        reasons = {
            e["node"]: e["reason"]
            for e in report.extra["dropped"]
            if e["phase"] == "train" and e["round"] == server_round
        }
        _assert_names_the_faulty_nodes(reasons, grid)
    _assert_names_the_faulty_nodes(_dropped_reasons(report, "evaluate"), grid)
    # The disconnected participant trained (its local model moved on), but nothing it sent was
    # applied: the server counted only the healthy uploads.
    lost = grid.contexts[grid.node_ids[LOST]]
    assert int(lost.state["dssgd-local-info"]["steps"]) == 2


def test_dssgd_fails_clearly_below_min_clients(scenario, tmp_path):
    grid = _faulty_grid(tmp_path)
    with pytest.raises(RuntimeError) as info:
        run_tiny(scenario, NUM_NODES, grid, **DSSGD, **{"min-clients": 4})
    text = str(info.value)
    assert "DSSGD round 1: 3 client(s) answered validly, fewer than min-clients=4" in text
    for index in (CRASH, OFFLINE, LOST):
        assert f"node {grid.node_ids[index]}" in text


def test_dssgd_round_robin_goes_on_past_a_participant_that_drops(tmp_path, flwr_home):
    scenario = tiny_scenario(tmp_path, num_clients=4)
    grid = InProcessGrid(client_app, 4, client_apps={2: _crashing})
    report, _ = run_tiny(
        scenario, 4, grid, **{**DSSGD, "dssgd-schedule": "round-robin", "min-clients": 3}
    )
    assert report.extra["server-rounds"] == 8
    assert report.extra["uploads-accepted"] == 6
    assert {e["node"] for e in report.extra["dropped"]} == {grid.node_ids[2]}
    assert [e["round"] for e in report.extra["dropped"] if e["phase"] == "train"] == [3, 7]
    # Two crashing participants leave 2 < 3.
    grid = InProcessGrid(client_app, 4, client_apps={1: _crashing, 2: _crashing})
    with pytest.raises(RuntimeError, match="DSSGD round 3: 2 client.*min-clients=3"):
        run_tiny(scenario, 4, grid, **{**DSSGD, "dssgd-schedule": "round-robin", "min-clients": 3})


def test_dssgd_min_clients_above_the_connected_nodes_is_refused_at_start(tmp_path, flwr_home):
    scenario = tiny_scenario(tmp_path, num_clients=2)
    with pytest.raises(RuntimeError, match="min-clients=3 but only 2 node"):
        run_tiny(scenario, 2, **DSSGD, **{"min-clients": 3})


# ------------------------------------------------------------- ledger crash safety
# Calls each patched step makes per atomic file write (`ledger_module._atomic_write`): the file's
# fsync and then its folder's (`_fsync_folder`). A charge writes the ledger, then its witness.
CALLS_PER_WRITE = {
    "mkstemp": 1,
    "half-written": 1,
    "written-not-synced": 2,
    "synced-not-renamed": 1,
    "renamed": 1,
}
WRITES = {"ledger": 0, "witness": 1}  # which of a charge's two atomic writes dies


def _die_at(step: str, monkeypatch, module, write: int = 0) -> None:
    """In a forked child: make `step` of the `write`-th atomic file write (0: the ledger, 1: its
    witness) end the process on the spot (os._exit: no cleanup, no finally), as a power cut or
    SIGKILL would; earlier writes go through untouched."""
    real_fdopen, real_fsync, real_replace = os.fdopen, os.fsync, os.replace
    real_mkstemp = module.tempfile.mkstemp
    calls = {"n": 0}
    fatal = write * CALLS_PER_WRITE[step] + 1  # the first call of that write

    def die():
        os._exit(17)

    def this_one() -> bool:
        calls["n"] += 1
        return calls["n"] == fatal

    class HalfWriter:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def write(self, text):
            self.handle.write(text[: len(text) // 2])
            self.handle.flush()
            die()

        def __getattr__(self, name):
            return getattr(self.handle, name)

    if step == "mkstemp":

        def mkstemp(*args, **kwargs):
            if this_one():
                die()
            return real_mkstemp(*args, **kwargs)

        monkeypatch.setattr(module.tempfile, "mkstemp", mkstemp)
    elif step == "half-written":

        def fdopen(*args, **kwargs):
            handle = real_fdopen(*args, **kwargs)
            return HalfWriter(handle) if this_one() else handle

        monkeypatch.setattr(module.os, "fdopen", fdopen)
    elif step == "written-not-synced":

        def fsync(fd):
            if this_one():
                die()
            return real_fsync(fd)

        monkeypatch.setattr(module.os, "fsync", fsync)
    elif step == "synced-not-renamed":

        def replace(*args):
            if this_one():
                die()
            return real_replace(*args)

        monkeypatch.setattr(module.os, "replace", replace)
    elif step == "renamed":

        def replace_then_die(*args):
            real_replace(*args)
            if this_one():
                die()

        monkeypatch.setattr(module.os, "replace", replace_then_die)
    else:
        raise AssertionError(step)


STEPS = list(CALLS_PER_WRITE)


def _in_child(action) -> int:
    """Run `action` in a forked child that never returns into pytest; its exit code."""
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            action()
        except BaseException:  # noqa: BLE001 - any failure is a distinct exit code
            code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _witness(path: Path) -> dict:
    return json.loads(path.with_name(path.name + ".witness").read_text())


def _crash_mid_charge(tmp_path, monkeypatch, step, target, event, limit) -> tuple[Path, list]:
    """Charge `event` ("first"), then die at `step` of the `target` file's write while charging
    it again ("second"); returns the ledger path and the notes stored on disk."""
    path = tmp_path / "ledger.json"
    ledger = NodeLedger(path, limit, 1e-5)
    ledger.charge(PrivacyEvent(**{**event.to_dict(), "note": "first"}))
    before = path.read_bytes()
    witness_before = _witness(path)

    def crash_mid_charge():
        _die_at(step, monkeypatch, ledger_module, WRITES[target])
        ledger.charge(PrivacyEvent(**{**event.to_dict(), "note": "second"}))

    assert _in_child(crash_mid_charge) == 17  # died inside the write
    monkeypatch.undo()
    stored = json.loads(path.read_text())  # always complete JSON
    notes = [e["note"] for e in stored["events"]]
    assert notes in (["first"], ["first", "second"])
    witness = _witness(path)  # always complete JSON too, never ahead of the ledger
    if target == "ledger" and step != "renamed":
        assert notes == ["first"]
        assert path.read_bytes() == before  # the old state, byte for byte
        assert witness == witness_before
    else:  # the new ledger was in place when the process died
        assert notes == ["first", "second"]
        expect_new = target == "witness" and step == "renamed"
        assert witness["sequence"] == (2 if expect_new else 1)
    return path, notes


@pytest.mark.parametrize("target", list(WRITES))
@pytest.mark.parametrize("step", STEPS)
def test_a_gaussian_ledger_survives_a_crash_at_any_step_of_a_write(
    tmp_path, monkeypatch, step, target
):
    event = PrivacyEvent.gaussian(4.0)
    path, notes = _crash_mid_charge(tmp_path, monkeypatch, step, target, event, 3.0)
    # A restart resumes from what is on disk (a lagging witness is brought up to date, not
    # mistaken for a rollback) and never answers past the limit.
    resumed = NodeLedger.open(path, 3.0, 1e-5)
    assert len(resumed.events) == len(notes)
    assert _witness(path)["sequence"] == len(notes)
    answered = 0
    while True:
        try:
            resumed.charge(event)
        except ledger_module.BudgetExceededError:
            break
        answered += 1
        assert answered < 100
    assert resumed.epsilon_spent() <= 3.0
    fresh = NodeLedger(None, 3.0, 1e-5)
    allowed = 0
    while fresh.epsilon_if(event) <= 3.0:
        fresh.charge(event)
        allowed += 1
    assert len(notes) + answered == allowed  # the crash cost no budget it did not record


@pytest.mark.parametrize("target", list(WRITES))
@pytest.mark.parametrize("step", STEPS)
def test_a_laplace_ledger_survives_a_crash_at_any_step_of_a_write(
    tmp_path, monkeypatch, step, target
):
    """DSSGD's pure-DP (SVT) uploads are Laplace events in the same node ledger."""
    event = PrivacyEvent.laplace(2.0)
    path, notes = _crash_mid_charge(tmp_path, monkeypatch, step, target, event, 5.0)
    resumed = NodeLedger.open(path, 5.0, 1e-5)
    assert [(e.kind, e.epsilon) for e in resumed.events] == [("laplace", 2.0)] * len(notes)
    # Pure epsilons compose to at most their sum (basic composition).
    assert 0 < resumed.epsilon_spent() <= 2.0 * len(notes) * (1 + 1e-12)


def test_a_failed_ledger_write_records_nothing_in_memory_or_on_disk(tmp_path, monkeypatch):
    path = tmp_path / "ledger.json"
    event = PrivacyEvent.gaussian(4.0)
    ledger = NodeLedger(path, 10.0, 1e-5)
    ledger.charge(event)
    before, witness_before = path.read_bytes(), _witness(path)

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ledger_module.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space"):
        ledger.charge(event)
    monkeypatch.undo()
    assert len(ledger.events) == 1 and path.read_bytes() == before
    assert _witness(path) == witness_before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # temp file removed
    # Nothing of the failed charge stayed in memory either: the next one is the second event.
    assert ledger.charge(event) == pytest.approx(compose_epsilon([event, event], 1e-5))
    assert len(NodeLedger.open(path, 10.0, 1e-5).events) == 2


def test_a_failed_witness_write_keeps_the_charge_and_the_ledger_usable(tmp_path, monkeypatch):
    """The ledger is written before its witness: a failure in between raises (nothing is
    released), the charge stays recorded (over-counting, never under-counting) and the lagging
    witness is repaired on the next open, not mistaken for a rollback."""
    path = tmp_path / "ledger.json"
    event = PrivacyEvent.gaussian(4.0)
    ledger = NodeLedger(path, 10.0, 1e-5)
    ledger.charge(event)
    real_replace = os.replace

    def witness_disk_full(src, dst):
        if str(dst).endswith(".witness"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(ledger_module.os, "replace", witness_disk_full)
    with pytest.raises(OSError, match="No space"):
        ledger.charge(event)
    monkeypatch.undo()
    assert len(json.loads(path.read_text())["events"]) == 2
    assert _witness(path)["sequence"] == 1
    resumed = NodeLedger.open(path, 10.0, 1e-5)
    assert len(resumed.events) == 2 and _witness(path)["sequence"] == 2


# ------------------------------------------------------ clients: restarts and repeats
@pytest.fixture(scope="module")
def ecos_query(tmp_path_factory):
    """One real `query.ecos` message (PCA extractor, K = 6) and its client config."""
    folder = tmp_path_factory.mktemp("ecos-query")
    scenario = tiny_scenario(folder)
    config = merge_run_config(FAST, {"scenario": str(scenario), "num-clients": 3})
    federation = load_federation(scenario)
    extractor = make_extractor("pca", n_components=8).fit(federation.pool.images)
    compression = compress(extractor.transform(federation.pool.images), 6, seed=0)
    grid = InProcessGrid(client_app, 1)
    (message,) = query_messages(
        QuerySettings(epsilon=1.0, delta=1e-5),
        compression.centroids,
        extractor,
        client_config(config),
        grid.node_ids,
    )
    set_server_identity(1)
    message.metadata.__dict__["_message_id"] = "query-1"
    return message


def _context(node_config: dict, state: RecordDict | None = None) -> Context:
    config = {"partition-id": 0, "num-partitions": 3, **node_config}
    return Context(
        run_id=1, node_id=1000, node_config=config, state=state or RecordDict(), run_config={}
    )


def _answered(reply: Message) -> bool:
    return reply.has_content() and "scores" in reply.content


def test_ecos_repeated_query_is_charged_each_time_and_refused_at_the_limit(
    ecos_query, tmp_path, flwr_home
):
    path = tmp_path / "ledger.json"
    node = {"ledger-path": str(path), "epsilon-limit": 2.0}
    context = _context(node)
    replies = [handle_ecos_query(ecos_query, context) for _ in range(10)]
    answered = [_answered(r) for r in replies]
    # epsilon 1 per answer under exact Gaussian composition: 1, ~1.46, ~1.83, ~2.15 > 2.
    assert answered == [True] * 3 + [False] * 7
    assert all("privacy budget exceeded" in r.content["refusal"]["reason"] for r in replies[3:])
    ledger = NodeLedger.open(path, 2.0, 1e-5)
    assert len(ledger.events) == 3 and ledger.epsilon_spent() <= 2.0
    assert [e.note for e in ledger.events] == ["ecos query, run 1"] * 3
    sigmas = [float(r.content["metrics"]["sigma"]) for r in replies[:3]]
    assert len(set(sigmas)) == 1  # every answer was a full release, each charged
    # Fresh noise per answer: averaging repeats does not get the server the exact counts
    # for free (it paid in budget for every one).
    scores = [next(iter(r.content["scores"].values())).numpy() for r in replies[:3]]
    assert not np.allclose(scores[0], scores[1])


def test_a_restarted_ecos_client_never_answers_beyond_its_limit(ecos_query, tmp_path, flwr_home):
    path = tmp_path / "ledger.json"
    node = {"ledger-path": str(path), "epsilon-limit": 2.0}
    answered = 0
    for _ in range(8):  # every query lands on a freshly restarted client (empty state)
        answered += _answered(handle_ecos_query(ecos_query, _context(node)))
    assert answered == 3
    assert len(NodeLedger.open(path, 2.0, 1e-5).events) == 3


def test_an_ecos_client_that_crashes_after_charging_keeps_the_charge(
    ecos_query, tmp_path, monkeypatch, flwr_home
):
    path = tmp_path / "ledger.json"
    node = {"ledger-path": str(path), "epsilon-limit": 2.0}

    def crash(*args, **kwargs):
        raise MemoryError("killed while scoring the private shard")

    monkeypatch.setattr(ecos_client, "coverage_scores", crash)
    reply = handle_ecos_query(ecos_query, _context(node))
    monkeypatch.undo()
    # The failure leaves as a refusal without its text (it stays in the node's log).
    assert not _answered(reply)
    assert reply.content["refusal"]["reason"] == INTERNAL_FAILURE
    # Charged before the data was read: a crash can waste budget, never under-count it.
    assert len(NodeLedger.open(path, 2.0, 1e-5).events) == 1
    answered = sum(_answered(handle_ecos_query(ecos_query, _context(node))) for _ in range(5))
    assert answered == 2


@pytest.fixture()
def dssgd_task(tmp_path, flwr_home):
    """One real `train.dssgd` message with DP (SVT) from the strategy, and its config."""
    scenario = tiny_scenario(tmp_path)
    config = merge_run_config(
        {"scenario": str(scenario), "num-clients": 3},
        DSSGD,
        {"dssgd-epsilon": 1.8, "gamma": 0.001, "tau": 0.0001},
    )
    federation = load_federation(scenario, num_clients=3)
    model = seeded_model("paper-mlp", 0, federation.num_classes, 1, 8)
    strategy = make_strategy(config, federation.num_classes)
    grid = InProcessGrid(client_app, 1)
    initial = ArrayRecord({"params": Array(flatten_params(model))})
    (message,) = strategy.configure_train(1, initial, client_config(config), grid)
    set_server_identity(1)
    message.metadata.__dict__["_message_id"] = "train-1"
    return message


def test_dssgd_repeated_and_restarted_steps_never_overspend(dssgd_task, tmp_path):
    path = tmp_path / "dssgd-ledger.json"
    node = {"ledger-path": str(path), "epsilon-limit": 3.5}
    context = _context(node)
    # Each step's SVT costs its true 5/9 x 1.8 = 1 (published split): three fit under 3.5,
    # whether repeated on one client or sent to a client that restarts (fresh state) in between.
    one = PrivacyEvent.laplace(1.0)
    assert compose_epsilon([one] * 3, 1e-5) <= 3.5 < compose_epsilon([one] * 4, 1e-5)
    results = [_answered_upload(handle_dssgd_train(dssgd_task, context)) for _ in range(2)]
    results += [_answered_upload(handle_dssgd_train(dssgd_task, _context(node))) for _ in range(4)]
    assert results == [True, True, True, False, False, False]
    stored = NodeLedger.open(path, 3.5, 1e-5)
    assert [(e.kind, e.epsilon) for e in stored.events] == [("laplace", pytest.approx(1.0))] * 3
    assert stored.epsilon_spent() <= 3.0 * (1 + 1e-12)


def test_a_dssgd_step_whose_ledger_write_fails_releases_nothing(dssgd_task, tmp_path, monkeypatch):
    path = tmp_path / "dssgd-ledger.json"
    node = {"ledger-path": str(path), "epsilon-limit": 3.5}
    assert _answered_upload(handle_dssgd_train(dssgd_task, _context(node)))
    before = path.read_bytes()

    def disk_gone(target, payload):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(ledger_module, "_atomic_write", disk_gone)
    # The charge fails, so the node refuses: no upload leaves it, and nothing is recorded.
    reply = handle_dssgd_train(dssgd_task, _context(node))
    assert not _answered_upload(reply)
    assert reply.content["refusal"]["reason"].startswith("privacy ledger unusable")
    monkeypatch.undo()
    assert path.read_bytes() == before


def _answered_upload(reply: Message) -> bool:
    return reply.has_content() and "upload" in reply.content
