"""The applications' algorithms alone (no Flower): private-kNN votes and their noise and
sensitivity, distillation and pseudo-labelling on tiny data, and the Opacus DP-SGD path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from ecos_flower.applications import (
    aggregate_votes,
    distill,
    dp_finetune_head,
    knn_sensitivity,
    knn_votes,
    noisy_votes,
    pseudo_label_train,
    semi_supervised,
    train_teacher,
)
from ecos_flower.applications.finetune import calibrate_noise, make_private_head
from ecos_flower.models import build_model, evaluate_accuracy
from ecos_flower.privacy import analytic_gaussian_sigma
from ecos_flower.privacy._opacus import compute_rdp, get_privacy_spent
from ecos_flower.privacy.gaussian import analytic_gaussian_epsilon

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook:UserWarning")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    images = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    return images[order], labels[order]


# ------------------------------------------------------------------------ private kNN
@pytest.mark.parametrize("mode", ["query", "capped"])
def test_knn_votes_count_the_right_neighbours(mode):
    rng = np.random.default_rng(0)
    private = rng.normal(size=(40, 5))
    labels = rng.integers(0, 3, size=40)
    queries = private[:7] + 1e-6  # each query sits on a private sample
    votes = knn_votes(private, labels, queries, k=1, num_classes=3, mode=mode)
    if mode == "query":
        assert np.all(votes.sum(axis=1) == 1)
        np.testing.assert_array_equal(votes.argmax(axis=1), labels[:7])
    else:
        assert votes.sum() == 40  # every private sample casts k = 1 vote
        for j in range(7):
            assert votes[j, labels[j]] >= 1  # its twin voted for it
    votes = knn_votes(private, labels, queries, k=4, num_classes=3, mode=mode)
    assert votes.sum() == (7 * 4 if mode == "query" else 40 * 4)


@pytest.mark.parametrize("mode", ["query", "capped"])
def test_removing_one_private_sample_stays_within_the_stated_sensitivity(mode):
    rng = np.random.default_rng(1)
    worst = 0.0
    for _ in range(30):
        private = rng.normal(size=(60, 4))
        labels = rng.integers(0, 4, size=60)
        queries = rng.normal(size=(25, 4))
        full = knn_votes(private, labels, queries, k=5, num_classes=4, mode=mode)
        for drop in rng.choice(60, size=5, replace=False):
            keep = np.arange(60) != drop
            fewer = knn_votes(private[keep], labels[keep], queries, 5, 4, mode=mode)
            worst = max(worst, float(np.linalg.norm(full - fewer)))
    assert 0 < worst <= knn_sensitivity(mode, 5, 25) + 1e-9


def test_vote_noise_has_the_calibrated_mean_and_std():
    """Many releases: the noise is unbiased with exactly the analytic-Gaussian sigma."""
    sensitivity = knn_sensitivity("capped", 10, 50)
    sigma = analytic_gaussian_sigma(1.0, 1e-5, sensitivity)
    assert sensitivity == pytest.approx(math.sqrt(10))
    votes = np.random.default_rng(2).integers(0, 20, size=(50, 10)).astype(float)
    rng = np.random.default_rng(3)
    releases = np.stack([noisy_votes(votes, sigma, rng) for _ in range(400)])
    noise = releases - votes
    n = noise.size
    assert abs(noise.mean()) < 4 * sigma / math.sqrt(n)
    assert noise.std() == pytest.approx(sigma, rel=4 * math.sqrt(2 / n) + 1e-3)
    # Per entry: the mean over releases recovers the exact votes.
    np.testing.assert_allclose(releases.mean(axis=0), votes, atol=5 * sigma / math.sqrt(400))


def test_aggregate_votes_takes_the_argmax_and_drops_noise_only_samples():
    a = np.array([[5.0, 0.0], [0.0, 0.1], [0.0, 6.0]])
    labels, kept = aggregate_votes([a, a], [1.0, 1.0], threshold_multiple=2.0)
    np.testing.assert_array_equal(labels, [0, 1, 1])
    np.testing.assert_array_equal(kept, [True, False, True])
    _, kept = aggregate_votes([np.zeros((2, 2))], [1.0], threshold_multiple=2.0)
    assert kept.all()  # nothing clears the threshold: keep everything rather than nothing


# ------------------------------------------------------------------- distillation
def test_distillation_on_a_small_unlabelled_proxy_set_improves_the_student(digits):
    images, labels = digits
    train, test = slice(0, 1200), slice(1200, None)
    teacher = build_model("wide-cnn", 10, 1, 8, seed=0)
    train_teacher(teacher, images[train], labels[train], epochs=4, batch_size=32, seed=0)
    teacher_acc, _ = evaluate_accuracy(teacher, images[test], labels[test])
    student = build_model("small-cnn", 10, 1, 8, seed=1)
    before, _ = evaluate_accuracy(student, images[test], labels[test])
    loss = distill(student, teacher, images[:300], temperature=2.0, epochs=30, seed=0)
    after, _ = evaluate_accuracy(student, images[test], labels[test])
    assert teacher_acc > 0.85
    assert math.isfinite(loss) and loss >= 0
    assert after > before + 0.4 and after > 0.6


# ---------------------------------------------------------------- pseudo-labelling
PSEUDO_SEEDS = (4, 5, 6)


def _pseudo_label_gains(digits, *, shuffle_pseudo_labels: bool = False):
    """Per seed: (accuracy with pseudo-labelling) - (accuracy of supervised-only training from
    the same initialisation and labelled set), and the first round's stats."""
    images, labels = digits
    labelled, unlabelled, test = slice(0, 60), slice(60, 1200), slice(1200, None)
    gains, first_rounds = [], []
    for seed in PSEUDO_SEEDS:
        common = {"epochs": 30, "batch_size": 32, "learning_rate": 0.05, "seed": seed}
        supervised = build_model("small-cnn", 10, 1, 8, seed=seed)
        pseudo_label_train(
            supervised, images[labelled], labels[labelled], images[:0], rounds=0, **common
        )
        semi = build_model("small-cnn", 10, 1, 8, seed=seed)
        original = semi_supervised.predict_proba
        if shuffle_pseudo_labels:  # a broken pseudo-labeller: confident guesses, wrong samples

            def shuffled(model, images, _original=original, **kwargs):  # noqa: ANN001, ANN202
                probabilities = _original(model, images, **kwargs)
                order = torch.randperm(
                    len(probabilities), generator=torch.Generator().manual_seed(1)
                )
                return probabilities[order]

            semi_supervised.predict_proba = shuffled
        try:
            stats = pseudo_label_train(
                semi,
                images[labelled],
                labels[labelled],
                images[unlabelled],
                rounds=3,
                threshold=0.9,
                round_epochs=5,
                unlabelled_truth=labels[unlabelled],
                **common,
            )
        finally:
            semi_supervised.predict_proba = original
        sup_acc, _ = evaluate_accuracy(supervised, images[test], labels[test])
        semi_acc, _ = evaluate_accuracy(semi, images[test], labels[test])
        gains.append(semi_acc - sup_acc)
        first_rounds.append((stats.kept[0], stats.correct[0]))
    return np.array(gains), first_rounds


