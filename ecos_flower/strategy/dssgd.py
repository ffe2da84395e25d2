"""DSSGD (Shokri & Shmatikov 2015) as a Flower strategy whose run is Flower's own
`Strategy.start()` loop.

Each server round `configure_train` schedules participants (round-robin, random or parallel) and
sends each one the theta_d fraction of most-updated global parameters in a `train.dssgd`
message; `aggregate_train` validates the sparse uploads, adds the good ones to the global
parameters and applies the drop / min-clients rules; every `evaluate_every` rounds and at the last
round `configure_evaluate` / `aggregate_evaluate` have every node score its local model and the
server's model (`evaluate.dssgd`). Per-client figures are returned in the evaluate MetricRecords
of Flower's `Result`, keyed "<figure>/client-<partition id>".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log

from ecos_flower.dssgd import (
    InvalidUpdateError,
    ParameterServer,
    SparseUpdate,
    svt_scales,
    upload_count,
    validate_sparse_update,
)
from ecos_flower.flower.report import no_results_message
from ecos_flower.flower.validation import (
    InvalidReplyError,
    answers,
    checked_numpy,
    claimed_client,
    drop_events,
    first_reply_per_node,
    metric,
    refusal,
    reply_record,
    too_few_message,
)

SCHEDULES = ("round-robin", "random", "parallel")
UPLOAD_MODES = ("largest", "threshold")
SVT_SPLITS = ("published", "corrected")
# Uploaded values may exceed gamma by float32 rounding of the clip bound, not more.
_GAMMA_SLACK = 1e-6
# The per-client figures of an evaluate MetricRecord: "<figure>/client-<partition id>".
CLIENT_FIGURES = (
    "accuracy",
    "server-accuracy",
    "local-steps",
    "uploads-accepted",
    "epsilon-spent",
    "epsilon-run",
    "delta",
)


def client_key(figure: str, client: int) -> str:
    """The MetricRecord key of one client's figure, e.g. "accuracy/client-0"."""
    return f"{figure}/client-{client}"


def per_client(record: MetricRecord, figure: str) -> dict[int, float]:
    """One figure of every client in `record` (an evaluate MetricRecord of a `Dssgd` Result)."""
    prefix = f"{figure}/client-"
    return {
        int(key[len(prefix) :]): float(value)  # type: ignore[arg-type]
        for key, value in record.items()
        if key.startswith(prefix)
    }


def _flat(arrays: ArrayRecord) -> np.ndarray:
    """All arrays of `arrays`, flattened and concatenated in record order, as float32."""
    if len(arrays) == 0:
        raise ValueError("Dssgd needs the initial model in `arrays` (got an empty ArrayRecord)")
    parts = [np.asarray(array.numpy(), dtype=np.float32).ravel() for array in arrays.values()]
    return parts[0].copy() if len(parts) == 1 else np.concatenate(parts)


