"""Head models on pretrained features: the feature-space data, the memo and cache of features,
and the node's side (features from its own weights file only, refused before any charge)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flower_helpers import run_tiny, server_message
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from ecos_flower.client.dp_fedavg import dpsgd_train_handler
from ecos_flower.client_app import app as client_app
from ecos_flower.data import ClientShard, ImageSet
from ecos_flower.ecos import feature_space
from ecos_flower.ecos.feature_space import (
    HEAD_EXTRACTOR_KEY,
    as_feature_images,
    features_of,
    head_extractor_text,
    local_head_extractor,
    shard_in_feature_space,
)
from ecos_flower.ecos.features import FeatureExtractor, make_extractor
from ecos_flower.flower.fedavg import dpsgd_request
from ecos_flower.flower.inprocess import InProcessGrid
from ecos_flower.flower.settings import merge_run_config
from ecos_flower.models import build_model, evaluate_accuracy, train_epochs
from ecos_flower.models.backbones import pretrained_available
from ecos_flower.privacy.ledger import NodeLedger


class CountingExtractor(FeatureExtractor):
    """Mean pixel per channel and its square: a 2-d feature map that counts its calls."""

    kind = "counting"

    def __init__(self) -> None:
        self.calls = 0

    def transform(self, images, batch_size: int = 256, progress: bool = False) -> np.ndarray:
        self.calls += 1
        x = torch.as_tensor(images).float().mean(dim=(1, 2, 3)).numpy()
        return np.stack([x, x**2], axis=1).astype(np.float32)

    def config(self) -> dict:
        return {"kind": self.kind}

    def to_arrays(self) -> dict:
        return {}


def _images(n: int, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    return ImageSet(
        images=torch.from_numpy(rng.random((n, 1, 4, 4), dtype=np.float32)),
        labels=torch.from_numpy(rng.integers(0, 2, n)),
        domains=torch.zeros(n, dtype=torch.int64),
        domain_names=("d",),
    )


@pytest.mark.parametrize("name, hidden", [("linear-head", 0), ("mlp-head", 256)])
def test_a_head_takes_features_as_one_by_one_images_and_exposes_its_last_layer(name, hidden):
    model = build_model(name, num_classes=7, in_channels=1280, image_size=1, seed=0)
    x = as_feature_images(np.random.default_rng(0).random((5, 1280)))
    assert tuple(x.shape) == (5, 1280, 1, 1) and x.dtype == torch.float32
    assert tuple(model(x).shape) == (5, 7)
    assert isinstance(model.classifier, torch.nn.Linear)
    assert model.classifier.in_features == (hidden or 1280)
    if not hidden:  # the linear head's embedding is the features themselves
        assert torch.equal(model.embed(x), x.flatten(1))


def test_a_linear_head_learns_a_linearly_separable_feature_space():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 300)
    centres = rng.normal(0, 1, (3, 32))
    features = centres[labels] + rng.normal(0, 0.3, (300, 32))
    x, y = as_feature_images(features), torch.from_numpy(labels)
    model = build_model("linear-head", 3, 32, 1, seed=0)
    train_epochs(model, x[:200], y[:200], epochs=20, batch_size=32, learning_rate=0.1, seed=0)
    accuracy, _ = evaluate_accuracy(model, x[200:], y[200:])
    assert accuracy > 0.9  # well-separated clusters: a working head is near 1, chance is 1/3


def test_features_are_memoised_per_data_and_cached_on_disk(tmp_path):
    feature_space._MEMO.clear()
    extractor, first, other = CountingExtractor(), _images(20), _images(20, seed=1)
    a = features_of(extractor, first.images, tmp_path, key="train")
    b = features_of(extractor, first.images.clone(), tmp_path, key="train")
    assert extractor.calls == 1 and np.array_equal(a, b)  # same bytes: computed once
    assert not a.flags.writeable  # shared: nobody may change it under another caller
    features_of(extractor, other.images, tmp_path, key="train")
    assert extractor.calls == 2  # other data: computed again
    mixed = torch.cat([first.images[:5], other.images[:5]])
    rows = features_of(extractor, mixed)
    assert extractor.calls == 2  # every image seen before, in whatever subset: no pass at all
    assert np.array_equal(rows[:5], a[:5])
    assert len(list(tmp_path.glob("train-*.npy"))) == 2
    feature_space._MEMO.clear()  # a new process: the disk cache answers
    c = features_of(extractor, first.images, tmp_path, key="train")
    assert extractor.calls == 2 and np.array_equal(a, c)


def test_a_shard_in_feature_space_keeps_labels_and_ids():
    feature_space._MEMO.clear()
    shard = ClientShard(3, _images(12), _images(6, seed=2))
    moved = shard_in_feature_space(shard, CountingExtractor())
    assert moved.client_id == 3
    assert moved.train.image_shape == (2, 1, 1) and moved.test.image_shape == (2, 1, 1)
    assert torch.equal(moved.train.labels, shard.train.labels)
    assert torch.equal(moved.test.sample_ids, shard.test.sample_ids)
    expected = shard.train.images.mean(dim=(1, 2, 3))
    assert torch.allclose(moved.train.images[:, 0, 0, 0], expected)


def test_only_an_extractor_nodes_hold_themselves_may_back_a_head():
    pca = make_extractor("pca", n_components=2).fit(torch.rand(10, 1, 4, 4))
    with pytest.raises(ValueError, match="every node holds itself"):
        head_extractor_text(pca)
    for text, match in (
        (None, "must name its extractor"),
        ("{not json", "not JSON"),
        ('["pca"]', "JSON object with a 'kind'"),
        (json.dumps({"kind": "pca"}), "never built by name"),
        (json.dumps({"kind": "nope"}), "unknown extractor kind"),
        (
            json.dumps(
                {"kind": "efficientnet-lite0", "weights-sha256": "0" * 64, "image_size": 224}
            ),
            "digest mismatch|not found|pretrained",
        ),
    ):
        config = {} if text is None else {HEAD_EXTRACTOR_KEY: text}
        with pytest.raises(ValueError, match=match):
            local_head_extractor(config)


@pytest.mark.parametrize(
    "text",
    [
        json.dumps({"kind": "pca"}),
        json.dumps({"kind": "efficientnet-lite0", "weights-sha256": "f" * 64, "image_size": 224}),
    ],
)
def test_a_dp_node_refuses_a_head_extractor_it_does_not_hold_before_any_charge(text, tmp_path):
    # The hostile server names a network the node does not hold (or one that would have to be
    # shipped): the node answers without charging its ledger or reading a record.
    reads = []

    def load_data(config, node_config):
        reads.append(1)
        raise AssertionError("no record may be read")

    config = merge_run_config({"model": "linear-head", "num-server-rounds": 2})
    content = RecordDict(
        {
            "arrays": ArrayRecord(build_model("linear-head", 10, 1280, 1, seed=0).state_dict()),
            "config": ConfigRecord(
                {"model": "linear-head", "num-classes": 10, HEAD_EXTRACTOR_KEY: text}
            ),
            "dpsgd": dpsgd_request(config),
        }
    )
    ledger = tmp_path / "ledger.json"
    node_config = {"partition-id": 0, "num-partitions": 3, "ledger-path": str(ledger)}
    context = Context(
        run_id=7, node_id=1000, node_config=node_config, state=RecordDict(), run_config={}
    )
    reply = dpsgd_train_handler(load_data)(server_message(1000, "train.dpsgd", content), context)
    assert reply.has_error() or "refusal" in reply.content
    assert not reads
    assert NodeLedger.open(ledger, math.inf, 1e-5).events == ()


# ------------------------------------------------------------ the pipeline, end to end
@pytest.fixture(scope="module")
def micro_scenario(tmp_path_factory):
    """The tiny scenario cut to 100 images per domain (EfficientNet costs ~0.1 s per image)."""
    from ecos_flower.testing.scenarios import TINY_SCENARIO

    path = tmp_path_factory.mktemp("heads") / "micro.toml"
    text = TINY_SCENARIO.format(num_clients=2)
    for variant in ("plain", "inverted"):
        text = text.replace(f'variant = "{variant}"', f'variant = "{variant}"\nmax-samples = 100')
    path.write_text(text)
    return path


@pytest.mark.skipif(not pretrained_available(), reason="needs the `pretrained` extra")
def test_every_kind_of_method_trains_the_same_head_on_efficientnet_features(
    micro_scenario, flwr_home
):
    # One process: each image is featurised once, then every run reuses the features.
    head = {"model": "linear-head", "extractor": "efficientnet-lite0", "learning-rate": 0.5}
    runs = {
        "random": {"budget": 100, "cloud-epochs": 30},
        "fedavg": {"num-server-rounds": 5, "local-epochs": 5},
        "dssgd": {"dssgd-epochs": 3, "theta-u": 0.5},
    }
    head_bytes = (1280 * 10 + 10) * 4  # the linear head's float32 parameters
    for method, extra in runs.items():
        report, _ = run_tiny(micro_scenario, 2, method=method, **head, **extra)
        assert set(report.accuracy_per_client) == {0, 1}, method
        down = min(report.bytes_down_per_client.values())
        # What reached a client is head-sized: never a CNN's, nor the backbone's 18.8 MB.
        assert head_bytes <= down < 40 * head_bytes + 2_000_000, (method, down)
        if method == "random":
            # 100 labelled pool images of 10 digits: the head learns (measured 0.75 on the
            # clients' 12 test images; chance is 0.1).
            assert report.accuracy_mean > 0.3


def test_the_memo_counts_only_rows_it_does_not_hold_yet():
    memo = feature_space._RowMemo(max_bytes=10 * 2 * 4)  # room for ten 2-d float32 rows
    rows = np.ones((4, 2), dtype=np.float32)
    keys = [bytes([i]) for i in range(4)]
    for _ in range(5):  # the same rows again and again (a pool loaded by every run)
        memo.add("d", keys, rows)
    assert memo.bytes == rows.nbytes and len(memo.rows) == 4  # never cleared, never grown
    memo.add("d", [bytes([i]) for i in range(4, 12)], np.ones((8, 2), dtype=np.float32))
    assert len(memo.rows) == 8 and memo.bytes == 8 * 2 * 4  # full: cleared, then the new rows


def test_a_node_keeps_its_query_features_where_its_own_config_says(tmp_path):
    # The node's cache folder comes from its node config only; the message cannot name one.
    from ecos_flower.client.data import node_feature_cache

    assert node_feature_cache({}) is None
    assert node_feature_cache({"feature-cache": str(tmp_path)}) == str(tmp_path)
    feature_space._MEMO.clear()
    features_of(
        CountingExtractor(),
        _images(6).images,
        node_feature_cache({"feature-cache": str(tmp_path)}),
        key="query",
    )
    assert len(list(tmp_path.glob("query-*.npy"))) == 1


@pytest.mark.skipif(not pretrained_available(), reason="needs the `pretrained` extra")
def test_applications_with_a_head_feed_feature_maps_images_and_the_head_features(
    micro_scenario, flwr_home
):
    # A random selection computes no pool features, so near-selection and the kNN query run the
    # run's extractor on the pool themselves: on its images, while the head trains on features.
    # Distillation's CNN teacher takes images, the head student features, of the same samples.
    head = {"model": "linear-head", "extractor": "efficientnet-lite0", "learning-rate": 0.5}
    runs = {
        "semi-supervised": {"semi-unlabelled": "near-selection", "semi-max-unlabelled": 40},
        "private-knn": {"knn-k": 5, "knn-k-per-query": 0.0},
        "distill": {"teacher-model": "small-cnn", "teacher-epochs": 2},
    }
    for application, extra in runs.items():
        report, _ = run_tiny(
            micro_scenario,
            2,
            method="random",
            budget=60,
            application=application,
            **{"cloud-epochs": 20},
            **head,
            **extra,
        )
        assert set(report.accuracy_per_client) == {0, 1}, application
        # The head is what the clients evaluated (a linear map of 1280-d features).
        assert min(report.bytes_down_per_client.values()) >= (1280 * 10 + 10) * 4, application
    # The kNN query does not depend on the task model: for a head as for a CNN it holds the
    # extractor's features of the selected pool images (the same random selection).
    queried = {}
    for model in ("linear-head", "small-cnn"):
        seen = []

        def recording_app(message, context, seen=seen):
            if message.metadata.message_type == "query.knn":
                seen.append(message.content["queries"]["features"].numpy())
            return client_app(message, context)

        grid = InProcessGrid(client_app, 2, client_apps={0: recording_app})
        run_tiny(
            micro_scenario,
            2,
            grid,
            method="random",
            budget=60,
            application="private-knn",
            **{**head, "model": model, "knn-k": 5, "knn-k-per-query": 0.0},
        )
        (queried[model],) = seen
    assert queried["linear-head"].shape == (60, 1280)
    np.testing.assert_allclose(queried["linear-head"], queried["small-cnn"], atol=1e-4)
