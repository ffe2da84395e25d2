"""Empirical privacy audits: a lower confidence bound on epsilon from two release experiments.

Run a mechanism n_d times on dataset D and n_d2 times on a neighbour D', count how often an event E
occurs (hits_d, hits_d2). For an epsilon-DP mechanism P_D(E) <= e^epsilon P_D'(E), so

    epsilon >= log(P_D(E) / P_D'(E)) >= log(lower_D / upper_D')

where lower_D and upper_D' are one-sided Clopper-Pearson bounds at level alpha / 2 each: with
probability >= 1 - alpha over the experiments the returned value is below the mechanism's true
epsilon. An audit asserts `epsilon_lower_bound(...) <= charged epsilon`; a value above it proves (at
confidence 1 - alpha) that the mechanism spends more than it charges. Swap D and D' (or use the
complement event) to audit the other direction.
"""

from __future__ import annotations

import math

from scipy import stats


def clopper_pearson(hits: int, n: int, alpha: float) -> tuple[float, float]:
    """One-sided (1 - alpha) Clopper-Pearson bounds (lower, upper) on a binomial proportion."""
    if not (0 <= hits <= n and n > 0):
        raise ValueError(f"need 0 <= hits <= n and n > 0, got hits={hits}, n={n}")
    lower = 0.0 if hits == 0 else float(stats.beta.ppf(alpha, hits, n - hits + 1))
    upper = 1.0 if hits == n else float(stats.beta.ppf(1 - alpha, hits + 1, n - hits))
    return lower, upper


def epsilon_lower_bound(
    hits_d: int, n_d: int, hits_d2: int, n_d2: int, alpha: float = 0.05
) -> float:
    """A (1 - alpha)-confidence lower bound on epsilon from log P_D(E) / P_D'(E) (>= 0)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    lower_d, _ = clopper_pearson(hits_d, n_d, alpha / 2)
    _, upper_d2 = clopper_pearson(hits_d2, n_d2, alpha / 2)
    if lower_d <= 0.0:
        return 0.0
    return max(0.0, math.log(lower_d / upper_d2))


def epsilon_estimate(hits_d: int, n_d: int, hits_d2: int, n_d2: int) -> float:
    """The point estimate log(p_D / p_D') (inf where p_D' = 0), for reports only."""
    p_d, p_d2 = hits_d / n_d, hits_d2 / n_d2
    if p_d == 0:
        return 0.0 if p_d2 == 0 else -math.inf
    return math.inf if p_d2 == 0 else math.log(p_d / p_d2)
