"""Issue 16: the same command twice gives the same numbers on Flower's Ray engine.

Flower's simulation draws the SuperNodes' ids from `os.urandom` and gives partition i to the i-th
id drawn, so the node-id order of the partitions was a fresh permutation every run; DSSGD's
round-robin and FedAvg's summation follow node-id order. The in-process tests show that a run's
numbers depend on that order only (not on the ids' values), and so that fixing it suffices;
the one Ray test shows the engine really hands the partitions out in node-id order
(`ecos_flower.flower.engines.partitions_in_node_id_order`). FedAvg also sums the updates by the
client each claims, which holds under `flwr run` too, where the engine fix does not reach.
"""

from __future__ import annotations

import secrets
import time

import numpy as np
import pytest
from flower_helpers import reply_from, run_tiny, tiny_scenario
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.superlink.federation import NoOpFederationManager

from ecos_flower.client_app import app as client_app
from ecos_flower.flower.engines import (
    node_noise_seed,
    noise_seeds_for_simulated_nodes,
    partitions_in_node_id_order,
    ray_backend_config,
)
from ecos_flower.flower.fedavg import RecordingFedAvg
from ecos_flower.flower.inprocess import InProcessGrid
from ecos_flower.flower.report import RunReport

DSSGD = {"method": "dssgd", "dssgd-epochs": 2, "theta-u": 0.1, "dssgd-schedule": "round-robin"}


def grid_with_node_ids(node_ids: list[int]) -> InProcessGrid:
    """An in-process grid of the project's ClientApp whose partition i is simulated by the node
    with id `node_ids[i]` (the in-process grid's own ids are 1000 + 7 i)."""
    grid = InProcessGrid(client_app, len(node_ids))
    contexts = [grid.contexts[old] for old in grid.node_ids]
    grid.node_ids = list(node_ids)
    grid.apps = dict.fromkeys(node_ids, client_app)
    grid.contexts = {
        new: Context(
            run_id=old.run_id,
            node_id=new,
            node_config=dict(old.node_config),
            state=RecordDict(),
            run_config=dict(old.run_config),
        )
        for new, old in zip(node_ids, contexts, strict=True)
    }
    return grid


def random_ids(count: int) -> list[int]:
    """`count` distinct random 63-bit ids, in increasing order (as Flower's, but ranked)."""
    ids: set[int] = set()
    while len(ids) < count:
        ids.add(secrets.randbits(63) + 2)  # never 0 or 1 (Flower reserves them)
    return sorted(ids)


def figures(report: RunReport) -> dict[str, dict[int, float]]:
    """Every per-client figure of a report that depends on the trained models."""
    out = {"accuracy": dict(report.accuracy_per_client)}
    if "server-accuracy-per-client" in report.extra:
        out["server-accuracy"] = dict(report.extra["server-accuracy-per-client"])
    return out


@pytest.mark.parametrize("method", ["dssgd", "fedavg"])
def test_the_numbers_depend_on_the_partitions_node_id_order_not_the_ids(
    tmp_path, flwr_home, method
):
    """Two different sets of random ids that rank the partitions alike give the same figures:
    with the partitions in node-id order, Flower's random ids cannot change a run."""
    scenario = tiny_scenario(tmp_path, num_clients=4)
    settings = DSSGD if method == "dssgd" else {"method": "fedavg", "num-server-rounds": 2}
    first, _ = run_tiny(scenario, 4, grid_with_node_ids(random_ids(4)), **settings)
    second, _ = run_tiny(scenario, 4, grid_with_node_ids(random_ids(4)), **settings)
    assert figures(second) == figures(first)


def test_dssgd_differs_when_the_node_id_order_of_the_partitions_differs(tmp_path, flwr_home):
    """What issue 16 saw: the same partitions behind the same ids in a different order (as
    Flower's unranked random ids gave each run) change DSSGD's round-robin and its numbers."""
    scenario = tiny_scenario(tmp_path, num_clients=4)
    ids = random_ids(4)
    ranked, _ = run_tiny(scenario, 4, grid_with_node_ids(ids), **DSSGD)
    shuffled, _ = run_tiny(scenario, 4, grid_with_node_ids(ids[::-1]), **DSSGD)
    assert figures(shuffled) != figures(ranked)


