"""Sample-level DP-FedAvg (`train.dpsgd`): every client runs DP-SGD (Opacus, Poisson sampling)
with noise it calibrates itself to the run's target, and charges its own ledger before reading
its data.

What must hold: the calibrated run costs at most the target by the ledger's accountant, tightly,
and agrees with Opacus' PRV accountant (and beats its RDP bound); the charge follows from the
message alone; replies carry only the declared fields (the constant weight 1, no size); a node
past its limit, or asked for an absurd run, refuses without reading its data; an in-process
Flower run learns and charges every node.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from flower_helpers import run_tiny, server_message, tiny_scenario
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from ecos_flower.client.data import client_shard
from ecos_flower.client.dp_fedavg import (
    CALIBRATION_TOLERANCE,
    Z_MIN,
    DpSgdPlan,
    calibrate_dpsgd,
    dpsgd_train_handler,
    steps_per_epoch,
)
from ecos_flower.client_app import app as client_app
from ecos_flower.data import ImageSet
from ecos_flower.data.federation import ClientShard
from ecos_flower.flower.fedavg import dpsgd_request
from ecos_flower.flower.inprocess import InProcessGrid, wire_copy
from ecos_flower.flower.settings import merge_run_config
from ecos_flower.models import build_model
from ecos_flower.privacy import _opacus  # noqa: F401  (Opacus without its logging side effect)
from ecos_flower.privacy.ledger import NodeLedger, PrivacyEvent, compose_epsilon
from ecos_flower.privacy.policy import MECHANISMS

DELTA = 1e-5
# A run the tiny scenario learns from at a generous epsilon (measured with 8 noise seeds: mean
# accuracy 0.53-0.74, chance is 0.1): the paper's MLP (17k parameters: less noise in all than
# the CNN's 150k), q = 0.5 (2 steps per epoch, ~112 of a client's ~225 samples per expected
# batch), 3 rounds of 4 epochs.
LEARNS = {
    "method": "dp-fedavg-sample",
    "model": "paper-mlp",
    "num-server-rounds": 3,
    "local-epochs": 4,
    "dp-sample-epsilon": 8.0,
    "dp-sample-rate": 0.5,
    "batch-size": 112,
    "learning-rate": 1.0,
}


@pytest.fixture()
def scenario(tmp_path, flwr_home):
    return tiny_scenario(tmp_path)


# ------------------------------------------------------------------ calibration and accounting
def cost(z: float, q: float, steps: int) -> float:
    return compose_epsilon((PrivacyEvent.dpsgd(z, q, steps),), DELTA)


@settings(max_examples=4, deadline=None, derandomize=True)
@given(
    epsilon=st.floats(0.3, 10.0),
    q=st.sampled_from([0.02, 0.1, 0.25, 0.5, 1.0]),
    steps=st.integers(1, 300),
)
def test_the_calibrated_noise_costs_at_most_the_target_and_no_more_noise_is_wasted(
    epsilon, q, steps
):
    z = calibrate_dpsgd(epsilon, DELTA, q, steps)
    assert cost(z, q, steps) <= epsilon
    if z > Z_MIN:  # a little less noise would overshoot: the target is met, not undershot
        assert cost(z / (1 + 2 * CALIBRATION_TOLERANCE), q, steps) > epsilon


@pytest.mark.parametrize(
    ("epsilon", "q", "steps", "rounds"), [(1.0, 0.25, 8, 3), (8.0, 0.25, 8, 2), (2.0, 0.1, 10, 5)]
)
def test_rounds_charged_one_by_one_compose_to_the_target_as_opacus_accounts_them(
    epsilon, q, steps, rounds
):
    from opacus.accountants import PRVAccountant, RDPAccountant

    z = calibrate_dpsgd(epsilon, DELTA, q, steps * rounds)
    ledger = NodeLedger(None, math.inf, DELTA)
    for _ in range(rounds):
        ledger.charge(PrivacyEvent.dpsgd(z, q, steps))
    spent = ledger.epsilon_spent()
    assert 0.99 * epsilon <= spent <= epsilon  # the target, spent (almost) exactly
    prv, rdp = PRVAccountant(), RDPAccountant()
    prv.history = rdp.history = [(z, q, steps * rounds)]
    # Opacus' PRV accountant estimates the same privacy loss distribution (its upper estimate):
    # within 2 %. Its RDP bound is looser: the PLD accounting earns >= 5 % less epsilon (~10 %
    # measured), which is what calibrating on the ledger rather than on RDP buys.
    assert spent == pytest.approx(prv.get_epsilon(DELTA), rel=0.02)
    assert spent <= 0.95 * rdp.get_epsilon(DELTA)


def test_the_plan_depends_on_the_message_and_the_node_limits_only():
    task = {
        "epsilon": 2.0,
        "delta": DELTA,
        "num-rounds": 3,
        "local-epochs": 2,
        "sample-rate": 0.3,
        "max-grad-norm": 1.0,
        "expected-batch-size": 20.0,
        "learning-rate": 0.5,
    }
    plan = DpSgdPlan.from_task(task, {})
    assert steps_per_epoch(0.3) == 3  # int(1/q), whatever the dataset's size
    assert (plan.steps, plan.total_steps) == (6, 18)
    assert plan.noise_multiplier == calibrate_dpsgd(2.0, DELTA, 0.3, 18)
    assert plan.event().steps == 6 and plan.event().sampling_rate == 0.3


# ----------------------------------------------------------------------- the node's handler
def node(folder, limit: float = 100.0, **extra) -> Context:
    """A deployed (private-policy) node with its own ledger and limit."""
    config = {
        "partition-id": 0,
        "num-partitions": 3,
        "ledger-path": str(folder / "ledger.json"),
        "epsilon-limit": limit,
        **extra,
    }
    return Context(run_id=7, node_id=1000, node_config=config, state=RecordDict(), run_config={})


def request(scenario, **run) -> Message:
    """A `train.dpsgd` message as the project's server sends it (one round of two, one epoch of
    two steps), with the run-config overrides `run`."""
    short = {"num-server-rounds": 2, "local-epochs": 1}
    config = merge_run_config({**LEARNS, **short, "scenario": str(scenario)}, run)
    model = build_model(config["model"], 10, 1, 8, seed=0)
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "config": ConfigRecord(
                {"scenario": str(scenario), "model": config["model"], "num-classes": 10}
            ),
            "dpsgd": dpsgd_request(config),
        }
    )
    return server_message(1000, "train.dpsgd", content)


class CountingLoader:
    """The node's data, counting reads (a refusal must come before any)."""

    def __init__(self, shard: ClientShard | None = None) -> None:
        self.shard, self.reads = shard, 0

    def __call__(self, config, node_config) -> ClientShard:
        self.reads += 1
        return self.shard or client_shard(config, node_config)


