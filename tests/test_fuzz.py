"""Property-based fuzzing of every message a peer can send: server-side validators (ECOS score
replies, DSSGD sparse uploads, evaluation metrics) and client-side checks (ECOS queries: centroid
counts and dimensions, privacy parameters; DSSGD tasks: theta values, budgets, downloads and
global weights of the wrong shape). Hypothesis builds 1,000 cases per message kind from a valid
message plus hostile mutations, forged array headers and random records, and calls the
validators, aggregate hooks and client handlers directly (no runs), checking:

- no crash: the documented rejection (InvalidReplyError / a refusal reply) or acceptance, nothing
  else escapes;
- a rejected message changes no server or client state (compared before and after);
- the rejection is logged with a clear reason naming the node;
- an accepted message satisfies the invariants the validator promises, and every valid message
  generated is accepted (the checks do not over-reject);
- resource bounds: a message declaring absurd sizes is refused before allocating (tracemalloc).

FUZZ_EXAMPLES=200 in the environment runs fewer cases (quick local iterations); the default is
the required 1,000 per message kind.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from flower_helpers import reply_from, server_message, tiny_scenario
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.logger import LOGGER_NAME
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ecos_flower.applications import KNN_MODES
from ecos_flower.client import dssgd as dssgd_client
from ecos_flower.client import ecos as ecos_client
from ecos_flower.client.applications import check_knn_query, read_finetune_spec
from ecos_flower.client.messages import ECOS_QUERY, FINETUNE_METHODS, QueryRejected, TaskRejected
from ecos_flower.client.release import INTERNAL_FAILURE
from ecos_flower.data import load_federation
from ecos_flower.dssgd import flatten_params, upload_count
from ecos_flower.ecos import compress, make_extractor
from ecos_flower.flower.applications import finetune_record
from ecos_flower.flower.inprocess import InProcessGrid
from ecos_flower.flower.settings import client_config, merge_run_config
from ecos_flower.flower.validation import InvalidReplyError, checked_numpy, float_vector
from ecos_flower.models import seeded_model
from ecos_flower.strategy import Dssgd
from ecos_flower.strategy.ecos_query import QuerySettings, QueryTally, query_messages
from ecos_flower.strategy.evaluation import EvaluationTally

FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "1000")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
K = 6
GOOD, BAD = 1001, 1002  # node ids: a well-behaved node and the fuzzed one


# --------------------------------------------------------------------------- helpers
class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def captured_log():
    """Every line Flower's logger emits inside the block."""
    handler = _Lines()
    logger = logging.getLogger(LOGGER_NAME)
    logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)


def _names(lines: list[str], node: int) -> bool:
    return any(f"node {node}" in line for line in lines)


def _forged(dtype: str, declared: tuple[int, ...], body: int) -> Array:
    """An Array whose .npy header declares `declared` but which carries `body` bytes."""
    descr, shape = np.dtype(dtype).str, tuple(declared)
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape!r}, }}"
    header = header.ljust(118 - 10) + "\n"
    data = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin1")
    return Array(dtype=dtype, shape=(K,), stype="numpy.ndarray", data=data + b"\0" * body)


DTYPES = ["float64", "float32", "float16", "int64", "int32", "uint8", "bool", "complex128"]

# Arrays a peer may send: any numeric dtype, shape and values (NaN, inf, huge), or forged bytes.
any_ndarray = st.sampled_from(DTYPES).flatmap(
    lambda dtype: hnp.arrays(
        np.dtype(dtype),
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=K + 2),
    )
)
forged_array = st.builds(
    _forged,
    st.sampled_from(["float64", "float32", "int64"]),
    st.lists(st.integers(0, 10**12), min_size=0, max_size=3).map(tuple),
    st.integers(0, 64),
)
junk_array = st.binary(max_size=200).map(
    lambda b: Array(dtype="float64", shape=(K,), stype="numpy.ndarray", data=b)
)
any_array = st.one_of(any_ndarray.map(Array), forged_array, junk_array)

metric_value = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(-5, 5), max_size=3),
    st.lists(st.floats(-1, 1), max_size=3),
)
config_value = st.one_of(
    metric_value,
    st.booleans(),
    st.text(max_size=12),
    st.binary(max_size=8),
)


def _metric_record(values: dict) -> MetricRecord | None:
    try:
        return MetricRecord(values)
    except Exception:  # a value MetricRecord cannot hold: the peer cannot send it either
        return None


def _config_record(values: dict) -> ConfigRecord | None:
    try:
        return ConfigRecord(values)
    except Exception:
        return None


other_record = st.one_of(
    st.builds(lambda a: ArrayRecord({"x": a}), any_array),
    st.dictionaries(st.sampled_from(["a", "reason", "x"]), config_value, max_size=3).map(
        _config_record
    ),
    st.dictionaries(st.sampled_from(["a", "accuracy", "x"]), metric_value, max_size=3).map(
        _metric_record
    ),
)


