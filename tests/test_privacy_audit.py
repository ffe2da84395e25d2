"""Empirical privacy audits of the released mechanisms on adversarial neighbouring datasets.

Privacy unit: record-level add/remove of one client sample. For every mechanism we build D and
D' = D minus one adversarially chosen target sample (alone in its centroid cell, the nearest
neighbour of every query, a feature direction no other sample uses, ...), draw many releases from
both, pick an event E = {T > t} (or {T < t}) on a released statistic T, and bound

    epsilon >= log((P_D(E) - delta) / P_D'(E))        (and with D, D' swapped)

from below with one-sided Clopper-Pearson bounds (P_D(E) from below, P_D'(E) from above, each at
alpha / 4: two probabilities times two directions, so the maximum over both directions is a
lower confidence bound at level 1 - alpha). An (epsilon, delta)-DP mechanism satisfies
P_D(E) <= e^epsilon P_D'(E) + delta for every event, so a lower bound above the charged epsilon
is a privacy bug (with probability >= 1 - alpha it is not bad luck). The threshold t is chosen on
a separate calibration batch (or fixed a priori from the mechanism's description) so the bound on
the evaluation batch stays valid.

T is the Neyman-Pearson statistic of a Gaussian mechanism: the release projected on the
direction of f(D) - f(D'), where f is the mechanism's exact statistic computed by the real
function. If one removal moved f by more than the stated sensitivity, T would separate D from D'
more than the calibrated noise allows and the audit would flag it.

Each mechanism is audited (a) vectorised: noise for many releases drawn at once on the exact
statistic, which is what the mechanism does, (b) end to end through the real release function for
fewer trials; and each audit's power is checked on a deliberately under-noised version, which
must be caught (lower bound > charged epsilon).

This file has its own Clopper-Pearson estimator (`epsilon_bounds`, with delta);
`benchmarks/audit_privacy.py` runs the same audits with more trials and prints a table.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from privacy_audit_helpers import epsilon_lower_bound
from scipy.stats import beta
from torch import nn

from ecos_flower.applications import (
    dp_finetune_head,
    dp_least_squares_head,
    knn_sensitivity,
    knn_votes,
    noisy_votes,
)
from ecos_flower.applications.dp_least_squares import (
    SENSITIVITY as LS_SENSITIVITY,
)
from ecos_flower.applications.dp_least_squares import (
    perturb,
    sufficient_statistics,
)
from ecos_flower.applications.finetune import calibrate_noise, make_private_head
from ecos_flower.applications.linear_head import normalized_with_bias
from ecos_flower.ecos import coverage_scores, score_sensitivity
from ecos_flower.privacy.gaussian import (
    GaussianMechanism,
    analytic_gaussian_epsilon,
    analytic_gaussian_sigma,
)

ALPHA = 0.05
EPSILON = 1.0
DELTA = 1e-5
UNDER_NOISE = 4.0  # the power check divides sigma by this
# Trials of the fast (CI) audits; benchmarks/audit_privacy.py passes larger counts.
FAST_CALIBRATION = 50_000
FAST_EVALUATION = 200_000
FAST_END_TO_END = 1_500
CHUNK = 100_000  # releases per vectorised noise draw (memory: CHUNK x release size floats)


# ----------------------------------------------------------------------------- estimator
def clopper_pearson(
    hits: np.ndarray | int, n: int, one_sided_alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """One-sided Clopper-Pearson (lower, upper) bounds on a binomial probability, each holding
    with probability >= 1 - one_sided_alpha."""
    hits = np.asarray(hits, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        lower = np.where(hits > 0, beta.ppf(one_sided_alpha, hits, n - hits + 1), 0.0)
        upper = np.where(hits < n, beta.ppf(1 - one_sided_alpha, hits + 1, n - hits), 1.0)
    return lower, upper


def _log_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """log(numerator / denominator) with -inf where the numerator is <= 0 (no evidence)."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log(np.maximum(numerator, 0.0)) - np.log(denominator)
    return np.where(numerator > 0, out, -np.inf)


