"""How a ClientApp finds its own data.

Every handler takes a `load_data(config, node_config) -> ClientShard` callable (`LoadData`): the
message's client config and the node's own config in, the node's train and test splits out. The
default, `client_shard`, reads the project's scenarios (the scenario named by the node config or
the message, the shard given by the node's `partition-id`); a Flower user passes their own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ecos_flower.data import ClientShard, load_federation

LoadData = Callable[[Mapping[str, Any], Mapping[str, Any]], ClientShard]
"""`load_data(config, node_config) -> ClientShard`: this node's data for one message."""


def check_data_source(
    config: Mapping[str, Any], node_config: Mapping[str, Any], load_data: LoadData | None = None
) -> None:
    """Raise ValueError unless the node config or the message names a scenario (checked before a
    charge: it depends on the configuration and the message only, not on the data). Only for
    the scenario loader: another `load_data` is the user's, and not checked here."""
    if load_data is not None and load_data is not client_shard:
        return
    if not str(node_config.get("scenario") or config.get("scenario") or ""):
        raise ValueError("no scenario: set `scenario` in the run config or the node config")


def client_shard(config: Mapping[str, Any], node_config: Mapping[str, Any]) -> ClientShard:
    """This node's shard: scenario from its node config if set (deployment), else from the server's
    message config (simulation); the shard index is the node's `partition-id`."""
    scenario = str(node_config.get("scenario") or config.get("scenario") or "")
    if not scenario:
        raise ValueError("no scenario: set `scenario` in the run config or the node config")
    data_root = str(node_config.get("data-root") or config.get("data-root") or "") or None
    num_clients = int(config["num-clients"]) if "num-clients" in config else None
    federation = load_federation(scenario, data_root=data_root, num_clients=num_clients)
    if "partition-id" not in node_config:
        raise ValueError(
            "node config has no `partition-id`: start the SuperNode with "
            "--node-config 'partition-id=N num-partitions=M'"
        )
    partition_id = int(node_config["partition-id"])
    num_clients = len(federation.clients)
    num_partitions = int(node_config.get("num-partitions", num_clients))
    if num_partitions != num_clients:
        raise ValueError(
            f"this node says the federation has {num_partitions} nodes (num-partitions) but the "
            f"server split scenario {scenario} into {num_clients} clients: start every node "
            f"with num-partitions={num_clients}"
        )
    if not 0 <= partition_id < num_clients:
        raise ValueError(f"partition-id {partition_id} outside 0..{num_clients - 1}")
    return federation.clients[partition_id]
