"""The ecos-flower ClientApp: one app whose handlers serve every method (FedAvg, DP-FedAvg, ECOS,
DSSGD, the applications and the reference points).

The handlers and mods live in `ecos_flower.client` (each answers through the node's release
boundary, `ecos_flower.client.release`); this module only registers them. `make_client_app`
builds the same app on other data (`load_data(config, node_config) -> ClientShard`).

`app` (what the Flower App names) imports no torch: on a node whose node config names a node
worker (`ecos_flower.node`) it relays each message there; otherwise it builds `make_client_app()`
on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flwr.clientapp import ClientApp

from ecos_flower.node.relay import RelayingClientApp

if TYPE_CHECKING:
    from ecos_flower.client import LoadData


def make_client_app(load_data: LoadData | None = None) -> ClientApp:
    """The project's ClientApp, every handler reading this node's data with `load_data`
    (default: `ecos_flower.client.client_shard`, the node's own data or its simulated shard)."""
    from ecos_flower.client import (
        client_shard,
        compute_time_mod,
        data_upload_handler,
        dp_clipping_mod,
        dp_fedavg_train_handler,
        dpsgd_train_handler,
        dssgd_evaluate_handler,
        dssgd_train_handler,
        ecos_handler,
        fedavg_evaluate_handler,
        fedavg_train_handler,
        finetune_handler,
        knn_handler,
        local_training_handler,
        torch_threads_mod,
    )

    load_data = client_shard if load_data is None else load_data
    app = ClientApp(mods=[torch_threads_mod, compute_time_mod])
    app.train()(fedavg_train_handler(load_data))
    app.evaluate()(fedavg_evaluate_handler(load_data))
    app.train("dpfedavg", mods=[dp_clipping_mod])(dp_fedavg_train_handler(load_data))
    app.train("dpsgd")(dpsgd_train_handler(load_data))  # sample-level DP-FedAvg (DP-SGD)
    app.query("ecos")(ecos_handler(load_data))
    app.query("knn")(knn_handler(load_data))
    app.train("dssgd")(dssgd_train_handler(load_data))
    app.evaluate("dssgd")(dssgd_evaluate_handler(load_data))
    app.evaluate("finetune")(finetune_handler(load_data))
    app.train("local")(local_training_handler(load_data))  # reference point `local`: accuracy only
    app.query("upload")(data_upload_handler(load_data))  # `centralized`: raw data, no privacy
    return app


app = RelayingClientApp(make_client_app)
"""The Flower App's ClientApp: relays to the node's worker when its node config names one
(`worker`), else answers in process (torch and the handlers are imported on first use)."""
