"""A server-chosen extractor architecture is held against the node's limits before anything is
built: an `embedding_dim=500000` SmallCNN or a `vit_l_16` backbone is refused naming the limit,
with no more than a few MB allocated; a normal extractor still loads."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from ecos_flower.client.ecos import EXTRACTOR_STATE_KEY, read_extractor
from ecos_flower.client.messages import QueryRejected
from ecos_flower.ecos import make_extractor
from ecos_flower.ecos.features import (
    PCAExtractor,
    RandomCNNExtractor,
    TorchvisionExtractor,
    extractor_from_arrays,
)
from ecos_flower.flower.inprocess import set_server_identity
from ecos_flower.models.nets import SmallCNN

IMAGES = torch.rand(20, 1, 12, 12, generator=torch.Generator().manual_seed(0))


def _message(arrays: dict[str, np.ndarray]) -> Message:
    set_server_identity(1)  # Flower stamps new messages with the process's task identity
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return Message(RecordDict({"extractor": record}), 1, "query.ecos")


def _query(kind: str, config: dict) -> dict:
    return {"extractor-hash": "h", "extractor-kind": kind, "extractor-config": json.dumps(config)}


def _context(**node_config) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def _small_cnn_arrays(embedding_dim: int = 32) -> dict[str, np.ndarray]:
    return make_extractor("random", embedding_dim=embedding_dim).fit(IMAGES).to_arrays()


def test_declared_sizes_match_the_built_modules():
    for channels, embedding in [(1, 128), (3, 32), (2, 7)]:
        built = SmallCNN(1, channels, embedding).features.state_dict()
        config = {"in_channels": channels, "embedding_dim": embedding}
        parameters, out = RandomCNNExtractor.declared_size(config, {})
        assert parameters == sum(t.numel() for t in built.values()) and out == embedding
        declared = RandomCNNExtractor.declared_arrays(config, {})
        assert declared == {f"features.{k}": tuple(t.shape) for k, t in built.items()}
    pca = PCAExtractor(5).fit(IMAGES)
    shapes = {k: v.shape for k, v in pca.to_arrays().items()}
    assert PCAExtractor.declared_size(pca.config(), shapes) == (144 + 5 * 144 + 5, 5)
    parameters, out = TorchvisionExtractor.declared_size({"arch": "resnet18", "image_size": 32}, {})
    assert out == 512 and parameters == 11_186_132  # state dict incl. batch-norm buffers


def test_a_huge_embedding_dim_is_refused_naming_the_limit():
    msg = _message(_small_cnn_arrays())
    query = _query("random", {"kind": "random", "in_channels": 1, "embedding_dim": 500_000})
    with pytest.raises(QueryRejected, match="max-extractor-params=50000000"):
        read_extractor(msg, _context(), query, dim=500_000)
    # Within a raised parameter limit, the node's max-dim still refuses it.
    with pytest.raises(QueryRejected, match="above this node's max-dim=4096"):
        read_extractor(msg, _context(**{"max-extractor-params": 10**9}), query, dim=500_000)


def test_a_vit_l_16_is_refused_naming_the_limit_or_the_allow_list():
    msg = _message({})
    query = _query("torchvision", {"kind": "torchvision", "arch": "vit_l_16", "image_size": 224})
    with pytest.raises(QueryRejected, match="303301632 parameters.*max-extractor-params"):
        read_extractor(msg, _context(), query, dim=1024)
    allow = _context(**{"torchvision-archs": "resnet18, resnet34"})
    with pytest.raises(QueryRejected, match="not in this node's torchvision-archs"):
        read_extractor(msg, allow, query, dim=1024)
    unknown = _query("torchvision", {"arch": "get_model"})
    with pytest.raises(QueryRejected, match="unknown torchvision architecture"):
        read_extractor(msg, _context(), unknown, dim=512)


def test_arrays_that_are_not_the_architectures_state_dict_are_refused():
    arrays = _small_cnn_arrays(32)
    config = {"kind": "random", "in_channels": 1, "embedding_dim": 32}
    wrong_shape = {**arrays, "features.7.bias": np.zeros(31, dtype=np.float32)}
    with pytest.raises(QueryRejected, match="'features.7.bias' has shape \\(31,\\)"):
        read_extractor(_message(wrong_shape), _context(), _query("random", config), dim=32)
    extra = {**arrays, "classifier.weight": np.zeros((1, 32), dtype=np.float32)}
    with pytest.raises(QueryRejected, match="unexpected \\['classifier.weight'\\]"):
        read_extractor(_message(extra), _context(), _query("random", config), dim=32)
    with pytest.raises(QueryRejected, match="query says dim=16"):
        read_extractor(_message(arrays), _context(), _query("random", config), dim=16)
    for bad in ({**config, "embedding_dim": "32"}, {**config, "in_channels": True}, [1]):
        with pytest.raises(QueryRejected, match="extractor"):
            read_extractor(_message(arrays), _context(), _query("random", bad), dim=32)
    with pytest.raises(ValueError, match="do not fit the architecture"):
        extractor_from_arrays("random", extra, config)


@pytest.mark.parametrize("kind", ["random", "pca"])
def test_a_normal_extractor_still_loads_and_is_kept(kind):
    fitted = make_extractor(kind, **({"embedding_dim": 32} if kind == "random" else {})).fit(IMAGES)
    context = _context()
    dim = fitted.transform(IMAGES[:2]).shape[1]
    query = _query(kind, fitted.config())
    loaded = read_extractor(_message(fitted.to_arrays()), context, query, dim=dim)
    assert np.allclose(loaded.transform(IMAGES[:4]), fitted.transform(IMAGES[:4]), atol=1e-5)
    assert isinstance(context.state[EXTRACTOR_STATE_KEY + "-config"], ConfigRecord)
    # A later query naming it is answered from the node's state, checked the same way.
    bare = _message({})
    bare.content = RecordDict()
    again = read_extractor(bare, context, query, dim=dim)
    assert np.allclose(again.transform(IMAGES[:4]), fitted.transform(IMAGES[:4]), atol=1e-5)


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np, torch, torchvision
    from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
    from ecos_flower.client.ecos import read_extractor
    from ecos_flower.client.messages import QueryRejected
    from ecos_flower.ecos import make_extractor
    from ecos_flower.flower.inprocess import set_server_identity

    set_server_identity(1)
    case = sys.argv[1]
    if case == "embedding":
        images = torch.rand(4, 1, 12, 12)
        arrays = make_extractor("random", embedding_dim=32).fit(images).to_arrays()
        config = {"kind": "random", "in_channels": 1, "embedding_dim": 500000}
        kind, dim = "random", 500000
    else:
        arrays, kind, dim = {}, "torchvision", 1024
        config = {"kind": "torchvision", "arch": "vit_l_16", "image_size": 224}
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    msg = Message(RecordDict({"extractor": record}), 1, "query.ecos")
    query = {"extractor-hash": "h", "extractor-kind": kind,
             "extractor-config": json.dumps(config)}
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        read_extractor(msg, context, query, dim=dim)
        reason = "answered"
    except QueryRejected as exc:
        reason = str(exc)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mb": (after - before) / 1024, "reason": reason}))
    """
)


@pytest.mark.parametrize("case", ["embedding", "vit_l_16"])
def test_a_refused_architecture_allocates_almost_nothing(case):
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, case], capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "max-extractor-params" in result["reason"], result
    assert result["peak_mb"] < 200, result  # ru_maxrss is in KiB on Linux
