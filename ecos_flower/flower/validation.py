"""Server-side checks of client replies: a bad reply is rejected with the node and the reason.

Checks run on copies and return new arrays; nothing here touches strategy state, so a rejected
reply cannot change it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable, Mapping
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.supercore import log
from numpy.lib import format as npy_format

# Kinds of numpy dtype a peer may send: bool, integers, floats. Never objects, strings, structs.
NUMERIC_KINDS = "biuf"


class InvalidReplyError(ValueError):
    """A reply that fails validation; the message names the node and the problem."""

    def __init__(self, node_id: int, problem: str) -> None:
        super().__init__(f"node {node_id}: {problem}")
        self.node_id = node_id
        self.problem = problem


def _npy_header(
    array: Array, what: str, max_elements: int | None = None
) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, data offset) from a peer Array's .npy header, checked to be
    numeric with a valid shape (at most `max_elements` elements, if given) and exactly as many
    data bytes as declared; nothing decoded."""
    if not isinstance(array, Array):
        raise ValueError(f"{what} is a {type(array).__name__}, not an Array")
    if array.stype != "numpy.ndarray":
        raise ValueError(f"{what} has serialisation type {array.stype!r}, expected numpy.ndarray")
    data = array.data
    if not isinstance(data, bytes):
        raise ValueError(f"{what} carries no bytes")
    buffer = io.BytesIO(data)
    try:
        version = npy_format.read_magic(buffer)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(buffer, max_header_size=1024)
        elif version == (2, 0):
            shape, fortran, dtype = npy_format.read_array_header_2_0(buffer, max_header_size=1024)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except Exception as exc:  # a header that does not parse
        raise ValueError(f"{what} does not decode as an array: {exc}") from exc
    if dtype.kind not in NUMERIC_KINDS or dtype.hasobject or dtype.fields is not None:
        raise ValueError(f"{what} has dtype {dtype}, expected a numeric dtype")
    if not all(isinstance(n, int) and n >= 0 for n in shape) or len(shape) > 8:
        raise ValueError(f"{what} declares an invalid shape {shape}")
    count = math.prod(shape)
    if max_elements is not None and count > max_elements:
        raise ValueError(
            f"{what} declares shape {shape}: {count} elements exceed the maximum {max_elements}"
        )
    body = len(data) - buffer.tell()
    if body != count * dtype.itemsize:
        raise ValueError(
            f"{what} declares shape {shape} of {dtype} ({count * dtype.itemsize} bytes) but "
            f"carries {body} bytes"
        )
    return tuple(shape), bool(fortran), dtype, buffer.tell()


def declared_shape(array: Array, what: str = "array") -> tuple[int, ...]:
    """The shape a peer's Array declares, read from its .npy header only (checked as by
    `checked_numpy`, nothing decoded or allocated); ValueError naming the problem."""
    return _npy_header(array, what)[0]


def checked_numpy(array: Array, max_elements: int, what: str = "array") -> np.ndarray:
    """Decode a peer's Array only after reading its .npy header: numeric dtype, at most
    `max_elements` elements, and exactly as many data bytes as the header declares.

    numpy.load pre-allocates the whole declared shape before reading the bytes, so a payload of a
    few hundred bytes declaring 10^9 elements would allocate gigabytes; this check refuses it
    first (ValueError naming the problem). Returns a fresh, writable numpy array."""
    shape, fortran, dtype, offset = _npy_header(array, what, max_elements)
    count = math.prod(shape)
    values = np.frombuffer(array.data, dtype=dtype, count=count, offset=offset)
    return np.array(values.reshape(shape, order="F" if fortran else "C"), copy=True)


def reply_record(reply: Message, key: str, kind: type) -> object:
    """`reply.content[key]`, checked to exist and be a record of `kind`."""
    node = reply.metadata.src_node_id
    if reply.has_error():
        raise InvalidReplyError(node, f"ClientApp error: {reply.error.reason}")
    content = reply.content
    if key not in content:
        raise InvalidReplyError(node, f"reply has no {kind.__name__} {key!r}")
    record = content[key]
    if not isinstance(record, kind):
        raise InvalidReplyError(
            node, f"{key!r} is a {type(record).__name__}, expected {kind.__name__}"
        )
    return record


