"""Feature extractors: shape/normalisation, determinism, serialisation round trip, cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from ecos_flower.ecos import (
    EXTRACTOR_KINDS,
    PCAExtractor,
    cached_features,
    extractor_from_arrays,
    make_extractor,
)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(48, 1, 12, 12, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def labels() -> torch.Tensor:
    return torch.arange(48) % 3


def _check(features: np.ndarray, n: int) -> None:
    assert features.dtype == np.float32 and features.ndim == 2 and features.shape[0] == n
    assert np.all(np.isfinite(features))
    assert np.allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    ("kind", "kwargs"),
    [
        ("supervised", {"epochs": 1, "batch_size": 16}),
        ("random", {"embedding_dim": 32}),
        ("pca", {"n_components": 10}),
    ],
)
def test_fit_transform_and_round_trip(kind, kwargs, images, labels) -> None:
    rng_state = torch.random.get_rng_state()
    extractor = make_extractor(kind, seed=3, **kwargs)
    feats = extractor.fit_transform(images, labels, batch_size=10, progress=False)
    # Fitting with a seed does not disturb the caller's global torch RNG.
    assert torch.equal(rng_state, torch.random.get_rng_state())
    _check(feats, len(images))
    # Batch size does not change the result.
    assert np.allclose(extractor.transform(images, batch_size=48), feats, atol=1e-5)
    # Ship to a "client": arrays + config only.
    arrays, config = extractor.to_arrays(), extractor.config()
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    assert extractor.num_bytes() == sum(v.nbytes for v in arrays.values()) > 0
    if kind != "pca":
        assert not any(name.startswith("classifier") for name in arrays)
    rebuilt = extractor_from_arrays(kind, arrays, config)
    assert np.allclose(rebuilt.transform(images[:7]), feats[:7], atol=1e-5)
    # Same seed, same extractor.
    again = make_extractor(kind, seed=3, **kwargs).fit(images, labels)
    assert np.allclose(again.transform(images[:7]), feats[:7], atol=1e-5)


def test_random_extractor_depends_on_seed(images) -> None:
    a = make_extractor("random", seed=0).fit(images).transform(images[:5])
    b = make_extractor("random", seed=1).fit(images).transform(images[:5])
    assert not np.allclose(a, b)


def test_torchvision_loads_local_weights_only(tmp_path, images) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18.pt"
    torch.save(state, path)
    extractor = make_extractor("torchvision", weights_path=path, arch="resnet18").fit()
    feats = extractor.transform(images[:6], batch_size=4)  # grey -> 3 channels
    _check(feats, 6)
    assert feats.shape[1] == 512
    rgb = extractor.transform(images[:6].repeat(1, 3, 1, 1))
    assert np.allclose(rgb, feats, atol=1e-5)
    rebuilt = extractor_from_arrays("torchvision", extractor.to_arrays(), extractor.config())
    assert np.allclose(rebuilt.transform(images[:6]), feats, atol=1e-5)
    resized = make_extractor("torchvision", weights_path=path, image_size=32).fit()
    _check(resized.transform(images[:2]), 2)
    with pytest.raises(ValueError, match="weights file not found"):
        make_extractor("torchvision", weights_path=tmp_path / "nope.pt").fit()
    with pytest.raises(ValueError, match="needs a local weights file"):
        make_extractor("torchvision").fit()
    torch.save({"conv1.weight": state["conv1.weight"]}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="does not fit"):
        make_extractor("torchvision", weights_path=tmp_path / "partial.pt").fit()


def test_validation(images, labels) -> None:
    with pytest.raises(ValueError, match="unknown extractor"):
        make_extractor("clip")
    with pytest.raises(ValueError, match="labels"):
        make_extractor("supervised", epochs=1).fit(images)
    with pytest.raises(ValueError, match="not fitted"):
        make_extractor("random").transform(images)
    with pytest.raises(ValueError, match="not fitted"):
        PCAExtractor().transform(images)
    with pytest.raises(ValueError, match="shape"):
        make_extractor("pca").fit(images[0])
    fitted = make_extractor("random", seed=0).fit(images)
    with pytest.raises(ValueError, match="channel"):
        fitted.transform(torch.rand(2, 3, 12, 12))
    with pytest.raises(ValueError, match="8x8"):
        fitted.transform(torch.rand(2, 1, 4, 4))
    pca = make_extractor("pca", n_components=4).fit(images)
    with pytest.raises(ValueError, match="pixels"):
        pca.transform(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="kind"):
        extractor_from_arrays("pca", pca.to_arrays(), {**pca.config(), "kind": "random"})
    assert set(EXTRACTOR_KINDS) == {
        "supervised",
        "random",
        "pca",
        "torchvision",
        "efficientnet-lite0",
    }


def test_feature_cache(tmp_path, images) -> None:
    extractor = make_extractor("pca", n_components=5).fit(images)
    first = cached_features(extractor, images, tmp_path, key="pool/a")
    files = list(tmp_path.glob("*.npy"))
    assert len(files) == 1 and files[0].name.startswith("pool_a-")
    assert np.array_equal(cached_features(extractor, images, tmp_path, key="pool/a"), first)
    # Different images or a different model: a new entry, never a stale hit.
    cached_features(extractor, images[:10], tmp_path, key="pool/a")
    other = make_extractor("pca", n_components=5).fit(images[:20])
    cached_features(other, images, tmp_path, key="pool/a")
    assert len(list(tmp_path.glob("*.npy"))) == 3
    assert np.array_equal(cached_features(extractor, images, None), first)
