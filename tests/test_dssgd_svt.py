"""The sparse vector technique: release count bound, noise scales, true cost, noise on the
clipped value, vectorised vs reference agreement."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from ecos_flower.dssgd.svt import svt_scales, svt_select, svt_select_reference
from ecos_flower.privacy.noise import NoiseSource

BOTH = [svt_select, svt_select_reference]


def test_scales_published_and_corrected():
    s = svt_scales(9.0, count=10, gamma=0.5)  # Df = 1, eps1 = 8, eps2 = 2
    assert s.threshold == pytest.approx(2 * 10 / 8)
    assert s.query == pytest.approx(4 * 10 / 8)
    assert s.release == pytest.approx(2 * 10 / 2)
    # True cost eps1/2 + eps2/2 = 4 + 1 = 5/9 of 9 (not the nominal eps1 + eps2 = 10/9 of 9).
    assert s.epsilon_spent == pytest.approx(5.0)
    c = svt_scales(9.0, count=10, gamma=0.5, split="corrected")
    assert c.release == pytest.approx(2 * 10 / 1)
    assert c.epsilon_spent == pytest.approx(4.5)  # 4 + 1/2: half of eps
    with pytest.raises(ValueError):
        svt_scales(0.0, 10, 0.5)
    with pytest.raises(ValueError):
        svt_scales(1.0, 10, 0.5, split="other")


@pytest.mark.parametrize("fn", BOTH)
@pytest.mark.parametrize("tau", [-1e9, 0.0, 1e-3, 1e9])
def test_never_more_than_c(fn, tau):
    rng = np.random.default_rng(1)
    delta = rng.normal(0, 1e-3, 3000).astype(np.float32)
    for seed in range(3):
        upd, eps = fn(
            delta, 0.05, epsilon=5.0, gamma=1e-3, tau=tau, rng=np.random.default_rng(seed)
        )
        assert len(upd) <= 150
        assert len(np.unique(upd.indices)) == len(upd)
        assert np.all(np.abs(upd.values) <= np.float32(1e-3))
        assert eps == pytest.approx(5.0 * 5 / 9)
    if tau == -1e9:
        assert len(upd) == 150
    if tau == 1e9:
        assert len(upd) == 0


@pytest.mark.parametrize("fn", BOTH)
def test_release_noise_scale(fn):
    """tau very low: every visited index is a hit; released - delta has std sqrt(2) * b2."""
    n, theta = 20000, 0.5
    delta = np.zeros(n, np.float32)
    gamma = 1e6  # clip never binds
    epsilon = 2.0e6
    upd, _ = fn(delta, theta, epsilon=epsilon, gamma=gamma, tau=-1e12, rng=np.random.default_rng(3))
    scale = svt_scales(epsilon, n // 2, gamma).release
    assert len(upd) == n // 2
    assert np.std(upd.values) == pytest.approx(np.sqrt(2) * scale, rel=0.05)
    # Laplace, not Gaussian: mean absolute deviation = b.
    assert np.mean(np.abs(upd.values)) == pytest.approx(scale, rel=0.05)


def _hit_rate(fn, delta, tau, seeds, epsilon):
    counts, first = [], []
    for seed in seeds:
        upd, _ = fn(
            delta, 0.1, epsilon=epsilon, gamma=1e-3, tau=tau, rng=np.random.default_rng(seed)
        )
        counts.append(len(upd))
        first.append(np.isin(upd.indices, np.arange(100)).sum())
    return np.asarray(counts), np.asarray(first)


@pytest.mark.parametrize("tau", [2e-3, 4e-3])
def test_vectorised_matches_reference_in_distribution(tau):
    """Same count distribution and same preference for large entries, over many seeds."""
    delta = np.zeros(1000, np.float32)
    delta[:100] = 1e-3  # 100 'large' entries
    epsilon = 2000.0  # c = 100: query scale 4 * 100 * 2e-3 / (8/9 * 2000) = 4.5e-4
    vec_counts, vec_big = _hit_rate(svt_select, delta, tau, range(0, 300), epsilon)
    ref_counts, ref_big = _hit_rate(svt_select_reference, delta, tau, range(1000, 1300), epsilon)
    assert vec_counts.std() > 0 and 0 < vec_counts.mean() < 100  # not a degenerate regime
    assert stats.ks_2samp(vec_counts, ref_counts).pvalue > 1e-3
    assert (
        abs(vec_counts.mean() - ref_counts.mean())
        < 4 * np.sqrt((vec_counts.var() + ref_counts.var()) / 300) + 0.5
    )
    assert stats.ks_2samp(vec_big, ref_big).pvalue > 1e-3


def test_vectorised_dense_regime_matches_reference():
    """Noise far above the signal (the realistic regime): hit rate per visit agrees."""
    rng = np.random.default_rng(0)
    delta = rng.normal(0, 1e-3, 4000).astype(np.float32)
    visits = {}
    for name, fn in (("vec", svt_select), ("ref", svt_select_reference)):
        counts = [
            len(fn(delta, 0.1, epsilon=1.0, gamma=1e-3, tau=1e-4, rng=np.random.default_rng(s))[0])
            for s in range(20)
        ]
        visits[name] = counts
    assert visits["vec"] == [400] * 20 and visits["ref"] == [400] * 20


def test_vectorised_chunks_and_carry():
    """Few hits spread over a large vector: exercises the chunked visit and carried threshold."""
    n = 200_000
    delta = np.zeros(n, np.float32)
    hot = np.random.default_rng(0).choice(n, 50, replace=False)
    delta[hot] = 1.0
    upd, _ = svt_select(delta, 0.1, epsilon=1e9, gamma=1.0, tau=0.5, rng=np.random.default_rng(1))
    assert sorted(upd.indices.tolist()) == sorted(hot.tolist())


@pytest.mark.parametrize("fn", BOTH)
def test_release_noise_is_on_the_clipped_value(fn):
    """Entries all 50 gamma release exactly like entries exactly gamma (KS), clipped to gamma.

    Before the fix the noise went on the raw 50 gamma: 97 % of the releases were +gamma, against
    51 % for entries at gamma, and this test failed (KS p-value 2e-75).
    """
    gamma, n, theta = 1e-3, 2000, 0.05
    c = 100
    released = {}
    for name, value in (("far", 50 * gamma), ("at", gamma)):
        delta = np.full(n, value, np.float32)
        vals = []
        for seed in range(8):
            rng = np.random.default_rng([7 if name == "far" else 8, seed])
            upd, _ = fn(delta, theta, epsilon=float(c), gamma=gamma, tau=-1.0, rng=rng)
            assert len(upd) == c
            vals.append(upd.values.astype(np.float64))
        released[name] = np.concatenate(vals)
        assert np.all(np.abs(released[name]) <= np.float32(gamma))
    far, at = released["far"], released["at"]
    assert 0.2 < np.mean(at < gamma * (1 - 1e-6)) < 0.8  # values inside (-gamma, gamma) occur
    assert stats.ks_2samp(far, at).pvalue > 1e-3


@pytest.mark.parametrize("fn", BOTH)
def test_non_finite_entries_are_clipped(fn):
    delta = np.array([np.nan, np.inf, -np.inf, 0.5], np.float32)
    upd, _ = fn(delta, 1.0, epsilon=1e9, gamma=1e-3, tau=-1.0, rng=np.random.default_rng(0))
    assert len(upd) == 4
    assert np.all(np.isfinite(upd.values)) and np.all(np.abs(upd.values) <= np.float32(1e-3))
    # Noise scale 2 * 4 * 2e-3 / (2/9 * 1e9) ~ 7e-11: the values are clip(dw) up to it.
    np.testing.assert_allclose(upd.values, [0.0, 1e-3, -1e-3, 1e-3], atol=1e-6)


def test_accepts_noise_source_and_rejects_no_rng():
    delta = np.random.default_rng(0).normal(0, 1e-3, 1000).astype(np.float32)
    for source in (NoiseSource.fresh(), NoiseSource.replayable(1, 2)):
        upd, eps = svt_select(delta, 0.1, epsilon=100.0, gamma=1e-3, tau=1e-4, rng=source)
        assert len(upd) == 100 and eps == pytest.approx(100.0 * 5 / 9)
    with pytest.raises(TypeError):
        svt_select(delta, 0.1, epsilon=1.0, gamma=1e-3, tau=0.0, rng=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        svt_select(delta, 0.1, epsilon=1.0, gamma=1e-3, tau=0.0, rng=0)  # type: ignore[arg-type]


def test_local_step_privacy_noise_comes_from_the_caller():
    """DP on: no default seed for the noise (TypeError without rng); charges the true cost."""
    import torch

    from ecos_flower.dssgd.participant import local_step
    from ecos_flower.models.nets import PaperMLP

    torch.manual_seed(0)
    model = PaperMLP(3, 1, 4)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (32,), generator=g)
    x = torch.randn(32, 1, 4, 4, generator=g)
    kw = {"batch_size": 16, "seed": 0, "theta_u": 0.1, "gamma": 1e-3, "tau": 1e-4}
    with pytest.raises(TypeError, match="noise source"):
        local_step(model, x, y, dp_epsilon=3.0, **kw)
    upd, eps = local_step(model, x, y, dp_epsilon=3.0, rng=NoiseSource.fresh(), **kw)
    assert eps == pytest.approx(3.0 * 5 / 9)
    assert np.all(np.abs(upd.values) <= np.float32(1e-3))
