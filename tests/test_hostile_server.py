"""The hostile server: crafted messages to every handler of the real ClientApp, on a deployed
(private-policy) node, and on neighbouring datasets D and D minus one sample.

What must hold (DESIGN.md 2.4): no exact release; every release charged to the node's one ledger
before it leaves; no charge on a refusal that depends on the message only; the same behaviour on
D and D' for every data-dependent path; no limit or noise setting taken from a message.

The messages are real: captured from in-process runs of the project's own ServerApp, then
altered field by field.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from flower_helpers import run_tiny, tiny_scenario
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from ecos_flower.client.data import client_shard
from ecos_flower.client.release import INTERNAL_FAILURE
from ecos_flower.client_app import app as client_app
from ecos_flower.client_app import make_client_app
from ecos_flower.data import ImageSet
from ecos_flower.data.federation import ClientShard
from ecos_flower.flower.inprocess import InProcessGrid, wire_copy
from ecos_flower.privacy.ledger import NodeLedger
from ecos_flower.privacy.policy import MECHANISMS

DSSGD_DP = {
    "method": "dssgd",
    "model": "paper-mlp",
    "dssgd-epochs": 1,
    "dssgd-epsilon": 5.0,
    "gamma": 0.001,
    "tau": 0.0001,
}
RUNS = (
    {"method": "ecos", "application": "private-knn"},
    {"method": "ecos", "finetune-epsilon": 1.0, "finetune-steps": 3},
    DSSGD_DP,
    {"method": "fedavg"},
    {"method": "dp-fedavg"},
    {"method": "dp-fedavg-sample", "dp-sample-rate": 0.5},
    {"method": "local", "local-train-epochs": 1},
    {"method": "centralized", "cloud-epochs": 1},
)
LEAK_METRICS = ("num-examples", "train-loss", "compute-s")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(scenario, {message type: first message of that type}) from real runs."""
    folder = tmp_path_factory.mktemp("hostile")
    scenario = tiny_scenario(folder)
    captured: dict[str, Message] = {}

    def recording(msg: Message, context: Context) -> Message:
        captured.setdefault(msg.metadata.message_type, wire_copy(msg))
        return client_app(msg, context)

    with pytest.MonkeyPatch.context() as env:
        env.setenv("FLWR_HOME", str(folder / "flwr"))
        env.setenv("HOME", str(folder))
        for run in RUNS:
            run_tiny(scenario, grid=InProcessGrid(recording, 3), **run)
    return scenario, captured


def private_node(folder, **extra) -> Context:
    """A deployed node: no Ray, its own ledger and limit; its data is the scenario's shard 0."""
    config = {
        "partition-id": 0,
        "num-partitions": 3,
        "ledger-path": str(folder / "ledger.json"),
        "epsilon-limit": 1.5,
        **extra,
    }
    return Context(run_id=7, node_id=1000, node_config=config, state=RecordDict(), run_config={})


def events(context: Context) -> int:
    path = context.node_config["ledger-path"]
    if not os.path.exists(path):
        return 0
    return len(NodeLedger.open(path, math.inf, 1e-5).events)


def deliver(msg: Message, context: Context) -> Message:
    return client_app(wire_copy(msg), context)


def refusal_of(reply: Message) -> str | None:
    assert not reply.has_error(), f"the node crashed: {reply.error.reason}"
    if "refusal" in reply.content:
        return str(reply.content["refusal"]["reason"])
    return None


def with_field(msg: Message, record: str, key: str, value) -> Message:
    """A copy of `msg` whose ConfigRecord `record` has `key` set to `value` (None: removed)."""
    copy = wire_copy(msg)
    fields = dict(copy.content[record].items())
    if value is None:
        fields.pop(key, None)
    else:
        fields[key] = value
    copy.content[record] = ConfigRecord(fields)
    return copy


def check_released_fields(reply: Message, mechanism: str) -> None:
    spec = MECHANISMS[mechanism]
    names = set(reply.content.keys()) - {"metrics"}
    assert set(spec.records) <= names <= set(spec.records) | set(spec.optional_records)
    metrics = set(reply.content["metrics"].keys())
    assert metrics <= set(spec.metrics), metrics - set(spec.metrics)
    assert not metrics & set(LEAK_METRICS)


