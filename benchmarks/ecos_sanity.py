"""End-to-end ECOS sanity check on scikit-learn's digits: does ECOS find the client's domain?

Public pool: plain + shifted digits (`--shift`: inverted 1 - x by default, "thick" strokes, or
"noise") of one half of the images, upscaled to 16x16; client: a subset of the shifted digits of
the other half. For each feature extractor: compress
the pool (K-means), score the client's data, add analytic-Gaussian noise, aggregate with
noise-aware thresholding, select a budget with ECOS / Oracle / Random / K-Center / InDomain, and
print each selection's domain precision (fraction of picks from the client's domain).

    python benchmarks/ecos_sanity.py [--client-size 400] [--k 50] [--budget 200] [--seeds 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.datasets import load_digits

from ecos_flower.ecos import (
    EcosSampler,
    InDomainSampler,
    KCenterSampler,
    OracleSampler,
    RandomSampler,
    aggregate_scores,
    compress,
    coverage_scores,
    domain_precision,
    make_extractor,
    score_sensitivity,
    suggest_num_clusters,
)
from ecos_flower.privacy import GaussianMechanism


def shift_domain(images: torch.Tensor, shift: str) -> torch.Tensor:
    """The client's domain: "invert" (1 - x, easy), "thick" (dilated strokes) or "noise"."""
    if shift == "invert":
        return 1.0 - images
    if shift == "thick":
        return torch.nn.functional.max_pool2d(images, 3, stride=1, padding=1)
    if shift == "noise":
        generator = torch.Generator().manual_seed(0)
        return (images + 0.25 * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    raise ValueError(f"unknown shift {shift!r}")


def build_data(client_size: int, seed: int, size: int = 16, shift: str = "invert"):
    """(pool images, pool labels, pool domains, client images); domain 1 = the shifted one."""
    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear")
    images = images.clamp(0, 1)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    client_half, pool_half = order[: len(order) // 2], order[len(order) // 2 :]
    pool_images = torch.cat([images[pool_half], shift_domain(images[pool_half], shift)])
    pool_labels = torch.cat([labels[pool_half], labels[pool_half]])
    pool_domains = np.concatenate([np.zeros(len(pool_half)), np.ones(len(pool_half))]).astype(
        np.int64
    )
    client_idx = rng.choice(client_half, size=min(client_size, len(client_half)), replace=False)
    client_images = shift_domain(images[client_idx], shift)
    return pool_images, pool_labels, pool_domains, client_images


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(max(1, args.threads))
    rows = []
    for kind in args.extractors:
        per_seed: dict[str, list[float]] = {}
        t0 = time.perf_counter()
        for seed in range(args.seeds):
            pool, pool_labels, domains, client = build_data(
                args.client_size, seed, shift=args.shift
            )
            if kind == "supervised":
                extractor = make_extractor(kind, epochs=args.epochs, seed=seed)
            elif kind == "pca":
                extractor = make_extractor(kind, n_components=args.pca_dim, seed=seed)
            else:
                extractor = make_extractor(kind, seed=seed)
            pool_feats = extractor.fit_transform(pool, pool_labels)
            client_feats = extractor.transform(client)
            mech = GaussianMechanism.calibrated(args.epsilon, args.delta, score_sensitivity())
            if args.k == "auto":
                k = suggest_num_clusters(len(client), mech.sigma, len(pool_feats))
            else:
                k = int(args.k)
            comp = compress(pool_feats, k, seed=seed)
            true = coverage_scores(client_feats, comp.centroids)
            noisy = mech.release(true, np.random.default_rng(1000 + seed))
            samplers = {
                "ecos": EcosSampler(
                    pool_feats,
                    comp,
                    aggregate_scores(
                        [noisy], mech.sigma, args.threshold, cluster_sizes=comp.cluster_sizes
                    ),
                    seed,
                ),
                "ecos-nothr": EcosSampler(
                    pool_feats, comp, aggregate_scores([noisy], mech.sigma, 0.0), seed
                ),
                "oracle": OracleSampler(pool_feats, comp, true, seed),
                "random": RandomSampler(len(pool_feats), seed),
                "kcenter": KCenterSampler(pool_feats, seed),
                "indomain": InDomainSampler(domains, 1, seed),
            }
            for name, sampler in samplers.items():
                picked = sampler.select(args.budget)
                assert len(np.unique(picked)) == len(picked) == args.budget
                per_seed.setdefault(name, []).append(domain_precision(picked, domains, 1))
        elapsed = time.perf_counter() - t0
        summary = {name: (np.mean(v), np.std(v)) for name, v in per_seed.items()}
        rows.append((kind, summary, elapsed))
        line = "  ".join(f"{n}={m:.3f}±{s:.3f}" for n, (m, s) in summary.items())
        print(f"{kind:11s} {line}  ({elapsed:.1f}s)", flush=True)
    print(
        f"\nsetting: client {args.client_size} {args.shift} digits, pool 1796 (half shifted), "
        f"K={args.k}, budget={args.budget}, eps={args.epsilon}, delta={args.delta}, "
        f"threshold x{args.threshold} of the aggregate noise std, {args.seeds} seeds"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extractors", nargs="+", default=["supervised", "random", "pca"])
    parser.add_argument("--shift", choices=["invert", "thick", "noise"], default="invert")
    parser.add_argument("--client-size", type=int, default=400)
    parser.add_argument("--k", default="50", help="number of clusters, or 'auto'")
    parser.add_argument("--budget", type=int, default=200)
    parser.add_argument("--epsilon", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--threshold", type=float, default=2.0)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--pca-dim", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
