"""Benchmark: OpenDP's floating-point-safe samplers vs numpy float64, on the paths that add noise.

    .venv/bin/python benchmarks/bench_noise.py [--quick]

(a) the SVT's noise vectors (10^4, 10^5, 10^6 values; numpy timed on all, OpenDP extrapolated
    linearly from 10^4 values above 10^5 unless --full), against the whole vectorised SVT upload
    of a 10^6-parameter model (theta_u = 0.1 and 0.01, c released values);
(b) K = 50..1000 ECOS counts (Gaussian), against today's path: scoring a 2,000-sample shard
    (64-dimensional features) against K centroids plus numpy noise.
Ratios are printed for the same run; ecos_flower.privacy.noise records the decision.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from ecos_flower.dssgd.svt import svt_select
from ecos_flower.ecos.scoring import coverage_scores
from ecos_flower.privacy.noise import NoiseSource


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true", help="time OpenDP on 1e6 values too")
    args = parser.parse_args()
    from importlib.metadata import version

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"python {platform.python_version()}, numpy {np.__version__}, opendp {version('opendp')}"
    )
    safe = NoiseSource.fresh()  # OpenDP in *_release
    fast = NoiseSource.replayable(0, 0)  # numpy everywhere
    assert safe.floating_point_safe and not fast.floating_point_safe
    safe.laplace_release(np.zeros(10), 1.0)  # build the measurements once
    safe.gaussian_release(np.zeros(10), 1.0)

    print("(a) SVT noise vectors, Laplace")
    opendp_per_value = None
    for n in (10**4, 10**5, 10**6):
        x = np.zeros(n)
        t_np = best_of(lambda x=x: fast.laplace_release(x, 1.0))
        if n <= 10**5 or args.full:
            t_dp = best_of(lambda x=x: safe.laplace_release(x, 1.0), repeats=1)
            opendp_per_value = t_dp / n
            note = ""
        else:
            t_dp = opendp_per_value * n
            note = " (extrapolated)"
        print(
            f"  n={n:.0e}: numpy {t_np * 1e3:8.2f} ms | OpenDP {t_dp * 1e3:9.1f} ms{note}"
            f" | OpenDP/numpy = {t_dp / t_np:7.0f}x"
        )
    rng = np.random.default_rng(0)
    delta = rng.normal(0, 1e-3, 10**6).astype(np.float32)
    for theta_u in (0.1, 0.01):
        c = int(np.ceil(theta_u * delta.size))
        t_svt = best_of(
            lambda theta_u=theta_u, c=c: svt_select(
                delta, theta_u, epsilon=float(c), gamma=1e-3, tau=1e-4, rng=fast
            )
        )
        t_extra = opendp_per_value * c
        print(
            f"  SVT upload n=1e6 theta_u={theta_u} (c={c}): {t_svt * 1e3:.0f} ms today; OpenDP on"
            f" the c released values adds ~{t_extra * 1e3:.0f} ms -> path x"
            f"{(t_svt + t_extra) / t_svt:.1f}"
        )

    print("(b) ECOS counts, Gaussian (scoring 2000 x 64 features against K centroids)")
    feats = rng.normal(size=(2000, 64))
    for k in (50, 100, 200, 500, 1000):
        cents = rng.normal(size=(k, 64))
        counts = coverage_scores(feats, cents)
        t_score = best_of(lambda cents=cents: coverage_scores(feats, cents))
        t_np = best_of(lambda counts=counts: fast.gaussian_release(counts, 3.0), repeats=20)
        t_dp = best_of(lambda counts=counts: safe.gaussian_release(counts, 3.0), repeats=5)
        t_lap = best_of(lambda counts=counts: safe.laplace_release(counts, 3.0), repeats=5)
        print(
            f"  K={k:4d}: numpy {t_np * 1e6:6.1f} us | OpenDP gaussian {t_dp * 1e3:6.2f} ms"
            f" (laplace {t_lap * 1e3:5.2f} ms) | OpenDP/numpy = {t_dp / t_np:6.0f}x | path "
            f"(score {t_score * 1e3:.1f} ms + noise) OpenDP/numpy = "
            f"{(t_score + t_dp) / (t_score + t_np):.2f}x"
        )


if __name__ == "__main__":
    main()