# ----------------------------------------------------------- the policy is the node's
NON_PRIVATE = {
    "exact ECOS counts": ("query.ecos", lambda m: with_field(m, "ecos", "noise", False)),
    "raw data upload": ("query.upload", lambda m: m),
    "DSSGD without the SVT": ("train.dssgd", lambda m: with_field(m, "dssgd", "dp-epsilon", None)),
    "FedAvg model update": ("train", lambda m: m),
    "client-level DP-FedAvg update": ("train.dpfedavg", lambda m: m),
    "exact evaluation metrics": ("evaluate", lambda m: m),
    "local training accuracy": ("train.local", lambda m: m),
    "DSSGD evaluation": ("evaluate.dssgd", lambda m: m),
    "fine-tuned accuracy": ("evaluate.finetune", lambda m: m),
}


@pytest.mark.parametrize("case", sorted(NON_PRIVATE))
def test_a_deployed_node_refuses_every_non_private_request_and_charges_nothing(
    world, tmp_path, case
):
    _, captured = world
    kind, craft = NON_PRIVATE[case]
    context = private_node(tmp_path, **{"epsilon-limit": 1.0})
    for _ in range(5):  # the audit: 5 of 5 exact answers from a node with limit 1
        reply = deliver(craft(captured[kind]), context)
        reason = refusal_of(reply)
        assert reason is not None and INTERNAL_FAILURE not in reason
        assert "metrics" not in reply.content and len(reply.content.array_records) == 0
    assert events(context) == 0


def test_an_operator_can_opt_a_node_into_exact_metrics_and_nothing_else(world, tmp_path):
    _, captured = world
    context = private_node(tmp_path, **{"report-metrics": True})
    reply = deliver(captured["evaluate"], context)
    assert refusal_of(reply) is None
    check_released_fields(reply, "evaluation-metrics")
    assert refusal_of(deliver(captured["query.upload"], context)) is not None
    assert refusal_of(deliver(captured["train"], context)) is not None


def test_a_node_without_its_own_ledger_and_limit_answers_no_private_query(world, tmp_path):
    _, captured = world
    context = private_node(tmp_path)
    context.node_config.pop("ledger-path")
    reason = refusal_of(deliver(captured["query.ecos"], context))
    assert reason is not None and "ledger-path" in reason


PRIVATE = {
    "query.ecos": ("ecos-counts", {}),
    "query.knn": ("knn-votes", {}),
    "train.dssgd": ("dssgd-svt", {}),
    "evaluate.finetune": ("dp-head-fit", {"report-metrics": True}),
    "train.dpsgd": ("dpsgd-update", {}),
}


@pytest.mark.parametrize("kind", sorted(PRIVATE))
def test_every_private_answer_is_charged_once_and_carries_only_its_declared_fields(
    world, tmp_path, kind
):
    _, captured = world
    mechanism, extra = PRIVATE[kind]
    context = private_node(tmp_path, **{"epsilon-limit": 100.0, **extra})
    if kind == "query.knn":  # the kNN query names the extractor sent with the ECOS query
        assert refusal_of(deliver(captured["query.ecos"], context)) is None
    before = events(context)
    reply = deliver(captured[kind], context)
    assert refusal_of(reply) is None
    check_released_fields(reply, mechanism)
    assert events(context) == before + 1
    metrics = reply.content["metrics"]
    ledger = NodeLedger.open(context.node_config["ledger-path"], math.inf, 1e-5)
    assert metrics["epsilon-spent"] == pytest.approx(ledger.epsilon_spent())


def test_no_message_field_raises_the_limit_or_lowers_the_noise(world, tmp_path):
    _, captured = world
    context = private_node(tmp_path, **{"epsilon-limit": 1.2})
    msg = captured["query.ecos"]
    for key, value in (("client-epsilon-limit", 1e9), ("epsilon-limit", 1e9), ("noise-seed", 1)):
        msg = with_field(msg, "ecos", key, value)
    msg = with_field(msg, "config", "epsilon-limit", 1e9)
    first = deliver(msg, context)
    assert refusal_of(first) is None
    assert first.content["metrics"]["epsilon-limit"] == 1.2
    assert first.content["metrics"]["sigma"] > 0
    second = refusal_of(deliver(msg, context))  # 1 + 1 composes past 1.2
    assert second is not None and "budget" in second
    assert events(context) == 1