def _mutated_metrics(base: dict, draw, keys: list[str]) -> tuple[MetricRecord | None, bool]:
    """`base` with some keys dropped or given hostile values; returns (record, unchanged)."""
    values = dict(base)
    unchanged = True
    for key in draw(st.lists(st.sampled_from(keys), max_size=3, unique=True)):
        if draw(st.booleans()):
            values.pop(key, None)
        else:
            values[key] = draw(metric_value)
        unchanged = False
    return _metric_record(values), unchanged


# ----------------------------------------------------------------- ECOS score replies
def _good_score_reply(node: int, rng_seed: int = 0) -> RecordDict:
    scores = np.random.default_rng(rng_seed).normal(5.0, 1.0, K)
    return RecordDict(
        {
            "scores": ArrayRecord([scores]),
            "metrics": MetricRecord({"partition-id": 0, "sigma": 3.0, "epsilon-spent": 1.0}),
        }
    )


@st.composite
def ecos_score_replies(draw):
    """(reply content or Error, valid) for the fuzzed node."""
    kind = draw(st.sampled_from(["valid", "scores", "metrics", "records", "error", "refusal"]))
    if kind == "error":
        return Error(code=2, reason=draw(st.text(max_size=40))), False
    if kind == "refusal":
        reason = draw(config_value)
        return RecordDict({"refusal": _config_record({"reason": reason}) or ConfigRecord()}), False
    scores = np.random.default_rng(1).normal(5.0, 1.0, K)
    metrics = {"partition-id": 1, "sigma": 2.5, "epsilon-spent": 0.5}
    content = {"scores": ArrayRecord([scores]), "metrics": MetricRecord(metrics)}
    if kind == "valid":
        finite = st.floats(-1e6, 1e6, allow_nan=False)
        content["scores"] = ArrayRecord([draw(hnp.arrays(np.float64, (K,), elements=finite))])
        content["metrics"] = MetricRecord(
            {
                "partition-id": draw(st.integers(1, 10**6)),  # 0 is GOOD's
                "sigma": draw(st.floats(1e-6, 1e6)),
                "epsilon-spent": draw(st.floats(0, 1e3)),
            }
        )
        return RecordDict(content), True
    if kind == "scores":
        arrays = draw(st.lists(any_array, min_size=0, max_size=2))
        record = ArrayRecord({f"a{i}": a for i, a in enumerate(arrays)})
        content["scores"] = record  # almost always invalid: checked against the invariants
        return RecordDict(content), None
    if kind == "metrics":
        record, unchanged = _mutated_metrics(metrics, draw, list(metrics) + ["extra"])
        if record is None:
            content.pop("metrics")
        else:
            content["metrics"] = record
        return RecordDict(content), None
    # records: replace or remove whole records
    for key in draw(st.lists(st.sampled_from(["scores", "metrics", "junk"]), min_size=1)):
        replacement = draw(st.one_of(st.none(), other_record))
        if replacement is None:
            content.pop(key, None)
        else:
            content[key] = replacement
    return RecordDict(content), None


def _ecos_state(tally: QueryTally) -> dict:
    return {
        "scores": {n: s.tolist() for n, s in tally.scores.items()},
        "sigmas": dict(tally.sigmas),
        "spent": dict(tally.epsilon_spent),
        "clients": dict(tally.node_to_client),
        "refused": dict(tally.refused),
    }


def _evaluation_state(tally: EvaluationTally) -> dict:
    return {
        "accuracy": dict(tally.accuracy),
        "clients": dict(tally.node_to_client),
        "evaluated": set(tally.evaluated_nodes),
    }


@FUZZ
@given(case=ecos_score_replies())
def test_fuzz_ecos_score_replies(case):
    content, valid = case
    strategy = QueryTally(K, threshold_multiple=0.0)
    strategy.add([reply_from(GOOD, "query.ecos", _good_score_reply(GOOD))])
    before = _ecos_state(strategy)
    rejected_before = len(strategy.rejected)
    reply = reply_from(BAD, "query.ecos", content)
    with captured_log() as lines:
        strategy.add([reply])  # must not raise
        aggregated = strategy.aggregate()
    assert aggregated is not None and aggregated.shape == (K,)
    assert np.all(np.isfinite(aggregated)) and np.all(aggregated >= 0)
    if BAD in strategy.scores:
        scores = strategy.scores[BAD]
        assert scores.dtype == np.float64 and scores.shape == (K,)
        assert np.all(np.isfinite(scores)) and strategy.sigmas[BAD] > 0
        assert math.isfinite(strategy.epsilon_spent[strategy.node_to_client[BAD]])
        assert valid is not False
        return
    assert valid is not True, f"a valid reply was rejected: {strategy.rejected[-1:]}"
    after = _ecos_state(strategy)
    if BAD in strategy.refused:  # a stated refusal: recorded as such, nothing else changes
        after["refused"].pop(BAD)
    else:
        assert len(strategy.rejected) == rejected_before + 1
        error = strategy.rejected[-1]
        assert error.node_id == BAD and str(error).startswith(f"node {BAD}: ") and error.problem
    assert after == before
    assert _names(lines, BAD)


