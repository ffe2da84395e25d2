"""The ecos-flower ClientApp: one app whose handlers serve every method (FedAvg, DP-FedAvg, ECOS,
DSSGD, the applications and the reference points).

The handlers and mods live in `ecos_flower.client` (each answers through the node's release
boundary, `ecos_flower.client.release`); this module only registers them. `make_client_app`
builds the same app on other data (`load_data(config, node_config) -> ClientShard`).
"""

from __future__ import annotations

from flwr.clientapp import ClientApp

from ecos_flower.client import (
    LoadData,
    client_shard,
    compute_time_mod,
    data_upload_handler,
    dp_clipping_mod,
    dp_fedavg_train_handler,
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


def make_client_app(load_data: LoadData = client_shard) -> ClientApp:
    """The project's ClientApp, every handler reading this node's data with `load_data`."""
    app = ClientApp(mods=[torch_threads_mod, compute_time_mod])
    app.train()(fedavg_train_handler(load_data))
    app.evaluate()(fedavg_evaluate_handler(load_data))
    app.train("dpfedavg", mods=[dp_clipping_mod])(dp_fedavg_train_handler(load_data))
    app.query("ecos")(ecos_handler(load_data))
    app.query("knn")(knn_handler(load_data))
    app.train("dssgd")(dssgd_train_handler(load_data))
    app.evaluate("dssgd")(dssgd_evaluate_handler(load_data))
    app.evaluate("finetune")(finetune_handler(load_data))
    app.train("local")(local_training_handler(load_data))  # reference point `local`: accuracy only
    app.query("upload")(data_upload_handler(load_data))  # `centralized`: raw data, no privacy
    return app


app = make_client_app()
