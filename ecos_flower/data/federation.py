"""Build a federation from a scenario: client shards (train/test) and the server's public pool.

The ECOS setting: a `share` fraction of the client domain is private and split over the clients;
the rest of it is public and (if the client domain is a pool domain) joins the pool together
with every other pool domain. Everything is deterministic by the scenario seed.

A scenario is a simulation: its federation holds every client's data. A deployed server reads
only its own public pool (`ecos_flower.data.pool`, run-config `pool`), a Federation without
clients, scenario or client domain.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError, ScenarioError
from .loaders import domain_class_names, load_domain
from .partition import dirichlet_partition, iid_partition, split_fraction
from .scenario import Scenario, load_scenario
from .types import ImageSet


@dataclass(frozen=True)
class ClientShard:
    """One client's private data; client_id is 0-based (node i of the simulation)."""

    client_id: int
    train: ImageSet
    test: ImageSet


@dataclass(frozen=True)
class Federation:
    """Client shards plus the public pool (labels and per-sample domain ids kept).

    Attributes
    ----------
    scenario : Scenario or None
        The scenario it was built from; None for a server-owned pool (`ecos_flower.data.pool`).
    clients : tuple of ClientShard
        Every client's data (simulation only); empty for a server-owned pool.
    pool : ImageSet
        The public pool, at the image size and channels every node is told.
    client_domain : str or None
        The pool domain the clients' data comes from; None when the server does not know it
        (a server-owned pool): then no pool sample is known to be client-domain.
    num_classes : int
        The size of the label space.
    class_names : tuple of str
        Name of each label 0..num_classes-1 (an image-folder domain's folder names, else the
        label's text: "0".."9" for the digit loaders); what the server tells the nodes.
    """

    scenario: Scenario | None
    clients: tuple[ClientShard, ...]
    pool: ImageSet
    client_domain: str | None
    num_classes: int
    class_names: tuple[str, ...] = ()

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    @property
    def image_size(self) -> int:
        """The side of every (square) image: what a node reading its own data resizes to."""
        return int(self.pool.images.shape[-1])

    @property
    def channels(self) -> int:
        """1 (grey) or 3 (RGB): what a node reading its own data converts to."""
        return int(self.pool.images.shape[1])


def derive_seed(seed: int, *tags: int) -> int:
    """An independent 32-bit seed for one use of the scenario seed (tags name the use)."""
    return int(np.random.SeedSequence([seed, *tags]).generate_state(1)[0])


def load_domains(scenario: Scenario) -> dict[str, ImageSet]:
    """Every domain of the scenario, loaded in file order, keyed by name."""
    return {
        spec.name: load_domain(
            spec.loader,
            name=spec.name,
            path=spec.path,
            image_size=scenario.image_size,
            channels=scenario.channels,
            options=spec.options,
            seed=scenario.seed,
        )
        for spec in scenario.domains
    }


def check_label_sets(domains: dict[str, ImageSet]) -> frozenset[int]:
    """The common label set; DataError naming both domains and the labels if any two differ."""
    items = list(domains.items())
    first_name, first = items[0][0], items[0][1].label_set()
    for name, data in items[1:]:
        labels = data.label_set()
        if labels != first:
            only_a, only_b = sorted(first - labels), sorted(labels - first)
            raise DataError(
                f"label sets differ across domains: {first_name!r} has {sorted(first)}, "
                f"{name!r} has {sorted(labels)} (only in {first_name!r}: {only_a}, "
                f"only in {name!r}: {only_b})"
            )
    return first


def scenario_class_names(scenario: Scenario, num_classes: int) -> tuple[str, ...]:
    """The name of each label 0..num_classes-1: the names the domains' sources define (an
    image-folder tree's class folders), else the label's text. DataError if two domains name
    one label differently (their folders list different classes)."""
    return merge_class_names(
        ((spec.name, domain_class_names(spec.loader, spec.path)) for spec in scenario.domains),
        num_classes,
    )


def merge_class_names(
    named: Iterable[tuple[str, Mapping[int, str]]], num_classes: int
) -> tuple[str, ...]:
    """The name of each label 0..num_classes-1 from (domain, label -> name) pairs; a label no
    domain names is its text. DataError if two domains name one label differently."""
    names: dict[int, tuple[str, str]] = {}
    for domain, labels in named:
        for label, name in labels.items():
            if label in names and names[label][1] != name:
                other, known = names[label]
                raise DataError(
                    f"class names differ across domains: label {label} is {known!r} in "
                    f"{other!r} but {name!r} in {domain!r}"
                )
            names[label] = (domain, name)
    result = tuple(names[i][1] if i in names else str(i) for i in range(num_classes))
    if len(set(result)) != len(result):
        raise DataError(f"class names are not unique: {list(result)}")
    return result


