"""ECOS as a Flower strategy: broadcast centroids in a `query.ecos` round, validate and sum the
noisy coverage scores, then send the cloud-trained model out in an `evaluate` round.

Modelled on Flower's FedAvg: a small class whose hooks (configure_query / aggregate_query,
configure_evaluate / aggregate_evaluate) build messages and fold replies; the run loop that calls
them (sampling, cloud training) lives in `ecos_flower.flower.sampling_run`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from ecos_flower.ecos import FeatureExtractor, aggregate_scores
from ecos_flower.flower.validation import (
    InvalidReplyError,
    answers,
    first_reply_per_node,
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


class EcosStrategy(Strategy):
    """Server side of ECOS. State: the accepted score vectors, per-node privacy reports and
    accuracies; a rejected reply is logged with its node and never enters that state."""

    def __init__(
        self,
        *,
        epsilon: float = 1.0,
        delta: float = 1e-5,
        noise: bool = True,
        score_mode: str = "nearest",
        radius: float | None = None,
        max_per_sample: int = 1,
        threshold_multiple: float = 2.0,
    ) -> None:
        self.epsilon, self.delta, self.noise = float(epsilon), float(delta), bool(noise)
        self.score_mode, self.radius = score_mode, radius
        self.max_per_sample = int(max_per_sample)
        self.threshold_multiple = float(threshold_multiple)
        self.accepted_scores: dict[int, np.ndarray] = {}
        self.sigmas: dict[int, float] = {}
        self.epsilon_spent: dict[int, float] = {}
        self.node_to_client: dict[int, int] = {}
        self.rejected: list[InvalidReplyError] = []
        self.refused: dict[int, str] = {}
        self.accuracy: dict[int, float] = {}
        self.evaluated_nodes: set[int] = set()  # nodes whose evaluation was accepted
        self._extractor_sent: set[int] = set()

    def summary(self) -> None:
        noise = (
            f"Gaussian, epsilon={self.epsilon:g}, delta={self.delta:g} per query"
            if self.noise
            else "none (oracle)"
        )
        log(
            INFO,
            "\t├── ECOS score mode: %s (max per sample %d)",
            self.score_mode,
            self.max_per_sample,
        )
        log(INFO, "\t├── Noise: %s", noise)
        log(INFO, "\t└── Noise-aware threshold: %g x aggregate noise std", self.threshold_multiple)

    # ------------------------------------------------------------------ query round
    def configure_query(
        self,
        server_round: int,
        centroids: np.ndarray,
        extractor: FeatureExtractor,
        client_config: ConfigRecord,
        grid: Grid,
    ) -> list[Message]:
        """One `query.ecos` message per node: centroids, the score config, and the extractor's
        weights for nodes that have not received them yet."""
        digest = extractor_digest(extractor)
        query = {
            "num-centroids": int(centroids.shape[0]),
            "dim": int(centroids.shape[1]),
            "score-mode": self.score_mode,
            "max-per-sample": self.max_per_sample,
            "noise": self.noise,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "extractor-hash": digest,
            "extractor-kind": extractor.kind,
            "extractor-config": json.dumps(extractor.config(), default=str),
        }
        if self.radius is not None:
            query["radius"] = float(self.radius)
        centroid_record = ArrayRecord({"centroids": _array(centroids.astype(np.float32))})
        weights = ArrayRecord({k: _array(v) for k, v in extractor.to_arrays().items()})
        messages = []
        for node_id in grid.get_node_ids():
            content = RecordDict(
                {
                    "centroids": centroid_record,
                    "ecos": ConfigRecord(query),
                    "config": client_config,
                }
            )
            if node_id not in self._extractor_sent:
                content["extractor"] = weights
            messages.append(Message(content, node_id, "query.ecos", group_id=str(server_round)))
        return messages

    def aggregate_query(
        self, server_round: int, replies: Iterable[Message], num_centroids: int
    ) -> np.ndarray | None:
        """Validate every reply, keep the good ones, and return the aggregated (thresholded)
        scores, or None if no client answered validly."""
        for reply in answers(replies, self._reject_all, self.refused, "the ECOS query"):
            node = reply.metadata.src_node_id
            try:
                scores = float_vector(reply, "scores", num_centroids)
                client = int(metric(reply, "partition-id", low=0))
                sigma = metric(reply, "sigma", low=0.0)
                spent = metric(reply, "epsilon-spent", low=0.0) if self.noise else math.inf
                if self.noise and sigma <= 0:
                    raise InvalidReplyError(
                        node, "reply claims no noise (sigma=0) in a private query"
                    )
                if node in self.accepted_scores:
                    raise InvalidReplyError(node, "already answered this query")
            except InvalidReplyError as exc:
                self._reject_all([exc])
                continue
            self.accepted_scores[node] = scores
            self.sigmas[node] = sigma
            self.epsilon_spent[client] = spent
            self.node_to_client[node] = client
            self._extractor_sent.add(node)
        if not self.accepted_scores:
            return None
        nodes = sorted(self.accepted_scores)
        return aggregate_scores(
            [self.accepted_scores[n] for n in nodes],
            [self.sigmas[n] for n in nodes],
            threshold_multiple=self.threshold_multiple if self.noise else 0.0,
        )

    def _reject_all(self, errors: Iterable[InvalidReplyError]) -> None:
        for error in errors:
            self.rejected.append(error)
            log(WARNING, "rejected reply: %s", error)

    # ------------------------------------------------------------- evaluate round
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Every node scores the cloud-trained model on its own test split."""
        content = RecordDict({"arrays": arrays, "config": config})
        return [
            Message(content, node, "evaluate", group_id=str(server_round))
            for node in grid.get_node_ids()
        ]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Record each node's accuracy (validated: a number in [0, 1]); return the mean."""
        kept, duplicates = first_reply_per_node(replies)
        self._reject_all(duplicates)
        for reply in kept:
            try:
                accuracy = metric(reply, "accuracy", low=0.0, high=1.0)
                client = int(metric(reply, "partition-id", low=0))
            except InvalidReplyError as exc:
                self._reject_all([exc])
                continue
            self.accuracy[client] = accuracy
            self.evaluated_nodes.add(reply.metadata.src_node_id)
            self.node_to_client.setdefault(reply.metadata.src_node_id, client)
        if not self.accuracy:
            return None
        return MetricRecord({"accuracy": float(np.mean(list(self.accuracy.values())))})

    # ECOS has no federated training round: the model is trained in the cloud.
    def configure_train(self, server_round, arrays, config, grid):  # noqa: ANN001, ANN201
        return []

    def aggregate_train(self, server_round, replies):  # noqa: ANN001, ANN201
        return None, None


def _array(values: np.ndarray) -> Array:
    return Array(np.ascontiguousarray(values))
