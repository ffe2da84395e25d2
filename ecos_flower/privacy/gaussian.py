"""The Gaussian mechanism and its calibration: analytic (Balle & Wang, ICML 2018) and classic.

The analytic calibration finds the smallest sigma for which adding N(0, sigma^2) to a query of
L2 sensitivity `sensitivity` is (epsilon, delta)-DP, using the exact privacy profile

    delta(eps, sigma) = Phi(D/(2 sigma) - eps sigma/D) - e^eps Phi(-D/(2 sigma) - eps sigma/D),

(D the sensitivity, Phi the standard normal CDF), which is tight for every epsilon > 0; the classic
bound sqrt(2 ln(1.25/delta)) D / eps is valid only for epsilon < 1 and is looser (~23 % at eps = 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import log_ndtr

_BISECTION_STEPS = 200


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def _check_delta(delta: float) -> float:
    delta = float(delta)
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta must lie in (0, 1), got {delta!r}")
    return delta


def gaussian_delta(epsilon: float, sigma: float, sensitivity: float = 1.0) -> float:
    """Exact delta of the Gaussian mechanism with noise `sigma` at privacy level `epsilon`.

    Computed in log space as Phi(a) * (1 - exp(eps + log Phi(b) - log Phi(a))) so it keeps full
    relative precision even when delta is tiny (no cancellation of two nearly equal CDFs).
    """
    epsilon = float(epsilon)
    if not math.isfinite(epsilon) or epsilon < 0:
        raise ValueError(f"epsilon must be a non-negative finite number, got {epsilon!r}")
    sigma = _check_positive("sigma", sigma)
    sensitivity = _check_positive("sensitivity", sensitivity)
    ratio = sensitivity / sigma
    a = ratio / 2.0 - epsilon / ratio
    b = -ratio / 2.0 - epsilon / ratio
    log_pa = float(log_ndtr(a))
    log_pb = float(log_ndtr(b))
    exponent = epsilon + log_pb - log_pa
    # exponent <= 0 always holds mathematically; clamp tiny round-off so delta stays >= 0.
    return float(math.exp(log_pa) * -math.expm1(min(exponent, 0.0)))


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """Smallest sigma making the Gaussian mechanism (epsilon, delta)-DP (analytic calibration).

    Bisection (in log sigma) on the exact, strictly decreasing delta(eps, sigma); runs until the
    bracket stops shrinking, so sigma is accurate to a few ulps.
    """
    epsilon = _check_positive("epsilon", epsilon)
    delta = _check_delta(delta)
    sensitivity = _check_positive("sensitivity", sensitivity)
    # Work with sensitivity 1 and rescale: sigma is linear in the sensitivity.
    lo, hi = 1e-3, 1.0
    while gaussian_delta(epsilon, lo) <= delta:  # need delta(lo) > target
        lo /= 2.0
        if lo < 1e-300:
            raise ValueError("could not bracket sigma from below")
    while gaussian_delta(epsilon, hi) > delta:  # need delta(hi) <= target
        hi *= 2.0
        if hi > 1e300:
            raise ValueError("could not bracket sigma from above")
    for _ in range(_BISECTION_STEPS):
        mid = math.sqrt(lo * hi)
        if mid <= lo or mid >= hi:
            break
        if gaussian_delta(epsilon, mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi * sensitivity


def analytic_gaussian_epsilon(sigma: float, delta: float, sensitivity: float = 1.0) -> float:
    """Smallest epsilon at which noise `sigma` is (epsilon, delta)-DP (inverse calibration)."""
    sigma = _check_positive("sigma", sigma)
    delta = _check_delta(delta)
    sensitivity = _check_positive("sensitivity", sensitivity)
    if gaussian_delta(0.0, sigma, sensitivity) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gaussian_delta(hi, sigma, sensitivity) > delta:
        lo, hi = hi, hi * 2.0
        if hi > 1e300:
            raise ValueError("could not bracket epsilon from above")
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if gaussian_delta(mid, sigma, sensitivity) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def classic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """Textbook sqrt(2 ln(1.25/delta)) * sensitivity / epsilon (Dwork & Roth; eps < 1)."""
    epsilon = _check_positive("epsilon", epsilon)
    delta = _check_delta(delta)
    sensitivity = _check_positive("sensitivity", sensitivity)
    return math.sqrt(2.0 * math.log(1.25 / delta)) * sensitivity / epsilon


@dataclass(frozen=True)
class GaussianMechanism:
    """Adds i.i.d. N(0, sigma^2) noise to a vector query of L2 sensitivity `sensitivity`."""

    sensitivity: float
    sigma: float

    def __post_init__(self) -> None:
        _check_positive("sensitivity", self.sensitivity)
        _check_positive("sigma", self.sigma)

    @classmethod
    def calibrated(
        cls, epsilon: float, delta: float, sensitivity: float = 1.0, *, method: str = "analytic"
    ) -> GaussianMechanism:
        """Mechanism for a target (epsilon, delta); `method` "analytic" (default) or "classic"."""
        if method == "analytic":
            sigma = analytic_gaussian_sigma(epsilon, delta, sensitivity)
        elif method == "classic":
            sigma = classic_gaussian_sigma(epsilon, delta, sensitivity)
        else:
            raise ValueError(f"unknown calibration method {method!r}; choose analytic or classic")
        return cls(sensitivity=float(sensitivity), sigma=float(sigma))

    @property
    def noise_multiplier(self) -> float:
        """sigma / sensitivity: what a privacy accountant needs."""
        return self.sigma / self.sensitivity

    def epsilon(self, delta: float) -> float:
        """Tight epsilon of one release at `delta`."""
        return analytic_gaussian_epsilon(self.sigma, delta, self.sensitivity)

    def release(self, vector: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Return `vector` + N(0, sigma^2 I) as float64; `rng` is the caller's seeded generator."""
        values = np.asarray(vector, dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError("the query answer contains non-finite values")
        return values + rng.normal(0.0, self.sigma, size=values.shape)

    def describe(self) -> str:
        """One line stating the mechanism's sensitivity and noise, for logs and reports."""
        return (
            f"Gaussian mechanism: L2 sensitivity {self.sensitivity:g}, sigma {self.sigma:.6g} "
            f"(noise multiplier {self.noise_multiplier:.6g})"
        )