class Dssgd(Strategy):
    """Distributed selective SGD: a parameter server that participants download from and upload
    sparse updates to.

    Implementation based on Shokri & Shmatikov, "Privacy-Preserving Deep Learning", CCS 2015.
    The initial global parameters are the `initial_arrays` given to `start()` (all arrays,
    flattened and concatenated in record order); the global parameters and their update counters
    then live in the strategy's parameter server.

    Parameters
    ----------
    theta_u : float (default: 0.1)
        Fraction of the parameters a participant uploads per step, in (0, 1].
    theta_d : float (default: 1.0)
        Fraction of the most-updated global parameters a participant downloads, in (0, 1].
    schedule : str (default: "round-robin")
        "round-robin": one participant per round, cycling over the node ids in sorted order;
        "random": one participant per round, a fresh random order of all nodes every pass;
        "parallel": every node each round, uploads applied in arrival order.
    upload_mode : str (default: "largest")
        How a participant picks its upload: "largest" (the theta_u largest gradients) or
        "threshold" (random ones above `tau`).
    gamma : float, optional (default: None)
        Clip bound of uploaded values; None uploads unclipped values. Required with DP. The
        server rejects an upload holding a value beyond it.
    max_update : float (default: 1.0)
        Without `gamma`: the largest |value| the server accepts in an upload (an upload with a
        value beyond it is rejected, naming the node). An honest value is one weight's change
        over one local epoch (learning rate times summed gradients): at most 0.35 measured on
        the tiny test scenario (paper-mlp, 5 epochs); a value of 1e30 would overflow the
        global model. Finite and > 0.
    tau : float (default: 0.0)
        Selection threshold of the "threshold" mode and of the SVT; finite and >= 0.
    dp_epsilon : float, optional (default: None)
        Epsilon per participant per step of the sparse vector technique; None: no DP.
    svt_split : str (default: "published")
        How the SVT splits `dp_epsilon`: "published" (as in the paper) or "corrected".
    beta : float, optional (default: None)
        Decay factor of the parameters' update counters, in [0, 1]; None: no decay.
    decay_every : int (default: 0)
        Decay the update counters every `decay_every` applied uploads; 0: never.
    min_clients : int (default: 1)
        Fewest participants that must remain: a round after which fewer nodes remain (a node
        drops when its latest scheduled step crashed, timed out or was invalid; a refusal is an
        answer), or an evaluation with fewer valid answers, raises a RuntimeError naming the
        dropped nodes and why.
    evaluate_every : int (default: 0)
        Evaluate every `evaluate_every` rounds; the last round is always evaluated; 0: only the
        last round.
    num_classes : int or None (default: None)
        Number of classes of the task, sent to participants; None: the `num-classes` of the
        train config (the run's label space). One of the two must name it: no default is
        assumed.
    seed : int (default: 0)
        Seed of the "random" schedule.
    """

    # pylint: disable=too-many-arguments, too-many-instance-attributes
    def __init__(
        self,
        *,
        theta_u: float = 0.1,
        theta_d: float = 1.0,
        schedule: str = "round-robin",
        upload_mode: str = "largest",
        gamma: float | None = None,
        max_update: float = 1.0,
        tau: float = 0.0,
        dp_epsilon: float | None = None,
        svt_split: str = "published",
        beta: float | None = None,
        decay_every: int = 0,
        min_clients: int = 1,
        evaluate_every: int = 0,
        num_classes: int | None = None,
        seed: int = 0,
    ) -> None:
        for name, theta in (("theta_u", theta_u), ("theta_d", theta_d)):
            if not 0.0 < theta <= 1.0:
                raise ValueError(f"{name} must lie in (0, 1], got {theta}")
        for name, value, choices in (
            ("schedule", schedule, SCHEDULES),
            ("upload_mode", upload_mode, UPLOAD_MODES),
            ("svt_split", svt_split, SVT_SPLITS),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        if gamma is not None and not (math.isfinite(gamma) and gamma > 0):
            raise ValueError(f"gamma must be positive and finite (None: no clipping), got {gamma}")
        if not (math.isfinite(max_update) and max_update > 0):
            raise ValueError(f"max_update must be positive and finite, got {max_update}")
        if not (math.isfinite(tau) and tau >= 0):
            raise ValueError(f"tau must be finite and >= 0, got {tau}")
        if dp_epsilon is not None:
            if not (math.isfinite(dp_epsilon) and dp_epsilon > 0):
                raise ValueError(f"dp_epsilon must be positive and finite, got {dp_epsilon}")
            if gamma is None:
                raise ValueError("dp_epsilon (the SVT upload) needs a clip bound gamma")
        if beta is not None and not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must lie in [0, 1] (None: no decay), got {beta}")
        for name, value, low in (
            ("decay_every", decay_every, 0),
            ("min_clients", min_clients, 1),
            ("evaluate_every", evaluate_every, 0),
            ("num_classes", 2 if num_classes is None else num_classes, 2),
        ):
            if isinstance(value, bool) or int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.theta_u, self.theta_d = float(theta_u), float(theta_d)
        self.schedule, self.upload_mode = schedule, upload_mode
        self.gamma, self.tau = gamma, float(tau)
        self.max_update = float(max_update)
        self.dp_epsilon, self.svt_split = dp_epsilon, svt_split
        self.beta, self.decay_every = beta, int(decay_every)
        self.min_clients, self.evaluate_every = int(min_clients), int(evaluate_every)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.seed = int(seed)
        self._num_rounds: int | None = None
        self._reset()

    def _reset(self) -> None:
        """Forget everything of a previous run (the server is built from the next round 1)."""
        self._server: ParameterServer | None = None
        self._num_nodes = 0
        self._scheduled: set[int] = set()  # nodes sent this round's train message
        self._evaluating: set[int] = set()  # nodes sent this round's evaluate message
        self._steps_sent: dict[int, int] = {}  # node -> train messages sent
        self._latest_drop: dict[int, dict[str, Any]] = {}  # node -> its latest train drop
        self._dropped: list[dict[str, Any]] = []
        self._rejected: list[InvalidReplyError] = []
        self._refused: dict[int, str] = {}
        self._node_to_client: dict[int, int] = {}
        self._accepted = 0
        self._accepted_per_client: dict[int, int] = {}
        self._epsilon_spent: dict[int, float] = {}  # ledger totals as last reported
        self._ledger_delta: dict[int, float] = {}  # the delta each ledger states them at
        self._epsilon_run: dict[int, float] = {}  # epsilon of this run's accepted uploads
        self._accuracy: dict[int, float] = {}
        self._server_accuracy: dict[int, float] = {}
        self._local_steps: dict[int, int] = {}

    # ------------------------------------------------------------------ read-only views
    @property
    def private(self) -> bool:
        """Whether uploads use the sparse vector technique (DP)."""
        return self.dp_epsilon is not None

    @property
    def rejected(self) -> tuple[InvalidReplyError, ...]:
        """Every rejected reply of the current run (node and problem), in order."""
        return tuple(self._rejected)

    @property
    def refused(self) -> dict[int, str]:
        """Each node's latest stated refusal (a copy)."""
        return dict(self._refused)

    @property
    def dropped(self) -> list[dict[str, Any]]:
        """Who dropped out of which round and why (train and evaluate), JSON-ready (a copy)."""
        return [dict(event) for event in self._dropped]

    @property
    def node_clients(self) -> dict[int, int]:
        """Node id -> partition id, as the nodes' accepted replies stated (a copy)."""
        return dict(self._node_to_client)

    @property
    def accepted(self) -> int:
        """Uploads applied to the global parameters in the current run."""
        return self._accepted

    @property
    def num_params(self) -> int:
        """Size of the global parameter vector (0 before the first round)."""
        return 0 if self._server is None else self._server.num_params

    @property
    def max_upload(self) -> int:
        """Most entries one upload may hold (theta_u of the parameters; 0 before round 1)."""
        return upload_count(self.theta_u, self.num_params) if self._server is not None else 0

    def epsilon_per_step(self, num_params: int | None = None) -> float:
        """What one SVT upload really costs (eps1/2 + eps2/2: 5/9 of dp_epsilon with the published
        split, 1/2 with the corrected one; see `ecos_flower.dssgd.svt`); 0 without DP."""
        if self.dp_epsilon is None or self.gamma is None:
            return 0.0
        count = upload_count(self.theta_u, num_params or self.num_params)
        return svt_scales(self.dp_epsilon, count, self.gamma, self.svt_split).epsilon_spent

    def num_rounds(self, epochs: int, num_nodes: int) -> int:
        """Server rounds for `epochs` local epochs per participant: one participant per round
        (round-robin, random) takes epochs * num_nodes rounds; parallel takes epochs."""
        if epochs < 1 or num_nodes < 1:
            raise ValueError(f"need epochs >= 1 and nodes >= 1, got {epochs} and {num_nodes}")
        return epochs if self.schedule == "parallel" else epochs * num_nodes

    def scheduled_nodes(self, server_round: int, node_ids: Iterable[int]) -> list[int]:
        """The node(s) that take a step in `server_round` (rounds count from 1)."""
        nodes = sorted(node_ids)
        if not nodes:
            return []
        if self.schedule == "parallel":
            return nodes
        position = (server_round - 1) % len(nodes)
        if self.schedule == "round-robin":
            return [nodes[position]]
        # random: a fresh permutation of all nodes per pass, fixed by (seed, pass).
        rng = np.random.default_rng([self.seed, (server_round - 1) // len(nodes)])
        return [nodes[int(rng.permutation(len(nodes))[position])]]

    # ------------------------------------------------------------------------- the run
    def summary(self) -> None:
        """Log the DSSGD settings."""
        privacy = (
            f"SVT, epsilon={self.dp_epsilon:g} per participant per step (split {self.svt_split})"
            if self.private
            else "none"
        )
        gamma = (
            f"none (max update {self.max_update:g})" if self.gamma is None else f"{self.gamma:g}"
        )
        log(INFO, "\t├── DSSGD schedule: %s", self.schedule)
        log(
            INFO,
            "\t├── theta_u=%g (mode %s), theta_d=%g",
            self.theta_u,
            self.upload_mode,
            self.theta_d,
        )
        log(INFO, "\t├── gamma=%s, tau=%g", gamma, self.tau)
        log(INFO, "\t├── min_clients=%d, evaluate_every=%d", self.min_clients, self.evaluate_every)
        log(INFO, "\t└── Privacy: %s", privacy)

    def start(  # pylint: disable=too-many-arguments, too-many-positional-arguments
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Flower's `Strategy.start()` (the round loop is Flower's); this only records
        `num_rounds`, so that the last round is evaluated, and forgets any previous run.

        The returned Result holds the final global parameters (`arrays`: one flat float32
        "params"), per train round the counts of accepted / rejected / refused uploads, and per
        evaluated round the mean local and server-model accuracy plus every client's figures
        keyed "<figure>/client-<partition id>" (see `CLIENT_FIGURES`, `per_client`). Raises
        RuntimeError naming every node's refusal or rejection if no upload was accepted.
        """
        if isinstance(num_rounds, bool) or int(num_rounds) != num_rounds or num_rounds < 1:
            raise ValueError(f"num_rounds must be an integer >= 1, got {num_rounds!r}")
        self._num_rounds = int(num_rounds)
        self._reset()
        result = super().start(
            grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, evaluate_fn
        )
        if self.accepted == 0:  # every step refused or rejected: the result is no trained model
            reasons = {n: f"refused: {r}" for n, r in self.refused.items()}
            reasons.update((e.node_id, f"rejected: {e.problem}") for e in self.rejected)
            listed = "; ".join(f"node {n}: {r}" for n, r in sorted(reasons.items()))
            raise RuntimeError(f"DSSGD accepted no upload in {num_rounds} round(s): {listed}")
        return result

    # ------------------------------------------------------------------ train round
    def _task_record(self, epoch: int) -> ConfigRecord:
        """The DSSGD settings a participant needs for one step."""
        assert self._server is not None
        task: dict[str, int | float | str] = {
            "theta-u": self.theta_u,
            "theta-d": self.theta_d,
            "upload-mode": self.upload_mode,
            "tau": self.tau,
            "svt-split": self.svt_split,
            "num-params": self._server.num_params,
            "num-classes": self.num_classes,
            "epoch": int(epoch),
        }
        if self.gamma is not None:
            task["gamma"] = float(self.gamma)
        if self.dp_epsilon is not None:
            task["dp-epsilon"] = float(self.dp_epsilon)
        return ConfigRecord(task)

    def _download_record(self) -> ArrayRecord:
        """The theta_d most-updated global parameters: indices and values, or (theta_d = 1)
        the values alone in index order (the indices would be two thirds of the bytes)."""
        assert self._server is not None
        download = self._server.download(self.theta_d)
        if len(download.indices) == self._server.num_params:
            dense = np.empty(self._server.num_params, dtype=np.float32)
            dense[download.indices] = download.values
            return ArrayRecord({"values": Array(dense)})
        return ArrayRecord(
            {
                "indices": Array(np.ascontiguousarray(download.indices, dtype=np.int64)),
                "values": Array(np.ascontiguousarray(download.values, dtype=np.float32)),
            }
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One `train.dssgd` message per scheduled node: the theta_d download (ArrayRecord
        "download"), the task settings ("dssgd") and the client config ("config").

        In round 1 (or before any round) the parameter server is built from `arrays`, the
        initial model; later rounds continue from the parameter server, which also holds the
        update counters the download is chosen by (`arrays` is then what `aggregate_train`
        returned: the same global parameters).
        """
        if server_round == 1 or self._server is None:
            self._reset()
            self._server = ParameterServer(_flat(arrays), self.beta, self.decay_every)
            if self.num_classes is None:
                classes = config.get("num-classes")
                if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
                    raise ValueError(
                        "Dssgd needs the number of classes: pass num_classes or put an integer "
                        f"num-classes >= 2 in the train config (got {classes!r})"
                    )
                self.num_classes = classes
            log(
                INFO,
                "DSSGD: %d parameters, %d per upload",
                self._server.num_params,
                self.max_upload,
            )
        node_ids = sorted(grid.get_node_ids())
        self._num_nodes = len(node_ids)
        if self.min_clients > len(node_ids):
            raise RuntimeError(
                f"min-clients={self.min_clients} but only {len(node_ids)} node(s) connected"
            )
        record = self._download_record()
        messages = []
        self._scheduled = set()
        for node in self.scheduled_nodes(server_round, node_ids):
            epoch = self._steps_sent.get(node, 0)
            self._steps_sent[node] = epoch + 1
            self._scheduled.add(node)
            content = RecordDict(
                {"download": record, "dssgd": self._task_record(epoch), "config": config}
            )
            messages.append(Message(content, node, "train.dssgd", group_id=str(server_round)))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each upload and apply the good ones in arrival order; returns the global
        parameters (ArrayRecord "params": dense, flat) and this round's counts.

        Raises RuntimeError when fewer than `min_clients` participants remain after this round,
        naming the dropped nodes and their reasons."""
        if self._server is None:
            raise RuntimeError("aggregate_train before configure_train: no parameter server")
        sent_to = sorted(self._scheduled)
        rejected_before = len(self._rejected)
        kept, duplicates = first_reply_per_node(replies)
        self._reject_all(duplicates)
        answered: set[int] = set()
        accepted = refused = 0
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
                self._refused[node] = reason
                answered.add(node)
                refused += 1
                log(WARNING, "node %s refused the DSSGD step: %s", node, reason)
                continue
            try:
                update, client, values = self._check_upload(reply)
            except InvalidReplyError as exc:
                self._reject_all([exc])
                continue
            self._server.apply(update)
            answered.add(node)
            accepted += 1
            self._accepted += 1
            self._node_to_client[node] = client
            self._accepted_per_client[client] = self._accepted_per_client.get(client, 0) + 1
            if self.private:
                self._epsilon_spent[client] = values["epsilon-spent"]
                self._ledger_delta[client] = values["delta"]
                self._epsilon_run[client] = (
                    self._epsilon_run.get(client, 0.0) + values["epsilon-epoch"]
                )
        self._scheduled = set()
        events = drop_events(
            "train",
            server_round,
            sent_to,
            answered,
            self._rejected[rejected_before:],
            self._node_to_client,
        )
        self._dropped += events
        for node in sent_to:
            self._latest_drop.pop(node, None)
        self._latest_drop.update((event["node"], event) for event in events)
        remaining = self._num_nodes - len(self._latest_drop)
        if sent_to and remaining < self.min_clients:
            raise RuntimeError(
                too_few_message(
                    f"DSSGD round {server_round}",
                    remaining,
                    self.min_clients,
                    self._latest_drop.values(),
                )
            )
        counts = {
            "accepted": accepted,
            "rejected": len(self._rejected) - rejected_before,
            "refused": refused,
            "rejected-total": len(self._rejected),
        }
        return self._global_arrays(), MetricRecord(counts)

    def _check_upload(self, reply: Message) -> tuple[SparseUpdate, int, dict[str, float]]:
        """The reply's sparse upload, partition id and metrics, or InvalidReplyError."""
        assert self._server is not None
        node = reply.metadata.src_node_id
        record = reply_record(reply, "upload", ArrayRecord)
        if sorted(record.keys()) != ["indices", "values"]:
            raise InvalidReplyError(
                node, f"upload holds {sorted(record.keys())}, expected indices and values"
            )
        limit = self.max_upload
        try:  # headers checked first: a tiny payload cannot make the server allocate much
            indices = checked_numpy(record["indices"], limit, "upload indices")
            values = checked_numpy(record["values"], limit, "upload values")
        except ValueError as exc:
            raise InvalidReplyError(node, f"bad upload: {exc}") from exc
        try:
            update = validate_sparse_update(
                indices, values, self._server.num_params, max_count=limit
            )
        except InvalidUpdateError as exc:
            raise InvalidReplyError(node, f"bad upload: {exc}") from exc
        if update.values.size:  # finite (validate_sparse_update) and within the bound
            largest = float(np.max(np.abs(update.values)))
            if self.gamma is not None and largest > self.gamma * (1 + _GAMMA_SLACK):
                raise InvalidReplyError(
                    node, f"bad upload: value {largest:g} outside the clip bound {self.gamma:g}"
                )
            if self.gamma is None and largest > self.max_update:
                raise InvalidReplyError(
                    node, f"bad upload: value {largest:g} beyond max_update {self.max_update:g}"
                )
        client = self._client_of(reply)
        found = {"epsilon-epoch": metric(reply, "epsilon-epoch", low=0.0)}
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
        return claimed_client(reply, self._node_to_client)

    def _reject_all(self, errors: Iterable[InvalidReplyError]) -> None:
        for error in errors:
            self._rejected.append(error)
            log(WARNING, "rejected reply: %s", error)

    def _global_arrays(self) -> ArrayRecord:
        assert self._server is not None
        return ArrayRecord({"params": Array(self._server.params.copy())})

    # ------------------------------------------------------------- evaluate round
    def _evaluates(self, server_round: int) -> bool:
        if self._num_rounds is None:  # hooks called outside start(): the caller asks
            return True
        every = self.evaluate_every > 0 and server_round % self.evaluate_every == 0
        return every or server_round == self._num_rounds

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """In an evaluated round, every node scores its own local model and the server's global
        model (`arrays`: one flat array "params"; empty: the parameter server's current
        parameters); no messages in other rounds."""
        if not self._evaluates(server_round):
            return []
        if len(arrays) == 0 and self._server is not None:
            arrays = self._global_arrays()
        task = ConfigRecord({"num-params": self.num_params, "num-classes": self.num_classes})
        content = RecordDict({"global": arrays, "dssgd": task, "config": config})
        self._evaluating = {int(node) for node in grid.get_node_ids()}
        return [
            Message(content, node, "evaluate.dssgd", group_id=str(server_round))
            for node in sorted(self._evaluating)
        ]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Record each node's local and server-model accuracy (validated: numbers in [0, 1]);
        return their means and every client's figures ("<figure>/client-<id>"). None in a round
        without evaluation or before any valid answer.

        Raises RuntimeError when fewer than `min_clients` nodes answered validly, or when the
        last round has no result at all."""
        replies = list(replies)
        if not replies and not self._evaluates(server_round):
            return None
        sent_to = sorted(self._evaluating)
        self._evaluating = set()
        rejected_before = len(self._rejected)
        evaluated: set[int] = set()
        stated: dict[int, str] = {}  # this round's refusals
        for reply in answers(replies, self._reject_all, stated, "to evaluate"):
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
                self._local_steps[client] = steps
            self._accuracy[client] = accuracy
            self._server_accuracy[client] = server_accuracy
            self._node_to_client[node] = client
            evaluated.add(node)
        self._refused.update(stated)
        events = drop_events(
            "evaluate",
            server_round,
            sent_to,
            evaluated | set(stated),
            self._rejected[rejected_before:],
            self._node_to_client,
        )
        self._dropped += events
        if not self._accuracy:
            if self._num_rounds is not None and server_round == self._num_rounds:
                errors = {e.node_id: e.problem for e in self._rejected}
                errors.update(self._refused)
                raise RuntimeError(no_results_message(errors))
            return None
        if len(evaluated) < self.min_clients:
            raise RuntimeError(
                too_few_message(
                    "DSSGD evaluation", len(evaluated), self.min_clients, events, stated
                )
            )
        record = self._figures()
        log(
            INFO,
            "round %d: local accuracy %.4f, server-model accuracy %.4f",
            server_round,
            record["accuracy"],
            record["server-accuracy"],
        )
        return record

    def _figures(self) -> MetricRecord:
        """Means, totals and every client's figures, as of now."""
        figures: dict[str, int | float] = {
            "accuracy": float(np.mean(list(self._accuracy.values()))),
            "server-accuracy": float(np.mean(list(self._server_accuracy.values()))),
            "uploads-accepted": self._accepted,
            "uploads-rejected": len(self._rejected),
        }
        columns: list[tuple[str, dict[int, Any]]] = [
            ("accuracy", self._accuracy),
            ("server-accuracy", self._server_accuracy),
            ("local-steps", self._local_steps),
            ("uploads-accepted", self._accepted_per_client),
        ]
        if self.private:
            columns += [
                ("epsilon-spent", self._epsilon_spent),
                ("epsilon-run", self._epsilon_run),
                ("delta", self._ledger_delta),
            ]
        for figure, values in columns:
            for client, value in sorted(values.items()):
                figures[client_key(figure, client)] = value
        return MetricRecord(figures)