# ------------------------------------------------------------------ evaluation metrics
@st.composite
def evaluation_replies(draw, extra_keys: tuple[str, ...] = ()):
    metrics = {"accuracy": 0.5, "partition-id": 1, **dict.fromkeys(extra_keys, 0.25)}
    kind = draw(st.sampled_from(["valid", "metrics", "records", "error"]))
    if kind == "error":
        return Error(code=2, reason=draw(st.text(max_size=20))), False
    if kind == "valid":
        values = {"partition-id": draw(st.integers(1, 1000))}  # 0 is GOOD's
        for key in ("accuracy", *extra_keys):
            values[key] = draw(st.floats(0.0, 1.0))
        return RecordDict({"metrics": MetricRecord(values)}), True
    if kind == "metrics":
        record, _ = _mutated_metrics(metrics, draw, [*metrics, "local-steps", "loss"])
        return RecordDict({"metrics": record} if record is not None else {}), None
    replacement = draw(st.one_of(st.none(), other_record))
    return RecordDict({} if replacement is None else {"metrics": replacement}), None


@FUZZ
@given(case=evaluation_replies())
def test_fuzz_ecos_evaluation_metrics(case):
    content, valid = case
    strategy = EvaluationTally()
    good = MetricRecord({"accuracy": 0.9, "partition-id": 0})
    strategy.add([reply_from(GOOD, "evaluate", RecordDict({"metrics": good}))])
    before, rejected_before = _evaluation_state(strategy), len(strategy.rejected)
    with captured_log() as lines:
        result = strategy.add([reply_from(BAD, "evaluate", content)])
    assert result is not None and 0.0 <= float(result["accuracy"]) <= 1.0
    if BAD in strategy.evaluated_nodes:
        assert valid is not False
        assert all(0.0 <= a <= 1.0 for a in strategy.accuracy.values())
        return
    assert valid is not True, f"a valid evaluation was rejected: {strategy.rejected[-1:]}"
    assert _evaluation_state(strategy) == before
    assert len(strategy.rejected) == rejected_before + 1
    assert strategy.rejected[-1].node_id == BAD and _names(lines, BAD)


# ---------------------------------------------------------------- DSSGD sparse uploads
NUM_PARAMS, GAMMA = 200, 0.001


def _dssgd_strategy() -> Dssgd:
    """A DP Dssgd after round 1's configure_train (its parameter server built) on 3 nodes."""
    initial = np.linspace(-1, 1, NUM_PARAMS).astype(np.float32)
    strategy = Dssgd(
        theta_u=0.05, schedule="parallel", gamma=GAMMA, tau=0.0001, dp_epsilon=1.0, num_classes=10
    )
    arrays = ArrayRecord({"params": Array(initial)})
    strategy.configure_train(1, arrays, ConfigRecord(), InProcessGrid(lambda m, c: m, 3))
    return strategy


MAX_UP = upload_count(0.05, NUM_PARAMS)
CLIP32 = float(np.float32(GAMMA * 0.999))


def _upload_content(indices, values, metrics: MetricRecord | None) -> RecordDict:
    content = RecordDict(
        {"upload": ArrayRecord({"indices": Array(indices), "values": Array(values)})}
    )
    if metrics is not None:
        content["metrics"] = metrics
    return content


# What a DP participant's upload states: its label, the upload's cost and its ledger's budget
# state (no num-examples or train-loss: they would leave exact facts of the private data).
GOOD_UPLOAD_METRICS = {
    "partition-id": 1,
    "epsilon-epoch": 1.0,
    "local-steps": 1,
    "epsilon-spent": 1.0,
    "epsilon-limit": 10.0,
    "delta": 1e-5,
}


@st.composite
def dssgd_uploads(draw):
    kind = draw(st.sampled_from(["valid", "arrays", "metrics", "records", "error", "refusal"]))
    if kind == "error":
        return Error(code=2, reason="boom"), False
    if kind == "refusal":
        return RecordDict({"refusal": ConfigRecord({"reason": "privacy budget"})}), False
    count = draw(st.integers(0, MAX_UP))
    indices = np.array(
        draw(st.lists(st.integers(0, NUM_PARAMS - 1), min_size=count, max_size=count, unique=True)),
        dtype=np.int64,
    )
    values = draw(hnp.arrays(np.float32, (count,), elements=st.floats(-CLIP32, CLIP32, width=32)))
    metrics = MetricRecord(GOOD_UPLOAD_METRICS)
    if kind == "valid":
        return _upload_content(indices, values, metrics), True
    if kind == "arrays":
        which = draw(st.sampled_from(["indices", "values", "both"]))
        record = ArrayRecord({"indices": Array(indices), "values": Array(values)})
        if which in ("indices", "both"):
            record["indices"] = draw(any_array)
        if which in ("values", "both"):
            record["values"] = draw(any_array)
        if draw(st.booleans()):
            record["extra"] = draw(any_array)
        return RecordDict({"upload": record, "metrics": metrics}), None
    if kind == "metrics":
        record, unchanged = _mutated_metrics(GOOD_UPLOAD_METRICS, draw, list(GOOD_UPLOAD_METRICS))
        return _upload_content(indices, values, record), True if unchanged else None
    content = _upload_content(indices, values, metrics)
    for key in draw(st.lists(st.sampled_from(["upload", "metrics"]), min_size=1, unique=True)):
        replacement = draw(st.one_of(st.none(), other_record))
        if replacement is None:
            content.pop(key, None)
        else:
            content[key] = replacement
    return content, None


