"""The fields a client reads from a server message: declared once per message kind, parsed once.

Modelled on scikit-learn's `_parameter_constraints`: each message kind is a `MessageSpec`, a
tuple of `Field`s (name, kind, bounds, choices, default), and `spec.parse(record, node_config)`
checks every field at the boundary and returns a plain dict of typed values, or raises the
spec's `Refused` subclass naming the field and the bound it breaks. Handlers read the dict, never
the record again. Bounds may be the node's own (`NodeLimit`: node config key and default), or an
earlier field of the same message (`FieldValue`).

Refusal texts (after the kind's prefix, e.g. ``query rejected:``)::

    query has no 'epsilon'                         a required field is missing
    k='x' is not a number                          wrong type (bool is not a number)
    k=2.5 must be an integer                       an int field given a fraction
    num-centroids=1000000000 outside 1..20000      an int outside its bounds (inclusive)
    epsilon=-1.0 must be a positive finite number  a float below (0, inf)
    radius=-1.0 must be a finite number >= 0       a float below [0, inf)
    delta=2.0 must lie in (0, 1)                   a float outside bounded limits
    delta=0.001 above this node's max-delta=0.0001 a float above the node's cap
    unknown score-mode 'x'; expected one of (...)  a text outside its choices
    radius is only used with score-mode 'radius'   a field sent where it has no meaning

Every message kind the project's ClientApp answers is declared here: `ECOS_QUERY`, `KNN_QUERY`,
`DSSGD_TASK`, `DSSGD_EVALUATION`, `DSSGD_CONFIG`, `FINETUNE_REQUEST`, `DPSGD_TASK` and
`MODEL_CONFIG`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from flwr.app import ConfigRecord

from ecos_flower.applications import DEFAULT_NORMALISER, KNN_MODES
from ecos_flower.client.release import Refused


class MessageRejected(Refused):
    """A message whose settings this client will not act on: a refusal that depends on the
    message only."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"message rejected: {reason}")


class QueryRejected(Refused):
    """A query this client will not answer (absurd sizes, bad privacy parameters): a refusal
    that depends on the message only."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"query rejected: {reason}")


class TaskRejected(Refused):
    """A DSSGD task this participant will not run (absurd settings or a malformed download): a
    refusal that depends on the message only."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"task rejected: {reason}")


class FieldError(ValueError):
    """A field breaks its declaration (the text names the field and the bound)."""


PRESENT = object()  # in a condition: "the field was sent (and parsed)"


@dataclass(frozen=True)
class NodeLimit:
    """A bound the node sets: its node config `key`, else `default` (never the message)."""

    key: str
    default: float

    def resolve(self, node_config: Mapping[str, Any], kind: type) -> float:
        return kind(node_config.get(self.key, self.default))


@dataclass(frozen=True)
class FieldValue:
    """A bound given by an earlier field of the same message."""

    name: str


Bound = float | NodeLimit | FieldValue | None
Condition = tuple[str, Any]  # (earlier field, value it must have, or PRESENT)


