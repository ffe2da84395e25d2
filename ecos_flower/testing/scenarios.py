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