# ------------------------------------------------------------ D and D minus one sample
def _neighbours(scenario, craft=None) -> tuple[ClientShard, ClientShard]:
    """(D, D'): shard 0 with a target sample appended (made by `craft`), and shard 0 itself."""
    shard = client_shard({"scenario": str(scenario)}, {"partition-id": 0, "num-partitions": 3})
    train = shard.train
    target_image = train.images[:1].clone()
    target_label = train.labels[:1].clone()
    images = train.images.clone()
    if craft is not None:
        images, target_image, target_label = craft(images, target_image, target_label)
    without = ImageSet(images, train.labels, train.domains, train.domain_names)
    with_target = ImageSet(
        torch.cat([images, target_image]),
        torch.cat([train.labels, target_label]),
        torch.cat([train.domains, train.domains[:1]]),
        train.domain_names,
    )
    return (
        ClientShard(0, with_target, shard.test),
        ClientShard(0, without, shard.test),
    )


def _run_on(shard: ClientShard, msg: Message, context: Context, monkeypatch, pre=()) -> Message:
    """`msg` (after `pre`) through the project's ClientApp, every handler reading `shard`."""
    app = make_client_app(load_data=lambda config, node_config: shard)
    for earlier in pre:
        assert refusal_of(app(wire_copy(earlier), context)) is None
    return app(wire_copy(msg), context)


def _same_behaviour(world, tmp_path, monkeypatch, msg, craft=None, pre=(), **node) -> tuple:
    scenario, _ = world
    d, d_prime = _neighbours(scenario, craft)
    outcomes = []
    for name, shard in (("d", d), ("d-prime", d_prime)):
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        context = private_node(folder, **{"epsilon-limit": 100.0, **node})
        before = len(pre)
        reply = _run_on(shard, msg, context, monkeypatch, pre)
        outcomes.append((refusal_of(reply), events(context) - before, reply))
    (reason_d, charged_d, reply_d), (reason_p, charged_p, reply_p) = outcomes
    assert reason_d == reason_p
    assert charged_d == charged_p
    if reason_d is None:
        assert sorted(reply_d.content.keys()) == sorted(reply_p.content.keys())
        assert sorted(reply_d.content["metrics"].keys()) == sorted(
            reply_p.content["metrics"].keys()
        )
    return outcomes[0]


def _overflowing_extractor(msg: Message) -> Message:
    """The ECOS query with a crafted PCA extractor: pixel 0 weighted by 1e38, so an image whose
    pixel 0 is lit gives infinite features and every other image finite ones."""
    copy = wire_copy(msg)
    record = copy.content["extractor"]
    components = np.zeros_like(record["components"].numpy())
    components[0, 0] = 1e38
    components[1:, 1:] = np.eye(components.shape[0] - 1, components.shape[1] - 1)
    copy.content["extractor"] = ArrayRecord(
        {
            "mean": Array(np.zeros_like(record["mean"].numpy())),
            "components": Array(components.astype(np.float32)),
            "scale": Array(np.ones_like(record["scale"].numpy())),
        }
    )
    return with_field(copy, "ecos", "extractor-hash", "crafted-overflow")


def _light_pixel_zero_of_the_target_only(images, target, label):
    images = images.clone()
    images.view(len(images), -1)[:, 0] = 0.0
    target = target.clone()
    target.view(1, -1)[:, 0] = 1.0
    return images, target, label


def test_an_extractor_that_overflows_on_one_image_is_answered_and_charged_on_both(
    world, tmp_path, monkeypatch
):
    _, captured = world
    msg = _overflowing_extractor(captured["query.ecos"])
    reason, charged, reply = _same_behaviour(
        world, tmp_path, monkeypatch, msg, craft=_light_pixel_zero_of_the_target_only
    )
    assert reason is None and charged == 1
    assert np.all(np.isfinite(reply.content["scores"].to_numpy_ndarrays()[0]))


def _label_out_of_range(images, target, label):
    return images, target, torch.full_like(label, 7)


def test_knn_with_fewer_classes_than_a_samples_label_answers_on_both(world, tmp_path, monkeypatch):
    _, captured = world
    msg = with_field(captured["query.knn"], "knn", "num-classes", 2)
    reason, charged, _ = _same_behaviour(
        world, tmp_path, monkeypatch, msg, craft=_label_out_of_range, pre=[captured["query.ecos"]]
    )
    assert reason is None and charged == 1


def _non_finite_pixel(images, target, label):
    target = target.clone()
    target.view(1, -1)[:, 3] = float("inf")
    return images, target, label