def single_array(reply: Message, key: str, max_elements: int = 10**8) -> np.ndarray:
    """The one array inside ArrayRecord `key` of a reply, as a fresh numpy array; its declared
    size is checked (at most `max_elements`) before anything is allocated for it."""
    record = reply_record(reply, key, ArrayRecord)
    node = reply.metadata.src_node_id
    if len(record) != 1:
        raise InvalidReplyError(node, f"{key!r} holds {len(record)} arrays, expected 1")
    try:
        return checked_numpy(next(iter(record.values())), max_elements, repr(key))
    except ValueError as exc:
        raise InvalidReplyError(node, str(exc)) from exc


def float_vector(reply: Message, key: str, length: int) -> np.ndarray:
    """A finite floating-point vector of exactly `length` entries (float64 copy)."""
    node = reply.metadata.src_node_id
    values = single_array(reply, key, max_elements=length)
    if values.dtype.kind != "f":
        raise InvalidReplyError(node, f"{key!r} has dtype {values.dtype}, expected floating point")
    if values.shape != (length,):
        raise InvalidReplyError(node, f"{key!r} has shape {values.shape}, expected ({length},)")
    if not np.all(np.isfinite(values)):
        bad = int(np.count_nonzero(~np.isfinite(values)))
        raise InvalidReplyError(node, f"{key!r} has {bad} non-finite values (NaN or inf)")
    return values.astype(np.float64)


