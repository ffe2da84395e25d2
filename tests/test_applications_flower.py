"""The applications through real ServerApp/ClientApps in process: every privacy cost lands in the
clients' ledgers and in the report, vote replies are validated, and budgets are enforced."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from flower_helpers import run_tiny, tiny_scenario
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from ecos_flower.client_app import app as client_app
from ecos_flower.compare import available_methods, preset_config
from ecos_flower.flower.applications import PrivateKnnRound, knn_neighbours
from ecos_flower.flower.inprocess import InProcessGrid
from ecos_flower.privacy.ledger import NodeLedger

APPLICATION_PRESETS = (
    *("ecos-semi", "random-semi", "kcenter-semi"),
    *("ecos-distill", "random-distill", "kcenter-distill"),
    *("ecos-knn", "random-knn", "kcenter-knn"),
    *("ecos-finetune", "ecos-finetune-fc", "ecos-finetune-ls", "dp-linear-probe"),
)


@pytest.fixture()
def scenario(tmp_path, flwr_home):
    return tiny_scenario(tmp_path)


def _ledger_grid(tmp_path, limit: float = 10.0) -> tuple[InProcessGrid, dict]:
    configs = {
        i: {
            "ledger-path": str(tmp_path / f"ledger-{i}.json"),
            "epsilon-limit": limit,
            "noise-seed": 10 + i,
        }
        for i in range(3)
    }
    return InProcessGrid(client_app, 3, node_configs=configs), configs


def _ledger(tmp_path, client: int) -> dict:
    return json.loads((tmp_path / f"ledger-{client}.json").read_text())


def _spent(tmp_path, client: int) -> float:
    """The epsilon client's ledger file holds (read with the node's own ledger code)."""
    return NodeLedger.open(tmp_path / f"ledger-{client}.json", math.inf, 1e-5).epsilon_spent()


def test_every_application_is_a_preset_of_compare():
    methods = available_methods()
    for name in APPLICATION_PRESETS:
        assert name in methods
    assert preset_config("ecos-knn")["application"] == "private-knn"
    assert preset_config("ecos-finetune")["finetune-epsilon"] <= 1.0


def test_knn_neighbours_grow_with_the_queried_samples_when_asked():
    fixed = {"knn-k": 30, "knn-k-per-query": 0.0}
    assert knn_neighbours(fixed, 500) == knn_neighbours(fixed, 1000) == 30
    scaled = {"knn-k": 30, "knn-k-per-query": 0.06}
    assert (knn_neighbours(scaled, 500), knn_neighbours(scaled, 1000)) == (30, 60)
    assert knn_neighbours(scaled, 3) == 1  # never zero neighbours


@pytest.mark.parametrize("method", ["ecos", "random"])
def test_private_knn_charges_each_ledger_and_reports_the_total(scenario, tmp_path, method):
    grid, _ = _ledger_grid(tmp_path)
    report, _ = run_tiny(
        scenario,
        grid=grid,
        method=method,
        application="private-knn",
        # random: k from the number of queried samples (0.1 x 60 selected = 6)
        **{"knn-epsilon": 0.5, "knn-k": 3, "knn-k-per-query": 0.0 if method == "ecos" else 0.1},
    )
    assert sorted(report.accuracy_per_client) == [0, 1, 2]
    assert report.extra["knn-answered"] == 3 and report.extra["knn-labelled"] > 0
    assert report.extra["knn-k-used"] == (3 if method == "ecos" else 6)
    for client in range(3):
        stored = _ledger(tmp_path, client)
        notes = [r["note"] for r in stored["events"]]
        assert notes[-1].startswith("kNN votes (60 samples)")
        assert len(notes) == (2 if method == "ecos" else 1)
        # The report's epsilon is the ledger's total (ECOS query + kNN composed).
        assert report.epsilon_per_client[client] == pytest.approx(_spent(tmp_path, client))
    if method == "random":
        assert report.epsilon == pytest.approx(0.5, rel=1e-6)  # one release at 0.5 (exact)
    else:
        assert 1.0 < report.epsilon < 1.5  # 1.0 (ECOS) and 0.5 (kNN) composed, below the sum


def test_knn_can_label_in_a_feature_map_of_its_own(scenario, tmp_path):
    """knn-extractor: a map fitted on the pool for labelling only, shipped with the kNN query
    even to nodes that hold the ECOS extractor."""
    grid, _ = _ledger_grid(tmp_path)
    report, _ = run_tiny(
        scenario,
        grid=grid,
        method="ecos",
        application="private-knn",
        **{"knn-extractor": "random", "knn-k": 3},
    )
    assert report.extra["knn-answered"] == 3 and report.extra["knn-labelled"] > 0
    from ecos_flower.ecos import make_extractor

    random_map = make_extractor("random", seed=0).fit(np.zeros((1, 1, 8, 8), np.float32))
    # Each client downloaded the random CNN's weights on top of the PCA extractor.
    assert min(report.bytes_down_per_client.values()) > random_map.num_bytes()


def test_knn_refuses_beyond_the_limit_and_is_not_charged(scenario, tmp_path):
    grid, _ = _ledger_grid(tmp_path, limit=1.2)
    with pytest.raises(RuntimeError, match="kNN labelling: 0 client"):
        run_tiny(scenario, grid=grid, method="ecos", application="private-knn")
    assert len(_ledger(tmp_path, 0)["events"]) == 1  # only the ECOS query


def test_knn_vote_noise_on_the_wire_has_the_stated_sigma(scenario, tmp_path):
    """The released votes minus the exact votes: mean 0, std the reply's sigma."""
    from flower_helpers import FAST

    from ecos_flower.applications import knn_votes
    from ecos_flower.data import load_federation
    from ecos_flower.flower.selection import build_extractor
    from ecos_flower.flower.settings import merge_run_config

    config = merge_run_config(FAST, {"scenario": str(scenario), "knn-k": 3})
    federation = load_federation(scenario)
    extractor = build_extractor(config, federation)
    queries = extractor.transform(federation.pool.images[:300])
    grid, _ = _ledger_grid(tmp_path)
    knn = PrivateKnnRound(config, federation.num_classes, grid)
    replies = list(grid.send_and_receive(knn.messages(extractor, queries)))
    for reply in replies:
        client = int(reply.content["metrics"]["partition-id"])
        sigma = float(reply.content["metrics"]["sigma"])
        shard = federation.clients[client].train
        exact = knn_votes(
            extractor.transform(shard.images), shard.labels.numpy(), queries, 3, 10, "capped"
        )
        noise = reply.content["votes"].to_numpy_ndarrays()[0] - exact
        assert abs(noise.mean()) < 4 * sigma / np.sqrt(noise.size)
        assert noise.std() == pytest.approx(sigma, rel=0.06)


