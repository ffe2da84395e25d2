"""Benchmark: ECOS coverage scoring vs one plain matmul of the same shape, and greedy k-center.

    python benchmarks/bench_ecos_scoring.py            # n=100,000 x K=1,000 x d=512
    python benchmarks/bench_ecos_scoring.py --quick    # small sizes, seconds

Scoring needs one (n x d) @ (d x K) product plus an argmin per row; the goal is to stay within
1.5x of the bare matmul (torch.mm, full n x K output) while using only chunk x K memory.
K-center is timed against the distance computations it must do (k rows of N distances).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from ecos_flower.ecos import coverage_scores, greedy_k_center


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (CI / smoke test)")
    parser.add_argument("--n", type=int, default=100_000, help="local features")
    parser.add_argument("--k", type=int, default=1_000, help="centroids")
    parser.add_argument("--d", type=int, default=512, help="feature dimension")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pool", type=int, default=100_000, help="k-center pool size")
    parser.add_argument("--kc-budget", type=int, default=1_000, help="k-center picks")
    parser.add_argument("--kc-d", type=int, default=128, help="k-center feature dimension")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args()
    if args.quick:
        args.n, args.k, args.d, args.pool, args.kc_budget = 10_000, 200, 128, 20_000, 200
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads"
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.n, args.d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c = x[rng.choice(args.n, args.k, replace=False)] + 0.01 * rng.normal(size=(args.k, args.d))
    c = c.astype(np.float32)
    xt, ct = torch.from_numpy(x), torch.from_numpy(c)
    rss_data = peak_rss_mib()

    t_score = median_time(lambda: coverage_scores(x, c), args.repeats)
    rss_score = peak_rss_mib()
    t_matmul = median_time(lambda: torch.mm(xt, ct.t()), args.repeats)
    rss_matmul = peak_rss_mib()
    print(f"scoring n={args.n:,} x K={args.k:,} x d={args.d}:")
    print(f"  coverage_scores (nearest) {t_score * 1e3:9.1f} ms")
    print(f"  torch.mm (n x d @ d x K)  {t_matmul * 1e3:9.1f} ms")
    print(f"  ratio {t_score / t_matmul:.2f}x (goal <= 1.5x)")
    print(
        f"  peak RSS: inputs {rss_data:.0f} MiB, after scoring {rss_score:.0f} MiB "
        f"(+{rss_score - rss_data:.0f}), after matmul {rss_matmul:.0f} MiB "
        f"(the full n x K output alone is {args.n * args.k * 4 / 2**20:.0f} MiB)"
    )
    t_radius = median_time(
        lambda: coverage_scores(x, c, mode="radius", radius=0.5, max_per_sample=3), args.repeats
    )
    print(f"  coverage_scores (radius, m=3) {t_radius * 1e3:.1f} ms")

    pool = rng.normal(size=(args.pool, args.kc_d)).astype(np.float32)
    picks = rng.choice(args.pool, args.kc_budget, replace=False)
    t_kc = median_time(
        lambda: greedy_k_center(pool, args.kc_budget, seed=0), max(1, args.repeats - 2)
    )
    pool_t = torch.from_numpy(pool)
    centers_t = torch.from_numpy(pool[picks])
    t_dist = median_time(lambda: torch.mm(pool_t, centers_t.t()), args.repeats)
    t_rows = median_time(
        lambda: [torch.mv(pool_t, pool_t[int(i)]) for i in picks[: min(50, len(picks))]],
        args.repeats,
    ) * (len(picks) / min(50, len(picks)))
    print(f"k-center: {args.kc_budget:,} picks from N={args.pool:,}, d={args.kc_d}:")
    print(f"  greedy_k_center                {t_kc * 1e3:9.1f} ms")
    print(f"  same distances as one matmul   {t_dist * 1e3:9.1f} ms  ({t_kc / t_dist:.1f}x)")
    print(f"  same distances row by row      {t_rows * 1e3:9.1f} ms  ({t_kc / t_rows:.2f}x)")
    print(f"peak RSS overall {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
