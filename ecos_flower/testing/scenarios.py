"""A tiny two-domain scenario from the embedded digits (8x8 images): for tests, benchmarks and
quick trials that need a real federation in a second, without any data files."""

from __future__ import annotations

from pathlib import Path

TINY_SCENARIO = """
seed = 0
image-size = 8
channels = 1
client-domain = "inverted"
num-clients = {num_clients}
share = 0.5
test-fraction = 0.25
partition = "iid"
pool-domains = ["plain", "inverted"]

[[domains]]
name = "plain"
loader = "embedded"
variant = "plain"

[[domains]]
name = "inverted"
loader = "embedded"
variant = "inverted"
"""


def write_tiny_scenario(folder: Path, num_clients: int = 3) -> Path:
    """Write the tiny scenario (plain + inverted digits, clients on inverted) as `tiny.toml`."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    path = Path(folder) / "tiny.toml"
    path.write_text(TINY_SCENARIO.format(num_clients=num_clients))
    return path


def write_tiny_deployment(folder: Path, num_clients: int = 3) -> tuple[Path, list[Path]]:
    """The tiny scenario as a deployment's folders: `folder/pool/pool.toml` with one ImageFolder
    tree per pool domain (the server's run-config `pool`) and `folder/node-<i>/` per node (its
    node config `data`). The scenario file itself goes to `folder/scenario/tiny.toml`, which
    neither the server nor a node needs. Returns (pool file, node folders)."""
    from ecos_flower.data.node_data import export_shards
    from ecos_flower.data.pool import export_pool

    folder = Path(folder)
    scenario = write_tiny_scenario(folder / "scenario", num_clients)
    nodes = export_shards(scenario, folder)
    return export_pool(scenario, folder / "pool"), nodes
