"""The domain montage renders one row per domain into a PNG."""

from __future__ import annotations

from PIL import Image

from ecos_flower.data import load_scenario, save_domain_montage
from ecos_flower.data.montage import pick_examples
from ecos_flower.data.types import ImageSet


def test_montage_png(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(
        'image-size = 8\nclient-domain = "a"\n'
        '[[domains]]\nname = "a"\nloader = "embedded"\nvariant = "inverted"\n'
        '[[domains]]\nname = "b"\nloader = "embedded"\nvariant = "edges"\n'
    )
    out = save_domain_montage(load_scenario(path), tmp_path / "m" / "montage.png", per_domain=12)
    with Image.open(out) as img:
        assert img.size[0] > img.size[1] > 100


def test_pick_examples_one_per_class_first():
    import torch

    labels = torch.tensor([3, 3, 1, 2, 1, 3])
    data = ImageSet(torch.zeros(6, 1, 2, 2), labels, torch.zeros(6, dtype=torch.int64), ("a",))
    picks = pick_examples(data, 5)
    assert [int(labels[i]) for i in picks[:3]] == [1, 2, 3] and len(set(picks)) == 5
