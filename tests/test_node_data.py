"""A node reading its own data (node config `data`): ImageFolder trees with class names or .npz
files, labels mapped by name into the server's `class-names`, the node's own split, no scenario
read; `export-shards` as the bridge from a simulation's shards to per-node folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flower_helpers import run_tiny, tiny_scenario
from PIL import Image

import ecos_flower.client.data as client_data
from ecos_flower.cli import main as cli_main
from ecos_flower.client.data import check_data_source, client_shard
from ecos_flower.client_app import app as client_app
from ecos_flower.data import load_federation
from ecos_flower.data.node_data import (
    LabelSpaceError,
    load_node_data,
    node_class_names,
    parse_class_names,
)
from ecos_flower.flower.inprocess import InProcessGrid
from ecos_flower.flower.settings import client_config

SERVER = ("bird", "cat", "dog")


def write_tree(root: Path, counts: dict[str, int], size: int = 12, mode: str = "L") -> Path:
    """An ImageFolder tree: `count` images per class folder, each of a per-class brightness (so
    a test can tell which folder an image came from), sizes varying with the index."""
    for k, (cls, count) in enumerate(counts.items()):
        (root / cls).mkdir(parents=True)
        for i in range(count):
            side = size + i % 3  # images of any size are resized
            shape = (side, side) if mode == "L" else (side, side, 3)
            Image.fromarray(np.full(shape, 40 + 80 * k, np.uint8), mode).save(
                root / cls / f"{i}.png"
            )
    return root


def message_config(names=SERVER, size: int = 8, channels: int = 1) -> dict:
    return {
        "class-names": ",".join(names),
        "num-classes": len(names),
        "image-size": size,
        "channels": channels,
    }


def all_labels(shard) -> list[int]:
    return sorted(shard.train.labels.tolist() + shard.test.labels.tolist())


def test_image_folder_with_class_names_maps_labels_by_name(tmp_path):
    # Folder order (sorted: cat, dog) differs from the server's (bird, cat, dog).
    root = write_tree(tmp_path / "node", {"cat": 4, "dog": 4}, mode="RGB")
    shard = load_node_data(root, image_size=8, channels=1, class_names=SERVER)
    assert shard.train.images.shape[1:] == (1, 8, 8)
    assert all_labels(shard) == [1] * 4 + [2] * 4
    assert len(shard.test) == 2 and len(shard.train) == 6  # test-fraction 0.25
    # Each label's images are its folder's (per-class brightness): cat darker than dog.
    data = torch.cat([shard.train.images, shard.test.images])
    labels = torch.cat([shard.train.labels, shard.test.labels])
    assert data[labels == 1].mean() < data[labels == 2].mean()


def test_node_split_follows_its_own_seed(tmp_path):
    root = write_tree(tmp_path / "node", {"bird": 6, "cat": 6, "dog": 6})
    a = load_node_data(root, image_size=8, channels=1, class_names=SERVER, split_seed=0)
    b = load_node_data(root, image_size=8, channels=1, class_names=SERVER, split_seed=0)
    c = load_node_data(root, image_size=8, channels=1, class_names=SERVER, split_seed=5)
    assert torch.equal(a.test.sample_ids, b.test.sample_ids)
    assert not torch.equal(a.test.sample_ids, c.test.sample_ids)
    half = load_node_data(root, image_size=8, channels=3, class_names=SERVER, test_fraction=0.5)
    assert len(half.test) == 9 and half.train.images.shape[1] == 3


def test_npz_with_and_without_class_names(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (10, 16, 16), dtype=np.uint8)
    labels = np.array([0, 1] * 5)
    named = tmp_path / "named.npz"
    np.savez(named, images=images, labels=labels, class_names=np.array(["dog", "bird"]))
    shard = load_node_data(named, image_size=8, channels=1, class_names=SERVER)
    assert all_labels(shard) == [0] * 5 + [2] * 5  # dog -> 2, bird -> 0
    assert shard.train.images.shape[1:] == (1, 8, 8)
    assert float(shard.train.images.max()) <= 1.0
    plain = tmp_path / "plain.npz"
    np.savez(plain, images=images[:, None].astype(np.float32) / 255, labels=labels)
    shard = load_node_data(plain, image_size=16, channels=1, class_names=SERVER)
    assert all_labels(shard) == [0] * 5 + [1] * 5  # labels are the server's indices
    assert node_class_names(plain) is None


@pytest.mark.parametrize("named", [True, False])
@pytest.mark.parametrize("bad_label", [-1, 99])
def test_one_sample_with_a_bad_label_is_left_out_not_an_error(tmp_path, named, bad_label):
    # Totality: D (with the bad sample) and D' (without it) give the node the same shard, so
    # nothing a handler answers after its charge depends on that one sample.
    images = np.random.default_rng(1).integers(0, 256, (9, 8, 8), dtype=np.uint8)
    labels = np.array([0, 1, 2] * 3)
    extra = {"class_names": np.array(["bird", "cat", "dog"])} if named else {}
    with_bad, without = tmp_path / "d.npz", tmp_path / "d_prime.npz"
    np.savez(
        with_bad,
        images=np.concatenate([images, images[:1]]),
        labels=np.append(labels, bad_label),
        **extra,
    )
    np.savez(without, images=images, labels=labels, **extra)
    shards = [
        load_node_data(path, image_size=8, channels=1, class_names=SERVER, test_fraction=0.0)
        for path in (with_bad, without)
    ]
    assert all_labels(shards[0]) == all_labels(shards[1])
    assert torch.equal(shards[0].train.images, shards[1].train.images)


def test_node_missing_a_class_is_fine(tmp_path):
    # `bird` absent, `cat` present but empty: names are a subset of the server's.
    root = write_tree(tmp_path / "node", {"cat": 0, "dog": 5})
    check_data_source(message_config(), {"data": str(root)})
    shard = client_shard(message_config(), {"data": str(root)})
    assert set(all_labels(shard)) == {2}


def test_unknown_class_name_is_refused_naming_both_lists(tmp_path):
    root = write_tree(tmp_path / "node", {"cat": 2, "horse": 2})
    node = {"data": str(root)}
    pattern = r"\['horse'\].*\['cat', 'horse'\].*\['bird', 'cat', 'dog'\]"
    with pytest.raises(LabelSpaceError, match=pattern):
        check_data_source(message_config(), node)  # before any charge: folder listing only
    with pytest.raises(LabelSpaceError, match=pattern):
        client_shard(message_config(), node)


def test_server_message_must_carry_a_sane_label_space(tmp_path):
    root = write_tree(tmp_path / "node", {"cat": 2})
    node = {"data": str(root)}
    config = message_config()
    del config["class-names"]
    with pytest.raises(ValueError, match="no class-names"):
        check_data_source(config, node)
    with pytest.raises(ValueError, match="differs from its 3 class-names"):
        client_shard({**message_config(), "num-classes": 5}, node)
    with pytest.raises(ValueError, match="twice"):
        client_shard({**message_config(), "class-names": "cat,cat"}, node)
    with pytest.raises(ValueError, match="image-size"):
        client_shard({**message_config(), "image-size": 10**9}, node)
    assert parse_class_names('["a,b", "c"]') == ("a,b", "c")


def test_with_data_set_no_scenario_is_read(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a node with its own data read a scenario")

    monkeypatch.setattr(client_data, "load_federation", forbidden)
    root = write_tree(tmp_path / "node", {"bird": 3, "dog": 3})
    config = {**message_config(), "scenario": str(tmp_path / "nowhere.toml"), "num-clients": 3}
    node = {"data": str(root)}  # no partition-id, no scenario
    check_data_source(config, node)
    shard = client_shard(config, node)
    assert len(shard.train) + len(shard.test) == 6


def test_server_sends_class_names_and_image_shape(tmp_path):
    federation = load_federation(tiny_scenario(tmp_path))
    assert federation.class_names == tuple(str(i) for i in range(10))
    sent = client_config(
        {"class-names": '["0", "1"]', "image-size": 8, "channels": 1, "num-classes": 2}
    )
    assert sent["class-names"] == '["0", "1"]' and sent["image-size"] == 8


def test_scenario_image_folder_accepts_class_names(tmp_path):
    from ecos_flower.data import load_domain
    from ecos_flower.data.federation import scenario_class_names
    from ecos_flower.data.scenario import load_scenario

    root = write_tree(tmp_path / "tree", {"cat": 2, "dog": 3})
    data = load_domain("image-folder", name="d", path=root, image_size=8, channels=1, options={})
    assert sorted(data.labels.tolist()) == [0, 0, 1, 1, 1]
    scenario = tmp_path / "s.toml"
    scenario.write_text(
        'image-size = 8\nchannels = 1\nclient-domain = "d"\nnum-clients = 1\nshare = 0.5\n'
        'test-fraction = 0.0\npool-domains = ["d"]\n\n[[domains]]\nname = "d"\n'
        f'loader = "image-folder"\npath = "{root}"\n'
    )
    assert scenario_class_names(load_scenario(scenario), 2) == ("cat", "dog")


def test_export_shards_round_trips(tmp_path):
    scenario = tiny_scenario(tmp_path)
    out = tmp_path / "out"
    assert cli_main(["export-shards", str(scenario), str(out)]) == 0
    federation = load_federation(scenario)
    assert sorted(p.name for p in out.iterdir()) == ["node-0", "node-1", "node-2"]
    assert sorted(p.name for p in (out / "node-0").iterdir()) == list(federation.class_names)
    original = federation.clients[0]
    shard = load_node_data(
        out / "node-0", image_size=8, channels=1, class_names=federation.class_names
    )
    assert len(shard.train) == len(original.train) and len(shard.test) == len(original.test)
    assert all_labels(shard) == all_labels(original)
    assert shard.train.images.shape[1:] == original.train.images.shape[1:]
    # Same images up to 8-bit quantisation: compare the sorted pixel sums per label.
    for label in range(10):
        mine = torch.cat([shard.train.images, shard.test.images])[
            torch.cat([shard.train.labels, shard.test.labels]) == label
        ]
        theirs = torch.cat([original.train.images, original.test.images])[
            torch.cat([original.train.labels, original.test.labels]) == label
        ]
        a = mine.flatten(1).sum(1).sort().values
        b = theirs.flatten(1).sum(1).sort().values
        assert torch.allclose(a, b, atol=64 / 255)
    train_only = tmp_path / "train-only"
    assert cli_main(["export-shards", str(scenario), str(train_only), "--train-only"]) == 0
    count = sum(1 for _ in (train_only / "node-0").rglob("*.png"))
    assert count == len(original.train)
    assert cli_main(["export-shards", str(scenario), str(out)]) == 2  # refuses to overwrite


def test_ecos_run_on_exported_node_folders_matches_the_scenario_run(tmp_path, monkeypatch):
    scenario = tiny_scenario(tmp_path)
    # Enough cloud training that accuracy is far above chance (FAST's 2 epochs are near 0.1).
    settings = {"method": "ecos", "budget": 300, "cloud-epochs": 15}
    baseline, _ = run_tiny(scenario, **settings)
    out = tmp_path / "out"
    assert cli_main(["export-shards", str(scenario), str(out)]) == 0

    # The server still reads the scenario (its pool); the nodes must not.
    real = client_data.load_federation

    def server_only(*args, **kwargs):
        raise AssertionError("a node with its own data read a scenario")

    monkeypatch.setattr(client_data, "load_federation", server_only)
    node_configs = {i: {"data": str(out / f"node-{i}")} for i in range(3)}
    grid = InProcessGrid(client_app, 3, node_configs=node_configs)
    report, _ = run_tiny(scenario, grid=grid, **settings)
    assert real is not server_only
    mine, base = report.accuracy_per_client, baseline.accuracy_per_client
    assert sorted(mine) == sorted(base) == [0, 1, 2]
    for client in base:
        assert base[client] > 0.7 and mine[client] > 0.7, (mine, base)
        assert abs(mine[client] - base[client]) < 0.15, (mine, base)