def test_pseudo_labelling_beats_supervised_only_and_the_check_catches_a_broken_labeller(digits):
    """Paired over several seeds (same init and labelled set), so the verdict does not hang on
    one run's float kernels: pseudo-labelling earns a clear mean gain (measured about +3.6
    points; asserted +1), never loses more than 2 points on a seed, and the same check fails
    for pseudo-labels shuffled across samples (measured about -11 points)."""
    gains, first_rounds = _pseudo_label_gains(digits)
    for kept, correct in first_rounds:
        assert kept > 100  # confident pseudo-labels were used
        assert correct / kept > 0.75  # mostly right
    assert gains.mean() >= 0.01, gains
    assert gains.min() >= -0.02, gains
    broken, _ = _pseudo_label_gains(digits, shuffle_pseudo_labels=True)
    assert broken.mean() < 0.01, broken


# -------------------------------------------------------------------- Opacus DP-SGD
def _problem(n: int = 64, d: int = 6, classes: int = 3):
    gen = torch.Generator().manual_seed(0)
    x = 3.0 * torch.randn(n, d, generator=gen)  # large features: most gradients exceed the clip
    y = torch.randint(0, classes, (n,), generator=gen)
    return x, y


def _one_step(noise_multiplier: float, clip: float, seed: int = 0):
    x, y = _problem()
    head = torch.nn.Linear(x.shape[1], 3)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    _, module, optimiser, loader = make_private_head(
        head,
        x,
        y,
        noise_multiplier=noise_multiplier,
        max_grad_norm=clip,
        learning_rate=0.1,
        seed=seed,
    )
    ((bx, by),) = list(loader)
    optimiser.zero_grad()
    torch.nn.functional.cross_entropy(module(bx), by).backward()
    params = [p for p in module.parameters() if p.requires_grad]
    per_sample = torch.cat([p.grad_sample.reshape(len(bx), -1) for p in params], dim=1)
    optimiser.step()
    grad = torch.cat([p.grad.reshape(-1) for p in params])
    return per_sample, grad, len(bx)


