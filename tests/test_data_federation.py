"""Federations: client/pool disjointness, share, domain ids, determinism and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ecos_flower.data import (
    DataError,
    ScenarioError,
    build_federation,
    load_federation,
    load_scenario,
)

PROJECT = Path(__file__).resolve().parents[1]

EMBEDDED = """\
seed = {seed}
image-size = 8
client-domain = "noisy"
num-clients = {clients}
share = {share}
test-fraction = 0.25
partition = "{partition}"
alpha = 0.3
pool-domains = {pool}

[[domains]]
name = "plain"
loader = "embedded"
variant = "plain"

[[domains]]
name = "noisy"
loader = "embedded"
variant = "noisy-background"
{extra}
"""


def scenario(
    tmp_path: Path,
    seed=0,
    clients=5,
    share=0.4,
    partition="iid",
    pool='["plain", "noisy"]',
    extra="",
):
    path = tmp_path / f"sc-{seed}-{clients}-{share}-{partition}.toml"
    path.write_text(
        EMBEDDED.format(
            seed=seed, clients=clients, share=share, partition=partition, pool=pool, extra=extra
        )
    )
    return load_scenario(path)


def keys(data) -> set[tuple[str, int]]:
    """(domain name, sample id): identifies a source sample across subsets and the pool."""
    return {
        (data.domain_names[d], s)
        for d, s in zip(data.domains.tolist(), data.sample_ids.tolist(), strict=True)
    }


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_clients_and_pool_are_disjoint_and_complete(tmp_path, partition):
    fed = build_federation(scenario(tmp_path, partition=partition))
    assert fed.client_domain == "noisy" and fed.num_classes == 10 and fed.num_clients == 5
    client_keys: list[set] = []
    for i, shard in enumerate(fed.clients):
        assert shard.client_id == i and len(shard.train) > 0 and len(shard.test) > 0
        assert shard.train.domain_names == ("noisy",)
        assert not keys(shard.train) & keys(shard.test)
        client_keys.append(keys(shard.train) | keys(shard.test))
    private = set().union(*client_keys)
    assert sum(len(k) for k in client_keys) == len(private)  # clients do not overlap
    pool = keys(fed.pool)
    assert not private & pool  # no client image is in the pool
    noisy_total = 1797
    assert len(private) == round(0.4 * noisy_total)  # share respected
    assert len(private) + int(fed.pool.domain_mask("noisy").sum()) == noisy_total
    assert int(fed.pool.domain_mask("plain").sum()) == 1797
    assert fed.pool.domain_names == ("plain", "noisy")
    # domain ids really point at the right images: pool "noisy" rows equal the noisy source rows
    noisy_pool = fed.pool.subset(np.flatnonzero(fed.pool.domain_mask("noisy").numpy()))
    shard = fed.clients[0].train
    assert (
        noisy_pool.images.mean()
        > fed.pool.subset(np.flatnonzero(fed.pool.domain_mask("plain").numpy())).images.mean()
    )
    assert abs(float(shard.images.mean()) - float(noisy_pool.images.mean())) < 0.03


def test_deterministic_by_seed(tmp_path):
    a = build_federation(scenario(tmp_path, seed=1))
    b = build_federation(scenario(tmp_path, seed=1))
    c = build_federation(scenario(tmp_path, seed=2))
    assert a.clients[0].train.sample_ids.tolist() == b.clients[0].train.sample_ids.tolist()
    assert a.pool.sample_ids.tolist() == b.pool.sample_ids.tolist()
    assert a.clients[0].train.sample_ids.tolist() != c.clients[0].train.sample_ids.tolist()


def test_client_domain_outside_pool(tmp_path):
    fed = build_federation(scenario(tmp_path, pool='["plain"]'))
    assert fed.pool.domain_names == ("plain",) and len(fed.pool) == 1797
    assert not fed.pool.domain_mask("noisy").any()


def test_split_leaving_a_client_without_data(tmp_path):
    too_many = scenario(tmp_path, clients=800)  # 0.4 * 1797 = 719 private samples
    with pytest.raises(ScenarioError, match=r"client 719 gets no training data.*num-clients"):
        build_federation(too_many)
    one_each = scenario(tmp_path, clients=719)
    with pytest.raises(ScenarioError, match=r"client 0 gets no test data.*test-fraction"):
        build_federation(one_each)


def test_subsample_dropping_a_class_is_a_label_error(tmp_path):
    with pytest.raises(DataError, match=r"label sets differ across domains: 'plain' has"):
        build_federation(scenario(tmp_path, extra="max-samples = 12"))


def test_dirichlet_failure_names_keys(tmp_path):
    sc = scenario(tmp_path, clients=40, partition="dirichlet", extra="max-samples = 100")
    with pytest.raises(ScenarioError, match=r"'alpha' / 'num-clients' / 'min-partition-size'"):
        build_federation(sc)


def test_label_sets_must_match(tmp_path):
    root = tmp_path / "three"
    for cls in ("0", "1", "2"):
        (root / cls).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(root / cls / "x.png")
    text = EMBEDDED.format(
        seed=0, clients=2, share=0.5, partition="iid", pool='["plain", "three"]', extra=""
    )
    text += '\n[[domains]]\nname = "three"\nloader = "image-folder"\npath = "three"\n'
    (tmp_path / "s.toml").write_text(
        text.replace(
            'pool-domains = ["plain", "three"]', 'pool-domains = ["plain", "noisy", "three"]'
        )
    )
    with pytest.raises(DataError, match=r"'plain' has \[0, 1, .*'three' has \[0, 1, 2\]"):
        build_federation(load_scenario(tmp_path / "s.toml"))


def test_load_federation_caches_per_path_and_mtime(tmp_path):
    sc = scenario(tmp_path)
    first = load_federation(sc.source)
    assert load_federation(str(sc.source)) is first
    import os

    os.utime(sc.source, ns=(1, 1))
    assert load_federation(sc.source) is not first


def test_shipped_embedded_scenario():
    fed = load_federation(PROJECT / "simulations" / "embedded.toml")
    assert len(fed.clients) == 10 and fed.pool.images.shape[1:] == (1, 16, 16)
    n_private = sum(len(c.train) + len(c.test) for c in fed.clients)
    assert n_private == 899  # round half up: floor(0.5 * 1797 + 0.5)
    assert len(fed.pool) == 3 * 1797 + (1797 - n_private)


def test_digits_usps_scenario_loads_real_domains(shared_digits):
    fed = load_federation(PROJECT / "simulations" / "digits-usps.toml")
    assert fed.pool.domain_names == ("usps", "mnist", "optdigits")
    assert int(fed.pool.domain_mask("mnist").sum()) == 10_000
    assert int(fed.pool.domain_mask("optdigits").sum()) == 3731
    n_private = sum(len(c.train) + len(c.test) for c in fed.clients)
    assert n_private + int(fed.pool.domain_mask("usps").sum()) == 9298
    assert fed.pool.images.shape[1:] == (1, 28, 28) and fed.num_classes == 10
    assert not {k for c in fed.clients for k in keys(c.train) | keys(c.test)} & keys(fed.pool)


def test_a_validation_split_replaces_the_test_split_and_never_touches_it(tmp_path):
    plain = build_federation(scenario(tmp_path))
    path = tmp_path / "validation.toml"
    path.write_text(
        "validation-fraction = 0.2\n"
        + EMBEDDED.format(
            seed=0, clients=5, share=0.4, partition="iid", pool='["plain", "noisy"]', extra=""
        )
    )
    tuned = build_federation(load_scenario(path))
    for real, tuning in zip(plain.clients, tuned.clients, strict=True):
        train, test = set(real.train.sample_ids.tolist()), set(real.test.sample_ids.tolist())
        fit, validation = (
            set(tuning.train.sample_ids.tolist()),
            set(tuning.test.sample_ids.tolist()),
        )
        assert fit | validation == train and not fit & validation  # carved from train only
        assert not (fit | validation) & test  # the test split is never seen
        assert abs(len(validation) - 0.2 * len(train)) <= 1
    assert plain.pool.sample_ids.tolist() == tuned.pool.sample_ids.tolist()
