"""DP least squares and DP-FC (the head-fitting variants of DP last-layer fine-tuning): the head
space keeps predictions exact, the released statistics have the stated sensitivity and noise,
the budget split composes to the target, the preconditioner is applied to the noisy gradient,
and Opacus' accountant reports the epsilon the client's ledger is charged."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis.extra.numpy import arrays
from torch import nn

from ecos_flower.applications.dp_fc import (
    dp_covariance,
    dp_fc_head,
    preconditioner,
    split_noise,
)
from ecos_flower.applications.dp_least_squares import (
    SENSITIVITY,
    dp_least_squares_head,
    perturb,
    solve_ridge,
    sufficient_statistics,
)
from ecos_flower.applications.finetune import (
    DEFAULT_NORMALISER,
    calibrate_noise,
    dp_finetune_head,
)
from ecos_flower.applications.linear_head import (
    augmented_from_head,
    head_from_augmented,
    normalized_with_bias,
    opacus_epsilon,
)
from ecos_flower.privacy._opacus import compute_rdp, get_privacy_spent
from ecos_flower.privacy.gaussian import analytic_gaussian_epsilon, analytic_gaussian_sigma

FEATURES = arrays(
    np.float64,
    st.tuples(st.integers(1, 12), st.integers(1, 6)),
    elements=st.floats(-50, 50, allow_nan=False),
)


def _upper(matrix: torch.Tensor) -> torch.Tensor:
    rows, cols = torch.triu_indices(len(matrix), len(matrix))
    return matrix[rows, cols]


def _problem(n: int = 300, d: int = 6, classes: int = 3, seed: int = 0):
    rng = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=rng) * 4
    labels = torch.randint(0, classes, (n,), generator=rng)
    features = torch.relu(centres[labels] + torch.randn(n, d, generator=rng)) + 0.1
    return features, labels


# ------------------------------------------------------------------ the head space
@settings(max_examples=60, deadline=None)
@given(FEATURES, st.floats(0.01, 100), st.integers(0, 2**31 - 1))
def test_a_head_on_normalised_rows_predicts_exactly_like_its_linear_layer(x, scale, seed):
    features = torch.from_numpy(x)
    rows = normalized_with_bias(features, scale)
    assert torch.allclose(rows.norm(dim=1), torch.ones(len(rows), dtype=torch.float64))
    weights = torch.randn(4, x.shape[1] + 1, generator=torch.Generator().manual_seed(seed))
    head = head_from_augmented(weights.double(), scale).double()
    # Logits on raw features are a positive multiple of the logits on z, row by row.
    on_rows = rows @ weights.double().T
    on_raw = head(features)
    ratio = on_raw / on_rows.where(on_rows.abs() > 1e-9, torch.ones_like(on_rows))
    factor = torch.linalg.norm(torch.cat([features / scale, torch.ones(len(x), 1)], 1), dim=1)
    mask = on_rows.abs() > 1e-6
    assert torch.allclose(ratio[mask], factor[:, None].expand_as(ratio)[mask], rtol=1e-3)
    # ...and the received head survives the round trip into the head space.
    torch.testing.assert_close(
        head_from_augmented(augmented_from_head(head, scale), scale).weight.double(),
        head.weight,
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("scale", [0.0, -1.0, math.inf, math.nan])
def test_a_bad_feature_scale_is_refused(scale):
    with pytest.raises(ValueError, match="feature scale"):
        normalized_with_bias(torch.ones(3, 2), scale)


# ------------------------------------------------------------------ DP least squares
@settings(max_examples=80, deadline=None)
@given(FEATURES, st.integers(0, 2), st.floats(0.1, 10))
def test_one_sample_moves_the_released_statistics_by_at_most_the_sensitivity(x, label, scale):
    features = torch.from_numpy(x)
    labels = torch.arange(len(x)) % 3
    rows = normalized_with_bias(features, scale)
    full = sufficient_statistics(rows, labels, 3)
    less = sufficient_statistics(rows[1:], labels[1:], 3)
    change = torch.cat(
        [_upper(full.gram - less.gram), (full.cross - less.cross).reshape(-1)]
    ).norm()
    assert change <= SENSITIVITY + 1e-9
    # Unit-norm rows and one-hot labels: the cross term alone moves by exactly 1.
    assert (full.cross - less.cross).norm() == pytest.approx(1.0)


def test_least_squares_noise_has_the_stated_spread_and_keeps_the_gram_symmetric():
    rows = normalized_with_bias(*_problem(n=50, d=4)[:1], 2.0)
    stats = sufficient_statistics(rows, _problem(n=50, d=4)[1], 3)
    sigma, draws = 1.7, 400
    generator = torch.Generator().manual_seed(3)
    gram_noise, cross_noise = [], []
    for _ in range(draws):
        noisy = perturb(stats, sigma, generator)
        assert torch.equal(noisy.gram, noisy.gram.T)
        gram_noise.append(_upper(noisy.gram - stats.gram))
        cross_noise.append((noisy.cross - stats.cross).reshape(-1))
    for noise in (torch.stack(gram_noise), torch.stack(cross_noise)):
        count = noise.numel()
        assert abs(noise.mean().item()) < 4 * sigma / math.sqrt(count)
        # The sample std of `count` normals is within a few of sigma / sqrt(2 count).
        assert abs(noise.std().item() - sigma) < 5 * sigma / math.sqrt(2 * count)
        # Entries are uncorrelated: off-diagonal correlations are at noise level.
        corr = torch.corrcoef(noise.T)
        assert corr[~torch.eye(len(corr), dtype=torch.bool)].abs().max() < 0.25


def test_without_noise_the_ridge_solve_is_ordinary_ridge_regression():
    features, labels = _problem(n=120, d=5)
    rows = normalized_with_bias(features, 3.0)
    stats = sufficient_statistics(rows, labels, 3)
    targets = torch.nn.functional.one_hot(labels, 3).double()
    expected = torch.linalg.solve(
        rows.T @ rows + 0.5 * torch.eye(6, dtype=torch.float64), rows.T @ targets
    )
    torch.testing.assert_close(solve_ridge(stats, 0.5), expected.T)


def test_dp_least_squares_is_one_gaussian_release_calibrated_exactly():
    features, labels = _problem()
    delta = 1e-5
    result = dp_least_squares_head(features, labels, 3, epsilon=2.0, delta=delta, scale=4.0, seed=0)
    z = calibrate_noise(2.0, delta, 1)
    assert z == pytest.approx(analytic_gaussian_sigma(2.0, delta, 1.0), rel=1e-12)
    assert result.steps == 1 and result.effective_noise_multiplier == pytest.approx(z)
    # The exact (Gaussian-DP) charge of the one release is the target...
    assert analytic_gaussian_epsilon(result.effective_noise_multiplier, delta) == pytest.approx(
        2.0, rel=1e-6
    )
    # ...and Opacus' RDP epsilon of the same release, reported for reference, reads higher.
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = compute_rdp(q=1.0, noise_multiplier=z, steps=1, orders=orders)
    assert result.epsilon_opacus == pytest.approx(
        get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0], rel=1e-6
    )
    assert result.epsilon_opacus > 2.0


def test_dp_least_squares_learns_a_separable_problem_at_a_moderate_budget():
    features, labels = _problem(n=3_000)
    result = dp_least_squares_head(features, labels, 3, epsilon=4.0, delta=1e-5, scale=4.0, seed=0)
    accuracy = (result.head(features).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.9


# ------------------------------------------------------------------ DP-FC
@settings(max_examples=100, deadline=None)
@given(st.floats(0.1, 100), st.integers(1, 1_000), st.floats(0.01, 0.99))
def test_the_budget_split_composes_to_one_release_of_the_target_multiplier(z, steps, share):
    z_cov, z_step = split_noise(z, steps, share)
    assert 1 / z_cov**2 + steps / z_step**2 == pytest.approx(1 / z**2, rel=1e-9)
    assert 1 / z_cov**2 == pytest.approx(share / z**2, rel=1e-9)


def test_dp_fc_reports_the_epsilon_of_the_composed_releases():
    features, labels = _problem()
    delta = 1e-5
    result = dp_fc_head(features, labels, 3, epsilon=1.0, delta=delta, scale=4.0, steps=20, seed=0)
    z_cov, z_step = split_noise(result.effective_noise_multiplier, 20, 0.3)
    assert result.noise_multiplier == pytest.approx(z_step)
    # The releases compose exactly to one Gaussian of the calibrated multiplier: the target.
    total = analytic_gaussian_epsilon(result.effective_noise_multiplier, delta)
    assert total == pytest.approx(1.0, rel=1e-6)
    # RDP of Gaussian releases adds up, so the split costs what one release of z costs there
    # too; Opacus' RDP bound reads above the exact epsilon.
    single = opacus_epsilon([(result.effective_noise_multiplier, 1.0, 1)], delta)
    assert result.epsilon_opacus == pytest.approx(single, rel=1e-6)
    assert result.epsilon_opacus > 1.0


def test_the_preconditioner_inverts_the_covariance_and_floors_what_noise_made_negative():
    rows = normalized_with_bias(*_problem(n=200, d=4)[:1], 4.0)
    exact = preconditioner(dp_covariance(rows, 0.0, torch.Generator()), len(rows), 1e-9)
    torch.testing.assert_close(
        exact @ (rows.T @ rows / len(rows)), torch.eye(5, dtype=torch.float64)
    )
    noisy = dp_covariance(rows, 30.0, torch.Generator().manual_seed(0))
    assert torch.linalg.eigvalsh(noisy).min() < 0  # this much noise breaks positivity...
    values = torch.linalg.eigvalsh(preconditioner(noisy, len(rows), 0.05))
    assert values.min() > 0 and values.max() <= 1 / 0.05 + 1e-9  # ...the floor restores it


@pytest.mark.parametrize("normaliser", [64.0, 40.0, DEFAULT_NORMALISER])
def test_dp_fc_applies_the_preconditioner_to_the_clipped_noisy_gradient(normaliser):
    """Zero noise to speak of (huge epsilon): one step from zero equals
    -lr * (clipped gradient sum / m) @ (G / m)^-1 with m the public normaliser, whatever the
    number of samples (64 here)."""
    features, labels = _problem(n=64, d=4)
    scale, lr = 4.0, 0.3
    extra = {} if normaliser == DEFAULT_NORMALISER else {"normaliser": normaliser}
    result = dp_fc_head(
        features,
        labels,
        3,
        epsilon=1e6,
        delta=1e-5,
        scale=scale,
        steps=1,
        learning_rate=lr,
        floor=0.01,
        noise_multiplier=1e-9,
        seed=0,
        **extra,
    )
    rows = normalized_with_bias(features, scale)
    gradient = (
        (torch.full((64, 3), 1 / 3) - nn.functional.one_hot(labels, 3)).double().T @ rows
    ) / normaliser  # per-sample norms < 1: clipping at 1 does nothing
    expected = -lr * gradient @ preconditioner(rows.T @ rows, normaliser, 0.01)
    torch.testing.assert_close(
        augmented_from_head(result.head, scale), expected, rtol=1e-3, atol=1e-4
    )


# ------------------------------------------------------------------ the public normaliser
def _one_step_weights(features, labels, method, normaliser, seed=0, z=1e-9):
    """The released head (as one vector) after one noisy step from zero at learning rate 1."""
    common = {
        "epsilon": 1.0,
        "delta": 1e-5,
        "steps": 1,
        "learning_rate": 1.0,
        "noise_multiplier": z,
        "seed": seed,
        "normaliser": normaliser,
    }
    if method == "dp-fc":
        # a floor below every eigenvalue of G / m: P = m G~^-1, so the step is m-free
        result = dp_fc_head(features, labels, 3, scale=4.0, floor=1e-9, **common)
    else:
        result = dp_finetune_head(features, labels, 3, **common)
    head = result.head
    return torch.cat([head.weight.detach().flatten(), head.bias.detach().flatten()]).double()


def test_dp_sgd_divides_the_noisy_gradient_sum_by_the_normaliser_not_by_the_dataset_size():
    """One step from zero is -(clipped sum + noise) / m: linear in 1 / m, and the same on 30
    samples and on 300 up to the signal (the dataset size never scales the release)."""
    features, labels = _problem(n=300)
    at_n = _one_step_weights(features, labels, "dp-sgd", 300.0)
    at_m = _one_step_weights(features, labels, "dp-sgd", 7.0)
    torch.testing.assert_close(at_m * 7.0, at_n * 300.0, rtol=1e-4, atol=1e-6)
    # Noise only (huge z): every weight has std z C / m on 5 samples as on 300.
    z, m = 1e4, 50.0
    for n in (5, 300):
        x, y = _problem(n=n)
        draws = torch.stack([_one_step_weights(x, y, "dp-sgd", m, seed=s, z=z) for s in range(20)])
        assert draws.std().item() == pytest.approx(z / m, rel=0.1)


def test_the_released_noise_scale_does_not_depend_on_the_dataset_size():
    """The same seed gives the same noise whatever |D|: with the signal negligible next to it,
    the heads fitted on D and on D minus one sample coincide (DP-SGD and DP-FC alike)."""
    features, labels = _problem(n=20)
    for method in ("dp-sgd", "dp-fc"):
        full = _one_step_weights(features, labels, method, DEFAULT_NORMALISER, seed=4, z=1e6)
        less = _one_step_weights(features[1:], labels[1:], method, DEFAULT_NORMALISER, 4, z=1e6)
        assert full.norm() > 1e3
        torch.testing.assert_close(full, less, rtol=1e-4, atol=1e-3 * float(full.abs().max()))


@pytest.mark.parametrize("bad", [0.0, -3.0, math.inf, math.nan, True, "100"])
def test_a_bad_normaliser_is_refused(bad):
    features, labels = _problem(n=10)
    common = {"epsilon": 1.0, "delta": 1e-5, "steps": 1, "seed": 0, "normaliser": bad}
    with pytest.raises(ValueError, match="normaliser"):
        dp_finetune_head(features, labels, 3, **common)
    with pytest.raises(ValueError, match="normaliser"):
        dp_fc_head(features, labels, 3, scale=4.0, **common)


def test_dp_fc_depends_on_the_normaliser_only_through_the_floor_scale():
    """Each eigen-direction of G~ (eigenvalue l) gets lr (g + noise) / max(l, m floor): DP-FC at
    (m, floor) is DP-FC at (m', floor m / m'), e.g. the old (n, floor) at (m, floor n / m)."""
    features, labels = _problem(n=300)
    common = {"epsilon": 1.0, "delta": 1e-5, "scale": 4.0, "steps": 10, "seed": 2}
    old = dp_fc_head(features, labels, 3, normaliser=300.0, floor=0.01, **common).head
    new = dp_fc_head(features, labels, 3, normaliser=DEFAULT_NORMALISER, floor=0.03, **common).head
    torch.testing.assert_close(new.weight, old.weight, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(new.bias, old.bias, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("method", ["dp-sgd", "dp-fc"])
def test_head_fits_learn_a_separable_problem_with_a_public_normaliser(method):
    """Learning stays sensible at epsilon 1 on 1,000 samples: with the default normaliser (a
    fixed constant), and with the typical client size as the normaliser (a caller's public
    estimate; here the true size, which reproduces the former average-over-|D| fit)."""
    features, labels = _problem(n=1_000, seed=1)
    test_x, test_y = _problem(n=2_000, seed=1)
    common = {"epsilon": 1.0, "delta": 1e-5, "steps": 100, "seed": 0}
    for normaliser in (DEFAULT_NORMALISER, 1e3):
        if method == "dp-fc":
            # floor 0.01 per expected sample of the typical client: 10 on G~ either way
            floor = 10.0 / normaliser
            result = dp_fc_head(
                features,
                labels,
                3,
                scale=4.0,
                learning_rate=1.0,
                floor=floor,
                normaliser=normaliser,
                **common,
            )
        else:
            result = dp_finetune_head(features, labels, 3, normaliser=normaliser, **common)
        accuracy = (result.head(test_x).argmax(1) == test_y).float().mean().item()
        assert accuracy > (0.95 if method == "dp-sgd" else 0.85), (method, normaliser, accuracy)
