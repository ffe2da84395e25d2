"""Analytic and classic Gaussian mechanism calibration, and the mechanism's noise statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import brentq
from scipy.stats import norm

from ecos_flower.privacy import (
    GaussianMechanism,
    analytic_gaussian_epsilon,
    analytic_gaussian_sigma,
    classic_gaussian_sigma,
    gaussian_delta,
)


def _reference_sigma(eps: float, delta: float) -> float:
    """Independent derivation: root of the Balle-Wang profile with plain norm.cdf and brentq."""

    def profile(sigma: float) -> float:
        a = 1 / (2 * sigma) - eps * sigma
        b = -1 / (2 * sigma) - eps * sigma
        return norm.cdf(a) - math.exp(eps) * norm.cdf(b) - delta

    return brentq(profile, 1e-3, 1e3, xtol=1e-14, rtol=1e-14)


def test_known_value_eps1_delta1e5() -> None:
    sigma = analytic_gaussian_sigma(1.0, 1e-5)
    # Published/derived value ~3.7306 (Balle & Wang 2018); classic bound ~4.8448.
    assert sigma == pytest.approx(3.7306, abs=5e-4)
    assert sigma == pytest.approx(_reference_sigma(1.0, 1e-5), rel=1e-9)
    assert classic_gaussian_sigma(1.0, 1e-5) == pytest.approx(4.8448, abs=5e-4)
    assert abs(gaussian_delta(1.0, sigma) / 1e-5 - 1) < 1e-9
    # ~23 % tighter than the classic calibration at eps = 1.
    assert 1 - sigma / classic_gaussian_sigma(1.0, 1e-5) == pytest.approx(0.23, abs=0.01)


@pytest.mark.parametrize(
    ("eps", "delta"), [(0.1, 1e-5), (0.5, 1e-6), (2.0, 1e-5), (8.0, 1e-3), (0.58, 1e-5)]
)
def test_calibration_hits_target_delta(eps: float, delta: float) -> None:
    sigma = analytic_gaussian_sigma(eps, delta)
    assert abs(gaussian_delta(eps, sigma) / delta - 1) < 1e-9
    assert sigma == pytest.approx(_reference_sigma(eps, delta), rel=1e-8)
    assert analytic_gaussian_epsilon(sigma, delta) == pytest.approx(eps, rel=1e-9)


def test_tiny_delta_is_stable() -> None:
    sigma = analytic_gaussian_sigma(1.0, 1e-15)
    assert math.isfinite(sigma)
    assert abs(gaussian_delta(1.0, sigma) / 1e-15 - 1) < 1e-8


def test_sensitivity_scales_sigma_linearly() -> None:
    assert analytic_gaussian_sigma(1.0, 1e-5, 3.0) == pytest.approx(
        3 * analytic_gaussian_sigma(1.0, 1e-5), rel=1e-12
    )


@settings(max_examples=60, deadline=None)
@given(
    eps=st.floats(0.05, 10.0),
    factor=st.floats(1.05, 4.0),
    log_delta=st.floats(-12.0, -2.0),
)
def test_sigma_decreases_with_epsilon_and_delta(
    eps: float, factor: float, log_delta: float
) -> None:
    delta = 10.0**log_delta
    sigma = analytic_gaussian_sigma(eps, delta)
    assert analytic_gaussian_sigma(eps * factor, delta) < sigma
    assert analytic_gaussian_sigma(eps, min(delta * factor, 0.5)) <= sigma
    # The analytic calibration never needs more noise than the classic one where that is valid.
    if eps < 1:
        assert sigma <= classic_gaussian_sigma(eps, delta)


@settings(max_examples=60, deadline=None)
@given(eps=st.floats(0.01, 10.0), sigma=st.floats(0.1, 50.0), factor=st.floats(1.01, 3.0))
def test_delta_decreases_in_sigma_and_epsilon(eps: float, sigma: float, factor: float) -> None:
    d = gaussian_delta(eps, sigma)
    assert 0.0 <= d <= 1.0
    assert gaussian_delta(eps, sigma * factor) <= d
    assert gaussian_delta(eps * factor, sigma) <= d


@pytest.mark.parametrize(
    "bad",
    [dict(epsilon=0.0, delta=1e-5), dict(epsilon=1.0, delta=0.0), dict(epsilon=1.0, delta=1.0)],
)
def test_invalid_inputs(bad: dict) -> None:
    with pytest.raises(ValueError):
        analytic_gaussian_sigma(**bad)
    with pytest.raises(ValueError):
        classic_gaussian_sigma(**bad)


def test_mechanism_validation_and_description() -> None:
    with pytest.raises(ValueError):
        GaussianMechanism(sensitivity=0.0, sigma=1.0)
    with pytest.raises(ValueError):
        GaussianMechanism(sensitivity=1.0, sigma=-1.0)
    with pytest.raises(ValueError):
        GaussianMechanism.calibrated(1.0, 1e-5, method="magic")
    mech = GaussianMechanism.calibrated(1.0, 1e-5, sensitivity=2.0)
    assert mech.noise_multiplier == pytest.approx(analytic_gaussian_sigma(1.0, 1e-5))
    assert "sensitivity 2" in mech.describe() and "sigma" in mech.describe()
    assert mech.epsilon(1e-5) == pytest.approx(1.0, rel=1e-9)
    with pytest.raises(ValueError):
        mech.release(np.array([1.0, np.nan]), np.random.default_rng(0))


def test_release_statistics_match_theory() -> None:
    """20,000 releases of a fixed vector: per-coordinate mean and std within a few SEs."""
    mech = GaussianMechanism.calibrated(1.0, 1e-5)
    truth = np.array([0.0, 5.0, 120.0])
    rng = np.random.default_rng(12345)
    n = 20_000
    samples = np.stack([mech.release(truth, rng) for _ in range(n)])
    assert samples.shape == (n, 3)
    noise = samples - truth
    sigma = mech.sigma
    mean_se = sigma / math.sqrt(n)
    std_se = sigma / math.sqrt(2 * (n - 1))
    assert np.all(np.abs(noise.mean(axis=0)) < 4 * mean_se)
    assert np.all(np.abs(noise.std(axis=0, ddof=1) - sigma) < 4 * std_se)
    # Coordinates are independent.
    corr = np.corrcoef(noise.T)[np.triu_indices(3, 1)]
    assert np.all(np.abs(corr) < 4 / math.sqrt(n))
    # Same seed, same noise: the caller's generator is the only source of randomness.
    again = mech.release(truth, np.random.default_rng(7))
    assert np.array_equal(again, mech.release(truth, np.random.default_rng(7)))
