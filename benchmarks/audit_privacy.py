"""Empirical privacy audits of every released mechanism, with more trials than the CI tests.

    .venv/bin/python benchmarks/audit_privacy.py [--scale 4] [--fast]

Runs the audits of tests/test_privacy_audit.py (same neighbouring datasets, events and
Clopper-Pearson estimator; privacy unit: add/remove one client sample) and prints one row per
audit: the charged epsilon (tight epsilon of the noise at delta = 1e-5), the empirical lower
confidence bound (95 %), the point estimate and the mirror-image upper bound for the chosen event.
Rows marked "sigma/4" (or z/100, z/50) are the deliberately under-noised power checks: their lower
bound must exceed the charge; every other row's must not. `--scale` multiplies the trial counts
(default 4 x the tests'), `--fast` runs the tests' counts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import test_privacy_audit as audits  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=4.0, help="x the CI tests' trial counts")
    parser.add_argument("--fast", action="store_true", help="the CI tests' trial counts")
    args = parser.parse_args()
    scale = 1.0 if args.fast else args.scale
    torch.set_num_threads(1)  # thousands of tiny torch ops
    calibration = int(audits.FAST_CALIBRATION * scale)
    evaluation = int(audits.FAST_EVALUATION * scale)
    end_to_end = int(audits.FAST_END_TO_END * scale)
    rows: list[tuple[str, str, float, audits.Audit, bool]] = []

    def add(name, variant, charged, audit, power=False):
        rows.append((name, variant, charged, audit, power))

    def gaussian_rows(case, release=None, e2e_trials=end_to_end):
        for factor, power in ((1.0, False), (audits.UNDER_NOISE, True)):
            variant = "exact" if factor == 1 else f"sigma/{factor:g}"
            sigma = case.sigma / factor
            audit = audits.gaussian_audit(
                case, sigma=sigma, calibration=calibration, evaluation=evaluation
            )
            add(case.name, f"vectorised {variant}", case.charged_epsilon, audit, power)
            if release is not None:
                e2e = audits.end_to_end_audit(
                    (lambda on_d, rng, s=sigma: release(on_d, rng, s)), case, trials=e2e_trials
                )
                add(case.name, f"end-to-end {variant}", case.charged_epsilon, e2e, power)

    start = time.perf_counter()
    for mode in ("nearest", "radius"):
        gaussian_rows(*audits.ecos_case(mode))
    for mode in ("query", "capped"):
        gaussian_rows(*audits.knn_case(mode, ties=False), e2e_trials=end_to_end // 3)
        gaussian_rows(audits.knn_case(mode, ties=True)[0])
    gaussian_rows(audits.least_squares_case())
    gaussian_rows(audits.dpsgd_sum_case())

    head_trials = int(150 * scale)
    audit, charged = audits.ls_head_audit(1.0, head_trials)
    add("dp_least_squares_head", "end-to-end exact", charged, audit)
    audit, charged = audits.ls_head_audit(0.01, int(40 * scale), seed=1)
    add("dp_least_squares_head", "end-to-end z/100", charged, audit, True)
    audit, charged = audits.finetune_projection_audit(1.0, head_trials)
    add("dp_finetune_head", "end-to-end exact", charged, audit)
    audit, charged = audits.finetune_projection_audit(0.02, int(40 * scale), seed=1)
    add("dp_finetune_head", "end-to-end z/50", charged, audit, True)
    audit, charged, _ = audits.finetune_size_audit(int(25 * scale))
    add("dp_finetune_head", "||w||^2: |D| leak", charged, audit)
    elapsed = time.perf_counter() - start

    header = (
        f"{'mechanism':<24} {'audit':<22} {'charged':>7} {'lower':>7} {'point':>7} "
        f"{'upper':>7} {'trials':>15}  event / verdict"
    )
    print(
        f"delta = {audits.DELTA:g}, alpha = {audits.ALPHA:g}; privacy unit: add/remove one sample"
    )
    print(header)
    print("-" * len(header))
    failures = 0
    for name, variant, charged, audit, power in rows:
        ok = audit.lower > charged if power else audit.lower <= charged
        failures += not ok
        verdict = ("caught" if ok else "NOT CAUGHT") if power else ("ok" if ok else "LEAKS")
        trials = f"{audit.trials[0]}/{audit.trials[1]}"
        print(
            f"{name:<24} {variant:<22} {charged:7.3f} {_num(audit.lower)} {_num(audit.point)} "
            f"{_num(audit.upper)} {trials:>15}  {audit.direction} ({verdict})"
        )
    print(f"\n{len(rows)} audits in {elapsed:.1f} s, {failures} failed")
    return 1 if failures else 0


def _num(value: float) -> str:
    return f"{value:7.3f}" if np.isfinite(value) else f"{value:>7}"


if __name__ == "__main__":
    raise SystemExit(main())
