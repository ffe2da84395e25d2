"""Empirical privacy audit of the DSSGD SVT upload (longer than tests/test_privacy_audit_svt.py).

    .venv/bin/python benchmarks/audit_svt.py [--trials 50000]

c = 1 on a one-coordinate update, neighbours D: dw = +50 gamma and D': dw = -50 gamma or 0 (the
privacy unit is the participant's whole data). For the fixed mechanism (`svt_select`, vectorised,
and `svt_select_reference`) and for the pre-fix release rule (noise on the raw dw, charge eps1 +
eps2; re-implemented here as `legacy`), it prints for several events the point estimate and the
95 % Clopper-Pearson lower bound of epsilon = log P_D(E) / P_D'(E), against the charged epsilon.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from privacy_audit_helpers import epsilon_estimate, epsilon_lower_bound  # noqa: E402

from ecos_flower.dssgd.svt import svt_scales, svt_select, svt_select_reference  # noqa: E402

GAMMA = 1e-3


def legacy(delta, theta_u, *, epsilon, gamma, tau, rng):
    """The pre-fix rule for one coordinate (c = 1): release clip(dw + Lap); charge eps1 + eps2."""
    s = svt_scales(epsilon, 1, gamma)
    dw = float(delta[0])
    t = tau + rng.laplace(0.0, s.threshold)
    if min(abs(dw), gamma) + rng.laplace(0.0, s.query) < t:
        return None, 10.0 / 9.0 * epsilon
    return min(max(dw + rng.laplace(0.0, s.release), -gamma), gamma), 10.0 / 9.0 * epsilon


def releases(fn, value, *, epsilon, tau, seed, trials):
    rng = np.random.default_rng(seed)
    delta = np.array([value], np.float32)
    out = np.full(trials, np.nan)
    charged = 0.0
    for i in range(trials):
        if fn is legacy:
            v, charged = legacy(delta, 1.0, epsilon=epsilon, gamma=GAMMA, tau=tau, rng=rng)
            out[i] = np.nan if v is None else np.float32(v)
        else:
            upd, charged = fn(delta, 1.0, epsilon=epsilon, gamma=GAMMA, tau=tau, rng=rng)
            if len(upd):
                out[i] = float(upd.values[0])
    return out, charged


EVENTS = {
    "value = +gamma": lambda r: np.nan_to_num(r, nan=-1.0) >= np.float32(GAMMA),
    "value > 0": lambda r: np.nan_to_num(r, nan=-1.0) > 0,
    "selected": lambda r: np.isfinite(r),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=50_000)
    args = parser.parse_args()
    n = args.trials
    mechanisms = {"legacy": legacy, "svt_select": svt_select, "reference": svt_select_reference}
    setups = [  # (budget epsilon, D value, D' value, tau)
        (1.0, 50 * GAMMA, -50 * GAMMA, -1.0),
        (9.0 / 5.0, 50 * GAMMA, -50 * GAMMA, -1.0),
        (9.0 / 5.0, 50 * GAMMA, 0.0, 2 * GAMMA),
    ]
    for epsilon, v_d, v_d2, tau in setups:
        print(
            f"budget {epsilon:.3g}, D: dw={v_d / GAMMA:+.0f} gamma, D': dw={v_d2 / GAMMA:+.0f}"
            f" gamma, tau={tau:g}, {n} trials each"
        )
        for name, fn in mechanisms.items():
            start = time.perf_counter()
            rel_d, charged = releases(fn, v_d, epsilon=epsilon, tau=tau, seed=1, trials=n)
            rel_d2, _ = releases(fn, v_d2, epsilon=epsilon, tau=tau, seed=2, trials=n)
            parts = []
            for label, event in EVENTS.items():
                h1, h2 = int(event(rel_d).sum()), int(event(rel_d2).sum())
                lb = epsilon_lower_bound(h1, n, h2, n)
                est = epsilon_estimate(h1, n, h2, n)
                parts.append(f"{label}: est {est:.3f} lb {lb:.3f}")
            worst = max(
                epsilon_lower_bound(int(e(rel_d).sum()), n, int(e(rel_d2).sum()), n)
                for e in EVENTS.values()
            )
            verdict = "VIOLATES" if worst > charged else "ok"
            print(
                f"  {name:10s} charged {charged:.3f} | "
                + " | ".join(parts)
                + f" | {verdict} ({time.perf_counter() - start:.1f} s)"
            )


if __name__ == "__main__":
    main()
