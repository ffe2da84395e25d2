"""Lazy (decode-on-demand) image-folder domains in real runs (`lazy = true`).

A lazy domain holds the same pixels as the eager one (`images[idx]`, every index form), and
subsets, concatenations and fingerprints decode nothing. A scenario with lazy pool domains builds
a federation whose pool stays lazy (only the clients' shards are decoded); `features_of` streams
the pool through a DataLoader into the feature cache and reads it back without decoding;
extractors that fit on the whole pool's pixels are refused naming the fix; and a whole in-process
ECOS run on a lazy pool decodes only the selection it trains on.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flower_helpers import FAST, run_tiny
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ecos_flower.config import merge_run_config
from ecos_flower.data import ImageSet, build_federation, lazy, load_domain, load_scenario, types
from ecos_flower.data.errors import DataError, ScenarioError
from ecos_flower.data.federation import load_federation
from ecos_flower.data.lazy import LazyImages, TensorSource
from ecos_flower.data.loaders import option_problems
from ecos_flower.data.pool import load_pool, load_pool_spec
from ecos_flower.ecos.feature_space import features_of
from ecos_flower.flower.selection import build_extractor

CLASSES = ("cat", "dog", "eel")


def write_tree(root, per_class: int, seed: int, size: int = 12) -> None:
    """An ImageFolder tree of class-name folders; images of two sizes and modes (RGB, grey)."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            side = size if i % 2 else size + 5
            pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            pixels[..., c] //= 3  # a little class signal
            image = Image.fromarray(pixels)
            (image if i % 3 else image.convert("L")).save(root / name / f"{i}.png")


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "tree"
    write_tree(root, 6, seed=0)
    return root


def _domain(
    path, lazy_: bool, size: int = 8, channels: int = 3, name: str = "d", **options
) -> ImageSet:
    options = {**options, "lazy": True} if lazy_ else options
    return load_domain(
        "image-folder", name=name, path=path, image_size=size, channels=channels, options=options
    )


class DecodeCounter:
    """Counts `decode_image` calls of the lazy datasets (monkeypatched into `lazy`)."""

    def __init__(self) -> None:
        self.calls = 0
        self.real = lazy.decode_image

    def __call__(self, path):
        self.calls += 1
        return self.real(path)


@pytest.fixture()
def decodes(monkeypatch) -> DecodeCounter:
    counter = DecodeCounter()
    monkeypatch.setattr(lazy, "decode_image", counter)
    return counter


@pytest.mark.parametrize("channels", [1, 3])
def test_lazy_domain_holds_the_eager_pixels(tree, channels):
    eager, lazy_ = _domain(tree, False, channels=channels), _domain(tree, True, channels=channels)
    assert isinstance(lazy_.images, LazyImages) and lazy_.is_lazy and not eager.is_lazy
    assert lazy_.images.shape == eager.images.shape == (18, channels, 8, 8)
    assert lazy_.images.dtype == torch.float32 and lazy_.images.dim() == 4 and len(lazy_) == 18
    assert torch.equal(lazy_.labels, eager.labels) and torch.equal(
        lazy_.sample_ids, eager.sample_ids
    )
    want = eager.images.numpy()
    for key in ([5, 0, 17, 5], np.array([3, -1]), torch.tensor([2, 9]), slice(1, None, 4)):
        got = lazy_.images[key]
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
        assert np.allclose(got.numpy(), want[np.arange(18)[key]], atol=1e-6), key
    mask = torch.arange(18) % 4 == 1
    assert np.allclose(lazy_.images[mask].numpy(), want[mask.numpy()], atol=1e-6)
    assert np.allclose(lazy_.images[7].numpy(), want[7], atol=1e-6)
    assert lazy_.images[[]].shape == (0, channels, 8, 8)
    with pytest.raises(IndexError):
        lazy_.images[[18]]
    # max-samples subsamples the same samples, still lazy.
    small_e, small_l = (
        _domain(tree, False, **{"max-samples": 7}),
        _domain(tree, True, **{"max-samples": 7}),
    )
    assert small_l.is_lazy and len(small_l) == 7
    assert torch.equal(small_l.sample_ids, small_e.sample_ids)
    assert np.allclose(small_l.images[np.arange(7)].numpy(), small_e.images.numpy(), atol=1e-6)