def events(context: Context) -> tuple[PrivacyEvent, ...]:
    return NodeLedger.open(context.node_config["ledger-path"], math.inf, DELTA).events


def refusal(reply: Message) -> str | None:
    assert not reply.has_error()
    return str(reply.content["refusal"]["reason"]) if "refusal" in reply.content else None


def test_a_deployed_node_answers_with_only_the_declared_fields_charged_once(scenario, tmp_path):
    loader = CountingLoader()
    context = node(tmp_path)
    msg = request(scenario)
    reply = dpsgd_train_handler(loader)(wire_copy(msg), context)
    assert refusal(reply) is None
    spec = MECHANISMS["dpsgd-update"]
    assert spec.private
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    metrics = dict(reply.content["metrics"].items())
    assert set(metrics) <= set(spec.metrics)
    assert "num-examples" not in metrics and "train-loss" not in metrics
    assert metrics["weight"] == 1
    plan = DpSgdPlan.from_task(dict(msg.content["dpsgd"].items()), {})
    (event,) = events(context)
    assert event == plan.event(event.note)  # the charge is exactly the message's plan
    assert metrics["noise-multiplier"] == plan.noise_multiplier > 0
    assert metrics["epsilon-spent"] == pytest.approx(compose_epsilon([event], DELTA))
    arrays = reply.content["arrays"].to_torch_state_dict()
    assert all(torch.isfinite(v).all() for v in arrays.values())


def test_a_node_refuses_past_its_limit_before_reading_its_data(scenario, tmp_path):
    loader = CountingLoader()
    context = node(tmp_path, limit=3.0)  # the run asks for 8
    handler = dpsgd_train_handler(loader)
    first = refusal(handler(wire_copy(request(scenario)), context))
    second = refusal(handler(wire_copy(request(scenario)), context))
    assert first is not None and "budget" in first
    assert first == second  # fixed text: the message and the (empty) ledger only
    assert loader.reads == 0 and events(context) == ()


def test_a_node_answers_until_its_limit_then_refuses(scenario, tmp_path):
    # One round costs a bit over half of the run's 8 (two rounds compose sub-additively), so a
    # node with limit 7 answers one round and refuses the second, charged once.
    loader = CountingLoader()
    context = node(tmp_path, limit=7.0)
    handler = dpsgd_train_handler(loader)
    assert refusal(handler(wire_copy(request(scenario)), context)) is None
    reason = refusal(handler(wire_copy(request(scenario)), context))
    assert reason is not None and "budget" in reason
    assert loader.reads == 1 and len(events(context)) == 1


