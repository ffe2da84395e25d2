"""DP last-layer fine-tuning of ECOS models (issue 6, part 4): client accuracy before and after,
per method, budget and epsilon, on `simulations/digits-usps.toml`.

ECOS runs through Flower's in-process engine for each (budget, seed); an application registered
in `sampling_run.APPLICATIONS` keeps the cloud model. Then every client fine-tunes that model's
head on its private train split with `ecos_flower.client.applications.finetune_head` (the code the
ClientApp runs for `evaluate.finetune`, with the presets' settings) at each epsilon, and is
scored on its test split. One ECOS run serves every (method, epsilon) cell, so the before/after
comparison uses the same model. Settings were chosen on seeds 0 and 1 at epsilon 1; seed 2 is
fresh. Writes finetune-sweep.{json,md,png} under simulations/results/.

    .venv/bin/python simulations/finetune_sweep.py [--seeds 3] [--budgets 100,200,500,1000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ecos_flower.applications import head_features
from ecos_flower.client.applications import FinetuneSpec, finetune_head, read_finetune_spec
from ecos_flower.compare import preset_config
from ecos_flower.data import load_federation
from ecos_flower.flower import sampling_run
from ecos_flower.flower.applications import finetune_record, public_feature_scale_of
from ecos_flower.flower.engines import run_once
from ecos_flower.flower.settings import merge_run_config
from ecos_flower.models import evaluate_accuracy

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "simulations" / "digits-usps.toml"
RESULTS = ROOT / "simulations" / "results"
PRESETS = {"dp-sgd": "ecos-finetune", "dp-fc": "ecos-finetune-fc", "dp-ls": "ecos-finetune-ls"}
EPSILONS = (0.25, 0.5, 1.0, 2.0, 4.0, 16.0)
KEPT: dict[tuple[int, int], tuple[torch.nn.Module, np.ndarray]] = {}


def keep_model(context: sampling_run.SelectionContext) -> torch.nn.Module:
    """The supervised application, keeping the cloud model and the selection for the sweep."""
    model = sampling_run.train_on_selection(context)
    KEPT[(int(context.config["budget"]), int(context.config["seed"]))] = (model, context.selected)
    return model


def finetune_spec(
    preset: str, epsilon: float, scale: float, config: dict[str, Any]
) -> FinetuneSpec:
    """What a client parses from the `finetune` record the server sends for this preset."""
    layer = preset_config(preset) | {"finetune-epsilon": epsilon}
    run_config = merge_run_config(layer, {"delta": config["delta"]})
    return read_finetune_spec(finetune_record(run_config, scale), {})  # default node limits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budgets", default="100,200,500,1000")
    parser.add_argument("--out", default=str(RESULTS / "finetune-sweep"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("FLWR_HOME", "/tmp/ecos-finetune-sweep")
    sampling_run.APPLICATIONS["keep-model"] = keep_model
    federation = load_federation(SCENARIO)
    budgets = [int(b) for b in args.budgets.split(",")]
    records: list[dict[str, Any]] = []
    start = time.time()
    plan = [(b, s) for b in budgets for s in range(args.seeds)]
    for budget, seed in tqdm(plan, desc="ECOS runs + fine-tuning", unit="model"):
        layer = preset_config("ecos") | {"budget": budget, "application": "keep-model"}
        config = merge_run_config(layer, {"scenario": str(SCENARIO), "seed": seed})
        report = run_once(config, len(federation.clients), "in-process")
        model, selected = KEPT.pop((budget, seed))
        scale = public_feature_scale_of(model, federation.pool.images[selected], "cpu")
        before = {
            c: evaluate_accuracy(model, shard.test.images, shard.test.labels)[0]
            for c, shard in enumerate(federation.clients)
        }
        # The frozen features of every client's splits, computed once for all the fits.
        train_features = [head_features(model, s.train.images) for s in federation.clients]
        test_features = [head_features(model, s.test.images) for s in federation.clients]
        record = {
            "budget": budget,
            "seed": seed,
            "ecos-epsilon": float(config["epsilon"]),
            "accuracy-before": float(np.mean(list(before.values()))),
            "accuracy-reported-by-flower": report.accuracy_mean,
            "after": {},
        }
        for method, preset in PRESETS.items():
            for epsilon in EPSILONS:
                spec = finetune_spec(preset, epsilon, scale, config)
                noise_multiplier = spec.noise_multiplier  # calibrated once for all clients
                after = []
                for c, shard in enumerate(federation.clients):
                    result = finetune_head(
                        spec,
                        model.classifier,
                        train_features[c],
                        shard.train.labels,
                        noise_multiplier,
                        seed=1_000 * seed + c,
                    )
                    with torch.no_grad():
                        predicted = result.head(test_features[c]).argmax(dim=1)
                    after.append((predicted == shard.test.labels).sum().item() / len(predicted))
                record["after"][f"{method}@{epsilon:g}"] = {
                    "accuracy": float(np.mean(after)),
                    "epsilon-opacus": result.epsilon_opacus,
                }
        records.append(record)
        Path(args.out + ".json").write_text(json.dumps(records, indent=2))
    write_table(records, Path(args.out + ".md"), time.time() - start, " ".join(sys.argv[1:]))
    write_plot(records, Path(args.out + ".png"))


def write_table(records: list[dict[str, Any]], path: Path, seconds: float, args: str) -> None:
    """Mean (over seeds) client accuracy before and the change after, per budget/method/epsilon."""
    budgets = sorted({r["budget"] for r in records})
    lines = [
        "# DP last-layer fine-tuning of ECOS models (digits-usps)",
        "",
        f"Made by `.venv/bin/python simulations/finetune_sweep.py {args}` in {seconds / 60:.0f} "
        "min. Accuracy: mean over the 10 clients of each client's test accuracy, then mean over "
        f"{len({r['seed'] for r in records})} seeds; the change is after minus before, in points "
        "(mean +- std over seeds). Epsilon is the fine-tuning's alone (Opacus RDP, delta 1e-5); "
        "the ECOS query costs each client 1.0 more.",
        "",
        "| budget | before (%) | method | " + " | ".join(f"eps {e:g}" for e in EPSILONS) + " |",
        "|---|---|---|" + "---|" * len(EPSILONS),
    ]
    for budget in budgets:
        rows = [r for r in records if r["budget"] == budget]
        before = 100 * np.mean([r["accuracy-before"] for r in rows])
        for method in PRESETS:
            cells = []
            for epsilon in EPSILONS:
                key = f"{method}@{epsilon:g}"
                change = [100 * (r["after"][key]["accuracy"] - r["accuracy-before"]) for r in rows]
                cells.append(f"{np.mean(change):+.1f} +- {np.std(change):.1f}")
            lines.append(f"| {budget} | {before:.1f} | {method} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(records: list[dict[str, Any]], path: Path) -> None:
    """Accuracy change against epsilon, one panel per budget, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r["budget"] for r in records})
    fig, axes = plt.subplots(1, len(budgets), figsize=(4 * len(budgets), 3.4), sharey=False)
    for ax, budget in zip(np.atleast_1d(axes), budgets, strict=True):
        rows = [r for r in records if r["budget"] == budget]
        for method in PRESETS:
            change = [
                np.mean(
                    [
                        100 * (r["after"][f"{method}@{e:g}"]["accuracy"] - r["accuracy-before"])
                        for r in rows
                    ]
                )
                for e in EPSILONS
            ]
            ax.plot(EPSILONS, change, marker="o", label=method)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(
            f"B = {budget} (before {100 * np.mean([r['accuracy-before'] for r in rows]):.1f} %)"
        )
        ax.set_xlabel("fine-tuning epsilon")
    np.atleast_1d(axes)[0].set_ylabel("client accuracy change (points)")
    np.atleast_1d(axes)[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