# float32 values whose weighted sum (weights 1/3) depends on the order: 1e8/3 absorbs 1/3
# unless -1e8/3 comes first. Element-wise IEEE adds, no BLAS: the same on every CPU.
ORDER_SENSITIVE = (1e8, 1.0, -1e8)


def train_replies(node_ids: list[int]) -> list[Message]:
    """Client i's FedAvg train reply (weight 1, value ORDER_SENSITIVE[i]) from node_ids[i]."""
    return [
        reply_from(
            node,
            "train",
            RecordDict(
                {
                    "arrays": ArrayRecord({"w": Array(np.array([value], dtype=np.float32))}),
                    "metrics": MetricRecord({"num-examples": 1, "partition-id": client}),
                }
            ),
        )
        for client, (node, value) in enumerate(zip(node_ids, ORDER_SENSITIVE, strict=True))
    ]


def test_fedavg_sums_the_updates_in_the_order_of_the_claimed_clients():
    """The same clients' updates behind node ids in another order (and arriving in another
    order) average to the same parameters: FedAvg sums them by claimed partition-id, which
    `flwr run` cannot randomise the way it randomises node ids."""
    ranked = train_replies([10, 20, 30])
    # Clients 0, 2, 1 behind nodes 10, 20, 30 and arriving in that order: summed by arrival
    # or by node id, the two 1e8s cancel before the 1 is added.
    client0, client1, client2 = train_replies([10, 30, 20])
    shuffled = [client0, client2, client1]
    # The order matters for these values: Flower's FedAvg, in arrival order, disagrees.
    plain = [FedAvg().aggregate_train(1, r)[0]["w"].numpy() for r in (ranked, shuffled)]
    assert not np.array_equal(*plain)
    first, _ = RecordingFedAvg().aggregate_train(1, ranked)
    second, _ = RecordingFedAvg().aggregate_train(1, shuffled)
    assert np.array_equal(first["w"].numpy(), second["w"].numpy())


def _memory_state() -> LinkStateFactory:
    return LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())


def test_flowers_registration_hands_out_partitions_in_node_id_order_within_the_context():
    """Flower's own registration (real LinkState, random ids) inside the context: partition i
    is the i-th smallest id, every id is one Flower registered; outside, Flower's is back."""
    original = vce_api._register_nodes
    factory = _memory_state()
    with partitions_in_node_id_order():
        mapping = vce_api._register_nodes(num_nodes=8, state_factory=factory)
    assert vce_api._register_nodes is original
    assert sorted(mapping.values()) == list(range(8))
    assert [mapping[node] for node in sorted(mapping)] == list(range(8))
    registered = {node.node_id for node in factory.state().get_node_info()}
    assert set(mapping) == registered


@pytest.mark.simulation
def test_ray_simulation_gives_partitions_in_node_id_order_and_seeded_noise(flwr_home):
    """Through Flower's real Ray engine, as `run_once` calls it: every node states its
    partition-id and the server sees them in node-id order (unpatched, 5 nodes would come out
    in order by chance once in 120 runs); each node has the research noise seed of its
    partition, as in the in-process engine, so DP runs repeat on Ray too."""
    seen: dict[int, int] = {}
    seeds: dict[int, int] = {}
    client = ClientApp()

    @client.query("partition")
    def partition(msg: Message, context: Context) -> Message:
        metrics = MetricRecord(
            {
                "partition-id": int(context.node_config["partition-id"]),
                "noise-seed": int(context.node_config.get("noise-seed", -1)),
            }
        )
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        deadline = time.monotonic() + 60
        while len(nodes := list(grid.get_node_ids())) < 5 and time.monotonic() < deadline:
            time.sleep(0.2)  # the engine registers its nodes after the ServerApp starts
        messages = [Message(RecordDict(), node, "query.partition") for node in nodes]
        for reply in grid.send_and_receive(messages):
            seen[reply.metadata.src_node_id] = int(reply.content["metrics"]["partition-id"])
            seeds[reply.metadata.src_node_id] = int(reply.content["metrics"]["noise-seed"])

    from flwr.simulation import run_simulation

    with partitions_in_node_id_order(), noise_seeds_for_simulated_nodes(3):
        run_simulation(
            server_app=server,
            client_app=client,
            num_supernodes=5,
            backend_config=ray_backend_config(),
        )
    assert [seen[node] for node in sorted(seen)] == list(range(5))
    assert {seen[node]: seeds[node] for node in seen} == {
        i: node_noise_seed(3, i) for i in range(5)
    }
