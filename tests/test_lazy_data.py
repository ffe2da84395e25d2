"""Lazy ImageFolder data and the on-disk feature cache.

`ImageFolderDataset` decodes on demand exactly what the eager loader decodes, labels class-name
folders by name (into a given label space, refusing names outside it); `transform_dataset`
streams it through an extractor in batches, equal to the eager features; `cached_features` keeps
the result as a memmap'd `.npy`: a second run on the same tree calls the extractor zero times and
decodes no image, a changed file recomputes.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from ecos_flower.data import lazy
from ecos_flower.data.imageops import standardize
from ecos_flower.data.lazy import ImageFolderDataset
from ecos_flower.data.loaders import read_image_tree
from ecos_flower.data.node_data import LabelSpaceError
from ecos_flower.ecos.features import cached_features, make_extractor

CLASSES = {"cat": 5, "dog": 4, "eel": 3}


@pytest.fixture()
def tree(tmp_path):
    """A class-name ImageFolder tree with mixed sizes and modes (RGB, grey, RGBA)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "tree"
    for name, count in CLASSES.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            size = int(rng.integers(10, 30))
            pixels = rng.integers(0, 256, (size, size + i, 3), dtype=np.uint8)
            image = Image.fromarray(pixels)
            image = [image, image.convert("L"), image.convert("RGBA")][i % 3]
            image.save(root / name / f"{i}.png")
    return root


def test_items_are_what_the_eager_loader_reads(tree):
    data = ImageFolderDataset(tree, image_size=16, channels=3)
    assert data.class_names == ("cat", "dog", "eel") and len(data) == sum(CLASSES.values())
    images, index, names = read_image_tree(tree, 16)
    eager = standardize(images, 16, 3)
    assert names == ["cat", "dog", "eel"]
    items = [data[i] for i in range(len(data))]
    assert all(x.shape == (3, 16, 16) and x.dtype == torch.float32 for x, _ in items)
    assert torch.equal(torch.stack([y for _, y in items]), index)
    assert torch.allclose(torch.stack([x for x, _ in items]), eager, atol=1e-5)


def test_labels_follow_a_given_label_space_by_name(tree):
    data = ImageFolderDataset(
        tree, image_size=8, channels=1, class_names=["eel", "cat", "dog", "x"]
    )
    counts = torch.bincount(data.labels, minlength=4).tolist()
    assert counts == [CLASSES["eel"], CLASSES["cat"], CLASSES["dog"], 0]
    assert data[0][0].shape == (1, 8, 8)
    with pytest.raises(LabelSpaceError, match=r"'eel'.*\['cat', 'dog'\]"):
        ImageFolderDataset(tree, image_size=8, class_names=["cat", "dog"])


def test_streamed_features_equal_the_eager_ones(tree):
    data = ImageFolderDataset(tree, image_size=12, channels=3)
    extractor = make_extractor("random", seed=1).fit(torch.rand(2, 3, 12, 12))
    eager = extractor.transform(torch.stack([data[i][0] for i in range(len(data))]))
    streamed = extractor.transform_dataset(data, batch_size=5)  # batches of 5, 5, 2
    assert streamed.dtype == np.float32 and streamed.shape == eager.shape
    assert np.allclose(streamed, eager, atol=1e-5)
    with_workers = extractor.transform_dataset(data, batch_size=4, num_workers=2)
    assert np.allclose(with_workers, eager, atol=1e-5)


class CountingExtractor:
    """Wraps an extractor and counts its transform calls (and images seen)."""

    def __init__(self, inner):
        self.inner, self.calls, self.images = inner, 0, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def transform(self, images, **kwargs):
        self.calls += 1
        self.images += len(images)
        return self.inner.transform(images, **kwargs)

    def transform_dataset(self, dataset, **kwargs):
        # The base implementation, bound to this wrapper so its transform calls are counted.
        return type(self.inner).transform_dataset(self, dataset, **kwargs)


def test_cache_reruns_nothing_and_decodes_nothing(tree, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    extractor = CountingExtractor(make_extractor("pca", n_components=4).fit(torch.rand(9, 3, 8, 8)))
    first = cached_features(extractor, ImageFolderDataset(tree, image_size=8), cache, batch_size=5)
    assert extractor.calls == 3 and extractor.images == len(first) == 12
    assert isinstance(first, np.memmap) and first.shape == (12, 4)
    [file] = cache.glob("*.npy")
    assert not list(cache.glob("*.tmp*"))
    expected = np.array(first)

    def no_decoding(path):
        raise AssertionError(f"decoded {path} for a cached pool")

    monkeypatch.setattr(lazy, "decode_image", no_decoding)
    again = cached_features(extractor, ImageFolderDataset(tree, image_size=8), cache)
    assert extractor.calls == 3  # nothing recomputed
    assert isinstance(again, np.memmap) and np.array_equal(np.array(again), expected)
    monkeypatch.undo()

    # A changed file (same name, new bytes and mtime) is other data: recomputed.
    calls = extractor.calls
    victim = next((tree / "dog").glob("*.png"))
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(victim)
    stat = victim.stat()
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = cached_features(extractor, ImageFolderDataset(tree, image_size=8), cache)
    assert extractor.calls > calls
    assert not np.array_equal(np.array(changed), expected)
    assert len(list(cache.glob("*.npy"))) == 2


def test_fingerprint_depends_on_the_file_list_not_on_decoding(tree, monkeypatch):
    before = ImageFolderDataset(tree, image_size=8).fingerprint()
    monkeypatch.setattr(lazy, "decode_image", lambda path: pytest.fail("decoded"))
    assert ImageFolderDataset(tree, image_size=8).fingerprint() == before
    assert ImageFolderDataset(tree, image_size=9).fingerprint() != before
    (tree / "cat" / "0.png").rename(tree / "cat" / "zz.png")
    assert ImageFolderDataset(tree, image_size=8).fingerprint() != before