HOSTILE = {
    "huge epochs": ({"local-epochs": 10**7}, "local-epochs"),
    "a run too long for the node": ({"num-rounds": 10_000, "local-epochs": 1_000}, "max-dpsgd"),
    "negative epsilon": ({"epsilon": -1.0}, "epsilon"),
    "zero epsilon": ({"epsilon": 0.0}, "epsilon"),
    "a larger delta": ({"delta": 1e-2}, "max-delta"),
    "a zero sample rate": ({"sample-rate": 0.0}, "sample-rate"),
    "a sample rate above 1": ({"sample-rate": 1.5}, "sample-rate"),
    "no clipping": ({"max-grad-norm": 0.0}, "max-grad-norm"),
    "an unreachable target": ({"epsilon": 1e-9}, "out of reach"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_crafted_fields_are_refused_before_any_charge_or_read(scenario, tmp_path, case):
    crafted, named = HOSTILE[case]
    msg = wire_copy(request(scenario))
    fields = dict(msg.content["dpsgd"].items())
    msg.content["dpsgd"] = ConfigRecord({**fields, **crafted})
    loader = CountingLoader()
    context = node(tmp_path)
    reason = refusal(dpsgd_train_handler(loader)(msg, context))
    assert reason is not None and named in reason
    assert loader.reads == 0 and not (tmp_path / "ledger.json").exists()


def test_no_message_field_sets_the_noise_or_the_limit(scenario, tmp_path):
    """A server asking for zero noise, or a higher limit, is ignored: the noise is the node's
    calibration of the declared run, the limit the node's own."""
    honest = node(tmp_path / "honest")
    (tmp_path / "honest").mkdir()
    base = dpsgd_train_handler(CountingLoader())(wire_copy(request(scenario)), honest)
    crafted = wire_copy(request(scenario))
    fields = dict(crafted.content["dpsgd"].items())
    extra = {"noise-multiplier": 0.0, "noise": False, "epsilon-limit": 1e9, "steps": 1}
    crafted.content["dpsgd"] = ConfigRecord({**fields, **extra})
    crafted.content["config"] = ConfigRecord(
        {**dict(crafted.content["config"].items()), "epsilon-limit": 1e9, "noise-seed": 1}
    )
    (tmp_path / "crafted").mkdir()
    context = node(tmp_path / "crafted")
    reply = dpsgd_train_handler(CountingLoader())(crafted, context)
    assert refusal(reply) is None
    for key in ("noise-multiplier", "steps", "epsilon-limit", "epsilon-spent"):
        assert reply.content["metrics"][key] == base.content["metrics"][key]
    assert reply.content["metrics"]["epsilon-limit"] == 100.0


def test_a_smaller_delta_buys_more_noise_never_less(scenario, tmp_path):
    replies = {}
    for delta in (1e-5, 1e-8):
        (tmp_path / str(delta)).mkdir()
        context = node(tmp_path / str(delta))
        msg = request(scenario, delta=delta)
        replies[delta] = dpsgd_train_handler(CountingLoader())(wire_copy(msg), context)
    z = {d: r.content["metrics"]["noise-multiplier"] for d, r in replies.items()}
    assert z[1e-8] > z[1e-5]


def _neighbours(scenario, poison) -> tuple[ClientShard, ClientShard]:
    """(D, D'): node 0's shard with one crafted sample appended, and the shard itself."""
    shard = client_shard({"scenario": str(scenario)}, {"partition-id": 0, "num-partitions": 3})
    train = shard.train
    image, label = poison(train.images[:1].clone(), train.labels[:1].clone())
    with_target = ImageSet(
        torch.cat([train.images, image]),
        torch.cat([train.labels, label]),
        torch.cat([train.domains, train.domains[:1]]),
        train.domain_names,
    )
    return ClientShard(0, with_target, shard.test), shard


POISONS = {
    "a non-finite pixel": lambda x, y: (x.index_fill_(-1, torch.tensor([3]), math.inf), y),
    "an absurd pixel": lambda x, y: (x * 1e30, y),
    "a label out of range": lambda x, y: (x, torch.full_like(y, 77)),
}


@pytest.mark.parametrize("case", sorted(POISONS))
def test_a_poisoned_sample_changes_nothing_but_its_own_contribution(scenario, tmp_path, case):
    """Totality on neighbouring datasets: the same answer, charge and fields on D and D', and a
    finite model (the sample is dropped by a per-sample rule, not by a branch)."""
    outcomes = []
    for name, shard in zip(("d", "d-prime"), _neighbours(scenario, POISONS[case]), strict=True):
        (tmp_path / name).mkdir()
        context = node(tmp_path / name)
        reply = dpsgd_train_handler(CountingLoader(shard))(wire_copy(request(scenario)), context)
        assert refusal(reply) is None
        arrays = reply.content["arrays"].to_torch_state_dict()
        assert all(torch.isfinite(v).all() for v in arrays.values())
        outcomes.append((sorted(reply.content["metrics"].keys()), len(events(context))))
    assert outcomes[0] == outcomes[1] == (outcomes[0][0], 1)


def test_a_model_crafted_to_overflow_on_one_pixel_does_not_poison_the_release(scenario, tmp_path):
    """The server's MLP weighs pixel 0 by 1e38: a lit pixel 0 overflows that sample's gradients
    (full batches, so it is in every step). The sample is dropped from its steps (a per-sample
    rule), so the release stays finite on D (one such sample) and D' (none); without that rule
    the release on D is NaN (checked by disabling it)."""
    msg = wire_copy(request(scenario, **{"model": "paper-mlp", "dp-sample-rate": 1.0}))
    state = msg.content["arrays"].to_torch_state_dict()
    weight = state["net.1.weight"]
    weight.zero_()
    weight[:, 0] = 1e38
    state["net.3.weight"].fill_(1.0)  # 128 x 1e38 overflows: inf logits, NaN gradients
    msg.content["arrays"] = ArrayRecord(state)

    def light_pixel_zero(x, y):
        x = x.clone()
        x.view(1, -1)[:, 0] = 1.0
        return x, y

    d, d_prime = _neighbours(scenario, light_pixel_zero)
    d.train.images.view(len(d.train), -1)[:-1, 0] = 0.0  # only the target has pixel 0 lit
    d_prime.train.images.view(len(d_prime.train), -1)[:, 0] = 0.0
    for name, shard in (("d", d), ("d-prime", d_prime)):
        (tmp_path / name).mkdir()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            reply = dpsgd_train_handler(CountingLoader(shard))(
                wire_copy(msg), node(tmp_path / name)
            )
        assert refusal(reply) is None
        arrays = reply.content["arrays"].to_torch_state_dict()
        assert all(bool(torch.isfinite(v).all()) for v in arrays.values()), name


# --------------------------------------------------------------------------- a Flower run
def test_an_in_process_run_learns_at_a_generous_epsilon_and_charges_every_node(scenario, tmp_path):
    """Three real ClientApps, three rounds at epsilon 8. Node 2's replies are altered on the way
    to claim the weight 1000: the server drops its update and names it, and still reports
    what that node spent."""
    seen: list[Message] = []

    def recording(msg: Message, context: Context) -> Message:
        reply = client_app(msg, context)
        if msg.metadata.message_type == "train.dpsgd":
            seen.append(reply)
        return reply

    def heavy(msg: Message, context: Context) -> Message:
        reply = recording(msg, context)
        if msg.metadata.message_type == "train.dpsgd":
            metrics = dict(reply.content["metrics"].items())
            reply = Message(RecordDict(dict(reply.content.items())), reply_to=msg)
            reply.content["metrics"] = MetricRecord({**metrics, "weight": 1000})
        return reply

    ledgers = {i: tmp_path / f"ledger-{i}.json" for i in range(3)}
    # Replayable noise (research nodes only) so that the accuracy bound is checked on fixed
    # draws; any of the 8 seeds measured clears it by far.
    node_configs = {i: {"ledger-path": str(p), "noise-seed": 11 + i} for i, p in ledgers.items()}
    grid = InProcessGrid(recording, 3, node_configs=node_configs, client_apps={2: heavy})
    report, grid = run_tiny(scenario, grid=grid, **LEARNS)
    assert report.accuracy_mean > 0.3, report.accuracy_per_client  # chance: 0.1
    assert len(seen) == 3 * 3
    for reply in seen:  # as the nodes sent them
        metrics = dict(reply.content["metrics"].items())
        metrics.pop("compute-s")  # a research node's timing (compute_time_mod); never deployed
        assert set(metrics) <= set(MECHANISMS["dpsgd-update"].metrics)
        assert "num-examples" not in metrics and metrics["weight"] == 1
    assert list(report.extra["problems"]) == [str(grid.node_ids[2])]
    assert "weight=1000" in report.extra["problems"][str(grid.node_ids[2])]
    for i, path in ledgers.items():
        ledger = NodeLedger.open(path, math.inf, DELTA)
        assert [e.kind for e in ledger.events] == ["dpsgd"] * 3
        assert {(e.sampling_rate, e.steps) for e in ledger.events} == {(0.5, 4 * 2)}
        spent = ledger.epsilon_spent()
        assert 0.99 * 8.0 <= spent <= 8.0
        assert report.epsilon_per_client[i] == pytest.approx(spent)  # node 2's as well
    assert "record-level" in report.extra["privacy-unit"]
    assert report.epsilon <= 8.0
