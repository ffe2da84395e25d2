"""ECOS, then DSSGD, on your own data (scikit-learn's digits: the server's public pool, a private
shard per node) in one Flower App. Simulated nodes get the research policy; a deployed node needs
a budget it owns and an opt-in to metrics: --node-config 'partition-id=0 num-partitions=3
ledger-path="/var/lib/ecos/ledger.json" epsilon-limit=8.0 report-metrics=true'."""

import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from sklearn.datasets import load_digits

from ecos_flower.client import (
    dssgd_evaluate_handler,
    dssgd_train_handler,
    ecos_handler,
    fedavg_evaluate_handler,
    torch_threads_mod,
)
from ecos_flower.data import ClientShard, ImageSet
from ecos_flower.ecos import make_extractor
from ecos_flower.models import seeded_model
from ecos_flower.strategy import Dssgd, Ecos

POOL, CLASSES, SEED = 900, 10, 0  # the first 900 shuffled digits are the public pool
CONFIG = {"model": "small-cnn", "num-classes": CLASSES, "batch-size": 32, "learning-rate": 0.05}


def digits(start: int, stop: int) -> ImageSet:
    bunch = load_digits()
    order = torch.randperm(1797, generator=torch.Generator().manual_seed(SEED))[start:stop].numpy()
    images = torch.tensor(bunch.images[order] / 16.0, dtype=torch.float32).unsqueeze(1)
    domain = torch.zeros(len(order), dtype=torch.int64)
    return ImageSet(images, torch.tensor(bunch.target[order]), domain, ("digits",))


def load_data(config, node_config) -> ClientShard:
    """This node's private shard (75 % train, 25 % test) of the digits after the pool."""
    part, parts = int(node_config["partition-id"]), int(node_config["num-partitions"])
    size = (1797 - POOL) // parts
    start, cut = POOL + part * size, POOL + part * size + size * 3 // 4
    return ClientShard(part, digits(start, cut), digits(cut, start + size))


client = ClientApp(mods=[torch_threads_mod])
client.query("ecos")(ecos_handler(load_data))  # noisy coverage counts of the pool's centroids
client.evaluate()(fedavg_evaluate_handler(load_data))  # test accuracy of ECOS' model
client.train("dssgd")(dssgd_train_handler(load_data))  # one local epoch, sparse DP upload
client.evaluate("dssgd")(dssgd_evaluate_handler(load_data))

server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    pool, config = digits(0, POOL), ConfigRecord(CONFIG)
    extractor = make_extractor("pca", n_components=16).fit(pool.images)
    ecos = Ecos(budget=200, pool=pool, extractor=extractor, num_centroids=20, epsilon=1.0)
    found = ecos.start(grid, ArrayRecord(), train_config=config)  # its model: trained in the cloud
    query, evaluation = found.train_metrics_clientapp[1], found.evaluate_metrics_clientapp[1]
    dssgd = Dssgd(theta_u=0.1, gamma=1e-3, tau=1e-4, dp_epsilon=1.0, num_classes=CLASSES)
    rounds = dssgd.num_rounds(epochs=2, num_nodes=len(list(grid.get_node_ids())))
    model = seeded_model("small-cnn", SEED, CLASSES, in_channels=1, image_size=8)  # as the nodes'
    initial = ArrayRecord(model.state_dict())
    trained = dssgd.start(grid, initial, rounds, train_config=config, evaluate_config=config)
    final = trained.evaluate_metrics_clientapp[rounds]  # "accuracy/client-0", ...
    results = {
        "ecos": {"accuracy": evaluation["accuracy"], "epsilon-spent": query["epsilon-spent"]},
        "dssgd": {k: v for k, v in final.items() if k.startswith(("accuracy", "epsilon-spent"))},
    }
    folder = Path(str(context.run_config.get("results-dir", "results")))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "quickstart.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    run_simulation(server_app=server, client_app=client, num_supernodes=3)