@dataclass(frozen=True)
class Field:
    """One message field.

    Parameters
    ----------
    name : str
        The key in the ConfigRecord.
    kind : type
        `float` (int or float accepted, finite), `int` (integral numbers), `str` or `bool`.
    low, high : float, NodeLimit, FieldValue or None
        Bounds: inclusive for `int`; for `float` closed unless `low_open` / `high_open`.
    choices : tuple of str, optional
        The texts accepted (`str` fields).
    default : optional
        The value when the field is absent (then it is never missing).
    required : bool or Condition
        Without a default: whether an absent field is refused (True), yields None (False), or
        is refused only when the condition holds.
    cap : NodeLimit, optional
        A node limit a `float` must not exceed ("above this node's ...").
    when : Condition, optional
        Read only when the condition holds; ignored otherwise, or refused if `exclusive`.
    """

    name: str
    kind: type = float
    low: Bound = None
    high: Bound = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    default: Any = None
    required: bool | Condition = True
    cap: NodeLimit | None = None
    when: Condition | None = None
    exclusive: bool = False

    def parse(
        self,
        record: ConfigRecord,
        values: Mapping[str, Any],
        node_config: Mapping[str, Any],
        noun: str = "message",
    ) -> Any:
        """This field's value in `record` (checked), or None if absent and optional; the reason
        it is refused, as a `FieldError`, otherwise."""
        if self.name not in record:
            if self.default is not None:
                return self.default
            required = self.required
            if isinstance(required, tuple):
                if _holds(required, values):
                    raise FieldError(
                        f"{noun} has no {self.name!r} (needed with {_shown(required)})"
                    )
                return None
            if required:
                raise FieldError(f"{noun} has no {self.name!r}")
            return None
        value = record[self.name]
        if self.kind is bool:
            if not isinstance(value, bool):
                raise FieldError(f"{self.name}={value!r} is not true or false")
            return value
        if self.kind is str:
            if not isinstance(value, str):
                raise FieldError(f"{self.name}={value!r} is not text")
            if self.choices is not None and value not in self.choices:
                raise FieldError(f"unknown {self.name} {value!r}; expected one of {self.choices}")
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise FieldError(f"{self.name}={value!r} is not a number")
        if self.kind is int:
            return self._integer(value, values, node_config)
        return self._float(float(value), values, node_config)

    def _bound(self, bound: Bound, values: Mapping[str, Any], node_config: Mapping[str, Any]):
        if isinstance(bound, NodeLimit):
            return bound.resolve(node_config, self.kind)
        if isinstance(bound, FieldValue):
            return values[bound.name]
        return bound

    def _bounds(self, values: Mapping[str, Any], node_config: Mapping[str, Any]) -> tuple[Any, Any]:
        return self._bound(self.low, values, node_config), self._bound(
            self.high, values, node_config
        )

    def _integer(
        self, value: float, values: Mapping[str, Any], node_config: Mapping[str, Any]
    ) -> int:
        if isinstance(value, float):
            if not (math.isfinite(value) and value.is_integer()):
                raise FieldError(f"{self.name}={value!r} must be an integer")
            value = int(value)
        low, high = self._bounds(values, node_config)
        if (low is not None and value < low) or (high is not None and value > high):
            raise FieldError(f"{self.name}={value} outside {_range(low, high)}")
        return int(value)

    def _float(
        self, value: float, values: Mapping[str, Any], node_config: Mapping[str, Any]
    ) -> float:
        low, high = self._bounds(values, node_config)
        below = low is not None and (value <= low if self.low_open else value < low)
        above = high is not None and (value >= high if self.high_open else value > high)
        if not math.isfinite(value) or below or above:
            raise FieldError(f"{self.name}={value!r} {self._interval(low, high)}")
        if self.cap is not None:
            cap = self.cap.resolve(node_config, float)
            if value > cap:
                # e.g. a large delta buys a small sigma: the node, not the server, decides.
                raise FieldError(f"{self.name}={value:g} above this node's {self.cap.key}={cap:g}")
        return value

    def _interval(self, low: float | None, high: float | None) -> str:
        if high is None:
            if low is None:
                return "must be a finite number"
            if low == 0 and self.low_open:
                return "must be a positive finite number"
            return f"must be a finite number {'>' if self.low_open else '>='} {low:g}"
        if low is None:
            return f"must be a finite number {'<' if self.high_open else '<='} {high:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"must lie in {left}{low:g}, {high:g}{right}"


def _range(low: float | None, high: float | None) -> str:
    return f"{'' if low is None else low}..{'' if high is None else high}"


def _holds(condition: Condition, values: Mapping[str, Any]) -> bool:
    name, wanted = condition
    if wanted is PRESENT:
        return values.get(name) is not None
    return values.get(name) == wanted


