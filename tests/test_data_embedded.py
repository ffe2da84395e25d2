"""Embedded load_digits domains: deterministic, in [0, 1], visibly different from each other."""

from __future__ import annotations

import itertools

import pytest
import torch

from ecos_flower.data import VARIANTS, load_domain

REQUIRED = ("plain", "inverted", "noisy-background", "thick-rotated")


def load(variant: str, size: int = 16, channels: int = 1):
    return load_domain(
        "embedded",
        name=variant,
        path=None,
        image_size=size,
        channels=channels,
        options={"variant": variant},
    )


def test_required_variants_exist():
    assert set(REQUIRED) <= set(VARIANTS)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_shape_range_and_determinism(variant):
    a, b = load(variant), load(variant)
    assert a.images.shape == (1797, 1, 16, 16) and a.images.dtype == torch.float32
    assert a.labels.dtype == torch.int64 and sorted(a.label_set()) == list(range(10))
    assert float(a.images.min()) >= 0.0 and float(a.images.max()) <= 1.0
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.domain_names == (variant,)


def test_variants_differ_from_each_other():
    sets = {v: load(v).images for v in VARIANTS}
    for a, b in itertools.combinations(sets, 2):
        diff = float((sets[a] - sets[b]).abs().mean())
        assert diff > 0.08, f"{a} vs {b}: mean abs difference {diff:.3f}"


def test_sklearn_digits_loader_and_rgb_and_sizes():
    plain = load_domain("sklearn-digits", name="d", path=None, image_size=8, channels=1, options={})
    from sklearn.datasets import load_digits

    expected = torch.from_numpy(load_digits().images / 16.0).float().unsqueeze(1)
    assert torch.allclose(plain.images, expected)
    rgb = load("inverted", size=28, channels=3)
    assert rgb.images.shape == (1797, 3, 28, 28)
    assert torch.equal(rgb.images[:, 0], rgb.images[:, 2])


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match="variant.*must be one of"):
        load("sepia")
