"""The evaluate round every method ends with: each node scores the model it is sent on its own
test split (with a `finetune` record, it first refits the classifier head with DP:
`evaluate.finetune`). Replies are validated; a bad one is rejected naming the node.

Used by `Ecos`, `run_centralized` and `dp-linear-probe`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from ecos_flower.flower.validation import (
    InvalidReplyError,
    ReplyTally,
    claimed_client,
    drop_events,
    first_reply_per_node,
    metric,
    refusal,
)


def evaluate_messages(
    arrays: ArrayRecord,
    config: ConfigRecord,
    node_ids: Iterable[int],
    *,
    server_round: int = 1,
    finetune: ConfigRecord | None = None,
) -> list[Message]:
    """One `evaluate` message per node (`evaluate.finetune`, carrying `finetune`, if given)."""
    content = RecordDict({"arrays": arrays, "config": config})
    kind = "evaluate"
    if finetune is not None:
        content = RecordDict({"arrays": arrays, "config": config, "finetune": finetune})
        kind = "evaluate.finetune"
    return [Message(content, node, kind, group_id=str(server_round)) for node in node_ids]


class EvaluationTally(ReplyTally):
    """The validated replies of one evaluate round.

    Everything is kept per node; a node's partition id is checked against what it (and every
    other node) claimed before (`known_clients`, e.g. the query round's node -> client map) and in
    this round, so no node can overwrite another client's figures. Read-only views: `accuracy`
    (client -> test accuracy in [0, 1]), `evaluated_nodes`, `node_to_client`, `rejected`, and
    after fine-tuning `epsilon_spent` (client -> ledger total the client reported after its DP
    refit) and `finetune_summary()`."""

    def __init__(
        self,
        *,
        finetune: bool = False,
        sent_to: Iterable[int] = (),
        known_clients: Mapping[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.finetune = bool(finetune)
        self.sent_to = list(sent_to)
        self._known: dict[int, int] = dict(known_clients or {})
        self._accuracy: dict[int, float] = {}  # node -> accuracy
        self._received: dict[int, float] = {}  # node -> accuracy before the refit
        self._opacus: dict[int, float] = {}  # node -> Opacus' epsilon
        self._finetune_refused: dict[int, str] = {}  # node -> reason

    def add(self, replies: Iterable[Message]) -> MetricRecord | None:
        """Validate the replies (first per node; accuracy a number in [0, 1]; partition id
        consistent and unique); returns the mean accuracy over every client accepted so far, or
        None if none was."""
        replies = list(replies)
        kept, duplicates = first_reply_per_node(replies)
        self._reject(duplicates)
        accepted = []
        for reply in kept:
            node = reply.metadata.src_node_id
            try:
                if node in self._accuracy:
                    raise InvalidReplyError(node, "already evaluated in this round")
                reason = refusal(reply)
                if reason is not None:  # e.g. a private node that reports no exact metrics
                    raise InvalidReplyError(node, f"refused to evaluate: {reason}")
                accuracy = metric(reply, "accuracy", low=0.0, high=1.0)
                client = claimed_client(reply, self._known)
            except InvalidReplyError as exc:
                self._reject([exc])
                continue
            self._accuracy[node] = accuracy
            self._known[node] = client
            self._clients[node] = client
            accepted.append(reply)
        if self.finetune:
            self._add_finetune(accepted)
        if not self._accuracy:
            return None
        return MetricRecord({"accuracy": float(np.mean(list(self._accuracy.values())))})

    def _add_finetune(self, accepted: list[Message]) -> None:
        """Each fine-tuned node's ledger total, its accuracy before the refit, Opacus' epsilon
        or its refusal; only for replies whose evaluation was accepted."""
        for reply in accepted:
            node = reply.metadata.src_node_id
            try:
                self._received[node] = metric(reply, "accuracy-received", low=0.0, high=1.0)
                if metric(reply, "finetuned", low=0, high=1) == 1:
                    self._spent[node] = metric(reply, "epsilon-spent", low=0.0)
                    self._opacus[node] = metric(reply, "finetune-epsilon-opacus", low=0.0)
                else:
                    reason = reply.content.get("finetune-refusal")
                    self._finetune_refused[node] = (
                        str(reason["reason"]) if reason is not None else "refused"
                    )
            except InvalidReplyError as exc:
                self._reject([exc])

    def _by_client(self, values: Mapping[int, object]) -> dict[int, object]:
        return {self._clients[node]: value for node, value in values.items()}

    def finetune_summary(self) -> dict[str, object]:
        """Report extras of a fine-tuning round (empty without one): mean accuracy before the
        refit, the largest Opacus epsilon, and each refusing client's reason."""
        if not self.finetune:
            return {}
        received, opacus = self._received, self._opacus
        return {
            "accuracy-before-finetune": (
                float(np.mean(list(received.values()))) if received else None
            ),
            "finetune-epsilon-opacus": max(opacus.values()) if opacus else None,
            "finetune-refused": {
                str(c): r for c, r in self._by_client(self._finetune_refused).items()
            },
        }

    def dropped(self, server_round: int = 1) -> list[dict[str, object]]:
        """Who dropped out of this round, and why (see `validation.drop_events`)."""
        return drop_events(
            "evaluate",
            server_round,
            self.sent_to,
            set(self._accuracy),
            self._rejected,
            {**self._known, **self._clients},
        )

    @property
    def accuracy(self) -> Mapping[int, float]:
        """Client (partition id) -> accuracy; one node per client (claims are unique)."""
        return self._by_client(self._accuracy)  # type: ignore[return-value]

    @property
    def epsilon_spent(self) -> Mapping[int, float]:
        return self._by_client(self._spent)  # type: ignore[return-value]

    @property
    def evaluated_nodes(self) -> frozenset[int]:
        return frozenset(self._accuracy)


def evaluate_round(
    grid: Grid,
    arrays: ArrayRecord,
    config: ConfigRecord,
    *,
    timeout: float,
    node_ids: Iterable[int] | None = None,
    server_round: int = 1,
    finetune: ConfigRecord | None = None,
) -> EvaluationTally:
    """Send the model to `node_ids` (default: every node of `grid`), wait up to `timeout` s and
    return the validated tally of the replies."""
    nodes = list(grid.get_node_ids() if node_ids is None else node_ids)
    messages = evaluate_messages(
        arrays, config, nodes, server_round=server_round, finetune=finetune
    )
    tally = EvaluationTally(
        finetune=finetune is not None, sent_to=[m.metadata.dst_node_id for m in messages]
    )
    tally.add(grid.send_and_receive(messages, timeout=timeout))
    return tally
