"""The public client side of ecos-flower: handlers and mods to register on your own ClientApp.

Every handler answers through the node's release boundary (`ReleaseBoundary`): the node's own
policy (its node config, never the message) decides what it answers, its one lifetime privacy
ledger is charged before its data is read, and a reply carries only the fields
`ecos_flower.privacy.policy.MECHANISMS` declares. Each message's fields are declared once, in
`ecos_flower.client.messages`, and checked before anything is allocated.

The handlers read the project's scenarios by default. Bring your own data by passing a
`load_data(config, node_config) -> ClientShard` callable to a handler factory::

    from flwr.clientapp import ClientApp

    from ecos_flower.client import (
        compute_time_mod,
        ecos_handler,
        handle_dssgd_evaluate,
        handle_dssgd_train,
        torch_threads_mod,
    )
    from ecos_flower.data import ClientShard

    def my_data(config, node_config) -> ClientShard:
        ...  # this node's train and test ImageSets

    app = ClientApp(mods=[torch_threads_mod, compute_time_mod])
    app.query("ecos")(ecos_handler(load_data=my_data))  # or handle_ecos_query: scenarios
    app.train("dssgd")(handle_dssgd_train)
    app.evaluate("dssgd")(handle_dssgd_evaluate)

A handler of your own gets the same boundary with `guarded`: write
`handler(msg, context, boundary)`, call `boundary.admit(mechanism)`, `boundary.charge(event)`
before reading data, reply with `boundary.reply(...)`, and raise `Refused(reason)` to refuse.
"""

from ecos_flower.client.applications import (
    finetune_handler,
    handle_finetune_evaluate,
    handle_knn_query,
    knn_handler,
)
from ecos_flower.client.baselines import (
    data_upload_handler,
    handle_data_upload,
    handle_local_training,
    local_training_handler,
)
from ecos_flower.client.data import LoadData, client_shard
from ecos_flower.client.dp_fedavg import dpsgd_train_handler, handle_dpsgd_train
from ecos_flower.client.dssgd import (
    dssgd_evaluate_handler,
    dssgd_train_handler,
    handle_dssgd_evaluate,
    handle_dssgd_train,
)
from ecos_flower.client.ecos import ecos_handler, handle_ecos_query
from ecos_flower.client.fedavg import (
    dp_fedavg_train_handler,
    fedavg_evaluate_handler,
    fedavg_train_handler,
    handle_dp_fedavg_train,
    handle_fedavg_evaluate,
    handle_fedavg_train,
)
from ecos_flower.client.messages import MessageRejected, QueryRejected, TaskRejected
from ecos_flower.client.mods import compute_time_mod, dp_clipping_mod, torch_threads_mod
from ecos_flower.client.release import Refused, ReleaseBoundary, guarded

__all__ = [
    "LoadData",
    "MessageRejected",
    "QueryRejected",
    "Refused",
    "ReleaseBoundary",
    "TaskRejected",
    "client_shard",
    "compute_time_mod",
    "data_upload_handler",
    "dp_clipping_mod",
    "dp_fedavg_train_handler",
    "dpsgd_train_handler",
    "dssgd_evaluate_handler",
    "dssgd_train_handler",
    "ecos_handler",
    "fedavg_evaluate_handler",
    "fedavg_train_handler",
    "finetune_handler",
    "guarded",
    "handle_data_upload",
    "handle_dp_fedavg_train",
    "handle_dpsgd_train",
    "handle_dssgd_evaluate",
    "handle_dssgd_train",
    "handle_ecos_query",
    "handle_fedavg_evaluate",
    "handle_fedavg_train",
    "handle_finetune_evaluate",
    "handle_knn_query",
    "handle_local_training",
    "knn_handler",
    "local_training_handler",
    "torch_threads_mod",
]