def test_opacus_clips_every_per_sample_gradient_to_the_max_grad_norm():
    clip = 0.5
    per_sample, grad, batch = _one_step(noise_multiplier=0.0, clip=clip)
    norms = per_sample.norm(dim=1)
    assert batch == 64  # full batch: q = 1
    assert (norms > clip).sum() > 32  # clipping is not a no-op here
    factors = torch.clamp(clip / (norms + 1e-6), max=1.0)
    clipped = per_sample * factors[:, None]
    assert clipped.norm(dim=1).max() <= clip + 1e-5
    torch.testing.assert_close(grad, clipped.sum(dim=0) / batch, rtol=1e-4, atol=1e-6)


def test_opacus_adds_gaussian_noise_of_std_z_times_clip():
    clip, z = 0.5, 2.0
    residuals = []
    for seed in range(40):
        per_sample, grad, batch = _one_step(noise_multiplier=z, clip=clip, seed=seed)
        norms = per_sample.norm(dim=1)
        clipped = per_sample * torch.clamp(clip / (norms + 1e-6), max=1.0)[:, None]
        residuals.append(grad * batch - clipped.sum(dim=0))  # the noise on the summed gradient
    noise = torch.cat(residuals)
    assert noise.std().item() == pytest.approx(z * clip, rel=0.1)
    assert abs(noise.mean().item()) < 4 * z * clip / math.sqrt(noise.numel())


def test_full_batch_dp_sgd_is_calibrated_exactly_and_reports_opacus_rdp_for_reference():
    x, y = _problem(n=200)
    steps, delta = 30, 1e-5
    result = dp_finetune_head(x, y, 3, epsilon=1.0, delta=delta, steps=steps, seed=0)
    assert result.steps == steps and result.sample_rate == 1.0
    assert result.noise_multiplier == pytest.approx(calibrate_noise(1.0, delta, steps))
    # T full-batch steps of z are one Gaussian of z / sqrt(T): the exact single-release
    # multiplier, whose exact epsilon (the ledger's charge) is the target.
    single = analytic_gaussian_sigma(1.0, delta, 1.0)
    assert result.noise_multiplier == pytest.approx(single * math.sqrt(steps), rel=1e-12)
    assert result.effective_noise_multiplier == pytest.approx(single, rel=1e-12)
    assert analytic_gaussian_epsilon(result.effective_noise_multiplier, delta) == pytest.approx(
        1.0, rel=1e-6
    )
    # Opacus' RDP analysis of `steps` full-batch steps with this multiplier is what is
    # reported as `epsilon_opacus`; RDP is looser than the exact composition, so it reads higher.
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = compute_rdp(q=1.0, noise_multiplier=result.noise_multiplier, steps=steps, orders=orders)
    opacus_eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    assert result.epsilon_opacus == pytest.approx(opacus_eps, rel=1e-6)
    assert 1.0 < result.epsilon_opacus < 1.3
    # Opacus' own (RDP) calibration to the same target needs more noise.
    from opacus.accountants.utils import get_noise_multiplier

    rdp_z = get_noise_multiplier(
        target_epsilon=1.0, target_delta=delta, sample_rate=1.0, steps=steps, accountant="rdp"
    )
    assert rdp_z > 1.05 * result.noise_multiplier
    # A zero-initialised head learns something on a separable problem even under DP.
    assert result.head.weight.abs().sum() > 0