def test_subset_concat_and_fingerprint_decode_nothing(tree, tmp_path, decodes):
    other = tmp_path / "other"
    write_tree(other, 4, seed=1)
    a, b = _domain(tree, True), _domain(other, True, name="o")
    part = a.subset([4, 2, 9])
    both = ImageSet.concat([part, b, a.subset([1])])
    fingerprint = both.images.fingerprint()
    assert decodes.calls == 0
    assert part.is_lazy and both.is_lazy and len(both) == 3 + 12 + 1
    assert both.domain_names == ("d", "o") and len(both.images.sources) == 2
    # A view's fingerprint is its rows': equal views agree, other rows differ.
    assert (
        ImageSet.concat([a.subset([4, 2, 9]), b, a.subset([1])]).images.fingerprint() == fingerprint
    )
    assert a.subset([4, 2, 8]).images.fingerprint() != part.images.fingerprint()
    assert decodes.calls == 0
    with pytest.raises(TypeError, match="decoded on demand"):
        np.asarray(both.images)
    eager = ImageSet.concat(
        [
            _domain(tree, False).subset([4, 2, 9]),
            _domain(other, False, name="o"),
            _domain(tree, False).subset([1]),
        ]
    )
    decodes.calls = 0
    assert np.allclose(both.images[np.arange(16)].numpy(), eager.images.numpy(), atol=1e-6)
    assert decodes.calls == 16
    assert torch.equal(both.labels, eager.labels) and torch.equal(both.domains, eager.domains)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 5), min_size=1, max_size=3),
    picks=st.lists(st.lists(st.integers(-20, 20), max_size=6), min_size=1, max_size=3),
    outer=st.lists(st.integers(-30, 30), max_size=8),
)
def test_views_index_like_the_tensor_they_stand_for(sizes, picks, outer):
    """take / concat / __getitem__ compose as tensor indexing and torch.cat of the same rows."""
    rng = np.random.default_rng(len(sizes))
    tensors = [torch.as_tensor(rng.random((k, 1, 2, 2), dtype=np.float32)) for k in sizes]
    sources = [LazyImages([TensorSource(t)]) for t in tensors]
    parts, eager = [], []
    for i, pick in enumerate(picks):
        view, tensor = sources[i % len(sources)], tensors[i % len(tensors)]
        pick = [p for p in pick if -len(tensor) <= p < len(tensor)]
        parts.append(view.take(pick))
        eager.append(tensor[torch.tensor(pick, dtype=torch.int64)])
    whole, expected = LazyImages.concat(parts), torch.cat(eager)
    assert whole.shape == expected.shape
    outer = [p for p in outer if -len(expected) <= p < len(expected)]
    assert torch.equal(whole.take(outer)[np.arange(len(outer))], expected[outer])
    assert torch.equal(whole[outer], expected[outer])
    assert len({id(s) for s in whole.sources}) == len(whole.sources) <= len(sources)


def test_a_mix_of_lazy_and_eager_parts(tree, monkeypatch):
    lazy_, eager = _domain(tree, True), _domain(tree, False)
    digits = load_domain("embedded", name="e", path=None, image_size=8, channels=3, options={})
    small = ImageSet.concat([digits, lazy_])  # a small lazy part is decoded
    assert not small.is_lazy
    assert np.allclose(small.images[len(digits) :].numpy(), eager.images.numpy(), atol=1e-6)
    monkeypatch.setattr(types, "MIXED_DECODE_LIMIT", 0)
    big = ImageSet.concat([digits, lazy_])  # a large one stays lazy; the eager part joins as is
    assert big.is_lazy and len(big) == len(digits) + 18
    assert torch.equal(big.images[[0, 5]], digits.images[[0, 5]])
    assert np.allclose(big.images[[len(digits) + 3]].numpy(), eager.images[[3]].numpy(), atol=1e-6)


def test_lazy_is_an_image_folder_option_checked_at_the_boundary(tree, tmp_path):
    assert option_problems("image-folder", {"lazy": True}) == []
    assert option_problems("image-folder", {"lazy": "yes"})[0][0] == "lazy"
    assert option_problems("image-folder", {"lazy": 1})[0][0] == "lazy"
    assert "unknown option" in option_problems("embedded", {"lazy": True})[0][1]
    pool = tmp_path / "pool.toml"
    pool.write_text(f'image-size = 8\nchannels = 3\n[[domains]]\npath = "{tree}"\nlazy = true\n')
    assert load_pool(pool).pool.is_lazy
    pool.write_text(f'image-size = 8\nchannels = 3\n[[domains]]\npath = "{tree}"\nlazy = "yes"\n')
    with pytest.raises(ScenarioError, match="lazy"):
        load_pool_spec(pool)
    (tree / "empty").mkdir()
    with pytest.raises(DataError, match="empty class folder"):
        _domain(tree, True)


