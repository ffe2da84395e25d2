"""DSSGD as a Flower strategy: the parameter server schedules participants, sends each the theta_d
fraction of most-updated global parameters in a `train.dssgd` message, validates the sparse
uploads and adds the good ones to the global parameters; an `evaluate.dssgd` round scores both the
participants' local models and the server's model on every participant's own test split.

Modelled on Flower's FedAvg and our EcosStrategy: a small class whose hooks (configure_train /
aggregate_train, configure_evaluate / aggregate_evaluate) build messages and fold replies; the run
loop that calls them lives in `ecos_flower.flower.dssgd_run`. The global parameters and their
update counters live in a `ParameterServer`; a rejected reply is logged with its node and never
touches it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from ecos_flower.dssgd import (
    InvalidUpdateError,
    ParameterServer,
    SparseUpdate,
    svt_scales,
    upload_count,
    validate_sparse_update,
)
from ecos_flower.flower.validation import (
    InvalidReplyError,
    answers,
    checked_numpy,
    first_reply_per_node,
    metric,
    refusal,
    reply_record,
)

SCHEDULES = ("round-robin", "random", "parallel")
UPLOAD_MODES = ("largest", "threshold")
SVT_SPLITS = ("published", "corrected")
# Uploaded values may exceed gamma by float32 rounding of the clip bound, not more.
_GAMMA_SLACK = 1e-6


class DSSGDStrategy(Strategy):
    """Server side of DSSGD. State: a `ParameterServer` (w_g and stat), per-client privacy
    reports, accuracies and counts; rejected and refused replies are recorded, never applied.

    Schedules: "round-robin" (one participant per server round, cycling over the nodes sorted by
    id, as in the paper), "random" (one participant per round, a fresh random order of all nodes
    every pass, so everyone still takes the same number of steps), "parallel" (every node each
    round, all downloading the same server state; uploads applied in arrival order).
    """

    def __init__(
        self,
        initial: np.ndarray,
        *,
        theta_u: float = 0.1,
        theta_d: float = 1.0,
        schedule: str = "round-robin",
        upload_mode: str = "largest",
        gamma: float | None = None,
        tau: float = 0.0,
        dp_epsilon: float | None = None,
        svt_split: str = "published",
        beta: float | None = None,
        decay_every: int = 0,
        num_classes: int = 10,
        seed: int = 0,
    ) -> None:
        for name, theta in (("theta_u", theta_u), ("theta_d", theta_d)):
            if not 0.0 < theta <= 1.0:
                raise ValueError(f"{name} must lie in (0, 1], got {theta}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if upload_mode not in UPLOAD_MODES:
            raise ValueError(f"upload mode must be one of {UPLOAD_MODES}, got {upload_mode!r}")
        if svt_split not in SVT_SPLITS:
            raise ValueError(f"svt split must be one of {SVT_SPLITS}, got {svt_split!r}")
        if gamma is not None and not gamma > 0:
            raise ValueError(f"gamma must be positive (None: no clipping), got {gamma}")
        if not (math.isfinite(tau) and tau >= 0):
            raise ValueError(f"tau must be finite and >= 0, got {tau}")
        if dp_epsilon is not None:
            if not (math.isfinite(dp_epsilon) and dp_epsilon > 0):
                raise ValueError(f"dp_epsilon must be positive and finite, got {dp_epsilon}")
            if gamma is None:
                raise ValueError("the DP (SVT) upload needs a clip bound gamma")
        self.server = ParameterServer(initial, beta, decay_every)
        self.theta_u, self.theta_d = float(theta_u), float(theta_d)
        self.schedule_name, self.upload_mode = schedule, upload_mode
        self.gamma, self.tau = gamma, float(tau)
        self.dp_epsilon, self.svt_split = dp_epsilon, svt_split
        self.num_classes, self.seed = int(num_classes), int(seed)
        self.max_upload = upload_count(self.theta_u, self.server.num_params)
        self.accepted = 0
        self.rejected: list[InvalidReplyError] = []
        self.refused: dict[int, str] = {}
        self.node_to_client: dict[int, int] = {}
        self.steps_sent: dict[int, int] = {}
        self.accepted_per_client: dict[int, int] = {}
        self.epsilon_spent: dict[int, float] = {}  # ledger totals as last reported
        self.ledger_delta: dict[int, float] = {}  # the delta each node's ledger states them at
        self.epsilon_run: dict[int, float] = {}  # epsilon of this run's accepted uploads
        self.accuracy: dict[int, float] = {}
        self.server_accuracy: dict[int, float] = {}
        self.local_steps: dict[int, int] = {}  # steps each local model has taken (as evaluated)
        self._scheduled: set[int] = set()
        self.answered_nodes: set[int] = set()  # accepted or refused in the latest train round
        self.evaluated_nodes: set[int] = set()  # nodes whose evaluation was accepted

    @property
    def private(self) -> bool:
        return self.dp_epsilon is not None

    def epsilon_per_step(self) -> float:
        """What one SVT upload costs (published split: 10/9 of dp_epsilon); 0 without DP."""
        if self.dp_epsilon is None or self.gamma is None:
            return 0.0
        return svt_scales(
            self.dp_epsilon, self.max_upload, self.gamma, self.svt_split
        ).epsilon_spent

    def summary(self) -> None:
        privacy = (
            f"SVT, epsilon={self.dp_epsilon:g} per participant per epoch "
            f"(eps/c={self.dp_epsilon / self.max_upload:g}, split {self.svt_split})"
            if self.private
            else "none"
        )
        log(INFO, "\t├── DSSGD schedule: %s", self.schedule_name)
        log(
            INFO,
            "\t├── theta_u=%g (%d of %d parameters up, mode %s), theta_d=%g",
            self.theta_u,
            self.max_upload,
            self.server.num_params,
            self.upload_mode,
            self.theta_d,
        )
        log(
            INFO,
            "\t├── gamma=%s, tau=%g",
            "none" if self.gamma is None else f"{self.gamma:g}",
            self.tau,
        )
        log(INFO, "\t└── Privacy: %s", privacy)

    def num_rounds(self, epochs: int, num_nodes: int) -> int:
        """Server rounds for `epochs` local epochs per participant: one participant per round
        (round-robin, random) takes epochs * num_nodes rounds; parallel takes epochs."""
        if epochs < 1 or num_nodes < 1:
            raise ValueError(f"need epochs >= 1 and nodes >= 1, got {epochs} and {num_nodes}")
        return epochs if self.schedule_name == "parallel" else epochs * num_nodes

    def scheduled_nodes(self, server_round: int, node_ids: Iterable[int]) -> list[int]:
        """The node(s) that take a step in `server_round` (rounds count from 1)."""
        nodes = sorted(node_ids)
        if not nodes:
            return []
        if self.schedule_name == "parallel":
            return nodes
        position = (server_round - 1) % len(nodes)
        if self.schedule_name == "round-robin":
            return [nodes[position]]
        # random: a fresh permutation of all nodes per pass, fixed by (seed, pass).
        rng = np.random.default_rng([self.seed, (server_round - 1) // len(nodes)])
        return [nodes[int(rng.permutation(len(nodes))[position])]]

    # ------------------------------------------------------------------ train round
    def task_record(self, epoch: int) -> ConfigRecord:
        """The DSSGD settings a participant needs for one step."""
        task: dict[str, int | float | str] = {
            "theta-u": self.theta_u,
            "theta-d": self.theta_d,
            "upload-mode": self.upload_mode,
            "tau": self.tau,
            "svt-split": self.svt_split,
            "num-params": self.server.num_params,
            "num-classes": self.num_classes,
            "epoch": int(epoch),
        }
        if self.gamma is not None:
            task["gamma"] = float(self.gamma)
        if self.dp_epsilon is not None:
            task["dp-epsilon"] = float(self.dp_epsilon)
        return ConfigRecord(task)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One `train.dssgd` message per scheduled node: the theta_d download from the
        ParameterServer (the `arrays` argument is not used: DSSGD never sends the dense model to
        train), the task settings and the client config."""
        download = self.server.download(self.theta_d)
        if len(download.indices) == self.server.num_params:
            # theta_d = 1: every parameter, so send the values alone in index order (the indices
            # would be two thirds of the bytes and say nothing).
            dense = np.empty(self.server.num_params, dtype=np.float32)
            dense[download.indices] = download.values
            record = ArrayRecord({"values": Array(dense)})
        else:
            record = ArrayRecord(
                {
                    "indices": Array(np.ascontiguousarray(download.indices, dtype=np.int64)),
                    "values": Array(np.ascontiguousarray(download.values, dtype=np.float32)),
                }
            )
        messages = []
        self._scheduled = set()
        for node in self.scheduled_nodes(server_round, grid.get_node_ids()):
            epoch = self.steps_sent.get(node, 0)
            self.steps_sent[node] = epoch + 1
            self._scheduled.add(node)
            content = RecordDict(
                {"download": record, "dssgd": self.task_record(epoch), "config": config}
            )
            messages.append(Message(content, node, "train.dssgd", group_id=str(server_round)))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each upload and apply the good ones in arrival order; returns the global
        parameters (dense, flat) and this round's counts."""
        kept, duplicates = first_reply_per_node(replies)
        self._reject_all(duplicates)
        accepted = 0
        self.answered_nodes = set()
        for reply in kept:
            node = reply.metadata.src_node_id
            if node not in self._scheduled:
                self._reject_all(
                    [InvalidReplyError(node, f"not scheduled in round {server_round}")]
                )
                continue
            self._scheduled.discard(node)  # one upload per node and round
            reason = refusal(reply)
            if reason is not None:
                self.refused[node] = reason
                self.answered_nodes.add(node)
                log(WARNING, "node %s refused the DSSGD step: %s", node, reason)
                continue
            try:
                update, client, values = self._check_upload(reply)
            except InvalidReplyError as exc:
                self._reject_all([exc])
                continue
            self.server.apply(update)
            self.answered_nodes.add(node)
            accepted += 1
            self.accepted += 1
            self.node_to_client[node] = client
            self.accepted_per_client[client] = self.accepted_per_client.get(client, 0) + 1
            if self.private:
                self.epsilon_spent[client] = values["epsilon-spent"]
                self.ledger_delta[client] = values["delta"]
                self.epsilon_run[client] = (
                    self.epsilon_run.get(client, 0.0) + values["epsilon-epoch"]
                )
        arrays = ArrayRecord({"params": Array(self.server.params.copy())})
        summary = {"accepted": accepted, "rejected-total": len(self.rejected)}
        return arrays, MetricRecord(summary)

    def _check_upload(self, reply: Message) -> tuple[SparseUpdate, int, dict[str, float]]:
        """The reply's sparse upload, partition id and metrics, or InvalidReplyError."""
        node = reply.metadata.src_node_id
        record = reply_record(reply, "upload", ArrayRecord)
        if sorted(record.keys()) != ["indices", "values"]:
            raise InvalidReplyError(
                node, f"upload holds {sorted(record.keys())}, expected indices and values"
            )
        try:  # headers checked first: a tiny payload cannot make the server allocate much
            indices = checked_numpy(record["indices"], self.max_upload, "upload indices")
            values = checked_numpy(record["values"], self.max_upload, "upload values")
        except ValueError as exc:
            raise InvalidReplyError(node, f"bad upload: {exc}") from exc
        try:
            update = validate_sparse_update(
                indices, values, self.server.num_params, max_count=self.max_upload
            )
        except InvalidUpdateError as exc:
            raise InvalidReplyError(node, f"bad upload: {exc}") from exc
        if self.gamma is not None and update.values.size:
            largest = float(np.max(np.abs(update.values)))
            if largest > self.gamma * (1 + _GAMMA_SLACK):
                raise InvalidReplyError(
                    node, f"bad upload: value {largest:g} outside the clip bound {self.gamma:g}"
                )
        client = self._client_of(reply)
        found = {
            "epsilon-epoch": metric(reply, "epsilon-epoch", low=0.0),
        }
        if self.private:  # the node's ledger total; a non-DP upload carries no budget
            found["epsilon-spent"] = metric(reply, "epsilon-spent", low=0.0)
            found["delta"] = metric(reply, "delta", low=0.0, high=1.0)
        if self.private and found["epsilon-epoch"] <= 0:
            raise InvalidReplyError(
                node, "reply claims no privacy cost (epsilon-epoch=0) in a DP run"
            )
        return update, client, found

    def _client_of(self, reply: Message) -> int:
        """The reply's partition id, consistent with what this node and the others said before."""
        node = reply.metadata.src_node_id
        value = metric(reply, "partition-id", low=0)
        if not value.is_integer():
            raise InvalidReplyError(node, f"partition-id {value:g} is not an integer")
        client = int(value)
        known = self.node_to_client.get(node)
        if known is not None and known != client:
            raise InvalidReplyError(node, f"partition-id changed from {known} to {client}")
        for other, other_client in self.node_to_client.items():
            if other != node and other_client == client:
                raise InvalidReplyError(node, f"partition-id {client} belongs to node {other}")
        return client

    def _reject_all(self, errors: Iterable[InvalidReplyError]) -> None:
        for error in errors:
            self.rejected.append(error)
            log(WARNING, "rejected reply: %s", error)

    def global_arrays(self) -> ArrayRecord:
        """The server's current global parameters, dense and flat."""
        return ArrayRecord({"params": Array(self.server.params.copy())})

    # ------------------------------------------------------------- evaluate round
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Every node scores its own local model and the server's global model (`arrays`: one
        flat array "params"; empty: the ParameterServer's current parameters)."""
        if len(arrays) == 0:
            arrays = self.global_arrays()
        task = ConfigRecord({"num-params": self.server.num_params, "num-classes": self.num_classes})
        content = RecordDict({"global": arrays, "dssgd": task, "config": config})
        return [
            Message(content, node, "evaluate.dssgd", group_id=str(server_round))
            for node in sorted(grid.get_node_ids())
        ]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Record each node's local and server-model accuracy (validated: numbers in [0, 1]);
        return their means."""
        for reply in answers(replies, self._reject_all, self.refused, "to evaluate"):
            node = reply.metadata.src_node_id
            try:
                accuracy = metric(reply, "accuracy", low=0.0, high=1.0)
                server_accuracy = metric(reply, "server-accuracy", low=0.0, high=1.0)
                client = self._client_of(reply)
                steps = None
                if "local-steps" in reply.content["metrics"]:
                    steps = int(metric(reply, "local-steps", low=0))
            except InvalidReplyError as exc:
                self._reject_all([exc])
                continue
            if steps is not None:
                self.local_steps[client] = steps
            self.accuracy[client] = accuracy
            self.server_accuracy[client] = server_accuracy
            self.node_to_client[node] = client
            self.evaluated_nodes.add(node)
        if not self.accuracy:
            return None
        return MetricRecord(
            {
                "accuracy": float(np.mean(list(self.accuracy.values()))),
                "server-accuracy": float(np.mean(list(self.server_accuracy.values()))),
            }
        )
