"""Scenario files (TOML): which domains exist, where the clients' data comes from, what is public.

load_scenario parses and validates without touching the data, so a bad key fails fast with a
message naming the key and the file; the data itself is read by federation.build_federation.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ScenarioError
from .loaders import LOADERS, option_problems

PARTITIONS = ("iid", "dirichlet")

# key -> (accepted types, default; REQUIRED if none). Documented in the README's scenario table.
REQUIRED = object()
TOP_LEVEL: dict[str, tuple[tuple[type, ...], Any]] = {
    "description": ((str,), ""),
    "seed": ((int,), 0),
    "image-size": ((int,), 28),
    "channels": ((int,), 1),
    "domains": ((list,), REQUIRED),
    "client-domain": ((str,), REQUIRED),
    "num-clients": ((int,), 10),
    "share": ((float, int), 0.5),
    "test-fraction": ((float, int), 0.2),
    "validation-fraction": ((float, int), 0.0),
    "partition": ((str,), "iid"),
    "alpha": ((float, int), 0.5),
    "min-partition-size": ((int,), 2),
    "pool-domains": ((list,), None),  # None: every domain
}


@dataclass(frozen=True)
class DomainSpec:
    """One [[domains]] entry: a name, a loader, an absolute path (None if the loader needs none)
    and the loader's options (every other key of the entry)."""

    name: str
    loader: str
    path: Path | None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Scenario:
    """A validated scenario file; see the README's scenario table for each field's meaning."""

    source: Path
    seed: int
    image_size: int
    channels: int
    domains: tuple[DomainSpec, ...]
    client_domain: str
    num_clients: int
    share: float
    test_fraction: float
    partition: str
    alpha: float
    pool_domains: tuple[str, ...]
    min_partition_size: int = 2
    validation_fraction: float = 0.0
    description: str = ""
    data_root: Path | None = None

    def domain(self, name: str) -> DomainSpec:
        """The DomainSpec called `name` (KeyError if absent)."""
        for spec in self.domains:
            if spec.name == name:
                return spec
        raise KeyError(name)


def _type_name(types: tuple[type, ...]) -> str:
    names = {"str": "a string", "int": "an integer", "float": "a number", "list": "an array"}
    return " or ".join(dict.fromkeys(names.get(t.__name__, t.__name__) for t in types))


def _check_type(file: Path, key: str, value: Any, types: tuple[type, ...]) -> Any:
    if isinstance(value, bool) or not isinstance(value, types):
        raise ScenarioError(
            f"{file}: key {key!r} must be {_type_name(types)}, got {type(value).__name__} {value!r}"
        )
    return float(value) if float in types else value


def _parse_domain(file: Path, i: int, entry: Any, base: Path) -> DomainSpec:
    where = f"domains[{i}]"
    if not isinstance(entry, dict):
        raise ScenarioError(f"{file}: key {where!r} must be a table ([[domains]]), got {entry!r}")
    for key in ("name", "loader"):
        if key not in entry:
            raise ScenarioError(f"{file}: key '{where}.{key}' is missing")
        _check_type(file, f"{where}.{key}", entry[key], (str,))
    name, loader = entry["name"], entry["loader"]
    if loader not in LOADERS:
        raise ScenarioError(
            f"{file}: key '{where}.loader' ({name!r}): unknown loader {loader!r}; "
            f"known: {', '.join(LOADERS)}"
        )
    info = LOADERS[loader]
    path = None
    if "path" in entry:
        if not info.needs_path:
            raise ScenarioError(f"{file}: key '{where}.path': loader {loader!r} takes no path")
        raw = _check_type(file, f"{where}.path", entry["path"], (str,))
        path = Path(raw).expanduser()
        path = path if path.is_absolute() else (base / path)
        path = path.resolve()
    elif info.needs_path:
        raise ScenarioError(f"{file}: key '{where}.path' is missing (loader {loader!r} needs it)")
    options = {k: v for k, v in entry.items() if k not in ("name", "loader", "path")}
    problems = option_problems(loader, options)
    if problems:
        key, msg = problems[0]
        raise ScenarioError(f"{file}: key '{where}.{key}' ({name!r}): {msg}")
    return DomainSpec(name=name, loader=loader, path=path, options=options)


