"""NoiseSource: seeding, float64 samplers (moments and KS against the exact laws), releases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from ecos_flower.privacy.noise import NoiseSource

N = 200_000


def _sources():
    return [NoiseSource.replayable(11, 0), NoiseSource(np.random.default_rng(5))]


@pytest.mark.parametrize("scale", [1e-3, 1.0, 250.0])
@pytest.mark.parametrize("source", _sources())
def test_laplace_moments_and_ks(source, scale):
    x = source.laplace(scale, N)
    assert x.dtype == np.float64 and x.shape == (N,)
    # Var = 2 b^2; the sample mean has sd sqrt(2/N) b, the sample variance sd ~ sqrt(20/N) b^2.
    assert abs(x.mean()) < 5 * np.sqrt(2 / N) * scale
    assert x.var() == pytest.approx(2 * scale**2, abs=6 * np.sqrt(20 / N) * scale**2)
    assert np.mean(np.abs(x)) == pytest.approx(scale, abs=5 * scale / np.sqrt(N))
    assert stats.kstest(x / scale, "laplace").pvalue > 1e-4
    assert abs(np.mean(x > 0) - 0.5) < 5 * 0.5 / np.sqrt(N)  # symmetric signs


@pytest.mark.parametrize("sigma", [1e-3, 1.0, 250.0])
@pytest.mark.parametrize("source", _sources())
def test_gaussian_moments_and_ks(source, sigma):
    x = source.gaussian(sigma, N)
    assert x.dtype == np.float64
    assert abs(x.mean()) < 5 * sigma / np.sqrt(N)
    assert x.var() == pytest.approx(sigma**2, abs=6 * np.sqrt(2 / N) * sigma**2)
    assert stats.kstest(x / sigma, "norm").pvalue > 1e-4


def test_shapes():
    s = NoiseSource.replayable(0, 0)
    assert s.laplace(1.0, (3, 4)).shape == (3, 4)
    assert s.gaussian(1.0, (2, 5)).shape == (2, 5)
    assert s.laplace(1.0, 0).shape == (0,)


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan, np.inf])
def test_rejects_bad_scale(bad):
    s = NoiseSource.replayable(0, 0)
    for fn in (s.laplace, s.gaussian):
        with pytest.raises(ValueError):
            fn(bad, 3)
    for fn in (s.laplace_release, s.gaussian_release):
        with pytest.raises(ValueError):
            fn(np.zeros(3), bad)


def test_release_rejects_non_finite_values():
    for s in (NoiseSource.fresh(), NoiseSource.replayable(0, 0)):
        for fn in (s.laplace_release, s.gaussian_release):
            with pytest.raises(ValueError):
                fn(np.array([1.0, np.nan]), 1.0)


def test_constructor_needs_a_generator():
    with pytest.raises(TypeError):
        NoiseSource(0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        NoiseSource(np.random.RandomState(0))  # type: ignore[arg-type]


def test_replayable_streams_repeat_and_differ():
    a = NoiseSource.replayable(3, 1).generator.integers(0, 2**62, 8)
    b = NoiseSource.replayable(3, 1).generator.integers(0, 2**62, 8)
    c = NoiseSource.replayable(3, 2).generator.integers(0, 2**62, 8)
    d = NoiseSource.replayable(4, 1).generator.integers(0, 2**62, 8)
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist() and a.tolist() != d.tolist()
    assert not NoiseSource.replayable(3, 1).floating_point_safe


def test_fresh_sources_are_independent_and_safe():
    a, b = NoiseSource.fresh(), NoiseSource.fresh()
    assert a.floating_point_safe and b.floating_point_safe
    ia, ib = a.generator.integers(0, 2**62, 8), b.generator.integers(0, 2**62, 8)
    assert ia.tolist() != ib.tolist()  # 2^-496 chance of a false failure


@pytest.mark.parametrize("source", [NoiseSource.fresh(), NoiseSource.replayable(2, 0)])
def test_laplace_release_distribution(source):
    """values + Laplace(b): the residual is Laplace(b) (OpenDP's grid-snapped sampler on fresh)."""
    values = np.linspace(-5.0, 5.0, 5000)
    scale = 2.0
    out = source.laplace_release(values, scale)
    assert out.dtype == np.float64 and out.shape == values.shape
    noise = out - values
    assert abs(noise.mean()) < 5 * np.sqrt(2 / noise.size) * scale
    assert np.mean(np.abs(noise)) == pytest.approx(scale, abs=5 * scale / np.sqrt(noise.size))
    assert stats.kstest(noise / scale, "laplace").pvalue > 1e-4
    assert source.laplace_release(np.zeros(0), 1.0).shape == (0,)


@pytest.mark.parametrize("source", [NoiseSource.fresh(), NoiseSource.replayable(2, 0)])
def test_gaussian_release_distribution(source):
    counts = np.arange(1000, dtype=np.float64).reshape(50, 20)
    sigma = 3.0
    out = source.gaussian_release(counts, sigma)
    assert out.dtype == np.float64 and out.shape == counts.shape
    noise = (out - counts).ravel()
    assert abs(noise.mean()) < 5 * sigma / np.sqrt(noise.size)
    assert noise.std() == pytest.approx(sigma, rel=0.15)
    assert stats.kstest(noise / sigma, "norm").pvalue > 1e-4
    assert np.all(counts == np.arange(1000).reshape(50, 20))  # input untouched