def _shown(condition: Condition) -> str:
    name, wanted = condition
    return name if wanted is PRESENT else f"{name} {wanted!r}"


@dataclass(frozen=True)
class MessageSpec:
    """The fields of one ConfigRecord of a message kind, checked in order.

    `record` names the ConfigRecord in the message, `noun` the thing a missing field is missing
    from ("query has no 'dim'"), `error` the refusal raised (its text names the field)."""

    record: str
    noun: str
    error: type[Refused]
    fields: tuple[Field, ...]

    def parse(self, record: object, node_config: Mapping[str, Any]) -> dict[str, Any]:
        """Every field of `record` (the message's `self.record`), typed and bound-checked; refuses
        with `self.error` naming the first field that breaks its declaration."""
        if not isinstance(record, ConfigRecord):
            if record is None:
                raise self.error(f"message has no ConfigRecord {self.record!r}")
            kind = type(record).__name__
            raise self.error(f"message's {self.record!r} is a {kind}, not a ConfigRecord")
        values: dict[str, Any] = {}
        for field in self.fields:
            if field.when is not None and not _holds(field.when, values):
                if field.exclusive and field.name in record:
                    raise self.error(f"{field.name} is only used with {_shown(field.when)}")
                values[field.name] = field.default
                continue
            try:
                values[field.name] = field.parse(record, values, node_config, self.noun)
            except FieldError as exc:
                raise self.error(str(exc)) from exc
        return values

    def only(self, *names: str) -> MessageSpec:
        """The same spec restricted to `names` (a message kind that carries part of another)."""
        return MessageSpec(
            self.record, self.noun, self.error, tuple(f for f in self.fields if f.name in names)
        )


# ------------------------------------------------------------------------------ declarations
MAX_CENTROIDS = NodeLimit("max-centroids", 20_000)
MAX_DIM = NodeLimit("max-dim", 4_096)
MAX_DELTA = NodeLimit("max-delta", 1e-4)  # the largest per-query delta a node accepts
EPSILON = Field("epsilon", float, low=0, low_open=True)
DELTA = Field("delta", float, low=0, high=1, low_open=True, high_open=True, cap=MAX_DELTA)
NUM_CLASSES = Field("num-classes", int, low=2, high=NodeLimit("max-classes", 100_000))
MODEL = Field("model", str)

ECOS_QUERY = MessageSpec(
    "ecos",
    "query",
    QueryRejected,
    (
        Field("num-centroids", int, low=1, high=MAX_CENTROIDS),
        Field("dim", int, low=1, high=MAX_DIM),
        Field("noise", bool, default=True),
        replace(EPSILON, when=("noise", True)),
        replace(DELTA, when=("noise", True)),
        Field("score-mode", str, choices=("nearest", "radius"), default="nearest"),
        Field("max-per-sample", int, low=1, high=FieldValue("num-centroids"), default=1),
        Field("radius", float, low=0, when=("score-mode", "radius"), exclusive=True),
        Field("extractor-hash", str),
        Field("extractor-kind", str),
        Field("extractor-config", str),
    ),
)
"""`query.ecos`, record `ecos`: the query's sizes, privacy, scoring and extractor."""

KNN_QUERY = MessageSpec(
    "knn",
    "query",
    QueryRejected,
    (
        Field("num-queries", int, low=1, high=NodeLimit("max-knn-queries", 100_000)),
        Field("dim", int, low=1, high=4_096),
        Field("k", int, low=1, high=NodeLimit("max-knn-k", 1_000)),
        Field("mode", str, choices=tuple(KNN_MODES)),
        Field("num-classes", int, low=2, high=10_000),
        EPSILON,
        DELTA,
        Field("extractor-hash", str),
        Field("extractor-kind", str),
        Field("extractor-config", str),
    ),
)
"""`query.knn`, record `knn`: the selected samples' sizes, the vote and its privacy."""

