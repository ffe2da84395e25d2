"""Benchmark the ECOS server: compression (K-means) time vs pool size, and diverse decompression
(allocation + per-cluster greedy k-center) vs the distance computations it must do.

    .venv/bin/python benchmarks/bench_ecos_server.py          # N to 10^6 (d=64), 2x10^5 (d=512)
    .venv/bin/python benchmarks/bench_ecos_server.py --quick    # seconds

Compression: time per N should grow linearly (mini-batch K-means above the threshold); quality is
the inertia on a subsample relative to full (Lloyd) K-means fitted on that subsample.
Decompression: farthest-first inside cluster c with b_c picks computes b_c rows of |c| distances;
the floor is one batched (b_c x d) @ (d x |c|) product per cluster, timed in the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from ecos_flower.ecos import EcosSampler, compress


def clustered(n: int, d: int, centres: int, seed: int) -> np.ndarray:
    """L2-normalised features around `centres` random centres (like real extractor output)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(centres, d)).astype(np.float32)
    x = means[rng.integers(0, centres, size=n)] + 0.3 * rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def inertia(x: np.ndarray, centroids: np.ndarray) -> float:
    d2 = (x**2).sum(1)[:, None] - 2 * x @ centroids.T + (centroids**2).sum(1)[None, :]
    return float(np.maximum(d2.min(1), 0).sum())


def bench_compress(sizes: list[int], d: int, k: int) -> None:
    print(f"\ncompress: K={k}, d={d}")
    print(f"{'N':>9} {'method':>10} {'seconds':>8} {'us/sample':>9} {'inertia vs full':>16}")
    for n in sizes:
        x = clustered(n, d, 2 * k, seed=n)
        start = time.perf_counter()
        result = compress(x, k, seed=0)
        seconds = time.perf_counter() - start
        method = "minibatch" if n > 20_000 else "full"
        sub = x[np.random.default_rng(1).choice(n, size=min(n, 20_000), replace=False)]
        full = KMeans(k, n_init=1, random_state=0).fit(sub)
        ratio = inertia(sub, result.centroids) / inertia(sub, full.cluster_centers_)
        print(f"{n:>9,} {method:>10} {seconds:>8.2f} {1e6 * seconds / n:>9.2f} {ratio:>16.3f}")


def bench_decompress(n: int, d: int, k: int, budget: int) -> None:
    x = clustered(n, d, k, seed=7)
    compression = compress(x, k, seed=0)
    scores = np.random.default_rng(3).gamma(1.0, size=k) * compression.cluster_sizes
    sampler = EcosSampler(x, compression, scores, seed=0)
    allocation = sampler.allocation(budget)
    start = time.perf_counter()
    selected = sampler.select(budget)
    seconds = time.perf_counter() - start
    # The floor: one (b_c x d) @ (d x |c|) distance block per cluster, all clusters.
    xt = torch.from_numpy(x)
    order = np.argsort(compression.assignments, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(compression.cluster_sizes)])
    start = time.perf_counter()
    for c in range(k):
        if allocation[c] == 0:
            continue
        members = xt[order[bounds[c] : bounds[c + 1]]]
        picks = members[: int(allocation[c])]
        torch.cdist(picks, members)
    floor = time.perf_counter() - start
    # The distance computations farthest-first must do, in order: one row per pick.
    start = time.perf_counter()
    for c in range(k):
        members = xt[order[bounds[c] : bounds[c + 1]]]
        norms = (members * members).sum(1)
        for i in range(int(allocation[c])):
            torch.addmv(norms, members, members[i], alpha=-2.0)
    rows_time = time.perf_counter() - start
    rows = int(sum(a * s for a, s in zip(allocation, compression.cluster_sizes, strict=True)))
    print(f"\ndecompress: budget {budget:,} from N={n:,} (d={d}, K={k}): {len(selected):,} picks")
    print(f"  k-center inside clusters: {seconds:.2f} s for {rows:,} distances")
    print(
        f"  vs the row-by-row distance computations it must do: {rows_time:.2f} s "
        f"-> ratio {seconds / rows_time:.2f}x (goal <= 2x)"
    )
    print(
        f"  vs one batched distance block per cluster (absolute floor): {floor:.2f} s "
        f"-> ratio {seconds / floor:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="BLAS/OpenMP and torch threads (the apps use 1: no oversubscription)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with threadpool_limits(limits=args.threads):
        run(args)


def run(args: argparse.Namespace) -> None:
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch threads "
        f"{torch.get_num_threads()}, numpy {np.__version__}, torch {torch.__version__}"
    )
    if args.quick:
        bench_compress([5_000, 20_000, 50_000], 64, 50)
        bench_decompress(50_000, 64, 50, 1_000)
        return
    bench_compress([10_000, 100_000, 1_000_000], 64, 100)
    bench_compress([10_000, 100_000, 200_000], 512, 100)
    bench_decompress(1_000_000, 64, 100, 10_000)


if __name__ == "__main__":
    main()