def _dssgd_state(strategy: Dssgd) -> dict:
    return {
        "params": strategy._server.params.tobytes(),
        "stat": strategy._server.stat.tobytes(),
        "applied": strategy._server.num_applied,
        "accepted": strategy.accepted,
        "clients": strategy.node_clients,
        "per-client": dict(strategy._accepted_per_client),
        "spent": dict(strategy._epsilon_spent),
        "ledger-delta": dict(strategy._ledger_delta),
        "run": dict(strategy._epsilon_run),
        "refused": strategy.refused,
        "accuracy": dict(strategy._accuracy),
        "server-accuracy": dict(strategy._server_accuracy),
    }


@FUZZ
@given(case=dssgd_uploads())
def test_fuzz_dssgd_sparse_uploads(case):
    content, valid = case
    strategy = _dssgd_strategy()
    strategy._scheduled = {BAD}
    before, rejected_before = _dssgd_state(strategy), len(strategy.rejected)
    params_before = strategy._server.params.copy()
    with captured_log() as lines:
        arrays, metrics = strategy.aggregate_train(1, [reply_from(BAD, "train.dssgd", content)])
    assert arrays is not None and metrics is not None
    if int(metrics["accepted"]) == 1:
        assert valid is not False
        record = content["upload"]
        indices, values = record["indices"].numpy(), record["values"].numpy()
        assert len(np.unique(indices)) == len(indices) <= MAX_UP
        assert np.all(np.abs(values) <= GAMMA * (1 + 1e-6))
        expected = params_before.copy()
        expected[indices] += values
        np.testing.assert_array_equal(strategy._server.params, expected)
        return
    assert valid is not True, f"a valid upload was rejected: {strategy.rejected[-1:]}"
    after = _dssgd_state(strategy)
    if BAD in strategy.refused:
        after["refused"].pop(BAD)
    else:
        assert len(strategy.rejected) == rejected_before + 1
        assert strategy.rejected[-1].node_id == BAD
    assert after == before
    assert _names(lines, BAD)


@FUZZ
@given(case=evaluation_replies(extra_keys=("server-accuracy",)))
def test_fuzz_dssgd_evaluation_metrics(case):
    content, valid = case
    strategy = _dssgd_strategy()
    before, rejected_before = _dssgd_state(strategy), len(strategy.rejected)
    with captured_log() as lines:
        strategy.aggregate_evaluate(1, [reply_from(BAD, "evaluate.dssgd", content)])
    if BAD in strategy.node_clients:  # its evaluation was accepted
        assert valid is not False
        assert all(0.0 <= a <= 1.0 for a in strategy._server_accuracy.values())
        return
    assert valid is not True, f"a valid evaluation was rejected: {strategy.rejected[-1:]}"
    assert _dssgd_state(strategy) == before
    assert len(strategy.rejected) == rejected_before + 1 and _names(lines, BAD)


# ------------------------------------------------------------ client: ECOS query checks
@pytest.fixture(scope="module")
def ecos_setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-ecos")
    scenario = tiny_scenario(folder)
    config = merge_run_config({"scenario": str(scenario), "num-clients": 3})
    federation = load_federation(scenario, num_clients=3)
    extractor = make_extractor("pca", n_components=8).fit(federation.pool.images)
    compression = compress(extractor.transform(federation.pool.images), K, seed=0)
    grid = InProcessGrid(lambda m, c: m, 1)
    (message,) = query_messages(
        QuerySettings(), compression.centroids, extractor, client_config(config), grid.node_ids
    )
    return message, folder


QUERY_FIELDS = [
    "num-centroids",
    "dim",
    "noise",
    "epsilon",
    "delta",
    "score-mode",
    "max-per-sample",
    "radius",
    "client-epsilon-limit",  # no longer part of the protocol: a server sending it is ignored
    "extractor-hash",
    "extractor-kind",
    "extractor-config",
]
hostile_number = st.one_of(
    st.sampled_from([0, -1, 1, 10**9, 10**18, 2**63 - 1, -(2**63), 0.5, 1e-300, 1e308]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**63), 2**63 - 1),
)
query_value = st.one_of(hostile_number, config_value)