def epsilon_bounds(
    hits_d: np.ndarray | int,
    n_d: int,
    hits_d2: np.ndarray | int,
    n_d2: int,
    delta: float = 0.0,
    alpha: float = ALPHA,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower bound, point estimate, upper bound) of log((P_D(E) - delta) / P_D'(E)) from hits of
    E in n_d releases on D and n_d2 on D'. The lower bound holds with probability >= 1 - alpha
    (alpha / 2 on each probability); the upper one is the mirror image (a loose point of
    reference, not a bound on the mechanism's epsilon, which only an optimal event reaches)."""
    lo_d, hi_d = clopper_pearson(hits_d, n_d, alpha / 2)
    lo_d2, hi_d2 = clopper_pearson(hits_d2, n_d2, alpha / 2)
    p_d = np.asarray(hits_d, dtype=np.float64) / n_d
    p_d2 = np.asarray(hits_d2, dtype=np.float64) / n_d2
    lower = _log_ratio(lo_d - delta, hi_d2)
    point = _log_ratio(p_d - delta, p_d2)
    upper = _log_ratio(hi_d - delta, lo_d2)
    return lower, point, upper


@dataclass(frozen=True)
class Audit:
    """The outcome of one audit (max over the two directions of the event)."""

    lower: float  # lower confidence bound on epsilon (level 1 - ALPHA)
    point: float  # point estimate for the same event
    upper: float  # the mirror-image bound for the same event
    direction: str  # the event and which probability is the numerator
    threshold: float
    hits: tuple[int, int]  # (hits on the numerator side, hits on the denominator side)
    trials: tuple[int, int]


def _count_above(samples: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    ordered = np.sort(samples)
    return len(ordered) - np.searchsorted(ordered, thresholds, side="right")


def _one_direction(
    num_calib: np.ndarray | None,
    den_calib: np.ndarray | None,
    num_eval: np.ndarray,
    den_eval: np.ndarray,
    delta: float,
    alpha: float,
    threshold: float | None,
) -> tuple[float, float, float, float, int, int]:
    """Event {T > t} with P_num - delta over P_den; t from the calibration batch (maximising the
    calibration lower bound) unless given a priori."""
    if threshold is None:
        pooled = np.concatenate([num_calib, den_calib])
        candidates = np.unique(np.quantile(pooled, np.linspace(0.0, 1.0, 801)[1:-1]))
        lower, _, _ = epsilon_bounds(
            _count_above(num_calib, candidates),
            len(num_calib),
            _count_above(den_calib, candidates),
            len(den_calib),
            delta,
            alpha,
        )
        threshold = float(candidates[int(np.argmax(lower))])
    hits_num = int(np.count_nonzero(num_eval > threshold))
    hits_den = int(np.count_nonzero(den_eval > threshold))
    lower, point, upper = epsilon_bounds(
        hits_num, len(num_eval), hits_den, len(den_eval), delta, alpha
    )
    return float(lower), float(point), float(upper), threshold, hits_num, hits_den


Event = tuple[str, str, float]  # (tail ">" or "<", ratio "D/D'" or "D'/D", threshold)
HYPOTHESES = ((">", "D/D'"), ("<", "D'/D"), ("<", "D/D'"), (">", "D'/D"))


def audit_statistic(
    eval_d: np.ndarray,
    eval_d2: np.ndarray,
    delta: float,
    *,
    calib_d: np.ndarray | None = None,
    calib_d2: np.ndarray | None = None,
    events: list[Event] | None = None,
    alpha: float = ALPHA,
) -> Audit:
    """Audit a scalar statistic T of the releases on D (`eval_d`) and D' (`eval_d2`).

    Without `events`, all four events {T > t} / {T < t} x (D over D', D' over D) are tried, each
    threshold chosen on the calibration batches; with `events`, only those (fixed a priori). The
    alpha is split evenly over the events tried (Bonferroni), so the best lower bound returned is
    a lower confidence bound at level 1 - alpha."""
    eval_d = np.asarray(eval_d, dtype=np.float64)
    eval_d2 = np.asarray(eval_d2, dtype=np.float64)
    if events is None:
        if calib_d is None or calib_d2 is None:
            raise ValueError("give calibration batches or a priori events")
        tried: list[tuple[str, str, float | None]] = [(*h, None) for h in HYPOTHESES]
        calib = (np.asarray(calib_d, dtype=np.float64), np.asarray(calib_d2, dtype=np.float64))
    else:
        tried, calib = list(events), (None, None)
    best = None
    for tail, ratio, threshold in tried:
        sign = 1.0 if tail == ">" else -1.0
        samples = [eval_d, eval_d2] if ratio == "D/D'" else [eval_d2, eval_d]
        calibration = list(calib) if ratio == "D/D'" else [calib[1], calib[0]]
        calibration = [None if c is None else sign * c for c in calibration]
        lower, point, upper, t, hits_num, hits_den = _one_direction(
            calibration[0],
            calibration[1],
            sign * samples[0],
            sign * samples[1],
            delta,
            alpha / len(tried),
            None if threshold is None else sign * threshold,
        )
        audit = Audit(
            lower, point, upper, f"{{T {tail} t}}: {ratio}", sign * t,
            (hits_num, hits_den), (len(samples[0]), len(samples[1])),
        )  # fmt: skip
        if best is None or audit.lower > best.lower:
            best = audit
    return best


# ----------------------------------------------------------------------------- Gaussian audits
@dataclass(frozen=True)
class GaussianCase:
    """A Gaussian mechanism's exact statistic on D and D' (flattened) and its calibration."""

    name: str
    exact_d: np.ndarray
    exact_d2: np.ndarray
    sensitivity: float  # the stated L2 sensitivity the noise is calibrated to
    sigma: float
    charged_epsilon: float  # tight epsilon of this sigma at DELTA (what the release may cost)
    requested_epsilon: float

    @property
    def direction(self) -> np.ndarray:
        diff = self.exact_d - self.exact_d2
        norm = float(np.linalg.norm(diff))
        if norm == 0:
            raise AssertionError(f"{self.name}: D and D' give the same statistic, no audit")
        return diff / norm

    @property
    def shift(self) -> float:
        return float(np.linalg.norm(self.exact_d - self.exact_d2))


def projected_releases(
    exact: np.ndarray, base: np.ndarray, unit: np.ndarray, sigma: float, trials: int, seed: int
) -> np.ndarray:
    """T = <exact + N(0, sigma^2 I) - base, unit> for `trials` releases, noise drawn in chunks of
    whole release vectors (what the mechanism adds), projected on the D - D' direction."""
    rng = np.random.default_rng(seed)
    out = np.empty(trials)
    offset = float((exact - base) @ unit)
    for start in range(0, trials, CHUNK):
        size = min(CHUNK, trials - start)
        noise = rng.normal(0.0, sigma, size=(size, exact.size))
        out[start : start + size] = noise @ unit + offset
    return out


def gaussian_audit(
    case: GaussianCase,
    *,
    sigma: float | None = None,
    calibration: int = FAST_CALIBRATION,
    evaluation: int = FAST_EVALUATION,
    seed: int = 0,
) -> Audit:
    """The vectorised audit of `case` (at its own sigma unless another is given)."""
    sigma = case.sigma if sigma is None else sigma
    unit = case.direction
    base = case.exact_d2

    def draw(exact: np.ndarray, trials: int, stream: int) -> np.ndarray:
        return projected_releases(exact, base, unit, sigma, trials, seed * 10 + stream)

    return audit_statistic(
        draw(case.exact_d, evaluation, 1),
        draw(case.exact_d2, evaluation, 2),
        DELTA,
        calib_d=draw(case.exact_d, calibration, 3),
        calib_d2=draw(case.exact_d2, calibration, 4),
    )


def end_to_end_audit(
    release: Callable[[bool, np.random.Generator], np.ndarray],
    case: GaussianCase,
    *,
    trials: int = FAST_END_TO_END,
    seed: int = 0,
) -> Audit:
    """Audit through the real release function: `release(on_d, rng)` returns one flattened
    release (recomputing the statistic from the data every time)."""
    unit = case.direction
    base = case.exact_d2

    def draw(on_d: bool, count: int, stream: int) -> np.ndarray:
        rng = np.random.default_rng([seed, stream])
        return np.array([(release(on_d, rng) - base) @ unit for _ in range(count)])

    calibration = max(trials // 2, 1)
    return audit_statistic(
        draw(True, trials, 1),
        draw(False, trials, 2),
        DELTA,
        calib_d=draw(True, calibration, 3),
        calib_d2=draw(False, calibration, 4),
    )


def _case(name, exact_d, exact_d2, sensitivity, requested_epsilon=EPSILON, sigma=None):
    exact_d = np.asarray(exact_d, dtype=np.float64).ravel()
    exact_d2 = np.asarray(exact_d2, dtype=np.float64).ravel()
    if sigma is None:
        sigma = analytic_gaussian_sigma(requested_epsilon, DELTA, sensitivity)
    charged = analytic_gaussian_epsilon(sigma, DELTA, sensitivity)
    return GaussianCase(name, exact_d, exact_d2, sensitivity, sigma, charged, requested_epsilon)


def assert_within_charge(case: GaussianCase, audit: Audit) -> None:
    """The mechanism leaks no more than charged, and its statistic moved by <= the sensitivity."""
    assert case.shift <= case.sensitivity * (1 + 1e-9), (
        f"{case.name}: one removal moved the released statistic by {case.shift:.6g}, more than "
        f"the stated L2 sensitivity {case.sensitivity:.6g}"
    )
    assert audit.lower <= case.charged_epsilon, (
        f"{case.name}: empirical epsilon >= {audit.lower:.3f} (point {audit.point:.3f}, event "
        f"{audit.direction} at t={audit.threshold:.4g}, hits {audit.hits} of {audit.trials}) "
        f"exceeds the charged epsilon {case.charged_epsilon:.3f} at delta={DELTA:g}"
    )


def assert_detected(case: GaussianCase, audit: Audit) -> None:
    """The audit has power: it catches the under-noised mechanism."""
    assert audit.lower > case.charged_epsilon, (
        f"{case.name}: the audit did not catch sigma / {UNDER_NOISE:g} (lower bound "
        f"{audit.lower:.3f} <= charged {case.charged_epsilon:.3f}): it has no power"
    )


# ----------------------------------------------------------------------------- ECOS scenarios
def ecos_nearest_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centroids, D, D'): five populated cells, the target alone (and far) in the sixth."""
    rng = np.random.default_rng(11)
    centroids = np.eye(6, dtype=np.float32)
    owners = np.repeat(np.arange(5), 8)
    others = centroids[owners] + rng.normal(0.0, 0.05, size=(len(owners), 6)).astype(np.float32)
    target = 1.2 * centroids[5:6]
    return centroids, np.concatenate([others, target]), others


def ecos_radius_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centroids, D, D'): the target lies within the radius of 3 (= m) empty centroids."""
    rng = np.random.default_rng(12)
    centroids = np.eye(6, dtype=np.float32)
    owners = np.repeat(np.arange(3, 6), 8)
    others = centroids[owners] + rng.normal(0.0, 0.05, size=(len(owners), 6)).astype(np.float32)
    target = np.zeros((1, 6), dtype=np.float32)
    target[0, :3] = 1.0 / math.sqrt(3.0)  # distance 0.92 to e0, e1, e2; 1.41 to the others
    return centroids, np.concatenate([others, target]), others


ECOS_RADIUS = {"mode": "radius", "radius": 1.0, "max_per_sample": 3}


def ecos_case(mode: str) -> tuple[GaussianCase, Callable]:
    data, kwargs = (
        (ecos_nearest_data(), {"mode": "nearest"})
        if mode == "nearest"
        else (ecos_radius_data(), ECOS_RADIUS)
    )
    centroids, d, d2 = data
    sensitivity = score_sensitivity(kwargs["mode"], kwargs.get("max_per_sample", 1))
    case = _case(
        f"ECOS {mode}",
        coverage_scores(d, centroids, **kwargs),
        coverage_scores(d2, centroids, **kwargs),
        sensitivity,
    )
    mechanism = GaussianMechanism.calibrated(EPSILON, DELTA, sensitivity)

    def release(on_d: bool, rng: np.random.Generator, sigma: float | None = None) -> np.ndarray:
        scores = coverage_scores(d if on_d else d2, centroids, **kwargs)
        if sigma is None:
            return mechanism.release(scores, rng)
        return scores + rng.normal(0.0, sigma, size=scores.shape)

    return case, release


# ----------------------------------------------------------------------------- kNN scenarios
KNN_CLASSES = 3
# Integer-lattice private set (exact distance ties) found by a random search to break the
# argpartition tie-breaking of knn_votes before neighbour orders were made stable.
TIE_FEATURES = np.array(
    [[-1, 3], [-3, 2], [1, -3], [1, -3], [1, 3], [1, 3], [1, 2], [3, 1], [-3, 1], [2, 0],
     [2, 3], [-2, -2], [-3, -2], [-3, 1]], dtype=np.float64,
)  # fmt: skip
TIE_LABELS = np.array([1, 1, 1, 2, 0, 0, 2, 0, 1, 1, 1, 2, 2, 2], dtype=np.int64)
TIE_QUERIES = np.array([[0, 0], [-2, 1], [1, -2]], dtype=np.float64)


def knn_data(mode: str, ties: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """(private features, labels, queries, k, target index); D' drops the target.

    query: the target (label 0) is the nearest private sample of every query; the others carry
    labels 1/2, so in every histogram one vote moves from class 0 (norm sqrt(2 n) in all).
    capped: the target gives its label to its k nearest queries (norm sqrt(k)).
    ties (integer coordinates, so distances tie exactly): query mode uses TIE_*, k = 9, target
    row 6, where the k-th nearest distance of every query is shared by several rows, so which
    rows vote is decided by tie-breaking (an unstable one, like np.argpartition on row
    positions that the removal shifts, moved the votes by sqrt(10) > sqrt(6)); capped mode puts
    12 queries on the lattice circle of radius 5 around the target (k = 2 of 12 tied)."""
    ring = np.array(
        [[3, 4], [4, 3], [5, 0], [4, -3], [3, -4], [0, -5],
         [-3, -4], [-4, -3], [-5, 0], [-4, 3], [-3, 4], [0, 5]], dtype=np.float64,
    )  # fmt: skip
    if mode == "query" and ties:
        return TIE_FEATURES.copy(), TIE_LABELS.copy(), TIE_QUERIES.copy(), 9, 6
    if mode == "query":
        k = 3
        rng = np.random.default_rng(21)
        queries = rng.normal(0.0, 0.05, size=(4, 2))
        others = rng.normal(0.0, 1.0, size=(20, 2)) + np.array([3.0, 0.0])
        other_labels = rng.integers(1, KNN_CLASSES, size=len(others))
        target = np.zeros((1, 2))
    else:
        k = 2
        if ties:
            queries = ring.copy()
            target = np.zeros((1, 2))
            others = np.array([[10.0, 0.0], [0.0, 10.0], [-10.0, 0.0], [5.0, 5.0], [1.0, 2.0]])
        else:
            rng = np.random.default_rng(22)
            queries = rng.normal(0.0, 1.0, size=(6, 2))
            others = rng.normal(0.0, 1.0, size=(20, 2))
            target = queries[:1] + 0.01
        other_labels = np.arange(len(others)) % (KNN_CLASSES - 1) + 1
    half = len(others) // 2
    features = np.concatenate([others[:half], target, others[half:]])
    labels = np.concatenate([other_labels[:half], [0], other_labels[half:]]).astype(np.int64)
    return features, labels, queries, k, half


def knn_case(mode: str, ties: bool) -> tuple[GaussianCase, Callable]:
    features, labels, queries, k, target = knn_data(mode, ties)
    keep = np.arange(len(features)) != target
    sensitivity = knn_sensitivity(mode, k, len(queries))

    def votes(on_d: bool) -> np.ndarray:
        f, y = (features, labels) if on_d else (features[keep], labels[keep])
        return knn_votes(f, y, queries, k, KNN_CLASSES, mode)

    case = _case(f"kNN {mode}{' (ties)' if ties else ''}", votes(True), votes(False), sensitivity)

    def release(on_d: bool, rng: np.random.Generator, sigma: float | None = None) -> np.ndarray:
        return noisy_votes(votes(on_d), case.sigma if sigma is None else sigma, rng).ravel()

    return case, release


# ----------------------------------------------------------------------------- DP heads
HEAD_SCALE = 1.0


def head_data(dim: int = 4, per_class: int = 4, classes: int = 2, big: float = 1e3):
    """(features, labels, target index) for the DP head audits: others on +-e_j (j >= 1) with
    balanced labels, the target far out on e_0 (a direction no other sample uses), label 0.

    Least squares: the target's z = normalized [x, 1] is almost e_0, so its contribution to the
    released (upper triangle of G, R) has norm ~sqrt(2), the stated sensitivity. DP-SGD from a
    zero head: the target's clipped gradient is orthogonal to the others' (which cancel)."""
    rows, labels = [], []
    for j in range(per_class * classes):
        axis = 1 + (j // 2) % (dim - 1)
        row = np.zeros(dim)
        row[axis] = 1.0 if j % 2 == 0 else -1.0
        rows.append(row)
        labels.append(j % classes)
    target = np.zeros(dim)
    target[0] = big
    features = torch.tensor(np.array([target, *rows]), dtype=torch.float32)
    return features, torch.tensor([0, *labels], dtype=torch.long), 0


def _upper(matrix: torch.Tensor) -> np.ndarray:
    index = torch.triu_indices(len(matrix), len(matrix))
    return matrix[index[0], index[1]].numpy()


def least_squares_case() -> GaussianCase:
    features, labels, target = head_data()
    keep = torch.arange(len(features)) != target

    def exact(f: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        stats = sufficient_statistics(normalized_with_bias(f, HEAD_SCALE), y, 2)
        return np.concatenate([_upper(stats.gram), stats.cross.numpy().ravel()])

    z = calibrate_noise(EPSILON, DELTA, 1)  # what dp_least_squares_head does
    return _case(
        "DP least squares",
        exact(features, labels),
        exact(features[keep], labels[keep]),
        LS_SENSITIVITY,
        sigma=z * LS_SENSITIVITY,
    )


def clipped_gradient_sum(features: torch.Tensor, labels: torch.Tensor, clip: float) -> np.ndarray:
    """Opacus' clipped per-sample gradient sum of a zero head (one step, no noise)."""
    head = nn.Linear(features.shape[1], int(labels.max()) + 1)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    _, module, optimiser, loader = make_private_head(
        head, features, labels, noise_multiplier=0.0, max_grad_norm=clip, learning_rate=1.0, seed=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for x, y in loader:
            optimiser.zero_grad()
            nn.functional.cross_entropy(module(x), y).backward()
            optimiser.step()
    # Opacus releases (sum + noise) / batch size; scale back to the sum the noise is added to.
    grads = [p.grad.detach().double().flatten() for p in module.parameters()]
    return torch.cat(grads).numpy() * len(features)


def dpsgd_sum_case(clip: float = 1.0) -> GaussianCase:
    """One full-batch DP-SGD step as the ledger charges it: clipped sum + N(0, (z clip)^2)."""
    features, labels, target = head_data()
    keep = torch.arange(len(features)) != target
    z = calibrate_noise(EPSILON, DELTA, 1)  # what dp_finetune_head does for steps=1
    return _case(
        "DP-SGD gradient sum",
        clipped_gradient_sum(features, labels, clip),
        clipped_gradient_sum(features[keep], labels[keep], clip),
        clip,
        sigma=z * clip,
    )


def head_weights(result) -> np.ndarray:
    head = result.head
    return torch.cat([head.weight.detach().flatten(), head.bias.detach().flatten()]).double()


# ============================================================================= tests
@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The audits run thousands of tiny torch ops: one intra-op thread (restored afterwards)
    avoids thread wake-ups costing more than the ops on a busy 2-core runner."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("mode", ["nearest", "radius"])
def test_ecos_scores_vectorised_audit(mode):
    case, _ = ecos_case(mode)
    assert case.shift == pytest.approx(case.sensitivity, rel=1e-9)  # the pair is worst case
    audit = gaussian_audit(case)
    assert_within_charge(case, audit)
    # The audit is close to tight: an optimal event of the tight Gaussian reaches the charge.
    assert audit.lower > 0.5 * case.charged_epsilon
    assert_detected(case, gaussian_audit(case, sigma=case.sigma / UNDER_NOISE))


@pytest.mark.parametrize("mode", ["nearest", "radius"])
def test_ecos_scores_end_to_end_audit(mode):
    case, release = ecos_case(mode)
    audit = end_to_end_audit(release, case)
    assert_within_charge(case, audit)
    under = end_to_end_audit(lambda on_d, rng: release(on_d, rng, case.sigma / UNDER_NOISE), case)
    assert_detected(case, under)


@pytest.mark.parametrize("mode", ["query", "capped"])
def test_knn_votes_vectorised_audit(mode):
    case, _ = knn_case(mode, ties=False)
    assert case.shift == pytest.approx(case.sensitivity, rel=1e-9)
    audit = gaussian_audit(case)
    assert_within_charge(case, audit)
    assert audit.lower > 0.5 * case.charged_epsilon
    assert_detected(case, gaussian_audit(case, sigma=case.sigma / UNDER_NOISE))


@pytest.mark.parametrize("mode", ["query", "capped"])
def test_knn_votes_end_to_end_audit(mode):
    case, release = knn_case(mode, ties=False)
    audit = end_to_end_audit(release, case, trials=FAST_END_TO_END // 3)
    assert_within_charge(case, audit)
    under = end_to_end_audit(
        lambda on_d, rng: release(on_d, rng, case.sigma / UNDER_NOISE),
        case,
        trials=FAST_END_TO_END // 3,
    )
    assert_detected(case, under)


@pytest.mark.parametrize("mode", ["query", "capped"])
def test_knn_votes_with_exact_distance_ties_audit(mode):
    """Exact ties: removing one sample must still move the votes by <= the sensitivity (stable
    neighbour order), and the release must not leak more than charged."""
    case, _ = knn_case(mode, ties=True)
    audit = gaussian_audit(case)
    assert_within_charge(case, audit)


def test_dp_least_squares_statistics_vectorised_audit():
    case = least_squares_case()
    assert case.shift == pytest.approx(case.sensitivity, rel=1e-5)  # target z ~ e_0
    audit = gaussian_audit(case)
    assert_within_charge(case, audit)
    assert audit.lower > 0.5 * case.charged_epsilon
    assert_detected(case, gaussian_audit(case, sigma=case.sigma / UNDER_NOISE))


def _ls_release(features, labels, sigma, generator) -> np.ndarray:
    """The module's own release path: sufficient_statistics, then perturb (the one Gaussian
    release of dp_least_squares_head), flattened as (upper triangle of G~, R~)."""
    stats = sufficient_statistics(normalized_with_bias(features, HEAD_SCALE), labels, 2)
    noisy = perturb(stats, sigma, generator)
    return np.concatenate([_upper(noisy.gram), noisy.cross.numpy().ravel()])


def test_dp_least_squares_release_end_to_end_audit():
    """sufficient_statistics + perturb from the data at every release, torch generators seeded
    per batch; projected on the D - D' direction like the vectorised audit."""
    case = least_squares_case()
    features, labels, target = head_data()
    keep = torch.arange(len(features)) != target
    data = {True: (features, labels), False: (features[keep], labels[keep])}

    def audit(sigma: float, seed: int) -> Audit:
        generators: dict[bool, torch.Generator] = {}

        def release(on_d: bool, rng: np.random.Generator) -> np.ndarray:
            if on_d not in generators:  # one torch stream per dataset, seeded from the audit's
                generators[on_d] = torch.Generator().manual_seed(int(rng.integers(2**62)))
            return _ls_release(*data[on_d], sigma, generators[on_d])

        return end_to_end_audit(release, case, trials=1_000, seed=seed)

    assert_within_charge(case, audit(case.sigma, 0))
    assert_detected(case, audit(case.sigma / UNDER_NOISE, 1))


def _ls_head_statistic(features, labels, z, seed):
    """T = w[0, 0] - w[1, 0] of the released head: the target's feature votes for its class. A
    strong ridge (post-processing: any value is as private) keeps T's spread on D', where no
    sample uses feature 0 and T is noise over the ridge, comparable to its shift on D."""
    result = dp_least_squares_head(
        features, labels, 2, epsilon=EPSILON, delta=DELTA, scale=HEAD_SCALE,
        ridge_multiple=10.0, noise_multiplier=z, seed=seed,
    )  # fmt: skip
    weight = result.head.weight.detach().double()
    return float(weight[0, 0] - weight[1, 0])


def _calibrated_audit(draw: Callable[[bool, int, int], np.ndarray], trials: int) -> Audit:
    """Calibration batch of trials // 2 per side, then `trials` per side; `draw(on_d, count,
    stream)` returns `count` values of the statistic."""
    calibration = max(trials // 2, 1)
    return audit_statistic(
        draw(True, trials, 1),
        draw(False, trials, 2),
        DELTA,
        calib_d=draw(True, calibration, 3),
        calib_d2=draw(False, calibration, 4),
    )


def ls_head_audit(noise_factor: float = 1.0, trials: int = 100, seed: int = 0):
    """(audit, charged epsilon) of dp_least_squares_head, noise multiplier z * noise_factor."""
    features, labels, target = head_data()
    keep = torch.arange(len(features)) != target
    z = calibrate_noise(EPSILON, DELTA, 1)
    data = {True: (features, labels), False: (features[keep], labels[keep])}

    def draw(on_d: bool, count: int, stream: int) -> np.ndarray:
        first = 1_000_000 * seed + 100_000 * stream
        return np.array(
            [_ls_head_statistic(*data[on_d], z * noise_factor, first + i) for i in range(count)]
        )

    return _calibrated_audit(draw, trials), analytic_gaussian_epsilon(z, DELTA)


def test_dp_least_squares_head_end_to_end_audit():
    """Through dp_least_squares_head: within the charge at its noise, and z / 100 is caught."""
    audit, charged = ls_head_audit(1.0, 150)
    assert audit.lower <= charged, f"DP least squares head leaks: {audit}"
    under, _ = ls_head_audit(0.01, 40, seed=1)
    assert under.lower > charged, f"no power on z/100: {under}"


def test_dpsgd_gradient_sum_vectorised_audit():
    case = dpsgd_sum_case()
    # The target's gradient is clipped to norm 1 and orthogonal to the others' (which cancel).
    assert case.shift == pytest.approx(case.sensitivity, rel=1e-6)
    audit = gaussian_audit(case)
    assert_within_charge(case, audit)
    assert audit.lower > 0.5 * case.charged_epsilon
    assert_detected(case, gaussian_audit(case, sigma=case.sigma / UNDER_NOISE))


def _finetune_weights(features, labels, z, seed, clip=1.0, classes=2):
    result = dp_finetune_head(
        features, labels, classes, epsilon=EPSILON, delta=DELTA, steps=1,
        max_grad_norm=clip, learning_rate=1.0, noise_multiplier=z, seed=seed,
    )  # fmt: skip
    return head_weights(result).numpy(), result


def finetune_projection_audit(noise_factor: float = 1.0, trials: int = 100, seed: int = 0):
    """(audit, charged epsilon) of dp_finetune_head (one full-batch step from zero, Opacus) with
    noise multiplier z * noise_factor: T = -<w, u>, u the target's clipped gradient direction
    (w = -(clipped sum + noise) / |D| after one step of learning rate 1)."""
    features, labels, target = head_data()
    keep = torch.arange(len(features)) != target
    z = calibrate_noise(EPSILON, DELTA, 1)
    unit = dpsgd_sum_case().direction
    data = {True: (features, labels), False: (features[keep], labels[keep])}

    def draw(on_d: bool, count: int, stream: int) -> np.ndarray:
        first = 1_000_000 * seed + 100_000 * stream
        return np.array(
            [
                -_finetune_weights(*data[on_d], z * noise_factor, first + i)[0] @ unit
                for i in range(count)
            ]
        )

    return _calibrated_audit(draw, trials), analytic_gaussian_epsilon(z, DELTA)


def test_dp_finetune_head_end_to_end_audit():
    """Through dp_finetune_head: within the charge at its noise, and z / 50 is caught."""
    audit, charged = finetune_projection_audit(1.0, 150)
    assert audit.lower <= charged, f"dp_finetune_head leaks: {audit}"
    under, _ = finetune_projection_audit(0.02, 40, seed=1)
    assert under.lower > charged, f"no power on z/50: {under}"


def finetune_size_audit(trials: int = 25, dim: int = 10, classes: int = 10, seed: int = 0):
    """(audit, charged epsilon, threshold) of the event "||w||^2 of the released head above
    (or below) the geometric mean of its expectations on D and D'", fixed a priori, for
    dp_finetune_head with one step from zero on |D| = 5 samples and p = (dim + 1) classes."""
    features, labels, target = head_data(dim=dim, per_class=1, classes=4)
    n = len(features)
    keep = torch.arange(n) != target
    z = calibrate_noise(EPSILON, DELTA, 1)
    params = (dim + 1) * classes
    expected_d = (params * z**2 + 1.0) / n**2
    expected_d2 = params * z**2 / (n - 1) ** 2
    t = math.sqrt(expected_d * expected_d2)

    def norms(f, y, stream):
        first = 1_000_000 * seed + stream
        weights = [_finetune_weights(f, y, z, first + i, classes=classes)[0] for i in range(trials)]
        return np.array([float(np.sum(w**2)) for w in weights])

    audit = audit_statistic(
        norms(features, labels, 0),
        norms(features[keep], labels[keep], 100_000),
        DELTA,
        events=[(">", "D'/D", t), ("<", "D/D'", t)],
    )
    return audit, analytic_gaussian_epsilon(z, DELTA), t


def test_dp_finetune_head_weights_hide_dataset_size():
    """Add/remove adjacency: the released head must not reveal |D|. Opacus' DP-SGD releases
    (clipped sum + noise) / batch size with the exact |D| as batch size, so the noise in every
    one of the p weights has std z clip lr / |D|, and ||w||^2 tells |D| from |D| - 1 when p is
    large next to |D|^2 (here p = 110, |D| = 5)."""
    audit, charged, t = finetune_size_audit()
    assert audit.lower <= charged, (
        f"dp_finetune_head reveals the dataset size: empirical epsilon >= {audit.lower:.2f} "
        f"(event {audit.direction} ||w||^2 vs {t:.3g}, hits {audit.hits} of {audit.trials}) "
        f"where {charged:.2f} is charged: the noisy gradient is divided by the exact |D|"
    )


def test_estimator_is_conservative_on_a_known_gaussian():
    """The estimator itself: on N(1, sigma^2) vs N(0, sigma^2) with sigma calibrated to (1, 1e-5)
    the lower bound stays below 1 over many seeds, and the point estimate of a fixed event
    matches its exact log ratio."""
    sigma = analytic_gaussian_sigma(EPSILON, DELTA, 1.0)
    lowers = []
    for seed in range(10):
        rng = np.random.default_rng(seed)
        a = rng.normal(1.0, sigma, 200_000)
        b = rng.normal(0.0, sigma, 200_000)
        c = rng.normal(1.0, sigma, 50_000)
        d = rng.normal(0.0, sigma, 50_000)
        lowers.append(audit_statistic(a, b, DELTA, calib_d=c, calib_d2=d).lower)
    assert max(lowers) <= EPSILON
    from scipy.stats import norm

    t = 2.0 * sigma
    exact = math.log((norm.sf(t, loc=1.0, scale=sigma) - DELTA) / norm.sf(t, scale=sigma))
    rng = np.random.default_rng(99)
    audit = audit_statistic(
        rng.normal(1.0, sigma, 400_000), rng.normal(0.0, sigma, 400_000), DELTA,
        events=[(">", "D/D'", t)],
    )  # fmt: skip
    assert audit.direction == "{T > t}: D/D'"
    assert audit.lower < exact < audit.upper
    assert audit.point == pytest.approx(exact, abs=0.05)


@pytest.mark.parametrize(
    ("hits_d", "n_d", "hits_d2", "n_d2"),
    [(900, 1000, 100, 1000), (50, 200, 10, 200), (7, 30, 0, 30), (0, 10, 5, 10)],
)
def test_estimator_agrees_with_the_shared_helper_at_delta_zero(hits_d, n_d, hits_d2, n_d2):
    """Without delta this file's bound is tests/privacy_audit_helpers.epsilon_lower_bound (which
    floors at 0); the delta term only ever lowers it."""
    lower, _, _ = epsilon_bounds(hits_d, n_d, hits_d2, n_d2, 0.0, ALPHA)
    shared = epsilon_lower_bound(hits_d, n_d, hits_d2, n_d2, alpha=ALPHA)
    assert max(float(lower), 0.0) == pytest.approx(shared, rel=1e-9, abs=1e-12)
    with_delta, _, _ = epsilon_bounds(hits_d, n_d, hits_d2, n_d2, 1e-3, ALPHA)
    assert with_delta <= lower