def read_top_level(
    path: str | Path, kind: str, top_level: Mapping[str, tuple[tuple[type, ...], Any]]
) -> tuple[Path, dict[str, Any]]:
    """(resolved file, its top-level values) of a `kind` TOML file ("scenario", "pool"): each
    key of `top_level` type-checked, defaults filled in (`REQUIRED`: must be given); unknown keys,
    a missing file and bad TOML are ScenarioErrors naming the file and the key."""
    file = Path(path).expanduser().resolve()
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ScenarioError(f"{file}: {kind} file not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ScenarioError(f"{file}: cannot parse {kind} file: {exc}") from None
    unknown = sorted(set(raw) - set(top_level))
    if unknown:
        raise ScenarioError(
            f"{file}: unknown key {unknown[0]!r} (known keys: {', '.join(top_level)})"
        )
    values: dict[str, Any] = {}
    for key, (types, default) in top_level.items():
        if key not in raw:
            if default is REQUIRED:
                raise ScenarioError(f"{file}: key {key!r} is missing")
            values[key] = default
        else:
            values[key] = _check_type(file, key, raw[key], types)
    return file, values


def load_scenario(path: str | Path, data_root: str | Path | None = None) -> Scenario:
    """Parse and validate a scenario TOML file; relative data paths resolve against the file's
    folder, or against data_root when given. Raises ScenarioError naming the key and the file."""
    file, values = read_top_level(path, "scenario", TOP_LEVEL)

    def bad(key: str, why: str) -> ScenarioError:
        return ScenarioError(f"{file}: key {key!r} {why}, got {values[key]!r}")

    if values["image-size"] < 1:
        raise bad("image-size", "must be >= 1")
    if values["channels"] not in (1, 3):
        raise bad("channels", "must be 1 (grey) or 3 (RGB)")
    if values["num-clients"] < 1:
        raise bad("num-clients", "must be >= 1")
    if not 0.0 < values["share"] < 1.0:
        raise bad("share", "must be strictly between 0 and 1")
    if not 0.0 <= values["test-fraction"] < 1.0:
        raise bad("test-fraction", "must be in [0, 1)")
    if not 0.0 <= values["validation-fraction"] < 1.0:
        raise bad("validation-fraction", "must be in [0, 1)")
    if values["partition"] not in PARTITIONS:
        raise bad("partition", f"must be one of {', '.join(PARTITIONS)}")
    if not values["alpha"] > 0.0:
        raise bad("alpha", "must be > 0")
    if values["min-partition-size"] < 1:
        raise bad("min-partition-size", "must be >= 1")

    base = file.parent if data_root is None else Path(data_root).expanduser().resolve()
    if not values["domains"]:
        raise bad("domains", "must list at least one [[domains]] table")
    domains = tuple(_parse_domain(file, i, e, base) for i, e in enumerate(values["domains"]))
    names = [d.name for d in domains]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ScenarioError(f"{file}: key 'domains[{i}].name': duplicate domain name {name!r}")

    if values["client-domain"] not in names:
        raise bad("client-domain", f"must name one of the domains ({', '.join(names)})")
    pool = values["pool-domains"]
    if pool is None:
        pool = list(names)
    if not pool:
        raise bad("pool-domains", "must list at least one domain")
    for i, name in enumerate(pool):
        _check_type(file, f"pool-domains[{i}]", name, (str,))
        if name not in names:
            raise ScenarioError(
                f"{file}: key 'pool-domains' names unknown domain {name!r} "
                f"(domains: {', '.join(names)})"
            )
        if name in pool[:i]:
            raise ScenarioError(f"{file}: key 'pool-domains' lists {name!r} twice")
    for i, name in enumerate(names):
        if name != values["client-domain"] and name not in pool:
            raise ScenarioError(
                f"{file}: key 'domains[{i}]' ({name!r}) is neither the client-domain nor in "
                "pool-domains: remove it or add it to pool-domains"
            )

    return Scenario(
        source=file,
        seed=values["seed"],
        image_size=values["image-size"],
        channels=values["channels"],
        domains=domains,
        client_domain=values["client-domain"],
        num_clients=values["num-clients"],
        share=values["share"],
        test_fraction=values["test-fraction"],
        partition=values["partition"],
        alpha=values["alpha"],
        pool_domains=tuple(pool),
        min_partition_size=values["min-partition-size"],
        validation_fraction=float(values["validation-fraction"]),
        description=values["description"],
        data_root=None if data_root is None else base,
    )
