"""ImageSet: construction checks, subset, concat (domain id remapping) and domain masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ecos_flower.data import ImageSet


def make_set(n: int, names: tuple[str, ...], domain: int = 0, fill: float = 0.0) -> ImageSet:
    return ImageSet(
        images=torch.full((n, 1, 4, 4), fill),
        labels=torch.arange(n, dtype=torch.int64) % 10,
        domains=torch.full((n,), domain, dtype=torch.int64),
        domain_names=names,
    )


def test_defaults_and_subset_keep_sample_ids():
    s = make_set(6, ("a",))
    assert len(s) == 6 and s.sample_ids.tolist() == list(range(6))
    for idx in ([4, 1], np.array([4, 1]), torch.tensor([4, 1])):
        sub = s.subset(idx)
        assert len(sub) == 2 and sub.sample_ids.tolist() == [4, 1]
        assert sub.labels.tolist() == [4, 1] and sub.domain_names == ("a",)
    assert len(s.subset([])) == 0


def test_concat_merges_names_and_remaps_ids():
    a = make_set(3, ("x", "y"), domain=1, fill=0.1)
    b = make_set(2, ("z", "y"), domain=0, fill=0.2)
    c = make_set(1, ("z",), domain=0)
    out = ImageSet.concat([a, b, c])
    assert out.domain_names == ("x", "y", "z")
    assert out.domains.tolist() == [1, 1, 1, 2, 2, 2]
    assert out.domain_mask("y").tolist() == [True] * 3 + [False] * 3
    assert out.domain_mask("z").sum() == 3
    assert not out.domain_mask("absent").any()
    assert out.sample_ids.tolist() == [0, 1, 2, 0, 1, 0]


def test_rejects_bad_shapes_and_dtypes():
    with pytest.raises(ValueError, match="float32"):
        ImageSet(
            torch.zeros(2, 4, 4),
            torch.zeros(2, dtype=torch.int64),
            torch.zeros(2, dtype=torch.int64),
            ("a",),
        )
    with pytest.raises(ValueError, match="labels"):
        ImageSet(
            torch.zeros(2, 1, 4, 4),
            torch.zeros(3, dtype=torch.int64),
            torch.zeros(2, dtype=torch.int64),
            ("a",),
        )
    with pytest.raises(ValueError, match="domain_names"):
        ImageSet(
            torch.zeros(2, 1, 4, 4),
            torch.zeros(2, dtype=torch.int64),
            torch.ones(2, dtype=torch.int64),
            ("a",),
        )
    with pytest.raises(ValueError, match="shapes differ"):
        ImageSet.concat(
            [
                make_set(1, ("a",)),
                ImageSet(
                    torch.zeros(1, 3, 4, 4),
                    torch.zeros(1, dtype=torch.int64),
                    torch.zeros(1, dtype=torch.int64),
                    ("b",),
                ),
            ]
        )
