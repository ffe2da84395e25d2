"""DSSGD quality-bar experiment on MNIST (DESIGN 2.2 "Measured here").

MNIST test set (10,000 idx images) split 8,000 train / 2,000 test with a fixed seed; 30
participants with
equal IID shares of the 8,000; the paper's MLP; 20 local epochs each (round-robin, 600 participant
steps); batch 32, lr 0.05 (SGD momentum 0.9, as `train_epochs`); 3 seeds. Every participant is
evaluated
on the common 2,000-image test split. Runs standalone, centralized, DSSGD theta_u in {0.01, 0.1, 1}
(no DP, no clipping) and DP (SVT, theta_u = 0.1, gamma = 0.001, tau = 0.0001) at several epsilons.

    .venv/bin/python simulations/dssgd_mnist.py [--seeds 3] [--quick] [--model mlp|cnn]
        [--runs standalone,centralized,dssgd,dp]
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ecos_flower.dssgd.selection import upload_count
from ecos_flower.dssgd.simulate import DSSGDConfig, simulate_centralized, simulate_standalone
from ecos_flower.flower.dssgd_simulation import simulate_dssgd
from ecos_flower.models.nets import PaperCNN, PaperMLP

ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT.parent / "shared" / "data" / "digits" / "mnist" / "raw"
RESULTS = ROOT / "simulations" / "results"
EPS_OVER_C = (0.1, 1.0, 10.0, 100.0, 1000.0)  # DP budgets per participant per epoch, as eps / c


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped idx file (big-endian header: magic, dims) into a numpy array."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_mnist(seed: int = 0):
    images = read_idx(RAW / "t10k-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    labels = read_idx(RAW / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    images = (images - 0.1307) / 0.3081
    order = np.random.default_rng(seed).permutation(len(images))
    x = torch.from_numpy(images[order]).unsqueeze(1)
    y = torch.from_numpy(labels[order])
    return (x[:8000], y[:8000]), (x[8000:], y[8000:])


def iid_shares(train, n: int, seed: int):
    x, y = train
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(x)))
    return [(x[idx], y[idx]) for idx in torch.tensor_split(order, n)]


MODELS = {"mlp": PaperMLP, "cnn": PaperCNN}
RUN_KINDS = ("standalone", "centralized", "dssgd", "dp")


def model_factory(kind: str) -> Callable[[int], torch.nn.Module]:
    """The paper's MLP or CNN, initialised from `seed`."""

    def model_fn(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return MODELS[kind](10, 1, 28)

    return model_fn


def summarise(values: list[float]) -> str:
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--participants", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="2 epochs, 1 seed (smoke test)")
    parser.add_argument("--model", choices=sorted(MODELS), default="mlp")
    parser.add_argument(
        "--runs", default=",".join(RUN_KINDS), help=f"subset of {','.join(RUN_KINDS)}"
    )
    args = parser.parse_args(argv)
    kinds = [k for k in args.runs.split(",") if k]
    unknown = sorted(set(kinds) - set(RUN_KINDS))
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {', '.join(RUN_KINDS)}")
    model_fn = model_factory(args.model)
    torch.set_num_threads(1)
    if args.quick:
        args.seeds, args.epochs = 1, 2
    train, test = load_mnist(0)
    n_params = sum(p.numel() for p in model_fn(0).parameters())
    c = upload_count(0.1, n_params)
    runs: list[tuple[str, dict]] = [(k, {}) for k in ("standalone", "centralized") if k in kinds]
    if "dssgd" in kinds:
        runs += [(f"dssgd theta_u={t}", {"theta_u": t}) for t in (0.01, 0.1, 1.0)]
    runs += [
        (
            f"dp-svt eps/c={r:g}",
            {"theta_u": 0.1, "gamma": 1e-3, "tau": 1e-4, "dp_epsilon": r * c},
        )
        for r in (EPS_OVER_C if "dp" in kinds else ())
    ]
    results: dict[str, list[dict]] = {name: [] for name, _ in runs}
    bar = tqdm(total=len(runs) * args.seeds, desc="runs")
    for seed in range(args.seeds):
        shares = iid_shares(train, args.participants, seed)
        tests = [test] * args.participants
        for name, overrides in runs:
            config = DSSGDConfig(epochs=args.epochs, seed=seed, **overrides)
            bar.set_postfix_str(f"seed {seed} {name}")
            if name == "standalone":
                out = simulate_standalone(shares, tests, model_fn, config)
            elif name == "centralized":
                out = simulate_centralized(shares, tests, model_fn, config)
            else:
                out = simulate_dssgd(shares, tests, model_fn, config)
            out.pop("participant_accuracy", None)
            results[name].append(out)
            bar.update(1)
    bar.close()

    options = sys.argv[1:] if argv is None else argv
    command = " ".join([".venv/bin/python simulations/dssgd_mnist.py", *options])
    model_name = type(model_fn(0)).__name__
    doc = {
        "command": command,
        "setting": {
            "data": "MNIST t10k idx, 8,000 train / 2,000 test (seed 0)",
            "participants": args.participants,
            "epochs": args.epochs,
            "seeds": args.seeds,
            "model": f"{model_name} ({n_params} parameters)",
            "c_at_theta_u_0.1": c,
        },
        "machine": f"{platform.processor() or platform.machine()}, {platform.python_version()}, "
        f"torch {torch.__version__}",
        "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = ("-cnn" if args.model == "cnn" else "") + ("-quick" if args.quick else "")
    (RESULTS / f"dssgd-mnist{suffix}.json").write_text(json.dumps(doc, indent=2, default=float))

    lines = [
        "# DSSGD on MNIST (quality bar)",
        "",
        f"Command: `{command}`",
        "",
        f"Setting: {doc['setting']['data']}; {args.participants} IID participants; {model_name} "
        f"({n_params} params); {args.epochs} local epochs each, round-robin, theta_d = 1; "
        f"batch 32, lr 0.05; {args.seeds} seeds (mean ± std, %). "
        f"DP rows: SVT with theta_u = 0.1 (c = {c}), "
        "gamma = 0.001, tau = 0.0001, published eps split; epsilon is per participant per epoch "
        "(total = 10/9 * eps * epochs by basic composition as published).",
        "",
        "| run | participants' accuracy | server model accuracy | eps / epoch | up MB | s / run |",
        "|---|---|---|---|---|---|",
    ]
    for name, outs in results.items():
        part = summarise([o["mean_participant_accuracy"] for o in outs])
        server = (
            summarise([o["server_accuracy"] for o in outs]) if "server_accuracy" in outs[0] else "-"
        )
        eps = outs[0].get("config", {}).get("dp_epsilon")
        eps_s = f"{eps:g}" if eps else "-"
        up = f"{np.mean([o['bytes_up'] for o in outs]) / 1e6:.1f}" if "bytes_up" in outs[0] else "-"
        secs = f"{np.mean([o['seconds'] for o in outs]):.1f}"
        lines.append(f"| {name} | {part} | {server} | {eps_s} | {up} | {secs} |")
    (RESULTS / f"dssgd-mnist{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    if "dp" not in kinds:
        return 0
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    dp = [(r, results[f"dp-svt eps/c={r:g}"]) for r in EPS_OVER_C]
    xs = [r for r, _ in dp]
    for key, label in (
        ("mean_participant_accuracy", "participants"),
        ("server_accuracy", "server"),
    ):
        ys = [100 * np.mean([o[key] for o in outs]) for _, outs in dp]
        es = [100 * np.std([o[key] for o in outs]) for _, outs in dp]
        ax.errorbar(xs, ys, yerr=es, marker="o", label=f"DSSGD+SVT theta_u=0.1 ({label})")
    for name, style in (("standalone", ":"), ("centralized", "--"), ("dssgd theta_u=0.1", "-.")):
        val = 100 * np.mean([o["mean_participant_accuracy"] for o in results[name]])
        ax.axhline(val, linestyle=style, color="grey", label=f"{name} ({val:.1f})")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon / c per participant per epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("DSSGD on MNIST: accuracy vs privacy budget")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"dssgd-mnist{suffix}-epsilon.png", dpi=120)
    return 0


if __name__ == "__main__":
    t0 = time.perf_counter()
    code = main()
    print(f"done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    sys.exit(code)