def metric(
    reply: Message,
    name: str,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    key: str = "metrics",
) -> float:
    """A finite numeric metric within [low, high]."""
    node = reply.metadata.src_node_id
    record = reply_record(reply, key, MetricRecord)
    if name not in record:
        raise InvalidReplyError(node, f"metrics have no {name!r}")
    value = record[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidReplyError(node, f"metric {name!r} is a {type(value).__name__}, not a number")
    value = float(value)
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidReplyError(node, f"metric {name!r} = {value} outside [{low}, {high}]")
    return value


def claimed_client(reply: Message, known: Mapping[int, int]) -> int:
    """The client a reply speaks for: its simulation label `partition-id` (an integer >= 0) if
    it carries one, else its node id (a deployed node with its own data has no partition). The
    same this node claimed before (`known`: node -> client, earlier rounds and this one) and
    claimed by no other node; otherwise InvalidReplyError (a duplicate claim names both nodes)."""
    node = reply.metadata.src_node_id
    if "partition-id" in reply_record(reply, "metrics", MetricRecord):
        value = metric(reply, "partition-id", low=0)
        if not value.is_integer():
            raise InvalidReplyError(node, f"partition-id {value:g} is not an integer")
        client = int(value)
    else:
        client = int(node)
    before = known.get(node)
    if before is not None and before != client:
        raise InvalidReplyError(node, f"partition-id changed from {before} to {client}")
    for other, other_client in known.items():
        if other != node and other_client == client:
            raise InvalidReplyError(
                node, f"partition-id {client} is already claimed by node {other}"
            )
    return client


def refusal(reply: Message) -> str | None:
    """The client's stated reason when it refused a query (e.g. its privacy budget), else None."""
    if reply.has_error() or "refusal" not in reply.content:
        return None
    record = reply.content["refusal"]
    if isinstance(record, ConfigRecord) and isinstance(record.get("reason"), str):
        return str(record["reason"])
    return "refused (no reason given)"


def first_reply_per_node(
    replies: Iterable[Message],
) -> tuple[list[Message], list[InvalidReplyError]]:
    """Keep each node's first reply; later ones from the same node are rejected as duplicates."""
    seen: set[int] = set()
    kept, rejected = [], []
    for reply in replies:
        node = reply.metadata.src_node_id
        if node in seen:
            rejected.append(
                InvalidReplyError(node, "answered twice in one round; extra reply dropped")
            )
            continue
        seen.add(node)
        kept.append(reply)
    return kept, rejected


NO_REPLY = "no reply within the timeout (crashed, offline or disconnected)"


def drop_events(
    phase: str,
    server_round: int,
    sent_to: Iterable[int],
    answered: Iterable[int],
    errors: Iterable[InvalidReplyError],
    node_to_client: dict[int, int] | None = None,
) -> list[dict[str, object]]:
    """Who dropped out of one round: every node a message was `sent_to` whose result is not among
    the `answered` ones (accepted replies and stated refusals), with the reason: its rejection
    (a ClientApp error or an invalid reply) or no reply at all. One JSON-ready dict per node."""
    done = set(answered)
    reasons: dict[int, str] = {}
    for error in errors:
        reasons[error.node_id] = error.problem
    events = []
    for node in dict.fromkeys(sent_to):
        if node in done:
            continue
        events.append(
            {
                "phase": phase,
                "round": int(server_round),
                "node": int(node),
                "client": (node_to_client or {}).get(node),
                "reason": reasons.get(node, NO_REPLY),
            }
        )
    return events


TOO_FEW_LISTED = 50  # nodes named per list in the stop message (the rest are counted)


def _listed(items: list[tuple[object, object]]) -> str:
    shown = "; ".join(f"node {node}: {reason}" for node, reason in items[:TOO_FEW_LISTED])
    more = len(items) - TOO_FEW_LISTED
    return shown + (f"; and {more} more (see results.json)" if more > 0 else "")


def too_few_message(
    what: str,
    got: int,
    minimum: int,
    events: Iterable[dict],
    refused: Mapping[int, str] | None = None,
) -> str:
    """Why a round cannot go on: fewer results than the run's `min-clients`, naming each node
    that dropped (crashed, timed out, sent an invalid reply) and each that refused, with its
    reason."""
    dropped = _listed([(e["node"], e["reason"]) for e in events])
    refusals = _listed(sorted((refused or {}).items()))
    return (
        f"{what}: {got} client(s) answered validly, fewer than min-clients={minimum}"
        + (f"; dropped: {dropped}" if dropped else "")
        + (f"; refused: {refusals}" if refusals else "")
    )


def answers(
    replies: Iterable[Message],
    reject: Callable[[list[InvalidReplyError]], None],
    refused: dict[int, str],
    action: str,
) -> list[Message]:
    """Each node's first reply that is not a refusal. Later replies from the same node go to
    `reject`; refusals (e.g. a spent privacy budget) are recorded in `refused` and logged."""
    kept, duplicates = first_reply_per_node(replies)
    reject(duplicates)
    answered = []
    for reply in kept:
        reason = refusal(reply)
        if reason is not None:
            refused[reply.metadata.src_node_id] = reason
            log(WARNING, "node %s refused %s: %s", reply.metadata.src_node_id, action, reason)
            continue
        answered.append(reply)
    return answered


class ReplyTally:
    """What a round's reply checks keep: per-client epsilon totals, the node -> client map, the
    rejected replies (each an InvalidReplyError naming its node, logged when rejected) and the
    refusals (node -> the client's stated reason). Shared base of the rounds' tallies; the views
    are copies, so no caller can change a tally's state."""

    def __init__(self) -> None:
        self._spent: dict[int, float] = {}
        self._clients: dict[int, int] = {}
        self._rejected: list[InvalidReplyError] = []
        self._refused: dict[int, str] = {}

    def _reject(self, errors: Iterable[InvalidReplyError]) -> None:
        for error in errors:
            self._rejected.append(error)
            log(WARNING, "rejected reply: %s", error)

    @property
    def epsilon_spent(self) -> Mapping[int, float]:
        return dict(self._spent)

    @property
    def node_to_client(self) -> Mapping[int, int]:
        return dict(self._clients)

    @property
    def rejected(self) -> list[InvalidReplyError]:
        return list(self._rejected)

    @property
    def refused(self) -> Mapping[int, str]:
        return dict(self._refused)
