"""How a ClientApp finds its own data.

Every handler takes a `load_data(config, node_config) -> ClientShard` callable (`LoadData`): the
message's client config and the node's own config in, the node's train and test splits out. The
default, `client_shard`, reads either

* the node's OWN data (deployment): node config `data = "/srv/images"` names an ImageFolder tree
  or an `.npz` (see ecos_flower/data/node_data.py); the node splits it into train/test with its
  node config `split-seed` (default 0) and `test-fraction` (default 0.25), resizes it to the
  message's `image-size` / `channels` and maps its labels by name into the message's
  `class-names`. Nothing else is read: no scenario, no `partition-id`;
* or, without `data`, the project's scenarios (simulation): the scenario named by the node config
  or the message, the shard given by the node's `partition-id`.

A Flower user passes their own `load_data`. Handlers that train or score the task model then pass
the shard through `task_inputs`: with a head model the images become the features of the
pretrained extractor the message names, built from the node's own weights file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ecos_flower.data import ClientShard, load_federation
from ecos_flower.data.node_data import check_node_data, load_node_data, parse_class_names
from ecos_flower.models import HEAD_MODELS

LoadData = Callable[[Mapping[str, Any], Mapping[str, Any]], ClientShard]
"""`load_data(config, node_config) -> ClientShard`: this node's data for one message."""


def check_data_source(
    config: Mapping[str, Any], node_config: Mapping[str, Any], load_data: LoadData | None = None
) -> None:
    """Raise ValueError unless this node has a data source (checked before a charge). With node
    config `data`: the message must carry a sane label space and image shape, and the node's
    class names (its folder listing or npz `class_names`: node-owned metadata, never a record)
    must be a subset of the server's. Otherwise the node config or the message must name a
    scenario. Only for the project's loader: another `load_data` is the user's, not checked.
    Whatever the loader, a head model's extractor must be one this node builds from its own
    files (`task_inputs`), checked here so that a mismatch is refused before any charge."""
    if str(config.get("model", "")) in HEAD_MODELS:
        from ecos_flower.ecos.feature_space import local_head_extractor

        local_head_extractor(config)
    if load_data is not None and load_data is not client_shard:
        return
    if node_data_path(node_config):
        check_node_data(node_data_path(node_config), _node_data_task(config)["class_names"])
        return
    if not str(node_config.get("scenario") or config.get("scenario") or ""):
        raise ValueError("no scenario: set `scenario` in the run config or the node config")


def node_data_path(node_config: Mapping[str, Any]) -> str:
    """The node config's `data` (the node's own data), or "" when it has none."""
    return str(node_config.get("data") or "")


def _node_data_task(config: Mapping[str, Any]) -> dict[str, Any]:
    """What node-owned data needs from the server's message: class names, image size, channels
    (ValueError if absent or malformed; message-only)."""
    missing = [k for k in ("class-names", "image-size", "channels") if k not in config]
    if missing:
        raise ValueError(
            f"the server's config has no {', '.join(missing)}: a node with its own `data` needs "
            "the run's label space and image shape (a server of this project sends them)"
        )
    names = parse_class_names(config["class-names"])
    size, channels = config["image-size"], config["channels"]
    for key, value in (("image-size", size), ("channels", channels)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"the server's {key} must be an integer, got {value!r}")
    if not 1 <= size <= 4096 or channels not in (1, 3):
        raise ValueError(f"the server's image-size {size} / channels {channels} are out of range")
    num_classes = config.get("num-classes")
    if num_classes is not None and num_classes != len(names):
        raise ValueError(
            f"the server's num-classes {num_classes!r} differs from its {len(names)} class-names"
        )
    return {"class_names": names, "image_size": size, "channels": channels}


def _node_float(node_config: Mapping[str, Any], key: str, default: float) -> float:
    value = node_config.get(key, default)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"node config {key} must be a number, got {value!r}") from None


def own_data_shard(config: Mapping[str, Any], node_config: Mapping[str, Any]) -> ClientShard:
    """The node's own data (node config `data`): split by its `split-seed` / `test-fraction`,
    in the message's label space and image shape. Reads nothing else."""
    task = _node_data_task(config)
    seed = _node_float(node_config, "split-seed", 0)
    if seed != int(seed) or seed < 0:
        raise ValueError(f"node config split-seed must be a non-negative integer, got {seed}")
    return load_node_data(
        node_data_path(node_config),
        split_seed=int(seed),
        test_fraction=_node_float(node_config, "test-fraction", 0.25),
        **task,
    )


def client_shard(config: Mapping[str, Any], node_config: Mapping[str, Any]) -> ClientShard:
    """This node's data: its own (node config `data`) if set, reading nothing else; otherwise
    a scenario shard: the scenario from its node config if set, else from the server's message
    config (simulation); the shard index is the node's `partition-id`."""
    if node_data_path(node_config):
        return own_data_shard(config, node_config)
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


def task_inputs(
    shard: ClientShard, config: Mapping[str, Any], node_config: Mapping[str, Any]
) -> ClientShard:
    """`shard` as the task model takes it: unchanged, or, when the message's `model` is a head
    (`linear-head`, `mlp-head`), in feature space: each image replaced by the features of the
    extractor the message's `head-extractor` names, which the node builds from its OWN weights
    file (a digest mismatch or a kind that is only ever shipped as weights is a ValueError, so
    a server cannot make the node run a network of its choosing). The features stay on the node;
    node config `feature-cache` names a folder where the node keeps them (default: memory)."""
    if str(config.get("model", "")) not in HEAD_MODELS:
        return shard
    from ecos_flower.ecos.feature_space import local_head_extractor, shard_in_feature_space

    return shard_in_feature_space(
        shard, local_head_extractor(config), node_feature_cache(node_config)
    )


def node_feature_cache(node_config: Mapping[str, Any]) -> str | None:
    """The folder the node keeps its own data's features in (node config `feature-cache`; the
    node's choice, never a message's), or None: memory only."""
    return str(node_config.get("feature-cache") or "") or None
