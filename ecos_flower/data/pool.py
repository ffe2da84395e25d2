"""The server-owned public pool of a deployment (run-config `pool`): a small TOML file naming the
pool's domains, which the server reads instead of a scenario.

A scenario (`ecos_flower.data.scenario`) is a simulation: building its federation loads every
domain, the clients' shards and test sets included. A deployed server owns only public data, so
with `pool` set it reads ONLY the paths the pool file names. The Federation it gets has no
clients, no scenario and no client domain: the label space (class names, number of classes) and
the image shape it tells the nodes come from the pool; which pool samples are of the clients'
domain is unknown (domain precision is not computed), and methods that need client data on the
server are simulation-only (`ecos_flower.server_app.SIMULATION_ONLY`).

Pool file (`pool.toml`; relative paths resolve against its folder)::

    description = "public digits"   # optional
    image-size = 28                  # required: every image is resized to this square
    channels = 1                     # required: 1 (grey) or 3 (RGB)
    seed = 0                         # optional: seeds the loaders' `max-samples` subsample

    [[domains]]                      # one table per pool domain, in label-table order
    path = "optdigits"               # a folder or a file
    name = "optdigits"               # optional: default the path's name (its stem for a file)
    loader = "image-folder"          # optional, inferred from the path (see below)
    max-samples = 5000               # the loader's options, as in a scenario
    lazy = true                      # image-folder: decode on demand, never hold the pixels

Loaders are the scenario's (`ecos_flower.data.loaders.LOADERS`: `image-folder`, `mnist-idx`,
`usps`, and the file-less `embedded` / `sklearn-digits`), plus `npz` (an `.npz` read by the
node-data reader, `ecos_flower.data.node_data.read_labelled`: `images`, integer `labels`,
optional `class_names`). Without `loader`: an `.npz` file is `npz`, a folder holding
`*-images-idx3-ubyte[.gz]` files is `mnist-idx`, any other folder is `image-folder`.

`export_pool` writes a scenario's public pool as such a file plus one ImageFolder tree per pool
domain, for a loopback deployment (`ecos-flower export-shards --pool`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import DataError, ScenarioError
from .federation import Federation, check_label_sets, load_federation, merge_class_names
from .loaders import domain_class_names, load_domain
from .node_data import _safe_class_folder, read_labelled, write_image_tree
from .scenario import REQUIRED, DomainSpec, _check_type, _parse_domain, read_top_level
from .types import ImageSet

NPZ_LOADER = "npz"
"""The pool-only loader name of an `.npz` domain (read by `node_data.read_labelled`)."""

POOL_FILE = "pool.toml"
"""The pool file `export_pool` writes."""

TOP_LEVEL: dict[str, tuple[tuple[type, ...], Any]] = {
    "description": ((str,), ""),
    "image-size": ((int,), REQUIRED),
    "channels": ((int,), REQUIRED),
    "seed": ((int,), 0),
    "domains": ((list,), REQUIRED),
}
"""Pool-file key -> (accepted types, default)."""


@dataclass(frozen=True)
class PoolSpec:
    """A validated pool file.

    Attributes
    ----------
    source : Path
        The pool file.
    image_size, channels : int
        The image shape every pool image is brought to (and every node is told).
    domains : tuple of DomainSpec
        The pool's domains in file order (absolute paths).
    seed : int
        Seeds the loaders' `max-samples` subsample.
    description : str
        Free text.
    """

    source: Path
    image_size: int
    channels: int
    domains: tuple[DomainSpec, ...]
    seed: int = 0
    description: str = ""


def _infer_loader(path: Path) -> str:
    """The loader of a domain entry without `loader`, from its path alone (no image is read)."""
    if path.suffix.lower() == ".npz":
        return NPZ_LOADER
    if path.is_dir() and any("-images-idx3-ubyte" in p.name for p in path.iterdir()):
        return "mnist-idx"
    return "image-folder"


def _parse_pool_domain(file: Path, i: int, entry: Any) -> DomainSpec:
    """One [[domains]] table: the scenario's parser, with the name and loader defaulted from
    the path and the pool-only `npz` loader."""
    where = f"domains[{i}]"
    if not isinstance(entry, dict):
        raise ScenarioError(f"{file}: key {where!r} must be a table ([[domains]]), got {entry!r}")
    entry = dict(entry)
    path = None
    if "path" in entry:
        raw = Path(_check_type(file, f"{where}.path", entry["path"], (str,))).expanduser()
        path = (raw if raw.is_absolute() else file.parent / raw).resolve()
        entry.setdefault("name", path.stem if path.suffix else path.name)
        entry.setdefault("loader", _infer_loader(path))
    if entry.get("loader") != NPZ_LOADER:
        return _parse_domain(file, i, entry, file.parent)
    extra = sorted(set(entry) - {"name", "loader", "path"})
    if extra:
        raise ScenarioError(f"{file}: key '{where}.{extra[0]}': loader 'npz' takes no options")
    if path is None or not path.is_file():
        raise ScenarioError(f"{file}: key '{where}.path': loader 'npz' needs a file, got {path}")
    name = _check_type(file, f"{where}.name", entry["name"], (str,))
    return DomainSpec(name=name, loader=NPZ_LOADER, path=path)


def load_pool_spec(path: str | Path) -> PoolSpec:
    """Parse and validate a pool file without reading any image; ScenarioError naming the key
    and the file otherwise."""
    file, values = read_top_level(path, "pool", TOP_LEVEL)
    if not 1 <= values["image-size"] <= 4096:
        raise ScenarioError(f"{file}: key 'image-size' must be in 1..4096")
    if values["channels"] not in (1, 3):
        raise ScenarioError(f"{file}: key 'channels' must be 1 (grey) or 3 (RGB)")
    if not values["domains"]:
        raise ScenarioError(f"{file}: key 'domains' must list at least one [[domains]] table")
    domains = tuple(_parse_pool_domain(file, i, e) for i, e in enumerate(values["domains"]))
    names = [d.name for d in domains]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ScenarioError(f"{file}: key 'domains[{i}].name': duplicate domain name {name!r}")
    return PoolSpec(
        source=file,
        image_size=values["image-size"],
        channels=values["channels"],
        domains=domains,
        seed=values["seed"],
        description=values["description"],
    )


def _load_pool_domain(spec: DomainSpec, pool: PoolSpec) -> tuple[ImageSet, dict[int, str]]:
    """One pool domain and the label -> class name table its source defines."""
    if spec.loader != NPZ_LOADER:
        data = load_domain(
            spec.loader,
            name=spec.name,
            path=spec.path,
            image_size=pool.image_size,
            channels=pool.channels,
            options=spec.options,
            seed=pool.seed,
        )
        return data, domain_class_names(spec.loader, spec.path)
    assert spec.path is not None
    images, labels, names = read_labelled(spec.path, pool.image_size, pool.channels)
    data = ImageSet(
        images=images,
        labels=labels.to(torch.int64),
        domains=torch.zeros(len(labels), dtype=torch.int64),
        domain_names=(spec.name,),
    )
    return data, dict(enumerate(names or ()))


def build_pool(pool: PoolSpec) -> Federation:
    """The server's Federation of a pool file: its domains concatenated, no clients."""
    loaded = {spec.name: _load_pool_domain(spec, pool) for spec in pool.domains}
    domains = {name: data for name, (data, _) in loaded.items()}
    num_classes = max(check_label_sets(domains)) + 1
    return Federation(
        scenario=None,
        clients=(),
        pool=ImageSet.concat(list(domains.values())),
        client_domain=None,
        num_classes=num_classes,
        class_names=merge_class_names(
            ((name, names) for name, (_, names) in loaded.items()), num_classes
        ),
    )


