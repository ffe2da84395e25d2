"""The release boundary: every reply an ecos-flower node sends is made here.

One `ReleaseBoundary` per message. A handler (a) asks it to `admit` the mechanism it is about to
run, which checks the node's own policy (`ecos_flower.privacy.policy.NodePolicy`, from the node
config, never from the message); (b) `charge`s the node's single lifetime ledger *before it reads
its data*, receiving the noise source for the release; (c) builds its reply with `reply`, which
writes only the record and metric names the mechanism declares in
`ecos_flower.privacy.policy.MECHANISMS`. What any node can ever send is therefore listed in one
place, `MECHANISMS`.

Refusals depend on the message and the node's configuration only. Because the ledger is charged
before the data is read, anything that fails afterwards (on any data) has been paid for; such a
failure leaves as a refusal without the exception's text (`guarded`), which stays in the node's
log.

A handler written against the boundary, `handler(msg, context, boundary) -> Message`, becomes a
ClientApp function with `guarded(handler)`.
"""

from __future__ import annotations

import functools
import os
import tempfile
import traceback
from collections.abc import Callable, Mapping
from logging import WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore import log

from ecos_flower.privacy.ledger import (
    BudgetExceededError,
    LedgerCorruptError,
    NodeLedger,
    PrivacyEvent,
)
from ecos_flower.privacy.noise import NoiseSource
from ecos_flower.privacy.policy import MECHANISMS, NodePolicy, PolicyError

INTERNAL_FAILURE = "the node could not complete this request (details are in the node's log)"


class Refused(Exception):
    """Raised inside a handler to refuse the message with `reason` (message-derived text only)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def refusal(msg: Message, reason: str, node_id: int | None = None) -> Message:
    """A reply that refuses `msg` with `reason` (logged on the node as well)."""
    log(WARNING, "node %s refuses %s: %s", node_id, msg.metadata.message_type, reason)
    return Message(content=RecordDict({"refusal": ConfigRecord({"reason": reason})}), reply_to=msg)


def default_ledger_path(context: Context) -> Path:
    """A research node's per-run ledger when its node config names none."""
    base = Path(os.environ.get("FLWR_HOME", tempfile.gettempdir())) / "ecos-ledgers"
    return base / f"run-{context.run_id}-node-{context.node_id}.json"


class ReleaseBoundary:
    """Policy check, ledger charge, noise source and reply building for one message.

    Parameters
    ----------
    msg : Message
        The message being answered.
    context : Context
        The node's context: its node config is the only source of its policy.
    """

    def __init__(self, msg: Message, context: Context) -> None:
        self.msg = msg
        self.context = context
        try:
            self.policy = NodePolicy.from_node_config(context.node_config)
        except PolicyError as exc:
            raise Refused(f"this node's privacy configuration is invalid: {exc}") from exc
        self._ledger: NodeLedger | None = None

    # --------------------------------------------------------------- policy and budget
    def admit(self, *mechanisms: str) -> None:
        """Refuse (raise `Refused`) unless the node's policy answers every one of `mechanisms`."""
        for mechanism in mechanisms:
            reason = self.policy.refusal(mechanism)
            if reason is not None:
                raise Refused(reason)

    @property
    def ledger(self) -> NodeLedger:
        """The node's one lifetime ledger (opened on first use)."""
        if self._ledger is None:
            path = self.policy.ledger_path or default_ledger_path(self.context)
            try:
                self._ledger = NodeLedger.open(path, self.policy.epsilon_limit, self.policy.delta)
            except (LedgerCorruptError, OSError) as exc:
                raise Refused(f"privacy ledger unusable, refusing to release: {exc}") from exc
        return self._ledger

    def charge(self, event: PrivacyEvent) -> tuple[float, NoiseSource]:
        """Charge `event` to the ledger (refusing past the limit); returns the epsilon spent
        after it and the noise source of this release."""
        try:
            spent = self.ledger.charge(event)
        except BudgetExceededError as exc:
            raise Refused(str(exc)) from exc
        except (LedgerCorruptError, OSError) as exc:
            raise Refused(f"privacy ledger unusable, refusing to release: {exc}") from exc
        except (ValueError, OverflowError, MemoryError) as exc:  # parameters from the message
            raise Refused(f"the privacy cost of this request cannot be accounted: {event}") from exc
        if self.policy.noise_seed is not None:  # research runs that must repeat
            stream = len(self.ledger.events)
            return spent, NoiseSource.replayable(self.policy.noise_seed, stream)
        return spent, NoiseSource.fresh()

    def budget_metrics(self, spent: float) -> dict[str, float]:
        """The budget state every private reply states (the node's own numbers, not its data)."""
        return {
            "epsilon-spent": float(spent),
            "epsilon-limit": float(self.policy.epsilon_limit),
            "delta": float(self.policy.delta),
        }

    def node_label(self) -> dict[str, int]:
        """The node's simulation label (`partition-id`, from its node config) if it has one."""
        node_config = self.context.node_config
        if "partition-id" in node_config:
            return {"partition-id": int(node_config["partition-id"])}
        return {}

    # ---------------------------------------------------------------------- replies
    def reply(
        self,
        mechanism: str,
        records: Mapping[str, ArrayRecord | ConfigRecord] | None = None,
        metrics: Mapping[str, float | int] | None = None,
    ) -> Message:
        """The reply to the message: exactly the records `mechanism` declares and no metric it
        does not declare. Anything else is a bug in the handler, and nothing leaves."""
        spec = MECHANISMS[mechanism]
        records = dict(records or {})
        metrics = dict(metrics or {})
        if self.policy.refusal(mechanism) is not None:  # admit() was skipped: a handler bug
            raise RuntimeError(f"reply {mechanism!r} built without admitting it")
        names = set(records)
        if not set(spec.records) <= names <= set(spec.records) | set(spec.optional_records):
            raise RuntimeError(
                f"reply {mechanism!r} has records {sorted(records)}, declares {spec.records}"
            )
        extra = sorted(set(metrics) - set(spec.metrics))
        if extra:
            raise RuntimeError(f"reply {mechanism!r} carries undeclared metrics {extra}")
        content = RecordDict(dict(records))
        content["metrics"] = MetricRecord(dict(metrics))
        return Message(content=content, reply_to=self.msg)


Handler = Callable[[Message, Context, ReleaseBoundary], Message]


def guarded(handler: Handler) -> Callable[[Message, Context], Message]:
    """A ClientApp handler answered through a `ReleaseBoundary`: `Refused` becomes a refusal
    reply with its reason; any other exception a refusal without its text (the traceback is
    logged on the node), so no data-dependent error text leaves the node."""

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            boundary = ReleaseBoundary(msg, context)
            return handler(msg, context, boundary)
        except Refused as exc:
            return refusal(msg, exc.reason, context.node_id)
        except Exception:  # noqa: BLE001 - nothing of a data-dependent failure may leave
            log(
                WARNING,
                "node %s failed on %s:\n%s",
                context.node_id,
                msg.metadata.message_type,
                traceback.format_exc(),
            )
            return refusal(msg, INTERNAL_FAILURE, context.node_id)

    return wrapper
