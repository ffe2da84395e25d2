"""Scenario files: parsing, path resolution, and validation errors that name the key and file."""

from __future__ import annotations

from pathlib import Path

import pytest

from ecos_flower.data import ScenarioError, load_scenario

PROJECT = Path(__file__).resolve().parents[1]

BASE = """\
seed = 3
image-size = 8
client-domain = "a"
pool-domains = ["a", "b"]

[[domains]]
name = "a"
loader = "embedded"
variant = "plain"

[[domains]]
name = "b"
loader = "image-folder"
path = "data/b"
"""


def write(tmp_path: Path, text: str, name: str = "scenario.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_and_relative_paths(tmp_path):
    sc = load_scenario(write(tmp_path, BASE))
    assert sc.source == (tmp_path / "scenario.toml").resolve()
    assert (sc.seed, sc.image_size, sc.channels) == (3, 8, 1)
    assert (sc.num_clients, sc.share, sc.test_fraction, sc.partition) == (10, 0.5, 0.2, "iid")
    assert sc.alpha == 0.5 and sc.min_partition_size == 2 and sc.data_root is None
    assert sc.pool_domains == ("a", "b")
    assert sc.domain("a").path is None and sc.domain("a").options == {"variant": "plain"}
    assert sc.domain("b").path == (tmp_path / "data" / "b").resolve()


def test_data_root_overrides_the_base(tmp_path):
    sc = load_scenario(write(tmp_path, BASE), data_root=tmp_path / "elsewhere")
    assert sc.domain("b").path == (tmp_path / "elsewhere" / "data" / "b").resolve()


def test_pool_defaults_to_every_domain(tmp_path):
    sc = load_scenario(write(tmp_path, BASE.replace('pool-domains = ["a", "b"]\n', "")))
    assert sc.pool_domains == ("a", "b")


def test_shipped_scenarios_parse():
    emb = load_scenario(PROJECT / "simulations" / "embedded.toml")
    assert emb.client_domain == "noisy-background" and emb.num_clients == 10
    assert emb.pool_domains == ("plain", "inverted", "noisy-background", "thick-rotated")
    real = load_scenario(PROJECT / "simulations" / "digits-usps.toml")
    assert real.domain("usps").path == (PROJECT.parent / "shared/data/digits/usps").resolve()


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("seed = 3", "seed = 3\nshards = 4", "unknown key 'shards'"),
        ("seed = 3", 'seed = "3"', "key 'seed' must be an integer, got str"),
        ("seed = 3", "seed = true", "key 'seed' must be an integer, got bool"),
        ("seed = 3", "seed = 3\nshare = 1.0", "key 'share' must be strictly between 0 and 1"),
        ("seed = 3", "seed = 3\nshare = 0", "key 'share' must be strictly between 0 and 1"),
        ("seed = 3", "seed = 3\nnum-clients = 0", "key 'num-clients' must be >= 1"),
        ("seed = 3", "seed = 3\ntest-fraction = 1", "key 'test-fraction' must be in"),
        ("seed = 3", "seed = 3\nchannels = 2", "key 'channels' must be 1"),
        ("seed = 3", 'seed = 3\npartition = "shards"', "key 'partition' must be one of"),
        ("seed = 3", "seed = 3\nalpha = -1", "key 'alpha' must be > 0"),
        ('client-domain = "a"\n', "", "key 'client-domain' is missing"),
        ('client-domain = "a"', 'client-domain = "c"', "key 'client-domain' must name one of"),
        ('["a", "b"]', '["a", "c"]', "key 'pool-domains' names unknown domain 'c'"),
        ('["a", "b"]', '["a", "a", "b"]', "key 'pool-domains' lists 'a' twice"),
        ('["a", "b"]', '["a"]', "key 'domains[1]' ('b') is neither the client-domain"),
        ('loader = "image-folder"', 'loader = "hdf5"', "key 'domains[1].loader' ('b'): unknown"),
        ('path = "data/b"\n', "", "key 'domains[1].path' is missing"),
        ('variant = "plain"', 'variant = "plain"\npath = "x"', "'domains[0].path': loader"),
        ('variant = "plain"', 'variant = "sepia"', "key 'domains[0].variant' ('a'): must be one"),
        ('variant = "plain"', "max-samples = 0", "key 'domains[0].max-samples' ('a'): must be >="),
        ('variant = "plain"', "colour = 1", "key 'domains[0].colour' ('a'): unknown option"),
        ('name = "b"', 'name = "a"', "key 'domains[1].name': duplicate domain name 'a'"),
        ('name = "b"\n', "", "key 'domains[1].name' is missing"),
        ("seed = 3", "seed = 3 3", "cannot parse scenario file"),
    ],
)
def test_errors_name_key_and_file(tmp_path, old, new, message):
    assert old in BASE
    path = write(tmp_path, BASE.replace(old, new, 1), name="bad-scenario.toml")
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_missing_scenario_file_is_named(tmp_path):
    with pytest.raises(ScenarioError, match=r"nope\.toml: scenario file not found"):
        load_scenario(tmp_path / "nope.toml")


def test_no_domains(tmp_path):
    with pytest.raises(ScenarioError, match="key 'domains' is missing"):
        load_scenario(write(tmp_path, 'client-domain = "a"\n'))