@st.composite
def ecos_queries(draw, base: Message):
    """A query message from `base` with hostile fields, centroids or records."""
    content = RecordDict()
    for key, record in base.content.items():
        content[key] = copy.deepcopy(record)
    query = content["ecos"]
    for key in draw(st.lists(st.sampled_from(QUERY_FIELDS), min_size=0, max_size=3, unique=True)):
        if draw(st.integers(0, 4)) == 0:
            query.pop(key, None)
        else:
            value = draw(query_value)
            with contextlib.suppress(Exception):
                query[key] = value
    choice = draw(st.sampled_from(["keep", "centroids", "records", "extractor"]))
    if choice == "centroids":
        content["centroids"] = ArrayRecord({"centroids": draw(any_array)})
    elif choice == "records":
        key = draw(st.sampled_from(["ecos", "centroids", "config", "extractor"]))
        replacement = draw(st.one_of(st.none(), other_record))
        if replacement is None:
            content.pop(key, None)
        else:
            content[key] = replacement
    elif choice == "extractor" and "extractor" in content:
        record = content["extractor"]
        name = draw(st.sampled_from(sorted(record.keys())))
        record[name] = draw(any_array)
    return content


def _client_state(context: Context, ledger: Path) -> tuple:
    state = {
        key: (
            sorted(record.keys()),
            [getattr(v, "data", v) for v in record.values()],
        )
        for key, record in context.state.items()
    }
    return json.dumps(state, default=repr, sort_keys=True), (
        ledger.read_bytes() if ledger.exists() else None
    )


def _ledger_events(ledger: Path) -> int:
    return len(json.loads(ledger.read_text())["events"]) if ledger.exists() else 0


@FUZZ
@given(data=st.data())
def test_fuzz_ecos_client_query_checks(ecos_setup, data, tmp_path_factory, monkeypatch):
    base, folder = ecos_setup
    monkeypatch.setenv("FLWR_HOME", str(folder))
    content = data.draw(ecos_queries(base))
    query = content.get("ecos")
    try:
        if not isinstance(content.get("centroids"), ArrayRecord):
            raise QueryRejected("no centroids")
        message = server_message(BAD, "query.ecos", content)
        centroids = ecos_client.read_centroids(message, ECOS_QUERY.parse(query, {}))
    except QueryRejected as exc:
        assert str(exc)
        return
    # Accepted: exactly what the query declared, within the node's limits, finite floats.
    k, d = int(query["num-centroids"]), int(query["dim"])
    assert 1 <= k <= ecos_client.DEFAULT_LIMITS["max-centroids"]
    assert 1 <= d <= ecos_client.DEFAULT_LIMITS["max-dim"]
    assert centroids.shape == (k, d) and centroids.dtype.kind == "f"
    assert np.all(np.isfinite(centroids))
    epsilon, delta = query.get("epsilon"), query.get("delta")
    if query.get("noise", True):
        assert 0 < float(epsilon) < math.inf and 0 < float(delta) < 1


@FUZZ
@given(data=st.data())
def test_fuzz_ecos_client_handler(ecos_setup, data, monkeypatch):
    """handle_ecos_query end to end on hostile messages, on a private (deployed) or a research
    (simulated) node: a refusal (logged naming the node, the state untouched; the ledger untouched
    too, unless the handler failed after charging it: then it keeps exactly that one charge and
    the reason is the fixed INTERNAL_FAILURE) or a well-formed answer; never an exception."""
    base, folder = ecos_setup
    ledger = folder / "fuzz-ledger.json"
    policy = data.draw(st.sampled_from(["private", "research"]))
    node_config = {
        "partition-id": 0,
        "num-partitions": 3,
        "epsilon-limit": 1e6,
        "ledger-path": str(ledger),
        "privacy-policy": policy,
    }
    context = data.draw(st.sampled_from(["fresh", "primed"]))
    state = RecordDict()
    ctx = Context(run_id=1, node_id=BAD, node_config=node_config, state=state, run_config={})
    if context == "primed":  # the node already holds the extractor from an earlier query
        primed = _ecos_primed(base, node_config, folder)
        for key, record in primed.items():
            state[key] = record
    content = data.draw(ecos_queries(base))
    before, events_before = _client_state(ctx, ledger), _ledger_events(ledger)
    with captured_log() as lines:
        reply = ecos_client.handle_ecos_query(server_message(BAD, "query.ecos", content), ctx)
    if "refusal" in reply.content:
        reason = reply.content["refusal"]["reason"]
        assert isinstance(reason, str)
        state_before, ledger_before = before
        state_after, ledger_after = _client_state(ctx, ledger)
        assert state_after == state_before
        event(
            f"{policy}: refused ({'internal failure' if reason == INTERNAL_FAILURE else 'message'})"
        )
        if reason == INTERNAL_FAILURE:  # failed after the charge, if any: it stays paid for
            assert _ledger_events(ledger) - events_before in (0, 1)
        else:
            assert ledger_after == ledger_before
        assert _names(lines, BAD)
        return
    scores = reply.content["scores"]
    (array,) = scores.values()
    query = content["ecos"]
    k = int(query["num-centroids"])
    assert array.numpy().shape == (k,) and np.all(np.isfinite(array.numpy()))
    metrics = reply.content["metrics"]
    event(f"{policy}: answered")
    if query.get("noise", True):  # charged to the node's ledger, under the node's own limit
        assert _ledger_events(ledger) == events_before + 1
        assert metrics["epsilon-limit"] == 1e6 and metrics["sigma"] > 0
    else:  # exact counts: only a research node answers them, and they cost nothing
        assert policy == "research" and metrics["sigma"] == 0
        assert _ledger_events(ledger) == events_before