_CACHE: dict[tuple[str, int], Federation] = {}


def load_pool(path: str | Path) -> Federation:
    """load_pool_spec + build_pool, cached per process by (resolved path, mtime). Callers share
    the cached tensors: treat them as read-only."""
    file = Path(path).expanduser().resolve()
    try:
        key = (str(file), file.stat().st_mtime_ns)
    except FileNotFoundError:
        raise ScenarioError(f"{file}: pool file not found") from None
    if key not in _CACHE:
        _CACHE[key] = build_pool(load_pool_spec(file))
    return _CACHE[key]


def server_federation(config: Mapping[str, Any]) -> Federation:
    """What a server run may read, from its (resolved) run config: the server-owned pool when
    `pool` is set, reading nothing else; otherwise the scenario's federation (a simulation,
    whose server holds the clients' data too but uses only its pool), split over
    `num-clients` nodes when set."""
    if config.get("pool"):
        return load_pool(config["pool"])
    return load_federation(
        config["scenario"],
        data_root=config.get("data-root") or None,
        num_clients=config.get("num-clients"),
    )


def export_pool(
    scenario: str | Path, out: str | Path, *, data_root: str | Path | None = None
) -> Path:
    """Write a scenario's public pool for a server: one ImageFolder tree per pool domain,
    `out/<domain>/<class-name>/<n>.png` (the client domain's public part included, as the
    simulation's pool holds it), and `out/pool.toml` naming them with the scenario's image size
    and channels. Returns the pool file; DataError if a domain folder is not empty."""
    federation = load_federation(scenario, data_root=data_root)
    pool, out = federation.pool, Path(out)
    tables = []
    for index, name in enumerate(pool.domain_names):
        folder = _safe_class_folder(name)
        # A lazy domain is decoded one domain at a time, to be written as PNGs.
        part = pool.subset(torch.nonzero(pool.domains == index).flatten()).decoded()
        write_image_tree(part, out / folder, federation.class_names)
        tables.append(f'[[domains]]\nname = "{_toml_text(name)}"\npath = "{_toml_text(folder)}"\n')
    file = out / POOL_FILE
    file.write_text(
        f'description = "public pool of {_toml_text(Path(scenario).name)}"\n'
        f"image-size = {federation.image_size}\nchannels = {federation.channels}\n\n"
        + "\n".join(tables),
        encoding="utf-8",
    )
    return file


def _toml_text(text: str) -> str:
    """`text` escaped for a TOML basic string."""
    if any(ord(c) < 32 for c in text):
        raise DataError(f"{text!r} holds a control character")
    return text.replace("\\", "\\\\").replace('"', '\\"')


__all__ = [
    "NPZ_LOADER",
    "POOL_FILE",
    "PoolSpec",
    "build_pool",
    "export_pool",
    "load_pool",
    "load_pool_spec",
    "server_federation",
]
