"""The ECOS query round's two halves: the `query.ecos` messages (centroids, score settings and the
extractor for nodes that lack it) and the validated tally of the replies.

Used by `ecos_flower.strategy.Ecos`; kept apart so tests and fuzzers can drive one query without a
whole run. A rejected reply is logged with its node and never enters a tally.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from ecos_flower.ecos import FeatureExtractor, aggregate_scores
from ecos_flower.flower.validation import (
    InvalidReplyError,
    ReplyTally,
    answers,
    float_vector,
    metric,
)


def extractor_digest(extractor: FeatureExtractor) -> str:
    """Content hash of an extractor's config and weights: clients cache it under this name."""
    digest = hashlib.sha256(json.dumps(extractor.config(), sort_keys=True, default=str).encode())
    for name, array in sorted(extractor.to_arrays().items()):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:32]


class ExtractorDelivery:
    """Which nodes hold which extractor (by digest): a node is sent an extractor's weights until
    it has answered a query that carried them. One instance may be shared by every round of a
    run (the ECOS query, a kNN labelling query) so no node downloads the same weights twice."""

    def __init__(self) -> None:
        self._held: set[tuple[int, str]] = set()

    def needs(self, node_id: int, digest: str) -> bool:
        """Whether `node_id` must be sent the extractor with `digest`."""
        return (int(node_id), digest) not in self._held

    def delivered(self, node_id: int, digest: str) -> None:
        """Record that `node_id` holds the extractor with `digest` (it answered validly)."""
        self._held.add((int(node_id), digest))


@dataclass(frozen=True)
class QuerySettings:
    """What every node is asked in a `query.ecos` round (see `Ecos` for each field)."""

    epsilon: float = 1.0
    delta: float = 1e-5
    noise: bool = True
    score_mode: str = "nearest"
    radius: float | None = None
    max_per_sample: int = 1


def query_messages(
    settings: QuerySettings,
    centroids: np.ndarray,
    extractor: FeatureExtractor,
    client_config: ConfigRecord,
    node_ids: Iterable[int],
    *,
    server_round: int = 1,
    delivery: ExtractorDelivery | None = None,
) -> list[Message]:
    """One `query.ecos` message per node: centroids, the score config, and the extractor's
    weights for nodes that do not hold them yet (all nodes without a `delivery`)."""
    digest = extractor_digest(extractor)
    query = {
        "num-centroids": int(centroids.shape[0]),
        "dim": int(centroids.shape[1]),
        "score-mode": settings.score_mode,
        "max-per-sample": int(settings.max_per_sample),
        "noise": bool(settings.noise),
        "epsilon": float(settings.epsilon),
        "delta": float(settings.delta),
        "extractor-hash": digest,
        "extractor-kind": extractor.kind,
        "extractor-config": json.dumps(extractor.config(), default=str),
    }
    if settings.radius is not None:
        query["radius"] = float(settings.radius)
    centroid_record = ArrayRecord({"centroids": _array(centroids.astype(np.float32))})
    weights = ArrayRecord({k: _array(v) for k, v in extractor.to_arrays().items()})
    messages = []
    for node_id in node_ids:
        content = RecordDict(
            {"centroids": centroid_record, "ecos": ConfigRecord(query), "config": client_config}
        )
        if delivery is None or delivery.needs(node_id, digest):
            content["extractor"] = weights
        messages.append(Message(content, node_id, "query.ecos", group_id=str(server_round)))
    return messages


class QueryTally(ReplyTally):
    """The validated replies to one `query.ecos` round of `num_centroids` centroids.

    `add` may be called with several batches of replies; a node answers once. Read-only views:
    `scores` and `sigmas` (node -> value), `epsilon_spent` (client -> its ledger total; infinite
    without noise), `node_to_client`, `rejected` (InvalidReplyError naming the node) and `refused`
    (node -> the client's stated reason)."""

    def __init__(
        self,
        num_centroids: int,
        *,
        noise: bool = True,
        threshold_multiple: float = 2.0,
    ) -> None:
        super().__init__()
        self.num_centroids = int(num_centroids)
        self.noise = bool(noise)
        self.threshold_multiple = float(threshold_multiple)
        self._scores: dict[int, np.ndarray] = {}
        self._sigmas: dict[int, float] = {}

    def add(self, replies: Iterable[Message]) -> None:
        """Validate every reply and keep the good ones (rejections are logged, node named)."""
        for reply in answers(replies, self._reject, self._refused, "the ECOS query"):
            node = reply.metadata.src_node_id
            try:
                scores = float_vector(reply, "scores", self.num_centroids)
                client = int(metric(reply, "partition-id", low=0))
                sigma = metric(reply, "sigma", low=0.0)
                spent = metric(reply, "epsilon-spent", low=0.0) if self.noise else math.inf
                if self.noise and sigma <= 0:
                    raise InvalidReplyError(
                        node, "reply claims no noise (sigma=0) in a private query"
                    )
                if node in self._scores:
                    raise InvalidReplyError(node, "already answered this query")
            except InvalidReplyError as exc:
                self._reject([exc])
                continue
            self._scores[node] = scores
            self._sigmas[node] = sigma
            self._spent[client] = spent
            self._clients[node] = client

    def aggregate(self) -> np.ndarray | None:
        """The summed, clipped and noise-thresholded scores; None if no node answered validly."""
        if not self._scores:
            return None
        nodes = sorted(self._scores)
        return aggregate_scores(
            [self._scores[n] for n in nodes],
            [self._sigmas[n] for n in nodes],
            threshold_multiple=self.threshold_multiple if self.noise else 0.0,
        )

    @property
    def scores(self) -> Mapping[int, np.ndarray]:
        return {n: s.copy() for n, s in self._scores.items()}

    @property
    def sigmas(self) -> Mapping[int, float]:
        return dict(self._sigmas)


def _array(values: np.ndarray) -> Array:
    return Array(np.ascontiguousarray(values))
