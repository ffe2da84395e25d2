"""The ECOS query round's two halves: the `query.ecos` messages (centroids, score settings and the
extractor for nodes that lack it) and the validated tally of the replies.

Used by `ecos_flower.strategy.Ecos`; kept apart so tests and fuzzers can drive one query without a
whole run. A rejected reply is logged with its node and never enters a tally.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore import log

from ecos_flower.ecos import FeatureExtractor, aggregate_scores, score_sensitivity
from ecos_flower.ecos.features import extractor_digest
from ecos_flower.flower.validation import (
    InvalidReplyError,
    ReplyTally,
    answers,
    claimed_client,
    float_vector,
    metric,
)
from ecos_flower.privacy.gaussian import analytic_gaussian_sigma

# Noise stds of slack in a node's score bound: an honest noisy score leaves [count - 6 sigma,
# count + 6 sigma] with probability ~2e-9 per centroid.
NOISE_SLACK = 6.0


class ExtractorDelivery:
    """Which nodes hold which extractor (by digest): a node is sent an extractor's weights until
    it has answered a query that carried them. One instance may be shared by every round of a
    run (the ECOS query, a kNN labelling query) so no node downloads the same weights twice.

    With `by_name`, an extractor that `ships_by_name` (a pretrained one whose config names its
    weights file by SHA-256) is sent to every node by name and digest only, no weight bytes:
    each node builds it from its own copy of the file and refuses, naming both digests, if its
    file differs (or it has none). Without it, weights ship as for any extractor."""

    def __init__(self, by_name: bool = False) -> None:
        self.by_name = bool(by_name)
        self._held: set[tuple[int, str]] = set()

    def ships_weights(self, node_id: int, digest: str, extractor: FeatureExtractor) -> bool:
        """Whether a query to `node_id` must carry `extractor`'s weights."""
        if self.by_name and type(extractor).ships_by_name:
            return False
        return self.needs(node_id, digest)

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


