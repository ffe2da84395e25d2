"""Faults, in process: clients that crash, time out or disconnect mid-round; privacy ledgers that
crash mid-write; restarted clients; a server that re-sends or repeats queries.

- Up to half of the clients may fail: ECOS and DSSGD rounds go on with the rest while at least
  `min-clients` answer, fail clearly below it, and the report names who dropped and why.
- A ledger file is always the old or the new complete state, whatever step of a write dies
  (checked by killing a forked child at each step), and a restarted client resumes from it.
- Every answer is charged: re-sending or repeating the same query cannot make a client spend past
  its limit, before or after a restart.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from flower_helpers import FAST, run_tiny, tiny_scenario
from flwr.app import ArrayRecord, Context, Message, RecordDict

import ecos_flower.flower.ecos_client as ecos_client
import ecos_flower.privacy.ledger as ledger_module
import ecos_flower.privacy.pure_dp as pure_dp_module
from ecos_flower.client_app import app as client_app
from ecos_flower.data import load_federation
from ecos_flower.dssgd import flatten_params
from ecos_flower.ecos import compress, make_extractor
from ecos_flower.flower.dssgd_client import handle_dssgd_train, seeded_model
from ecos_flower.flower.dssgd_run import make_strategy
from ecos_flower.flower.ecos_client import handle_ecos_query
from ecos_flower.flower.ecos_strategy import EcosStrategy
from ecos_flower.flower.inprocess import InProcessGrid, set_server_identity
from ecos_flower.flower.settings import DEFAULT_RUN_CONFIG, client_config, merge_run_config
from ecos_flower.flower.validation import NO_REPLY
from ecos_flower.privacy import PrivacyLedger
from ecos_flower.privacy.pure_dp import PureDPLedger

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
    assert len(json.loads((ledgers / f"node-{LOST}.json").read_text())["releases"]) == 1
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
def _die_at(step: str, monkeypatch, module) -> None:
    """In a forked child: make `step` of the ledger write end the process on the spot
    (os._exit: no cleanup, no finally), as a power cut or SIGKILL would."""
    real_fdopen, real_fsync, real_replace = os.fdopen, os.fsync, os.replace
    real_mkstemp = module.tempfile.mkstemp

    def die():
        os._exit(17)

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
        monkeypatch.setattr(module.tempfile, "mkstemp", lambda *a, **k: die())
    elif step == "half-written":
        monkeypatch.setattr(module.os, "fdopen", lambda *a, **k: HalfWriter(real_fdopen(*a, **k)))
    elif step == "written-not-synced":
        monkeypatch.setattr(module.os, "fsync", lambda fd: die())
    elif step == "synced-not-renamed":
        monkeypatch.setattr(module.os, "replace", lambda *a: die())
    elif step == "renamed":

        def replace_then_die(*args):
            real_replace(*args)
            die()

        monkeypatch.setattr(module.os, "replace", replace_then_die)
    else:
        raise AssertionError(step)
    del real_fsync, real_mkstemp


STEPS = ["mkstemp", "half-written", "written-not-synced", "synced-not-renamed", "renamed"]


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


@pytest.mark.parametrize("step", STEPS)
def test_a_gaussian_ledger_survives_a_crash_at_any_step_of_a_write(tmp_path, monkeypatch, step):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(3.0, 1e-5, path, accountant="gdp")
    ledger.charge(4.0, note="first")
    before = path.read_bytes()

    def crash_mid_charge():
        _die_at(step, monkeypatch, ledger_module)
        ledger.charge(4.0, note="second")

    assert _in_child(crash_mid_charge) == 17  # died inside the write
    monkeypatch.undo()
    stored = json.loads(path.read_text())  # always complete JSON
    notes = [r["note"] for r in stored["releases"]]
    assert notes in (["first"], ["first", "second"])
    if step == "renamed":
        assert notes == ["first", "second"]
    else:
        assert path.read_bytes() == before  # the old state, byte for byte
    # A restart resumes from what is on disk and never answers past the limit.
    resumed = PrivacyLedger.open_or_create(path, 3.0, 1e-5, accountant="gdp")
    assert len(resumed.releases) == len(notes)
    answered = 0
    while True:
        try:
            resumed.charge(4.0)
        except ledger_module.BudgetExceededError:
            break
        answered += 1
        assert answered < 100
    assert resumed.epsilon_spent() <= 3.0
    fresh = PrivacyLedger(3.0, 1e-5, accountant="gdp")
    allowed = 0
    while fresh.can_afford(4.0):
        fresh.charge(4.0)
        allowed += 1
    assert len(notes) + answered == allowed  # the crash cost no budget it did not record


@pytest.mark.parametrize("step", STEPS)
def test_a_pure_dp_ledger_survives_a_crash_at_any_step_of_a_write(tmp_path, monkeypatch, step):
    path = tmp_path / "ledger-dssgd.json"
    ledger = PureDPLedger(5.0)
    ledger.charge(2.0, note="first")
    ledger.save(path)
    before = path.read_bytes()

    def crash_mid_save():
        _die_at(step, monkeypatch, pure_dp_module)
        ledger.charge(2.0, note="second")
        ledger.save(path)

    assert _in_child(crash_mid_save) == 17
    monkeypatch.undo()
    notes = [c["note"] for c in json.loads(path.read_text())["charges"]]
    assert notes in (["first"], ["first", "second"])
    if step != "renamed":
        assert path.read_bytes() == before
    resumed = PureDPLedger.load(path)
    assert resumed.spent == pytest.approx(2.0 * len(notes))


def test_a_failed_ledger_write_records_nothing_in_memory_or_on_disk(tmp_path, monkeypatch):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(10.0, 1e-5, path, accountant="gdp")
    ledger.charge(4.0)
    before = path.read_bytes()

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ledger_module.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space"):
        ledger.charge(4.0)
    assert len(ledger.releases) == 1 and path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # temp file removed


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
    strategy = EcosStrategy(epsilon=1.0, delta=1e-5)
    (message,) = strategy.configure_query(
        1, compression.centroids, extractor, client_config(config), grid
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
    node = {"ledger-path": str(path), "epsilon-limit": 2.0, "accountant": "gdp"}
    context = _context(node)
    replies = [handle_ecos_query(ecos_query, context) for _ in range(10)]
    answered = [_answered(r) for r in replies]
    # epsilon 1 per answer under exact Gaussian composition: 1, ~1.46, ~1.83, ~2.15 > 2.
    assert answered == [True] * 3 + [False] * 7
    assert all("privacy budget exceeded" in r.content["refusal"]["reason"] for r in replies[3:])
    ledger = PrivacyLedger.load(path, 2.0, 1e-5, accountant="gdp")
    assert len(ledger.releases) == 3 and ledger.epsilon_spent() <= 2.0
    sigmas = [float(r.content["metrics"]["sigma"]) for r in replies[:3]]
    assert len(set(sigmas)) == 1  # every answer was a full release, each charged
    # Fresh noise per answer: averaging repeats does not get the server the exact counts
    # for free (it paid in budget for every one).
    scores = [next(iter(r.content["scores"].values())).numpy() for r in replies[:3]]
    assert not np.allclose(scores[0], scores[1])


def test_a_restarted_ecos_client_never_answers_beyond_its_limit(ecos_query, tmp_path, flwr_home):
    path = tmp_path / "ledger.json"
    node = {"ledger-path": str(path), "epsilon-limit": 2.0, "accountant": "gdp"}
    answered = 0
    for _ in range(8):  # every query lands on a freshly restarted client (empty state)
        answered += _answered(handle_ecos_query(ecos_query, _context(node)))
    assert answered == 3
    assert len(PrivacyLedger.load(path, 2.0, 1e-5, accountant="gdp").releases) == 3


def test_an_ecos_client_that_crashes_after_charging_keeps_the_charge(
    ecos_query, tmp_path, monkeypatch, flwr_home
):
    path = tmp_path / "ledger.json"
    node = {"ledger-path": str(path), "epsilon-limit": 2.0, "accountant": "gdp"}

    def crash(*args, **kwargs):
        raise MemoryError("killed while adding noise")

    monkeypatch.setattr(ecos_client, "noise_generator", crash)
    with pytest.raises(MemoryError):
        handle_ecos_query(ecos_query, _context(node))
    monkeypatch.undo()
    # Charged before anything was released: a crash can waste budget, never under-count it.
    assert len(PrivacyLedger.load(path, 2.0, 1e-5, accountant="gdp").releases) == 1
    answered = sum(_answered(handle_ecos_query(ecos_query, _context(node))) for _ in range(5))
    assert answered == 2


@pytest.fixture()
def dssgd_task(tmp_path, flwr_home):
    """One real `train.dssgd` message with DP (SVT) from the strategy, and its config."""
    scenario = tiny_scenario(tmp_path)
    config = merge_run_config(
        {"scenario": str(scenario), "num-clients": 3},
        DSSGD,
        {"dssgd-epsilon": 0.9, "gamma": 0.001, "tau": 0.0001},
    )
    federation = load_federation(scenario, num_clients=3)
    model = seeded_model("paper-mlp", 0, federation.num_classes, 1, 8)
    strategy = make_strategy(config, flatten_params(model), federation.num_classes)
    grid = InProcessGrid(client_app, 1)
    (message,) = strategy.configure_train(1, ArrayRecord(), client_config(config), grid)
    set_server_identity(1)
    message.metadata.__dict__["_message_id"] = "train-1"
    return message


def test_dssgd_repeated_and_restarted_steps_never_overspend(dssgd_task, tmp_path):
    path = tmp_path / "dssgd-ledger.json"
    node = {"dssgd-ledger-path": str(path), "epsilon-limit": 3.5}
    context = _context(node)
    # Each step costs 10/9 x 0.9 = 1: three fit under 3.5, whether repeated on one client or
    # sent to a client that restarts (fresh state) in between.
    results = [_answered_upload(handle_dssgd_train(dssgd_task, context)) for _ in range(2)]
    results += [_answered_upload(handle_dssgd_train(dssgd_task, _context(node))) for _ in range(4)]
    assert results == [True, True, True, False, False, False]
    stored = PureDPLedger.load(path)
    assert len(stored.charges) == 3 and stored.spent == pytest.approx(3.0)


def test_a_dssgd_step_whose_ledger_write_fails_releases_nothing(dssgd_task, tmp_path, monkeypatch):
    path = tmp_path / "dssgd-ledger.json"
    node = {"dssgd-ledger-path": str(path), "epsilon-limit": 3.5}
    assert _answered_upload(handle_dssgd_train(dssgd_task, _context(node)))
    before = path.read_bytes()

    def disk_gone(self, target):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(PureDPLedger, "save", disk_gone)
    with pytest.raises(OSError):  # the ClientApp fails: no upload leaves the node
        handle_dssgd_train(dssgd_task, _context(node))
    assert path.read_bytes() == before


def _answered_upload(reply: Message) -> bool:
    return reply.has_content() and "upload" in reply.content