@pytest.mark.parametrize("method", ["dp-least-squares", "dp-fc", "dp-sgd"])
def test_a_head_fit_with_a_non_finite_sample_answers_on_both(world, tmp_path, monkeypatch, method):
    _, captured = world
    msg = with_field(captured["evaluate.finetune"], "finetune", "method", method)
    reason, charged, _ = _same_behaviour(
        world, tmp_path, monkeypatch, msg, craft=_non_finite_pixel, **{"report-metrics": True}
    )
    assert reason is None and charged == 1


HOSTILE_VALUES = (None, float("nan"), -1.0, 1e12, 0, "x", True)
CRAFTED = {
    "query.ecos": ("ecos", ()),
    "query.knn": ("knn", ("query.ecos",)),
    "train.dssgd": ("dssgd", ()),
    "evaluate.finetune": ("finetune", ()),
    "train.dpsgd": ("dpsgd", ()),
}
CONFIG_FIELDS = ("model", "batch-size", "learning-rate", "seed", "num-classes", "device")


@pytest.mark.parametrize("kind", sorted(CRAFTED))
def test_every_field_of_every_private_request_crafted_behaves_alike_on_d_and_d_prime(
    world, tmp_path, monkeypatch, kind
):
    """Every field of the mechanism's record and the run config set to hostile values: the node
    either refuses (message-only reason, nothing charged) or answers charged, and does the same
    on D and D'. A failure after the charge leaves as INTERNAL_FAILURE, paid."""
    _, captured = world
    record, pre_kinds = CRAFTED[kind]
    base = captured[kind]
    pre = [captured[p] for p in pre_kinds]
    fields = [(record, key) for key in base.content[record]]
    fields += [("config", key) for key in CONFIG_FIELDS if key in base.content["config"]]
    seen_reasons = set()
    for index, (name, key) in enumerate(fields):
        for value_index, value in enumerate(HOSTILE_VALUES):
            msg = with_field(base, name, key, value)
            case = tmp_path / f"{index}-{value_index}"
            case.mkdir()
            reason, charged, reply = _same_behaviour(
                world, case, monkeypatch, msg, pre=pre, **{"report-metrics": True}
            )
            no_fit = kind == "evaluate.finetune" and reason is None
            if no_fit and reply.content["metrics"]["finetuned"] == 0:  # only exact metrics left
                assert "finetune-refusal" in reply.content and charged == 0
                continue
            if reason is not None and reason != INTERNAL_FAILURE and "budget" not in reason:
                assert charged == 0, f"{name}.{key}={value!r}: refused ({reason}) but charged"
            elif reason is None or reason == INTERNAL_FAILURE:
                assert charged == 1, f"{name}.{key}={value!r}: released without a charge"
            seen_reasons.add(reason)
    assert None in seen_reasons  # some hostile values are harmless: the node still answers


def test_no_reply_of_any_handler_carries_exact_sizes_losses_or_timings(world, tmp_path):
    _, captured = world
    context = private_node(
        tmp_path,
        **{
            "epsilon-limit": 100.0,
            "report-metrics": True,
            "allow": ",".join(
                ("exact-counts", "raw-upload", "dssgd-exact", "model-update", "clipped-update")
            ),
        },
    )
    for kind, msg in sorted(captured.items()):
        reply = deliver(msg, context)
        if refusal_of(reply) is not None or "metrics" not in reply.content:
            continue
        metrics = set(reply.content["metrics"].keys())
        assert "compute-s" not in metrics, kind
        if kind not in ("train",):  # FedAvg (opted in, non-private) weights by its size
            assert not metrics & {"num-examples", "train-loss"} or kind == "train.dpfedavg", kind
        if kind == "train.dpfedavg":
            assert reply.content["metrics"]["num-examples"] == 1  # uniform weights
    assert json.loads(json.dumps(sorted(captured)))  # every message kind was exercised
    assert {"query.ecos", "query.knn", "train.dssgd", "evaluate.finetune", "train.dpsgd"} <= set(
        captured
    )


def test_a_node_refusing_to_evaluate_is_named_with_its_own_reason(world, tmp_path):
    from ecos_flower.strategy.evaluation import EvaluationTally

    _, captured = world
    context = private_node(tmp_path)  # a private node: no report-metrics
    reply = deliver(captured["evaluate"], context)
    reply.metadata.__dict__["_src_node_id"] = context.node_id
    tally = EvaluationTally()
    assert tally.add([reply]) is None
    (error,) = tally.rejected
    assert error.node_id == context.node_id and "report-metrics" in str(error)
