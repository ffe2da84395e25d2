"""Data layer: loaders for digit domains, scenario files, partitions and federations."""

from .embedded import VARIANTS, embedded_digits
from .errors import DataError, ScenarioError
from .federation import (
    ClientShard,
    Federation,
    build_federation,
    load_domains,
    load_federation,
)
from .idx import read_idx
from .loaders import LOADERS, load_domain
from .montage import save_domain_montage
from .partition import dirichlet_partition, iid_partition, split_fraction
from .scenario import DomainSpec, Scenario, load_scenario
from .types import ImageSet

__all__ = [
    "LOADERS",
    "VARIANTS",
    "ClientShard",
    "DataError",
    "DomainSpec",
    "Federation",
    "ImageSet",
    "Scenario",
    "ScenarioError",
    "build_federation",
    "dirichlet_partition",
    "embedded_digits",
    "iid_partition",
    "load_domain",
    "load_domains",
    "load_federation",
    "load_scenario",
    "read_idx",
    "save_domain_montage",
    "split_fraction",
]