def _client_parts(scenario: Scenario, labels: np.ndarray) -> list[np.ndarray]:
    """Positions (into the private part) of each client's shard."""
    n, k, file = len(labels), scenario.num_clients, scenario.source
    if n < k:
        raise ScenarioError(
            f"{file}: client {n} gets no training data: the private share of "
            f"{scenario.client_domain!r} has {n} samples for {k} clients: lower 'num-clients' "
            "or raise 'share'"
        )
    seed = derive_seed(scenario.seed, 2)
    if scenario.partition == "iid":
        return iid_partition(n, k, seed)
    try:
        return dirichlet_partition(labels, k, scenario.alpha, seed, scenario.min_partition_size)
    except DataError as exc:
        raise ScenarioError(
            f"{file}: keys 'alpha' / 'num-clients' / 'min-partition-size': {exc}"
        ) from None


def build_federation(scenario: Scenario) -> Federation:
    """Load the scenario's domains and cut them into client shards and the public pool."""
    domains = load_domains(scenario)
    labels = check_label_sets(domains)
    file = scenario.source
    home = domains[scenario.client_domain]

    public_idx, private_idx = split_fraction(
        np.arange(len(home)), scenario.share, derive_seed(scenario.seed, 1)
    )
    private_labels = home.labels.numpy()[private_idx]
    clients = []
    for cid, part in enumerate(_client_parts(scenario, private_labels)):
        shard = private_idx[part]
        train_idx, test_idx = split_fraction(
            shard, scenario.test_fraction, derive_seed(scenario.seed, 3, cid)
        )
        if len(train_idx) == 0:
            raise ScenarioError(
                f"{file}: client {cid} gets no training data: its shard has {len(shard)} "
                f"sample(s) and 'test-fraction' is {scenario.test_fraction}: lower "
                "'num-clients' or 'test-fraction', or raise 'share'"
            )
        if scenario.test_fraction > 0 and len(test_idx) == 0:
            raise ScenarioError(
                f"{file}: client {cid} gets no test data: its shard has {len(shard)} sample(s) "
                f"with 'test-fraction' {scenario.test_fraction}: lower 'num-clients' or raise "
                "'share' (or set 'test-fraction' = 0)"
            )
        if scenario.validation_fraction > 0:
            # Tuning: a validation split carved from the training data stands in for the test
            # split, which no run of this scenario then sees.
            train_idx, test_idx = split_fraction(
                train_idx, scenario.validation_fraction, derive_seed(scenario.seed, 4, cid)
            )
            if len(train_idx) == 0 or len(test_idx) == 0:
                raise ScenarioError(
                    f"{file}: client {cid}: 'validation-fraction' "
                    f"{scenario.validation_fraction} leaves an empty train or validation split "
                    f"of its {len(shard)} sample(s)"
                )
        # A client's shard is decoded even from a lazy domain: the handlers train and score on
        # it as a tensor, and it is small next to the pool, which stays lazy.
        clients.append(
            ClientShard(cid, home.subset(train_idx).decoded(), home.subset(test_idx).decoded())
        )

    pool_parts = [
        home.subset(public_idx) if name == scenario.client_domain else domains[name]
        for name in scenario.pool_domains
    ]
    pool = ImageSet.concat(pool_parts)
    if len(pool) == 0:
        raise ScenarioError(f"{file}: key 'pool-domains': the public pool is empty")
    return Federation(
        scenario=scenario,
        clients=tuple(clients),
        pool=pool,
        client_domain=scenario.client_domain,
        num_classes=max(labels) + 1,
        class_names=scenario_class_names(scenario, max(labels) + 1),
    )


_CACHE: dict[tuple[str, int, str | None, int | None], Federation] = {}


def load_federation(
    path: str | Path, data_root: str | Path | None = None, num_clients: int | None = None
) -> Federation:
    """load_scenario + build_federation, cached per process by (resolved path, mtime, data_root,
    num_clients). `num_clients` overrides the scenario's (a deployment with another node count).

    Callers share the cached tensors: treat them as read-only.
    """
    file = Path(path).expanduser().resolve()
    try:
        mtime = file.stat().st_mtime_ns
    except FileNotFoundError:
        raise ScenarioError(f"{file}: scenario file not found") from None
    root = None if data_root is None else str(Path(data_root).expanduser().resolve())
    key = (str(file), mtime, root, num_clients)
    if key not in _CACHE:
        scenario = load_scenario(file, data_root)
        if num_clients is not None and num_clients != scenario.num_clients:
            if num_clients < 1:
                raise ScenarioError(f"{file}: num-clients override {num_clients} must be >= 1")
            scenario = dataclasses.replace(scenario, num_clients=int(num_clients))
        _CACHE[key] = build_federation(scenario)
    return _CACHE[key]