def test_an_extractor_whose_output_overflows_is_answered_not_a_crash(ecos_setup, tmp_path):
    """Found by the fuzzer: a PCA scale of ~1e38 makes float32 features infinite. The scoring is
    total (it drops non-finite samples), so the node answers, charged before it read its data,
    instead of a refusal whose reason would depend on the data."""
    base, _ = ecos_setup
    content = copy.deepcopy(base.content)
    content["extractor"]["scale"] = Array(np.full(8, 3e38, dtype=np.float32))
    path = tmp_path / "l"
    node_config = {
        "partition-id": 0,
        "num-partitions": 3,
        "ledger-path": str(path),
        "epsilon-limit": 10.0,
    }
    ctx = Context(run_id=1, node_id=BAD, node_config=node_config, state=RecordDict(), run_config={})
    reply = ecos_client.handle_ecos_query(server_message(BAD, "query.ecos", content), ctx)
    assert "refusal" not in reply.content
    (scores,) = reply.content["scores"].values()
    assert scores.numpy().shape == (K,) and np.all(np.isfinite(scores.numpy()))
    assert _ledger_events(path) == 1  # charged once


_PRIMED: dict = {}


def _ecos_primed(base: Message, node_config: dict, folder: Path) -> RecordDict:
    if "state" not in _PRIMED:
        ctx = Context(
            run_id=1, node_id=BAD, node_config=dict(node_config), state=RecordDict(), run_config={}
        )
        ctx.node_config["ledger-path"] = str(folder / "prime-ledger.json")
        reply = ecos_client.handle_ecos_query(base, ctx)
        assert "scores" in reply.content
        _PRIMED["state"] = ctx.state
    return _PRIMED["state"]


# ----------------------------------------------------- client: DSSGD task and weights
@pytest.fixture(scope="module")
def dssgd_setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-dssgd")
    scenario = tiny_scenario(folder)
    config = merge_run_config(
        {"scenario": str(scenario), "num-clients": 3},
        {"method": "dssgd", "model": "paper-mlp", "dssgd-schedule": "parallel"},
    )
    federation = load_federation(scenario, num_clients=3)
    model = seeded_model("paper-mlp", 0, federation.num_classes, 1, 8)
    strategy = Dssgd(
        theta_u=0.1,
        theta_d=0.5,
        schedule="parallel",
        gamma=0.001,
        tau=0.0001,
        dp_epsilon=1.0,
        num_classes=federation.num_classes,
    )
    grid = InProcessGrid(lambda m, c: m, 1)
    initial = ArrayRecord({"params": Array(flatten_params(model))})
    (train,) = strategy.configure_train(1, initial, client_config(config), grid)
    (evaluate,) = strategy.configure_evaluate(1, ArrayRecord(), client_config(config), grid)
    return train, evaluate, strategy.num_params, folder


TASK_FIELDS = [
    "theta-u",
    "theta-d",
    "upload-mode",
    "tau",
    "svt-split",
    "num-params",
    "num-classes",
    "epoch",
    "gamma",
    "dp-epsilon",
    "epsilon-limit",  # no longer part of the protocol: a server sending it is ignored
]
CONFIG_FIELDS = ["model", "batch-size", "learning-rate", "seed"]


@st.composite
def dssgd_messages(draw, base: Message):
    """A `train.dssgd` message with at least one hostile change that must make it invalid,
    or with hostile values in fields the checks must catch."""
    content = RecordDict()
    for key, record in base.content.items():
        content[key] = copy.deepcopy(record)
    task, config = content["dssgd"], content["config"]
    for key in draw(st.lists(st.sampled_from(TASK_FIELDS), max_size=3, unique=True)):
        if draw(st.integers(0, 4)) == 0:
            task.pop(key, None)
        else:
            with contextlib.suppress(Exception):
                task[key] = draw(query_value)
    for key in draw(st.lists(st.sampled_from(CONFIG_FIELDS), max_size=2, unique=True)):
        with contextlib.suppress(Exception):
            config[key] = draw(query_value)
    choice = draw(st.sampled_from(["download", "download", "records", "fields"]))
    if choice == "download":
        record = content["download"]
        name = draw(st.sampled_from(["indices", "values"]))
        record[name] = draw(any_array)
    elif choice == "records":
        key = draw(st.sampled_from(["dssgd", "download", "config"]))
        replacement = draw(st.one_of(st.none(), other_record))
        if replacement is None:
            content.pop(key, None)
        else:
            content[key] = replacement
    return content


