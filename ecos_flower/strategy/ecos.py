"""ECOS as a Flower strategy whose run is `start()`, like FedAvg's: query the clients' noisy
coverage of the public pool's centroids, select a proxy set from the pool, train the task model
on it in the cloud, and send that model out in an evaluate round.

One round of the protocol (`num_rounds` repeats it; each repeat is a fresh, charged query):

1. `query.ecos` to the sampled nodes (centroids, score settings, the extractor for nodes that
   lack it); malformed replies are rejected naming the node and the round goes on without them;
2. each accepted score vector is clipped to the public per-node bound (`max_count_per_node`);
   the vectors are summed, clipped at zero and noise-thresholded;
3. `selector` (ECOS's own `EcosSampler` over those scores unless another is given) picks
   `budget` pool indices;
4. `fit_fn(selection)` trains the model in the cloud (default: supervised training on the
   selection with its pool labels);
5. `evaluate` (or `evaluate.finetune`) to the sampled nodes; each reports its test accuracy.

The per-client figures land in the returned `EcosResult`'s metric records (see `per_client`).
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO
from typing import Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore import log

from ecos_flower.data import ImageSet
from ecos_flower.ecos import Compression, EcosSampler, FeatureExtractor, compress
from ecos_flower.ecos.scoring import SCORE_MODES
from ecos_flower.flower.report import no_results_message
from ecos_flower.flower.timing import PhaseTimer
from ecos_flower.flower.validation import InvalidReplyError, drop_events, too_few_message
from ecos_flower.models import build_model, train_epochs
from ecos_flower.strategy.ecos_query import (
    ExtractorDelivery,
    QuerySettings,
    QueryTally,
    ScoreBound,
    query_messages,
)
from ecos_flower.strategy.evaluation import EvaluationTally, evaluate_messages


class Sampler(Protocol):
    """A selection over the public pool: `select(budget)` -> distinct pool indices."""

    def select(self, budget: int) -> np.ndarray: ...


FitFn = Callable[[np.ndarray], ArrayRecord]
FinetuneFn = Callable[[np.ndarray, ArrayRecord], ConfigRecord | None]


@dataclass
class EcosResult(Result):
    """Flower's `Result` of an `Ecos` run, plus what is not a number.

    Metric records, per round r (per-client lists align with `client-ids`; read them with
    `per_client`):

    - `train_metrics_clientapp[r]`, the query: `selected` (pool samples chosen), and with a
      query `answered`, `rejected`, `refused`, `client-ids`, `epsilon-spent` (each client's
      ledger total after the query; inf without noise) and `sigma` (its noise std);
    - `evaluate_metrics_clientapp[r]`: `accuracy` (mean), `evaluated`, `client-ids`,
      `accuracy-per-client`, and after DP fine-tuning `finetune-client-ids` and
      `finetune-epsilon-spent` (ledger totals after the refit);
    - `arrays`: the last cloud-trained model.

    Fields beyond Flower's: `selection` (the last round's pool indices), `node_to_client`,
    `rejected` (phase "query" / "evaluate" -> the rejected replies, node named), `refused`
    (node -> the client's stated reason for refusing the query), `dropped` (who dropped out of
    which round and why), `clipped` (whose score vector exceeded the per-node bound, by how
    much: one JSON-ready dict per node and round), `finetune` (fine-tuning extras: accuracy
    before the refit, Opacus' epsilon, refusals) and `phase_seconds`."""

    selection: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    node_to_client: dict[int, int] = field(default_factory=dict)
    rejected: dict[str, list[InvalidReplyError]] = field(
        default_factory=lambda: {"query": [], "evaluate": []}
    )
    refused: dict[int, str] = field(default_factory=dict)
    dropped: list[dict[str, object]] = field(default_factory=list)
    clipped: list[dict[str, object]] = field(default_factory=list)
    finetune: dict[str, object] = field(default_factory=dict)
    phase_seconds: dict[str, float] = field(default_factory=dict)

    __repr__ = Result.__repr__


def per_client(record: MetricRecord, key: str, ids_key: str = "client-ids") -> dict[int, float]:
    """`{client: value}` from a record's aligned lists `ids_key` and `key` (empty if absent)."""
    if key not in record or ids_key not in record:
        return {}
    return {int(c): float(v) for c, v in zip(record[ids_key], record[key], strict=True)}


def supervised_fit(
    pool: ImageSet,
    *,
    num_classes: int,
    model: str = "small-cnn",
    epochs: int = 30,
    batch_size: int = 32,
    learning_rate: float = 0.05,
    seed: int = 0,
    device: str = "cpu",
) -> FitFn:
    """A `fit_fn`: train a fresh `model` on the selected pool samples with their pool labels."""

    def fit(selection: np.ndarray) -> ArrayRecord:
        images = pool.images
        net = build_model(model, num_classes, images.shape[1], images.shape[-1], seed=seed)
        chosen = np.asarray(selection, dtype=np.int64).tolist()
        train_epochs(
            net,
            images[chosen],
            pool.labels[chosen],
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            seed=seed,
            device=device,
        )
        return ArrayRecord(net.state_dict())

    return fit


class Ecos(Strategy):
    """Server side of ECOS: one-shot selection of a proxy set from a public pool.

    Parameters
    ----------
    budget : int
        Number of pool samples to select (at least 1).
    pool : ImageSet, optional
        The public pool, labelled. Needed for the default `fit_fn` and, without
        `pool_features`, to compute the features; its length must match `pool_features`.
    extractor : FeatureExtractor, optional
        The fitted feature map phi, shipped to the clients with the query. Required unless a
        `selector` replaces ECOS's query.
    pool_features : numpy.ndarray, optional
        phi of every pool sample, (pool size, d), finite. Computed from `pool` with `extractor`
        if not given. Required (given or computed) unless a `selector` is given.
    num_centroids : int, default 50
        K, the number of K-means centroids the pool is compressed into (1 <= K <= pool size).
    compressor : callable, optional
        `compressor(pool_features, num_centroids) -> Compression`; default K-means
        (`ecos_flower.ecos.compress` with `seed`).
    epsilon : float, default 1.0
        Per-client epsilon of the query's Gaussian release (> 0).
    delta : float, default 1e-5
        Its delta, in (0, 1).
    noise : bool, default True
        False asks for exact scores (the oracle upper reference: no privacy).
    score_mode : {"nearest", "radius"}, default "nearest"
        How a client sample covers centroids: its nearest one, or every one within `radius`.
    radius : float, optional
        The covering radius; required (> 0) with `score_mode="radius"`, else unused.
    max_per_sample : int, default 1
        Most centroids one client sample may count for (>= 1); sets the query's sensitivity.
    threshold_multiple : float, default 2.0
        Aggregated scores below this many aggregate-noise stds are zeroed (>= 0; 0: off).
    max_count_per_node : int, default 1000
        The most samples any one client holds (public, declared; >= 1). Bounds what one node's
        score vector can weigh: each entry is clipped to [-6 sigma, max_count_per_node +
        6 sigma] and the positive mass to max_count_per_node * max_per_sample plus the noise's
        (see `ecos_query.ScoreBound`), so one node moves the selection by at most one full
        client's share. Clipping the noisy vector is post-processing (no privacy cost); a
        clipped node is listed in the result's `clipped`. The default is over twice the largest
        client of the project's scenarios (~470 samples).
    selector : Sampler, optional
        Replaces ECOS's query-driven selection with another (Random, K-Center, In-domain):
        `selector.select(budget)` picks the pool indices and no query is sent.
    fit_fn : callable, optional
        The cloud step, `fit_fn(selection) -> ArrayRecord` (the model clients evaluate).
        Default: `supervised_fit` of a `small-cnn` on the selection (needs `pool`).
    finetune_fn : callable, optional
        `finetune_fn(selection, arrays) -> ConfigRecord | None`: the `finetune` record with
        which clients refit the head with DP before evaluating (`evaluate.finetune`); None or
        a None result: plain `evaluate`.
    fraction_query : float, default 1.0
        Fraction of the connected nodes sampled for the query, in (0, 1].
    fraction_evaluate : float, default 1.0
        Fraction of the connected nodes sampled for evaluation, in (0, 1].
    min_available_nodes : int, default 1
        Nodes to wait for before sampling (Flower's `sample_nodes`), >= 0.
    min_answers : int, default 1
        Fewest valid answers the query and the evaluation each need (>= 1); fewer raise
        RuntimeError naming who dropped out and why.
    seed : int, default 0
        Seed of the compression and of ECOS's within-cluster selection.
    delivery : ExtractorDelivery, optional
        Which nodes hold which extractor; share one with later rounds of the same run (e.g. a
        kNN labelling query) so no node downloads the same weights twice.
    """

    def __init__(
        self,
        *,
        budget: int,
        pool: ImageSet | None = None,
        extractor: FeatureExtractor | None = None,
        pool_features: np.ndarray | None = None,
        num_centroids: int = 50,
        compressor: Callable[[np.ndarray, int], Compression] | None = None,
        epsilon: float = 1.0,
        delta: float = 1e-5,
        noise: bool = True,
        score_mode: str = "nearest",
        radius: float | None = None,
        max_per_sample: int = 1,
        threshold_multiple: float = 2.0,
        max_count_per_node: int = 1000,
        selector: Sampler | None = None,
        fit_fn: FitFn | None = None,
        finetune_fn: FinetuneFn | None = None,
        fraction_query: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_available_nodes: int = 1,
        min_answers: int = 1,
        seed: int = 0,
        delivery: ExtractorDelivery | None = None,
    ) -> None:
        self._budget = _integer("budget", budget, low=1)
        self._settings = QuerySettings(
            epsilon=_number("epsilon", epsilon, low=0.0, strict=True) if noise else float(epsilon),
            delta=_number("delta", delta, low=0.0, high=1.0, strict=True),
            noise=bool(noise),
            score_mode=_choice("score_mode", score_mode, SCORE_MODES),
            radius=(
                _number("radius", radius, low=0.0, strict=True) if score_mode == "radius" else None
            ),
            max_per_sample=_integer("max_per_sample", max_per_sample, low=1),
        )
        self._threshold_multiple = _number("threshold_multiple", threshold_multiple, low=0.0)
        self._max_count = _integer("max_count_per_node", max_count_per_node, low=1)
        self._fraction_query = _fraction("fraction_query", fraction_query)
        self._fraction_evaluate = _fraction("fraction_evaluate", fraction_evaluate)
        self._min_available_nodes = _integer("min_available_nodes", min_available_nodes, low=0)
        self._min_answers = _integer("min_answers", min_answers, low=1)
        self._seed = _integer("seed", seed)
        self._selector = selector
        if selector is not None and not callable(getattr(selector, "select", None)):
            raise ValueError("Ecos(selector=...): needs a select(budget) method")
        self._extractor = extractor
        self._features: np.ndarray | None = None
        if selector is None:
            if extractor is None:
                raise ValueError("Ecos(extractor=None): ECOS's query needs a fitted extractor")
            if pool_features is None:
                if pool is None:
                    raise ValueError(
                        "Ecos(pool_features=None): give the pool's features or the pool"
                    )
                pool_features = extractor.transform(pool.images)
        if pool_features is not None:
            features = np.asarray(pool_features)
            if features.ndim != 2 or features.shape[0] == 0 or not np.isfinite(features).all():
                raise ValueError(
                    f"Ecos(pool_features=...): need a finite, non-empty (n, d) array, got shape "
                    f"{features.shape}"
                )
            if pool is not None and features.shape[0] != len(pool):
                raise ValueError(
                    f"Ecos(pool_features=...): {features.shape[0]} rows for a pool of {len(pool)}"
                )
            self._features = pool_features
        self._num_centroids = _integer("num_centroids", num_centroids, low=1)
        if self._features is not None and self._num_centroids > self._features.shape[0]:
            raise ValueError(
                f"Ecos(num_centroids={num_centroids}): more than the {self._features.shape[0]} "
                "pool samples"
            )
        if compressor is not None and not callable(compressor):
            raise ValueError("Ecos(compressor=...): must be callable")
        self._compressor = compressor
        if fit_fn is None:
            if pool is None:
                raise ValueError("Ecos(fit_fn=None): the default supervised fit needs the pool")
            fit_fn = supervised_fit(pool, num_classes=int(pool.labels.max()) + 1, seed=self._seed)
        elif not callable(fit_fn):
            raise ValueError("Ecos(fit_fn=...): must be callable")
        self._fit_fn = fit_fn
        if finetune_fn is not None and not callable(finetune_fn):
            raise ValueError("Ecos(finetune_fn=...): must be callable")
        self._finetune_fn = finetune_fn
        self._delivery = delivery if delivery is not None else ExtractorDelivery()

    def summary(self) -> None:
        """Log the strategy's configuration."""
        if self._selector is not None:
            log(INFO, "\t├── Selection: %s (no query)", type(self._selector).__name__)
        else:
            settings = self._settings
            noise = (
                f"Gaussian, epsilon={settings.epsilon:g}, delta={settings.delta:g} per query"
                if settings.noise
                else "none (oracle)"
            )
            log(
                INFO,
                "\t├── ECOS score mode: %s (max per sample %d), K=%d",
                settings.score_mode,
                settings.max_per_sample,
                self._num_centroids,
            )
            log(INFO, "\t├── Noise: %s", noise)
            log(
                INFO,
                "\t├── Noise-aware threshold: %g x aggregate noise std",
                self._threshold_multiple,
            )
            log(INFO, "\t├── Per-node score bound: %d samples", self._max_count)
        log(
            INFO,
            "\t└── Budget: %d; query %.2f / evaluate %.2f of the nodes, at least %d answers",
            self._budget,
            self._fraction_query,
            self._fraction_evaluate,
            self._min_answers,
        )

    # -------------------------------------------------------------------------- the run
    def start(  # noqa: PLR0913
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 1,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> EcosResult:
        """Run the protocol `num_rounds` times (query, aggregate, select, fit, evaluate).

        Parameters
        ----------
        grid : Grid
            Sends the messages to, and receives replies from, the ClientApps.
        initial_arrays : ArrayRecord
            The model before any round: the result's `arrays` if no round trains one, and what
            `evaluate_fn` scores at round 0.
        num_rounds : int, default 1
            Repeats of the whole protocol; each repeat queries (and charges) the clients again.
        timeout : float, default 3600
            Seconds to wait for the replies of each round.
        train_config : ConfigRecord, optional
            The client config sent with the query (`config` record).
        evaluate_config : ConfigRecord, optional
            The client config sent with the model to evaluate; default `train_config`.
        evaluate_fn : callable, optional
            `evaluate_fn(round, arrays) -> MetricRecord | None`, a server-side evaluation
            before the first round and after each (in `evaluate_metrics_serverapp`).

        Returns
        -------
        EcosResult
            The final model and per-round, per-client metrics (see `EcosResult`).

        Raises
        ------
        RuntimeError
            If fewer than `min_answers` nodes answer the query or the evaluation validly.
        """
        rounds = _integer("num_rounds", num_rounds, low=1)
        log(INFO, "Starting %s strategy:", type(self).__name__)
        self.summary()
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = train_config if evaluate_config is None else evaluate_config
        timer = PhaseTimer()
        result = EcosResult(arrays=initial_arrays)
        if evaluate_fn is not None:
            metrics = evaluate_fn(0, initial_arrays)
            if metrics is not None:
                result.evaluate_metrics_serverapp[0] = metrics
        t_start = time.time()
        compression = None
        if self._selector is None:
            with timer("compress"):
                compression = self._compress()
        for server_round in range(1, rounds + 1):
            log(INFO, "[ROUND %d/%d]", server_round, rounds)
            if compression is not None:
                with timer("query"):
                    tally = self._query(
                        server_round, compression, grid, train_config, timeout, result
                    )
                sampler: Sampler = EcosSampler(
                    self._features, compression, tally.aggregate(), seed=self._seed
                )
            else:
                tally, sampler = None, self._selector
            with timer("select"):
                selection = np.asarray(sampler.select(self._budget), dtype=np.int64)
            result.selection = selection
            result.train_metrics_clientapp[server_round] = _query_metrics(tally, selection)
            with timer("cloud-training"):
                arrays = self._fit_fn(selection)
            result.arrays = arrays
            with timer("evaluate"):
                evaluation = self._evaluate(
                    server_round, selection, arrays, grid, evaluate_config, timeout, result
                )
            result.evaluate_metrics_clientapp[server_round] = _evaluate_metrics(evaluation)
            result.finetune = evaluation.finetune_summary()
            if evaluate_fn is not None:
                metrics = evaluate_fn(server_round, arrays)
                if metrics is not None:
                    result.evaluate_metrics_serverapp[server_round] = metrics
        result.phase_seconds = dict(timer.seconds)
        log(INFO, "Strategy execution finished in %.2fs", time.time() - t_start)
        for line in io.StringIO(repr(result)):
            log(INFO, "\t%s", line.rstrip("\n"))
        return result

    # ----------------------------------------------------------------- private helpers
    def _compress(self) -> Compression:
        if self._compressor is not None:
            return self._compressor(self._features, self._num_centroids)
        return compress(self._features, self._num_centroids, seed=self._seed)

    def _sample(self, grid: Grid, fraction: float) -> list[int]:
        """Flower's `sample_nodes` (waiting for `min_available_nodes`); sorted, so a run's
        message order does not depend on Python's global random state."""
        available = len(list(grid.get_node_ids()))
        size = min(max(int(available * fraction), self._min_answers), available)
        nodes, _ = sample_nodes(grid, self._min_available_nodes, size)
        return sorted(nodes)

    def _query(
        self,
        server_round: int,
        compression: Compression,
        grid: Grid,
        config: ConfigRecord,
        timeout: float,
        result: EcosResult,
    ) -> QueryTally:
        """Send the query, tally the replies, record drop-outs; raise if too few answered."""
        messages = self._configure_query(server_round, compression, grid, config)
        tally = QueryTally(
            compression.num_clusters,
            noise=self._settings.noise,
            threshold_multiple=self._threshold_multiple,
            bound=ScoreBound.for_query(self._max_count, self._settings),
            known_clients=result.node_to_client,
        )
        tally.add(grid.send_and_receive(messages, timeout=timeout))
        digest = messages[0].content["ecos"]["extractor-hash"] if messages else ""
        for node in tally.scores:
            self._delivery.delivered(node, str(digest))
        refused, rejected = tally.refused, tally.rejected
        dropped = drop_events(
            "query",
            server_round,
            [m.metadata.dst_node_id for m in messages],
            set(tally.scores) | set(refused),
            rejected,
        )
        result.dropped += dropped
        result.rejected["query"] += rejected
        result.refused.update(refused)
        for node, client in tally.node_to_client.items():
            result.node_to_client[node] = client
        result.clipped += [
            {
                "phase": "query",
                "round": int(server_round),
                "node": int(node),
                "client": tally.node_to_client.get(node),
                "reason": reason,
            }
            for node, reason in sorted(tally.clipped.items())
        ]
        answered = len(tally.scores)
        if answered == 0:
            listed = "; ".join(f"node {n}: {r}" for n, r in refused.items())
            raise RuntimeError(
                "no client answered the ECOS query validly ("
                + too_few_message("query", 0, self._min_answers, result.dropped)
                + (f"; refused: {listed}" if listed else "")
                + ")"
            )
        if answered < self._min_answers:
            raise RuntimeError(
                too_few_message("ECOS query", answered, self._min_answers, result.dropped, refused)
            )
        return tally

    def _configure_query(
        self, server_round: int, compression: Compression, grid: Grid, config: ConfigRecord
    ) -> list[Message]:
        return query_messages(
            self._settings,
            compression.centroids,
            self._extractor,
            config,
            self._sample(grid, self._fraction_query),
            server_round=server_round,
            delivery=self._delivery,
        )

    def _evaluate(
        self,
        server_round: int,
        selection: np.ndarray,
        arrays: ArrayRecord,
        grid: Grid,
        config: ConfigRecord,
        timeout: float,
        result: EcosResult,
    ) -> EvaluationTally:
        """The evaluate round (fine-tuning first if `finetune_fn` asks); raise if too few."""
        finetune = self._finetune_fn(selection, arrays) if self._finetune_fn else None
        messages = evaluate_messages(
            arrays,
            config,
            self._sample(grid, self._fraction_evaluate),
            server_round=server_round,
            finetune=finetune,
        )
        tally = EvaluationTally(
            finetune=finetune is not None,
            sent_to=[m.metadata.dst_node_id for m in messages],
            known_clients=result.node_to_client,
        )
        tally.add(grid.send_and_receive(messages, timeout=timeout))
        result.dropped += tally.dropped(server_round)
        result.rejected["evaluate"] += tally.rejected
        for node, client in tally.node_to_client.items():
            result.node_to_client.setdefault(node, client)
        if not tally.accuracy:
            errors = [e for phase in result.rejected.values() for e in phase]
            raise RuntimeError(no_results_message({e.node_id: e.problem for e in errors}))
        if len(tally.evaluated_nodes) < self._min_answers:
            raise RuntimeError(
                too_few_message(
                    "evaluation", len(tally.evaluated_nodes), self._min_answers, result.dropped
                )
            )
        return tally

    # ECOS's protocol is one-shot: there is no federated training round and no separate
    # evaluate hook pair driven by Flower's loop (`start` runs its own). Flower requires the
    # hooks; they build/fold the same messages `start` uses, for callers that drive them.
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Not used by ECOS: clients never train (the model is trained in the cloud)."""
        return []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Not used by ECOS (no training round): nothing to aggregate."""
        return None, None

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """`evaluate` messages for the sampled nodes: the evaluate round of `start`."""
        return evaluate_messages(
            arrays, config, self._sample(grid, self._fraction_evaluate), server_round=server_round
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The validated evaluation metrics of `replies` (as in `start`'s evaluate round)."""
        tally = EvaluationTally()
        tally.add(replies)
        return _evaluate_metrics(tally) if tally.accuracy else None


def _query_metrics(tally: QueryTally | None, selection: np.ndarray) -> MetricRecord:
    record = MetricRecord({"selected": int(len(selection))})
    if tally is None:
        return record
    spent, sigmas = tally.epsilon_spent, tally.sigmas
    nodes = sorted(tally.scores)
    clients = tally.node_to_client
    record["answered"] = len(nodes)
    record["rejected"] = len(tally.rejected)
    record["refused"] = len(tally.refused)
    record["client-ids"] = [clients[n] for n in nodes]
    record["epsilon-spent"] = [float(spent[clients[n]]) for n in nodes]
    record["sigma"] = [float(sigmas[n]) for n in nodes]
    return record


def _evaluate_metrics(tally: EvaluationTally) -> MetricRecord:
    accuracy = tally.accuracy
    clients = sorted(accuracy)
    record = MetricRecord(
        {
            "accuracy": float(np.mean(list(accuracy.values()))) if accuracy else math.nan,
            "evaluated": len(tally.evaluated_nodes),
            "client-ids": clients,
            "accuracy-per-client": [float(accuracy[c]) for c in clients],
        }
    )
    if tally.finetune:
        spent = tally.epsilon_spent
        record["finetune-client-ids"] = sorted(spent)
        record["finetune-epsilon-spent"] = [float(spent[c]) for c in sorted(spent)]
    return record


# ------------------------------------------------------------- argument validation
def _integer(name: str, value: object, *, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"Ecos({name}={value!r}): must be an integer")
    if low is not None and value < low:
        raise ValueError(f"Ecos({name}={value!r}): must be at least {low}")
    return int(value)


def _number(
    name: str,
    value: object,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    strict: bool = False,
) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise ValueError(f"Ecos({name}={value!r}): must be a number")
    number = float(value)
    inside = (low < number < high) if strict else (low <= number <= high)
    if not math.isfinite(number) or not inside:
        bounds = f"({low:g}, {high:g})" if strict else f"[{low:g}, {high:g}]"
        raise ValueError(f"Ecos({name}={value!r}): must be finite and lie in {bounds}")
    return number


def _fraction(name: str, value: object) -> float:
    number = _number(name, value, low=0.0, high=1.0)
    if number == 0.0:
        raise ValueError(f"Ecos({name}={value!r}): must lie in (0, 1]")
    return number


def _choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"Ecos({name}={value!r}): choose one of {', '.join(choices)}")
    return str(value)