SCENARIO = """
seed = 0
image-size = {size}
channels = 3
client-domain = "b"
num-clients = 3
share = 0.5
test-fraction = 0.25
pool-domains = ["a", "b"]

[[domains]]
name = "a"
loader = "image-folder"
path = "a"
lazy = true

[[domains]]
name = "b"
loader = "image-folder"
path = "b"
lazy = true
"""


def lazy_scenario(folder, size: int = 8, per_class: tuple[int, int] = (12, 8)):
    write_tree(folder / "a", per_class[0], seed=2)
    write_tree(folder / "b", per_class[1], seed=3)
    path = folder / "lazy.toml"
    path.write_text(SCENARIO.format(size=size))
    return path


def test_federation_keeps_the_pool_lazy_and_features_stream_into_the_cache(
    tmp_path, decodes, monkeypatch
):
    scenario = load_scenario(lazy_scenario(tmp_path))
    federation = build_federation(scenario)
    client_rows = sum(len(c.train) + len(c.test) for c in federation.clients)
    assert decodes.calls == client_rows == 12  # only the clients' shards (half of b's 24)
    assert federation.pool.is_lazy and len(federation.pool) == 36 + 12
    assert not any(c.train.is_lazy or c.test.is_lazy for c in federation.clients)
    assert federation.image_size == 8 and federation.channels == 3
    assert federation.class_names == CLASSES

    extractor = build_extractor({"extractor": "random", "seed": 0, "device": "cpu"}, federation)
    decodes.calls = 0
    cache = tmp_path / "cache"
    features = features_of(extractor, federation.pool.images, cache, key="pool")
    assert decodes.calls == len(federation.pool)  # each pool image decoded once, streamed
    assert features.shape[0] == 48 and not features.flags.writeable
    assert len(list(cache.glob("pool-*.npy"))) == 1
    reference = extractor.transform(federation.pool.images[np.arange(48)])
    assert np.allclose(features, reference, atol=1e-5)
    decodes.calls = 0
    again = features_of(extractor, federation.pool.images, cache, key="pool")
    assert decodes.calls == 0 and np.array_equal(np.asarray(again), np.asarray(features))

    for kind in ("pca", "supervised"):
        config = {"extractor": kind, "seed": 0, "device": "cpu", "pca-components": 4}
        with pytest.raises(ValueError, match="efficientnet-lite0 or torchvision"):
            build_extractor({**config, "extractor-epochs": 1}, federation)


def test_an_ecos_run_on_a_lazy_pool_decodes_only_what_it_trains_on(tmp_path, decodes):
    import torchvision

    scenario = lazy_scenario(tmp_path, size=32, per_class=(30, 12))
    weights = tmp_path / "mobilenet.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), weights)
    overrides = {
        "extractor": "torchvision:mobilenet_v3_small",
        "extractor-weights": str(weights),
        "feature-cache": str(tmp_path / "cache"),
        "num-centroids": 4,
        "budget": 20,
    }
    # The pool's features are computed once through the DataLoader (every pool image decoded
    # once) and cached; the run itself then reads them from the cache.
    config = merge_run_config(FAST, {"scenario": str(scenario)}, overrides)
    federation = load_federation(scenario)
    pool_size = len(federation.pool)
    assert pool_size == 90 + 18 and federation.pool.is_lazy
    extractor = build_extractor(config, federation)
    features_of(extractor, federation.pool.images, config["feature-cache"], key="pool")
    decodes.calls = 0
    report, _ = run_tiny(scenario, **overrides)
    assert report.extra["answered"] == 3, report.extra
    assert report.extra["selected"] == 20
    # The selection (cloud training), the extractor's one-row fit and at most the clients'
    # shards (the server's federation is rebuilt under its num-clients key): never the pool.
    client_rows = sum(len(c.train) + len(c.test) for c in federation.clients)
    assert 20 <= decodes.calls <= 20 + 1 + client_rows < pool_size, decodes.calls