DSSGD_TASK = MessageSpec(
    "dssgd",
    "task",
    TaskRejected,
    (
        Field("theta-u", float, low=0, high=1, low_open=True),
        Field("theta-d", float, low=0, high=1, low_open=True),
        Field("num-params", int, low=1, high=NodeLimit("max-params", 50_000_000)),
        NUM_CLASSES,
        Field("upload-mode", str, choices=("largest", "threshold"), default="largest"),
        Field("tau", float, low=0, default=0.0),
        Field("dp-epsilon", float, low=0, low_open=True, required=False),
        Field("gamma", float, low=0, low_open=True, required=("dp-epsilon", PRESENT)),
        Field(
            "svt-split",
            str,
            choices=("published", "corrected"),
            default="published",
            when=("dp-epsilon", PRESENT),
        ),
        Field("epoch", int, low=0, high=10**9, default=0),
    ),
)
"""`train.dssgd`, record `dssgd`: sharing fractions, model size, upload rule and SVT privacy."""

DSSGD_EVALUATION = DSSGD_TASK.only("num-params", "num-classes")
"""`evaluate.dssgd`, record `dssgd`: the model's size only."""

DSSGD_CONFIG = MessageSpec(
    "config",
    "task",
    TaskRejected,
    (
        MODEL,
        Field("batch-size", int, low=1, high=1_000_000),
        Field("learning-rate", float, low=0, low_open=True),
        Field("seed", int, low=0, high=2**63 - 1, default=0),
    ),
)
"""The client config of a DSSGD message: model, batch size, learning rate, seed."""

FINETUNE_METHODS = ("dp-sgd", "dp-least-squares", "dp-fc")
FINETUNE_REQUEST = MessageSpec(
    "finetune",
    "finetune request",
    QueryRejected,
    (
        EPSILON,
        DELTA,
        Field("method", str, choices=FINETUNE_METHODS, default="dp-sgd"),
        Field("steps", int, low=1, high=NodeLimit("max-finetune-steps", 10_000), default=100),
        Field("clip", float, low=0, low_open=True, default=1.0),
        Field("learning-rate", float, low=0, low_open=True, default=1.0),
        Field("init", str, choices=("zero", "received"), default="zero"),
        Field("ridge", float, low=0, low_open=True, default=1.0),
        Field("covariance-share", float, low=0, high=1, low_open=True, high_open=True, default=0.3),
        Field("floor", float, low=0, low_open=True, default=0.01),
        Field("feature-scale", float, low=0, low_open=True, default=1.0),
        Field("normaliser", float, low=0, low_open=True, default=DEFAULT_NORMALISER),
    ),
)
"""`evaluate.finetune`, record `finetune`: the DP head fit the server asks for."""

DPSGD_TASK = MessageSpec(
    "dpsgd",
    "task",
    TaskRejected,
    (
        EPSILON,  # the whole run's target (all its rounds), not one round's
        DELTA,
        Field("num-rounds", int, low=1, high=NodeLimit("max-dpsgd-rounds", 10_000)),
        Field("local-epochs", int, low=1, high=NodeLimit("max-local-epochs", 1_000)),
        Field("sample-rate", float, low=NodeLimit("min-sample-rate", 1e-4), high=1),
        Field("max-grad-norm", float, low=0, low_open=True),
        Field("expected-batch-size", float, low=1, high=1e6),
        Field("learning-rate", float, low=0, low_open=True),
    ),
)
"""`train.dpsgd`, record `dpsgd`: sample-level DP-FedAvg's DP-SGD task (the run's target epsilon
and length, the public Poisson rate and normaliser); the node calibrates the noise itself."""

MODEL_CONFIG = MessageSpec("config", "config", MessageRejected, (MODEL, NUM_CLASSES))
"""The task model a FedAvg, local or fine-tuning message names: its architecture and classes."""