def _accepted_download_is_sane(message: Message, node_config: dict) -> None:
    task = message.content["dssgd"]
    dssgd_client.check_task(task, node_config)
    download = dssgd_client.read_download(message, task)
    num_params = int(task["num-params"])
    assert np.all((download.indices >= 0) & (download.indices < num_params))
    assert np.all(np.isfinite(download.values))


@FUZZ
@given(data=st.data())
def test_fuzz_dssgd_client_task_checks(dssgd_setup, data, monkeypatch):
    """check_task / check_config / read_download on hostile tasks, then the handler itself for
    every task the checks refuse: a refusal reply, no ledger, no state, a log naming the node."""
    train, _, num_params, folder = dssgd_setup
    monkeypatch.setenv("FLWR_HOME", str(folder))
    content = data.draw(dssgd_messages(train))
    message = server_message(BAD, "train.dssgd", content)
    node_config = {
        "partition-id": 0,
        "num-partitions": 3,
        "ledger-path": str(folder / "fuzz-dssgd-ledger.json"),
        "epsilon-limit": 1e6,
    }
    try:
        task = content.get("dssgd")
        if not isinstance(task, ConfigRecord):
            raise TaskRejected("no task")
        dssgd_client.check_task(task, node_config)
        dssgd_client.check_config(content.get("config"))
        _accepted_download_is_sane(message, node_config)
    except TaskRejected:
        pass
    else:
        task = content["dssgd"]
        assert 0 < float(task["theta-u"]) <= 1 and 0 < float(task["theta-d"]) <= 1
        if "dp-epsilon" in task:
            assert 0 < float(task["dp-epsilon"]) < math.inf and "gamma" in task
        return  # a valid task would train: covered by the DSSGD flow tests
    ledger = Path(node_config["ledger-path"])
    ctx = Context(run_id=1, node_id=BAD, node_config=node_config, state=RecordDict(), run_config={})
    before = _client_state(ctx, ledger)
    with captured_log() as lines:
        reply = dssgd_client.handle_dssgd_train(message, ctx)
    assert "refusal" in reply.content, "the checks refused what the handler accepted"
    assert _client_state(ctx, ledger) == before and _names(lines, BAD)


@FUZZ
@given(
    params=st.one_of(any_array, st.builds(Array, hnp.arrays(np.float32, st.integers(0, 300)))),
    num_params=st.one_of(st.none(), hostile_number),
)
def test_fuzz_dssgd_client_global_weights_of_the_wrong_shape(dssgd_setup, params, num_params):
    _, evaluate, true_params, folder = dssgd_setup
    content = RecordDict({key: copy.deepcopy(record) for key, record in evaluate.content.items()})
    content["global"] = ArrayRecord({"params": params})
    if num_params is not None:
        with contextlib.suppress(Exception):
            content["dssgd"]["num-params"] = num_params
    # Exact test-set metrics leave a (private) node only if its operator reports them.
    node_config = {"partition-id": 0, "num-partitions": 3, "report-metrics": True}
    ctx = Context(run_id=1, node_id=BAD, node_config=node_config, state=RecordDict(), run_config={})
    with captured_log() as lines:
        message = server_message(BAD, "evaluate.dssgd", content)
        reply = dssgd_client.handle_dssgd_evaluate(message, ctx)
    if "refusal" in reply.content:
        assert _names(lines, BAD) and len(ctx.state) == 0
        return
    # Only weights of exactly the model's size, finite float32, are evaluated.
    weights = params.numpy()
    assert weights.shape == (true_params,) and weights.dtype == np.float32
    assert 0.0 <= float(reply.content["metrics"]["server-accuracy"]) <= 1.0


# ------------------------------------------------------------------- resource bounds
def _peak_bytes(action) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        action()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


LIMIT = 4 * 2**20  # a few MB


