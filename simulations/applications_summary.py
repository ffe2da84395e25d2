"""One table for the ECOS applications on digits-usps (issue 6): each application's client
accuracy for ECOS, Random and K-Center at each budget (mean +- std over seeds), next to
supervised-only training on the same selections (same seeds, from ../ecos-digits-usps), and
whether ECOS beats both baselines. Reads the committed results.json files; writes SUMMARY.md.

    .venv/bin/python simulations/applications_summary.py
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from ecos_flower.compare import mean_std

RESULTS = Path(__file__).resolve().parent / "results"
FOLDER = RESULTS / "applications-digits-usps"
APPLICATIONS = {
    "semi-supervised": (
        "semi",
        "semi-supervised (pseudo-labels on pool samples nearest the selection)",
    ),
    "distill": ("distill", "distillation of a pool-trained teacher on the selection only"),
    "private-knn": ("knn", "private kNN labelling by the clients (votes at epsilon 1)"),
}
SELECTORS = ("ecos", "random", "kcenter")


def accuracies(path: Path) -> dict[tuple[str, int], list[float]]:
    """(preset, budget) -> accuracy (%) per seed, from a compare results.json."""
    table: dict[tuple[str, int], list[float]] = defaultdict(list)
    for record in json.loads(path.read_text()):
        table[(record["preset"], record["budget"])].append(100 * record["accuracy_mean"])
    return table


def cell(values: list[float]) -> str:
    """Mean ± sample std (as compare's tables), and the number of seeds."""
    return mean_std(values) + f" (n={len(values)})" if values else "-"


def main() -> None:
    supervised = accuracies(RESULTS / "ecos-digits-usps" / "results.json")
    lines = [
        "# ECOS applications on digits-usps: summary",
        "",
        "Made by `.venv/bin/python simulations/applications_summary.py` from each folder's",
        "results.json (commands in each results.md). Client accuracy (%), mean ± std over seeds;",
        "in brackets: supervised-only training on the same selection (same seeds, from",
        "`../ecos-digits-usps`).",
        "",
        "| application | budget | ECOS | Random | K-Center | ECOS beats both? |",
        "|---|---|---|---|---|---|",
    ]
    for folder, (suffix, title) in APPLICATIONS.items():
        path = FOLDER / folder / "results.json"
        if not path.is_file():
            continue
        table = accuracies(path)
        for budget in sorted({b for (_, b) in table}):
            means, cells = {}, []
            for selector in SELECTORS:
                values = table.get((f"{selector}-{suffix}", budget), [])
                means[selector] = np.mean(values) if values else float("nan")
                reference = supervised.get((selector, budget), [])
                extra = f" [{np.mean(reference):.1f}]" if reference else ""
                cells.append(cell(values) + extra)
            beats = means["ecos"] > max(means["random"], means["kcenter"])
            margin = means["ecos"] - max(means["random"], means["kcenter"])
            lines.append(
                f"| {title} | {budget} | " + " | ".join(cells) + f" | {'yes' if beats else 'no'}"
                f" ({margin:+.1f}) |"
            )
    lines += finetune_lines(FOLDER / "finetune" / "results.json")
    (FOLDER / "SUMMARY.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def finetune_lines(path: Path) -> list[str]:
    """Client accuracy of the ECOS model before and after each client's DP head fine-tuning."""
    if not path.is_file():
        return []
    lines = [
        "",
        "DP last-layer fine-tuning of the ECOS model on every client (same runs: the clients",
        "report the received model's accuracy and the fine-tuned one's). Epsilon: the",
        "fine-tuning's alone (Opacus), and each client's ledger total with the ECOS query.",
        "",
        "| preset | budget | before (%) | after (%) | change (points) | improved seeds |"
        " fine-tuning epsilon | ledger epsilon |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for record in json.loads(path.read_text()):
        groups[(record["preset"], record["budget"])].append(record)
    for (preset, budget), records in groups.items():
        before = [100 * r["extra"]["accuracy-before-finetune"] for r in records]
        after = [100 * r["accuracy_mean"] for r in records]
        change = [a - b for a, b in zip(after, before, strict=True)]
        opacus = max(r["extra"]["finetune-epsilon-opacus"] for r in records)
        ledger = max(r["epsilon"] for r in records)
        lines.append(
            f"| {preset} | {budget} | {mean_std(before)} | {mean_std(after)} | "
            f"{np.mean(change):+.1f} ± {np.std(change, ddof=1):.1f} | "
            f"{sum(c > 0 for c in change)} of {len(change)} | {opacus:.2f} | {ledger:.2f} |"
        )
    return lines


if __name__ == "__main__":
    main()