@dataclass(frozen=True)
class ScoreBound:
    """The most one node's score vector may weigh in the aggregate: public, from the declared
    `max_count` (the most samples any client holds), the query's `max_per_sample` m and the
    query's noise std `sigma` (what an honest node adds: fixed by the public epsilon, delta and
    sensitivity).

    An honest node's counts lie in [0, n] per centroid and sum to at most n*m, n <= max_count;
    its noisy vector adds N(0, sigma^2) per centroid. So every entry is clipped to
    [-6 sigma, max_count + 6 sigma] and the sum of the positive entries to
    max_count*m + sigma*(K/sqrt(2 pi) + 6 sqrt(K)) (the positive noise mass of K centroids, mean
    plus 6 of its stds at most): an honest node is, with overwhelming probability, never
    clipped, and no node, however large its scores, adds more than one full client's mass.
    Clipping a released (noisy) vector is post-processing: it costs no privacy."""

    max_count: float
    max_per_sample: int = 1
    sigma: float = 0.0

    @classmethod
    def for_query(cls, max_count: float, settings: QuerySettings) -> ScoreBound:
        """The bound of a query with `settings` (sigma as every honest node computes it)."""
        sigma = 0.0
        if settings.noise:
            sensitivity = score_sensitivity(settings.score_mode, settings.max_per_sample)
            sigma = analytic_gaussian_sigma(settings.epsilon, settings.delta, sensitivity)
        return cls(float(max_count), int(settings.max_per_sample), float(sigma))

    def limits(self, num_centroids: int) -> tuple[float, float, float]:
        """(lowest entry, highest entry, largest sum of the positive entries)."""
        slack = NOISE_SLACK * self.sigma
        k = int(num_centroids)
        noise_mass = self.sigma * (k / math.sqrt(2 * math.pi) + NOISE_SLACK * math.sqrt(k))
        total = self.max_count * min(self.max_per_sample, k) + noise_mass
        return -slack, self.max_count + slack, total

    def clip(self, scores: np.ndarray) -> tuple[np.ndarray, str | None]:
        """`scores` within the bound (a copy), and what was clipped (None: nothing)."""
        low, high, total = self.limits(scores.shape[0])
        clipped = np.clip(scores, low, high)
        reasons = []
        if np.any(clipped != scores):
            reasons.append(
                f"scores in [{scores.min():.4g}, {scores.max():.4g}] clipped to the per-centroid "
                f"bound [{low:.4g}, {high:.4g}]"
            )
        positive = clipped > 0
        mass = float(clipped[positive].sum())
        if mass > total:
            clipped[positive] *= total / mass
            reasons.append(f"positive mass {mass:.4g} scaled to the bound {total:.4g}")
        return clipped, "; ".join(reasons) or None


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
    weights for nodes that do not hold them yet (all nodes without a `delivery`; none for an
    extractor the `delivery` sends by name)."""
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
    centroid_record = ArrayRecord({"centroids": wire_array(centroids.astype(np.float32))})
    weights = ArrayRecord({k: wire_array(v) for k, v in extractor.to_arrays().items()})
    messages = []
    for node_id in node_ids:
        content = RecordDict(
            {"centroids": centroid_record, "ecos": ConfigRecord(query), "config": client_config}
        )
        if delivery is None or delivery.ships_weights(node_id, digest, extractor):
            content["extractor"] = weights
        messages.append(Message(content, node_id, "query.ecos", group_id=str(server_round)))
    return messages


class QueryTally(ReplyTally):
    """The validated replies to one `query.ecos` round of `num_centroids` centroids.

    `add` may be called with several batches of replies; a node answers once. Read-only views:
    `scores` and `sigmas` (node -> value), `epsilon_spent` (client -> its ledger total; infinite
    without noise), `node_to_client`, `rejected` (InvalidReplyError naming the node) and `refused`
    (node -> the client's stated reason) and `clipped` (node -> what its `bound` clipped).

    Everything is kept per node. A node's partition id must be an integer, the one it claimed
    before (`known_clients`: node -> partition id of earlier rounds) and no other node's claim
    (a duplicate is rejected naming both nodes). With a `bound` (`ScoreBound`) each accepted
    vector is clipped to it before it enters the tally; without one, scores are taken as sent."""

    def __init__(
        self,
        num_centroids: int,
        *,
        noise: bool = True,
        threshold_multiple: float = 2.0,
        bound: ScoreBound | None = None,
        known_clients: Mapping[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.num_centroids = int(num_centroids)
        self.noise = bool(noise)
        self.threshold_multiple = float(threshold_multiple)
        self.bound = bound
        self._known: dict[int, int] = dict(known_clients or {})
        self._scores: dict[int, np.ndarray] = {}
        self._sigmas: dict[int, float] = {}
        self._clipped: dict[int, str] = {}

    def add(self, replies: Iterable[Message]) -> None:
        """Validate every reply and keep the good ones (rejections are logged, node named)."""
        for reply in answers(replies, self._reject, self._refused, "the ECOS query"):
            node = reply.metadata.src_node_id
            try:
                scores = float_vector(reply, "scores", self.num_centroids)
                sigma = metric(reply, "sigma", low=0.0)
                spent = metric(reply, "epsilon-spent", low=0.0) if self.noise else math.inf
                if self.noise and sigma <= 0:
                    raise InvalidReplyError(
                        node, "reply claims no noise (sigma=0) in a private query"
                    )
                public = self.bound.sigma if self.bound is not None else 0.0
                if self.noise and public > 0 and not math.isclose(sigma, public, rel_tol=1e-6):
                    # Every honest node adds the public sigma of the query's (epsilon, delta):
                    # a larger stated sigma would inflate the noise threshold for everyone.
                    raise InvalidReplyError(
                        node, f"reply states sigma={sigma:g}, the query's noise is {public:g}"
                    )
                if node in self._scores:
                    raise InvalidReplyError(node, "already answered this query")
                client = claimed_client(reply, self._known)
            except InvalidReplyError as exc:
                self._reject([exc])
                continue
            if self.bound is not None:
                scores, clipped = self.bound.clip(scores)
                if clipped is not None:
                    self._clipped[node] = clipped
                    log(WARNING, "node %s: %s", node, clipped)
            self._scores[node] = scores
            self._sigmas[node] = sigma
            self._spent[node] = spent
            self._clients[node] = client
            self._known[node] = client

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

    @property
    def epsilon_spent(self) -> Mapping[int, float]:
        """Client (partition id) -> its ledger total (claims are unique per node)."""
        return {self._clients[n]: spent for n, spent in self._spent.items()}

    @property
    def clipped(self) -> Mapping[int, str]:
        """Node -> what the bound clipped of its scores (nodes within the bound are absent)."""
        return dict(self._clipped)


def wire_array(values: np.ndarray) -> Array:
    """`values` as a C-contiguous Flower Array, keeping its shape."""
    # np.require, not np.ascontiguousarray: the latter makes 0-d arrays 1-d, and a BatchNorm's
    # 0-d `num_batches_tracked` would then not fit the architecture a client declares.
    return Array(np.require(values, requirements="C"))