def test_a_query_declaring_a_billion_centroids_is_refused_before_allocating(ecos_setup):
    base, _ = ecos_setup
    content = RecordDict({key: copy.deepcopy(r) for key, r in base.content.items()})
    content["ecos"]["num-centroids"] = 10**9
    dim = int(content["ecos"]["dim"])
    content["centroids"] = ArrayRecord({"centroids": _forged("float32", (10**9, dim), 0)})
    message = server_message(BAD, "query.ecos", content)
    ctx = Context(
        run_id=1, node_id=BAD, node_config={"partition-id": 0}, state=RecordDict(), run_config={}
    )
    replies = []
    peak = _peak_bytes(lambda: replies.append(ecos_client.handle_ecos_query(message, ctx)))
    assert "num-centroids=1000000000 outside" in replies[0].content["refusal"]["reason"]
    assert peak < LIMIT
    # Within the node's limit on paper, but the array header claims a billion rows.
    content["ecos"]["num-centroids"] = K
    replies.clear()
    peak = _peak_bytes(lambda: replies.append(ecos_client.handle_ecos_query(message, ctx)))
    assert "exceed the maximum" in replies[0].content["refusal"]["reason"]
    assert peak < LIMIT
    # What a plain numpy decode of that header would have reserved.
    assert 10**9 * dim * 4 > 1000 * LIMIT


def test_forged_headers_are_refused_before_allocating_on_the_server():
    bomb = _forged("float64", (10**9,), 16)
    reply = reply_from(BAD, "query.ecos", RecordDict({"scores": ArrayRecord({"s": bomb})}))
    errors = []

    def validate():
        try:
            float_vector(reply, "scores", K)
        except InvalidReplyError as exc:
            errors.append(exc)

    assert _peak_bytes(validate) < LIMIT and "exceed the maximum" in str(errors[0])
    strategy = _dssgd_strategy()
    strategy._scheduled = {BAD}
    upload = ArrayRecord({"indices": _forged("int64", (10**10,), 8), "values": bomb})
    content = RecordDict({"upload": upload, "metrics": MetricRecord(GOOD_UPLOAD_METRICS)})
    peak = _peak_bytes(
        lambda: strategy.aggregate_train(1, [reply_from(BAD, "train.dssgd", content)])
    )
    assert peak < LIMIT and "exceed the maximum" in str(strategy.rejected[-1])


def test_checked_numpy_round_trips_what_flower_encodes():
    for array in (
        np.arange(12.0).reshape(3, 4),
        np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
        np.array(3, dtype=np.int64),
        np.zeros((0, 5)),
        np.array([True, False]),
    ):
        np.testing.assert_array_equal(checked_numpy(Array(array), array.size), array)
    with pytest.raises(ValueError, match="carries"):
        checked_numpy(_forged("float64", (3,), 8), 10)


# ----------------------------------------------------------------- DP fine-tuning requests
FINETUNE_FIELDS = [
    "method",
    "epsilon",
    "delta",
    "steps",
    "clip",
    "learning-rate",
    "init",
    "ridge",
    "covariance-share",
    "floor",
    "feature-scale",
]


def _mutated_config(base: dict, draw, keys: list[str]) -> ConfigRecord | None:
    """`base` with up to four keys dropped or given hostile values, as a ConfigRecord."""
    values = dict(base)
    for key in draw(st.lists(st.sampled_from(keys), max_size=4, unique=True)):
        if draw(st.booleans()):
            values.pop(key, None)
        else:
            values[key] = draw(config_value)
    return _config_record(values)


@FUZZ
@given(data=st.data())
def test_fuzz_finetune_requests_parse_within_bounds_or_are_refused(data):
    """Whatever the server sends in `finetune`, the node either gets settings inside its bounds
    or refuses with QueryRejected (which becomes a refusal reply), never another exception."""
    config = merge_run_config({"finetune-epsilon": 1.0, "finetune-method": "dp-fc"})
    record = _mutated_config(dict(finetune_record(config, 3.0)), data.draw, FINETUNE_FIELDS)
    assume(record is not None)
    try:
        spec = read_finetune_spec(record, {})
    except QueryRejected:
        return
    assert spec.method in FINETUNE_METHODS and spec.init in ("zero", "received")
    assert math.isfinite(spec.epsilon) and spec.epsilon > 0 and 0 < spec.delta < 1
    assert 1 <= spec.steps <= 10_000 and 0 < spec.covariance_share < 1
    for value in (spec.clip, spec.learning_rate, spec.ridge, spec.floor, spec.feature_scale):
        assert math.isfinite(value) and value > 0


KNN_FIELDS = ["num-queries", "dim", "k", "mode", "num-classes", "epsilon", "delta"]


@FUZZ
@given(data=st.data())
def test_fuzz_knn_queries_are_checked_or_refused(data):
    """Same contract for `query.knn`: checked fields, or QueryRejected, nothing else."""
    features = np.zeros((4, 3), dtype=np.float64)
    values = {"num-queries": 4, "dim": 3, "k": 2, "mode": "capped", "num-classes": 10}
    values |= {"epsilon": 1.0, "delta": 1e-5}
    record = _mutated_config(values, data.draw, KNN_FIELDS)
    assume(record is not None)
    try:
        check_knn_query(record, features, {})
    except QueryRejected:
        return
    assert 1 <= int(record["k"]) <= 1_000 and str(record["mode"]) in KNN_MODES
    assert int(record["num-queries"]) == 4 and int(record["dim"]) == 3