def _vote_reply(msg: Message, votes, metrics) -> Message:
    content = RecordDict({"votes": ArrayRecord([np.asarray(votes)]), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (
            lambda m: _vote_reply(
                m,
                np.ones((5, 3)),
                MetricRecord({"partition-id": 1, "sigma": 1.0, "epsilon-spent": 1.0}),
            ),
            "shape",
        ),
        (
            lambda m: _vote_reply(
                m,
                np.full((4, 3), np.nan),
                MetricRecord({"partition-id": 1, "sigma": 1.0, "epsilon-spent": 1.0}),
            ),
            "non-finite",
        ),
        (
            lambda m: _vote_reply(
                m,
                np.ones((4, 3)),
                MetricRecord({"partition-id": 1, "sigma": 0.0, "epsilon-spent": 1.0}),
            ),
            "sigma=0",
        ),
        (lambda m: _vote_reply(m, np.ones((4, 3)), MetricRecord({"partition-id": 1})), "sigma"),
    ],
)
def test_bad_vote_replies_are_rejected_naming_the_node(make, expected):
    query = Message(RecordDict(), 7, "query.knn")
    knn = PrivateKnnRound({}, 3)
    # A reply needs delivery metadata: fake what the grid would set.
    reply = make(query)
    reply.metadata.__dict__["_src_node_id"] = 7
    votes, _ = knn.aggregate([reply], (4, 3))
    assert votes == [] and len(knn.rejected) == 1
    assert "node 7" in str(knn.rejected[0]) and expected in str(knn.rejected[0])
    assert knn.epsilon_spent == {} and knn.node_to_client == {}


@pytest.mark.parametrize(
    ("method", "finetune"),
    [
        ("ecos", "dp-sgd"),
        ("ecos", "dp-least-squares"),
        ("ecos", "dp-fc"),
        ("dp-linear-probe", "dp-sgd"),
        ("dp-linear-probe", "dp-fc"),
    ],
)
def test_dp_finetuning_is_charged_and_reported(scenario, tmp_path, method, finetune):
    grid, _ = _ledger_grid(tmp_path)
    report, _ = run_tiny(
        scenario,
        grid=grid,
        method=method,
        **{
            "finetune-epsilon": 0.8,
            "finetune-method": finetune,
            "finetune-steps": 5,
            "teacher-epochs": 1,
        },
    )
    assert sorted(report.accuracy_per_client) == [0, 1, 2]
    # Calibrated exactly (full-batch DP-SGD is one Gaussian); Opacus' RDP bound reads higher.
    assert 0.8 <= report.extra["finetune-epsilon-opacus"] <= 1.0
    assert 0 <= report.extra["accuracy-before-finetune"] <= 1
    assert report.extra["finetune-refused"] == {}
    for client in range(3):
        stored = _ledger(tmp_path, client)
        assert stored["events"][-1]["note"].startswith(f"DP head fine-tuning ({finetune}, 5")
        assert report.epsilon_per_client[client] == pytest.approx(_spent(tmp_path, client))
    if method == "dp-linear-probe":
        # One release calibrated to exactly 0.8 (exact Gaussian accounting).
        assert report.epsilon == pytest.approx(0.8, rel=1e-3)


