"""The client's message specs (`ecos_flower.client.messages`): every field declared once, parsed
once, refused with a text naming the field and the bound it breaks."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord

from ecos_flower.client.messages import (
    DSSGD_CONFIG,
    DSSGD_EVALUATION,
    DSSGD_TASK,
    ECOS_QUERY,
    FINETUNE_REQUEST,
    KNN_QUERY,
    MODEL_CONFIG,
    QueryRejected,
    TaskRejected,
)

ECOS = {
    "num-centroids": 4,
    "dim": 3,
    "epsilon": 1.0,
    "delta": 1e-5,
    "extractor-hash": "h",
    "extractor-kind": "pca",
    "extractor-config": "{}",
}
TASK = {"theta-u": 0.1, "theta-d": 1.0, "num-params": 10, "num-classes": 10}


def test_a_query_parses_to_typed_values_with_its_defaults():
    parsed = ECOS_QUERY.parse(ConfigRecord(ECOS), {})
    assert parsed["num-centroids"] == 4 and parsed["noise"] is True
    assert parsed["score-mode"] == "nearest" and parsed["max-per-sample"] == 1
    assert parsed["radius"] is None
    task = DSSGD_TASK.parse(ConfigRecord(TASK), {})
    assert task["upload-mode"] == "largest" and task["tau"] == 0.0 and task["epoch"] == 0
    assert task["dp-epsilon"] is None and task["gamma"] is None
    assert DSSGD_EVALUATION.parse(ConfigRecord({"num-params": 3, "num-classes": 2}), {}) == {
        "num-params": 3,
        "num-classes": 2,
    }


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("num-centroids", 10**9, "num-centroids=1000000000 outside 1..20000"),
        ("num-centroids", 2.5, "num-centroids=2.5 must be an integer"),
        ("num-centroids", True, "num-centroids=True is not a number"),
        ("epsilon", -1.0, "epsilon=-1.0 must be a positive finite number"),
        ("epsilon", float("inf"), "epsilon=inf must be a positive finite number"),
        ("delta", 2.0, "delta=2.0 must lie in (0, 1)"),
        ("delta", 0.001, "delta=0.001 above this node's max-delta=0.0001"),
        ("score-mode", "psychic", "unknown score-mode 'psychic'; expected one of"),
        ("noise", 1, "noise=1 is not true or false"),
        ("extractor-kind", 3, "extractor-kind=3 is not text"),
        ("max-per-sample", 5, "max-per-sample=5 outside 1..4"),  # bounded by num-centroids
        ("radius", 1.0, "radius is only used with score-mode 'radius'"),
    ],
)
def test_a_bad_field_is_refused_naming_it_and_its_bound(field, value, reason):
    with pytest.raises(QueryRejected, match="query rejected: ") as refused:
        ECOS_QUERY.parse(ConfigRecord({**ECOS, field: value}), {})
    assert reason in refused.value.reason


def test_missing_fields_node_limits_and_conditions():
    del_epsilon = {k: v for k, v in ECOS.items() if k != "epsilon"}
    with pytest.raises(QueryRejected, match="query has no 'epsilon'"):
        ECOS_QUERY.parse(ConfigRecord(del_epsilon), {})
    assert ECOS_QUERY.parse(ConfigRecord({**del_epsilon, "noise": False}), {})["epsilon"] is None
    with pytest.raises(QueryRejected, match="query has no 'radius'"):
        ECOS_QUERY.parse(ConfigRecord({**ECOS, "score-mode": "radius"}), {})
    with pytest.raises(QueryRejected, match="num-centroids=4 outside 1..3"):  # the node's limit
        ECOS_QUERY.parse(ConfigRecord(ECOS), {"max-centroids": 3})
    with pytest.raises(TaskRejected, match=r"task has no 'gamma' \(needed with dp-epsilon\)"):
        DSSGD_TASK.parse(ConfigRecord({**TASK, "dp-epsilon": 1.0}), {})
    with pytest.raises(TaskRejected, match="message has no ConfigRecord 'dssgd'"):
        DSSGD_TASK.parse(None, {})
    with pytest.raises(TaskRejected, match="theta-u=0.0 must lie in \\(0, 1\\]"):
        DSSGD_TASK.parse(ConfigRecord({**TASK, "theta-u": 0.0}), {})
    with pytest.raises(TaskRejected, match="learning-rate=0.0 must be a positive finite number"):
        DSSGD_CONFIG.parse(ConfigRecord({"model": "m", "batch-size": 1, "learning-rate": 0.0}), {})


def test_the_other_message_kinds_are_declared_and_bounded():
    knn = {"num-queries": 4, "dim": 3, "k": 2, "mode": "capped", "num-classes": 10}
    knn |= {"epsilon": 1.0, "delta": 1e-5, "extractor-hash": "h"}
    knn |= {"extractor-kind": "pca", "extractor-config": "{}"}
    assert KNN_QUERY.parse(ConfigRecord(knn), {})["k"] == 2
    with pytest.raises(QueryRejected, match="k=2 outside 1..1"):
        KNN_QUERY.parse(ConfigRecord(knn), {"max-knn-k": 1})
    request = FINETUNE_REQUEST.parse(ConfigRecord({"epsilon": 1.0, "delta": 1e-5}), {})
    assert request["method"] == "dp-sgd" and request["steps"] == 100 and request["init"] == "zero"
    with pytest.raises(QueryRejected, match="unknown init 'pretrained'"):
        FINETUNE_REQUEST.parse(
            ConfigRecord({"epsilon": 1.0, "delta": 1e-5, "init": "pretrained"}), {}
        )
    with pytest.raises(Exception, match="config has no 'num-classes'"):
        MODEL_CONFIG.parse(ConfigRecord({"model": "small-cnn"}), {})
