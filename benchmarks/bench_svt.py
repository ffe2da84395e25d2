"""Benchmark: vectorised SVT vs the per-element loop vs a plain top-k of |delta|.

    .venv/bin/python benchmarks/bench_svt.py [--large]   # --large adds 10^7 parameters

The per-element loop is timed on a 10^5-entry slice (same theta_u, so c scales with it) and
extrapolated linearly to the full size; the printed ratio says so.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from functools import partial

import numpy as np

from ecos_flower.dssgd.svt import svt_select, svt_select_reference


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def top_k(delta: np.ndarray, c: int) -> np.ndarray:
    """Indices of the c largest |delta| (unordered), the non-private baseline."""
    return np.argpartition(np.abs(delta), delta.size - c)[delta.size - c :]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--large", action="store_true", help="also 10^7 parameters")
    parser.add_argument("--theta-u", type=float, default=0.1)
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"python {platform.python_version()}, numpy {np.__version__}"
    )
    sizes = [10**6] + ([10**7] if args.large else [])
    rng = np.random.default_rng(0)
    kw = {"gamma": 1e-3, "tau": 1e-4}
    for n in sizes:
        delta = rng.normal(0, 1e-3, n).astype(np.float32)
        small = delta[: 10**5]
        c = int(np.ceil(args.theta_u * n))
        for label, ratio in (("eps/c=1 (noise-dominated)", 1.0), ("eps/c=1e4", 1e4)):
            vec = best_of(
                partial(svt_select, delta, args.theta_u, epsilon=ratio * c, rng=rng, **kw)
            )
            c_small = int(np.ceil(args.theta_u * small.size))
            loop_small = best_of(
                partial(
                    svt_select_reference,
                    small,
                    args.theta_u,
                    epsilon=ratio * c_small,
                    rng=rng,
                    **kw,
                ),
                repeats=1,
            )
            loop = loop_small * n / small.size
            topk = best_of(partial(top_k, delta, c))
            print(
                f"n={n:.0e} theta_u={args.theta_u} c={c} {label}: vectorised {vec * 1e3:.0f} ms | "
                f"loop {loop * 1e3:.0f} ms (timed on 1e5, extrapolated) | top-k {topk * 1e3:.0f} ms"
                f" | loop/vectorised = {loop / vec:.1f}x | vectorised/top-k = {vec / topk:.1f}x"
            )


if __name__ == "__main__":
    main()