BAD_FINETUNING = [
    ("finetune-method", "dp-magic", "unknown method 'dp-magic'"),
    ("finetune-covariance-share", 1.5, "covariance-share=1.5 must lie in (0, 1)"),
    ("finetune-ridge", -1.0, "ridge=-1.0 must be a positive"),
    ("finetune-init", "pretrained", "unknown init 'pretrained'"),
]


@pytest.mark.parametrize(("setting", "value", "problem"), BAD_FINETUNING)
def test_bad_finetuning_settings_are_refused_by_the_run_config(scenario, setting, value, problem):
    """The server's run config refuses them before any run starts, naming the key."""
    with pytest.raises(ValueError, match=f"run-config key '{setting}'"):
        run_tiny(scenario, method="random", **{"finetune-epsilon": 0.5, setting: value})


@pytest.mark.parametrize(("setting", "value", "problem"), BAD_FINETUNING)
def test_bad_finetuning_settings_are_refused_by_the_client(setting, value, problem):
    """A server that skips that check (or crafts the record) meets the client's own: the
    request is refused while it is parsed, before anything is charged."""
    from flwr.app import ConfigRecord

    from ecos_flower.client.applications import read_finetune_spec

    record = {
        "method": "dp-fc",
        "epsilon": 0.5,
        "delta": 1e-5,
        "steps": 100,
        "clip": 1.0,
        "learning-rate": 1.0,
        "init": "zero",
        "ridge": 1.0,
        "covariance-share": 0.3,
        "floor": 0.01,
        "feature-scale": 3.0,
        "normaliser": 100.0,
    }
    record[setting.removeprefix("finetune-")] = value
    with pytest.raises(Exception, match=re.escape(problem)) as refused:
        read_finetune_spec(ConfigRecord(record), {})
    assert type(refused.value).__name__ == "QueryRejected"


def test_finetuning_past_the_budget_reports_the_received_model(scenario, tmp_path):
    grid, _ = _ledger_grid(tmp_path, limit=1.1)
    report, _ = run_tiny(
        scenario, grid=grid, method="ecos", **{"finetune-epsilon": 1.0, "finetune-steps": 5}
    )
    assert sorted(report.extra["finetune-refused"]) == ["0", "1", "2"]
    assert "budget exceeded" in report.extra["finetune-refused"]["0"]
    assert report.accuracy_mean == pytest.approx(report.extra["accuracy-before-finetune"])
    assert len(_ledger(tmp_path, 0)["events"]) == 1  # only the ECOS query


@pytest.mark.parametrize("application", ["semi-supervised", "near-selection", "distill"])
def test_cloud_applications_cost_nothing_beyond_the_selection(scenario, application):
    unlabelled = "near-selection" if application == "near-selection" else "pool"
    report, _ = run_tiny(
        scenario,
        method="random",
        application="semi-supervised" if application == "near-selection" else application,
        **{"teacher-epochs": 1, "semi-max-unlabelled": 300, "semi-unlabelled": unlabelled},
    )
    assert report.epsilon == 0.0 and sorted(report.accuracy_per_client) == [0, 1, 2]
    if application != "distill":
        assert len(report.extra["pseudo-labelled"]) >= 1
    else:
        assert report.extra["distill-loss"] >= 0


def test_a_knn_query_declaring_a_huge_array_is_refused_before_decoding(scenario, tmp_path):
    from flwr.app import Array, ConfigRecord

    from ecos_flower.flower.settings import client_config, merge_run_config

    grid, _ = _ledger_grid(tmp_path)
    header = np.lib.format.header_data_from_array_1_0(np.zeros((2, 2), np.float32))
    header["shape"] = (100_000, 4_096)  # declares 1.6 GB, carries nothing
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    lie = Array(
        dtype="float32", shape=(100_000, 4_096), stype="numpy.ndarray", data=buffer.getvalue()
    )
    knn = ConfigRecord(
        {
            "num-queries": 100_000,
            "dim": 4_096,
            "k": 3,
            "mode": "capped",
            "num-classes": 10,
            "epsilon": 1.0,
            "delta": 1e-5,
            "extractor-hash": "x",
            "extractor-kind": "pca",
            "extractor-config": "{}",
        }
    )
    config = client_config(merge_run_config({"scenario": str(scenario)}))
    node = grid.node_ids[0]
    message = Message(
        RecordDict({"queries": ArrayRecord({"features": lie}), "knn": knn, "config": config}),
        node,
        "query.knn",
    )
    (reply,) = grid.send_and_receive([message])
    assert "carries 0 bytes" in reply.content["refusal"]["reason"]
    assert not (tmp_path / "ledger-0.json").exists()  # nothing charged
