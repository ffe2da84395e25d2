"""`ecos-flower compare`: every selected method on one scenario, over seeds (and budgets for the
sampling methods); writes results.json (one record per run), results.md (mean ± std) and plots."""

from __future__ import annotations

import json
import logging
import math
import time
import tomllib
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # matplotlib is imported only when plotting
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

from ecos_flower.console import logs_to_file
from ecos_flower.data import DataError, Scenario, load_scenario
from ecos_flower.flower.engines import ENGINES, run_once
from ecos_flower.flower.report import RunReport, _json_safe
from ecos_flower.flower.settings import PACKAGE_ROOT, merge_run_config, resolve_path

LOG_NAME = "compare.log"  # in the output folder: Flower's log, warnings, Ray's output
SAMPLING = ("ecos", "oracle", "random", "kcenter", "in-domain")
# The keys every record has (the schema documented in the README; keep it stable).
RECORD_KEYS = (
    "method",
    "preset",
    "seed",
    "budget",
    "accuracy_mean",
    "accuracy_per_client",
    "epsilon",
    "delta",
    "bytes_up_per_client",
    "bytes_down_per_client",
    "client_compute_s",
    "wall_s",
    "domain_precision",
    "settings",
)


def available_methods() -> list[str]:
    """Method names: the presets in strategies/ (each is a run-config TOML)."""
    return sorted(p.stem for p in (PACKAGE_ROOT / "strategies").glob("*.toml"))


def preset_config(method: str) -> dict[str, Any]:
    """The run-config layer of a method's preset; unknown names raise listing the choices."""
    path = PACKAGE_ROOT / "strategies" / f"{method}.toml"
    if not path.is_file():
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(available_methods())}")
    return tomllib.loads(path.read_text())


def to_record(report: RunReport, preset: str, budget: int | None) -> dict[str, Any]:
    """A report as one results.json record (the stable schema)."""
    full = report.to_json()
    record = {
        "method": preset,
        "preset": preset,
        "seed": report.seed,
        "budget": budget,
        "accuracy_mean": report.accuracy_mean,
        "accuracy_per_client": full["accuracy_per_client"],
        "epsilon": full["epsilon"],
        "delta": report.delta,
        "bytes_up_per_client": full["bytes_up_per_client"],
        "bytes_down_per_client": full["bytes_down_per_client"],
        "client_compute_s": full["client_compute_s"],
        "wall_s": report.wall_s,
        "domain_precision": report.extra.get("domain-precision"),
        "settings": full["settings"],
        "phase_seconds": full["phase_seconds"],
        "extra": _json_safe(report.extra),
    }
    return record


def check_data_paths(scenario: Scenario) -> None:
    """Every domain's data path exists (DataError naming the scenario, the domain and the path):
    checked before anything starts, so a typo does not surface inside a simulated client."""
    for domain in scenario.domains:
        if domain.path is not None and not domain.path.exists():
            raise DataError(
                f"{scenario.source}: domain {domain.name!r}: data path {domain.path} does not exist"
            )


def run_compare(
    scenario: str | Path,
    methods: Sequence[str],
    seeds: int,
    out: str | Path,
    *,
    budgets: Sequence[int] | None = None,
    engine: str = "ray",
    overrides: dict[str, Any] | None = None,
    verbose: bool = False,
) -> list[dict[str, Any]]:
    """Run every (method, budget, seed); write results.json after each run (so nothing is lost
    if a later run fails), then results.md and the plots. Returns the records.

    Everything is validated before `out` is created: the seeds, every method name and setting,
    the scenario and its data paths. The console shows one progress bar; Flower's log, Python
    warnings and Ray's output go to `out`/compare.log (`verbose`: they print as well)."""
    from tqdm import tqdm

    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an integer >= 1, got {seeds!r}")
    if budgets is not None and any(not isinstance(b, int) or b < 1 for b in budgets):
        raise ValueError(f"budgets must be integers >= 1, got {list(budgets)}")
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    scenario_path = resolve_path(scenario, "scenario")
    layers = {m: preset_config(m) for m in methods}  # validate every name before running
    # Every preset with the overrides, validated before any run (errors name the bad key).
    checked = {m: merge_run_config(layers[m], overrides or {}) for m in methods}
    data_roots = {checked[m]["data-root"] or None for m in methods}
    num_clients = 0
    for data_root in sorted(data_roots, key=str):
        parsed = load_scenario(scenario_path, data_root)
        check_data_paths(parsed)
        num_clients = parsed.num_clients
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = []
    for method in methods:
        method_budgets = budgets if (budgets and checked[method]["method"] in SAMPLING) else [None]
        for budget in method_budgets:
            for seed in range(seeds):
                plan.append((method, budget, seed))
    records: list[dict[str, Any]] = []
    with logs_to_file(out / LOG_NAME, verbose=verbose) as console:
        progress = tqdm(plan, desc="compare", unit="run", file=console, dynamic_ncols=True)
        for method, budget, seed in progress:
            label = method if budget is None else f"{method} B={budget}"
            progress.set_postfix_str(f"{label} seed {seed}")
            logging.getLogger("flwr").info("compare: %s, seed %d", label, seed)
            # The swept budget and seed win over the preset and the overrides.
            swept = {"scenario": str(scenario_path), "seed": seed}
            if budget is not None:
                swept["budget"] = budget
            config = merge_run_config(layers[method], overrides or {}, swept)
            start = time.time()
            report = run_once(config, num_clients, engine)
            report.wall_s = time.time() - start
            records.append(
                to_record(
                    report,
                    method,
                    config["budget"] if config["method"] in SAMPLING else None,
                )
            )
            (out / "results.json").write_text(json.dumps(records, indent=2))
        progress.close()
        command = compare_command(scenario_path, methods, seeds, budgets, engine, overrides, out)
        write_table(records, out / "results.md", scenario_path, command)
        write_plots(records, out)  # matplotlib's warnings, if any, go to the log too
    return records


def _group(records: list[dict[str, Any]]) -> dict[tuple[str, Any], list[dict[str, Any]]]:
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[(record["method"], record["budget"])].append(record)
    return groups


def mean_std(values: list[float], fmt: str = "{:.1f}", scale: float = 1.0) -> str:
    array = np.asarray(values, dtype=float) * scale
    if len(array) == 1:
        return fmt.format(array[0])
    return f"{fmt.format(array.mean())} ± {fmt.format(array.std(ddof=1))}"


def _epsilon_text(values: list[Any]) -> str:
    floats = [float(v) for v in values]
    if all(math.isinf(v) for v in floats):
        return "inf"
    return f"{max(floats):.3g}"


def _mean_bytes(per_client: dict[str, int]) -> float:
    return float(np.mean(list(per_client.values()))) if per_client else 0.0


def _mean_compute(record: dict[str, Any]) -> float:
    values = list(record["client_compute_s"].values())
    return float(np.mean(values)) if values else 0.0


def table_markdown(records: list[dict[str, Any]], *, aligned: bool = False) -> str:
    """Methods as rows: accuracy (%) and domain precision mean ± std over seeds, epsilon per
    client (max over seeds), bytes up/down per client (mean), client compute and wall time.
    `aligned`: cells padded to their column's width (the same table, readable on a terminal)."""
    header = (
        "| method | budget | seeds | accuracy (%) | domain precision | epsilon (delta) | "
        "bytes up / client | bytes down / client | client compute (s) | wall (s) |"
    )
    lines = [header, "|" + "---|" * 10]
    for (method, budget), group in _group(records).items():
        precision = [r["domain_precision"] for r in group if r["domain_precision"] is not None]
        delta = group[0]["delta"]
        eps = _epsilon_text([r["epsilon"] for r in group])
        eps_cell = eps if eps in ("inf", "0") or not delta else f"{eps} ({delta:g})"
        lines.append(
            f"| {method} | {budget if budget is not None else '-'} | {len(group)} | "
            f"{mean_std([r['accuracy_mean'] for r in group], scale=100)} | "
            f"{mean_std(precision, '{:.3f}') if precision else '-'} | {eps_cell} | "
            f"{np.mean([_mean_bytes(r['bytes_up_per_client']) for r in group]):,.0f} | "
            f"{np.mean([_mean_bytes(r['bytes_down_per_client']) for r in group]):,.0f} | "
            f"{np.mean([_mean_compute(r) for r in group]):.2f} | "
            f"{np.mean([r['wall_s'] for r in group]):.1f} |"
        )
    return _align(lines) if aligned else "\n".join(lines)


def _align(lines: list[str]) -> str:
    """A markdown table with every column padded to its widest cell (text left, numbers right)."""
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    widths = [max(len(row[i]) for row in rows if row[i] != "---") for i in range(len(rows[0]))]
    out = []
    for row in rows:
        if all(cell == "---" for cell in row):
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
            continue
        cells = [
            cell.ljust(width) if i == 0 or row is rows[0] else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def compare_command(
    scenario: Path,
    methods: Sequence[str],
    seeds: int,
    budgets: Sequence[int] | None,
    engine: str,
    overrides: dict[str, Any] | None,
    out: Path,
) -> str:
    """The command line that reproduces a comparison (paths relative to the project root)."""
    try:
        scenario_text = str(scenario.relative_to(PACKAGE_ROOT))
    except ValueError:
        scenario_text = str(scenario)
    try:
        out_text = str(Path(out).resolve().relative_to(PACKAGE_ROOT))
    except ValueError:
        out_text = str(out)
    parts = [
        f"ecos-flower compare {scenario_text} --methods {','.join(methods)}",
        f"--seeds {seeds}",
    ]
    if budgets:
        parts.append(f"--budgets {','.join(str(b) for b in budgets)}")
    parts.append(f"--engine {engine}")
    for key, value in (overrides or {}).items():
        parts.append(f"--set {key}={json.dumps(value)}")
    parts.append(f"--out {out_text}")
    return " ".join(parts)


def write_table(records: list[dict[str, Any]], path: Path, scenario: Path, command: str) -> None:
    """results.md: the table and the command that made it."""
    path.write_text(
        f"# Comparison on `{scenario.name}`\n\n"
        f"Made by `{command}` (see results.json for every run; accuracy is the mean over clients "
        f"of each client's test accuracy, then mean ± std over seeds; epsilon is each client's "
        f"total for the run).\n\n{table_markdown(records)}\n"
    )


def write_plots(records: list[dict[str, Any]], out: Path) -> list[Path]:
    """accuracy-vs-epsilon.png, accuracy-vs-bytes.png (log x), accuracy-vs-budget.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _group(records)
    paths = []

    def finish(fig: Figure, ax: Axes, name: str, xlabel: str) -> None:
        ax.set_xlabel(xlabel)
        ax.set_ylabel("client test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        paths.append(out / name)

    fig, ax = plt.subplots(figsize=(6, 4))
    finite = []
    for (method, budget), group in groups.items():
        eps = max(float(r["epsilon"]) for r in group)
        acc = [100 * r["accuracy_mean"] for r in group]
        label = method if budget is None else f"{method} B={budget}"
        if math.isinf(eps):
            ax.axhline(
                np.mean(acc),
                linestyle="--",
                linewidth=1,
                label=f"{label} (eps=inf)",
                color=f"C{len(finite) % 10}",
            )
        else:
            finite.append(eps)
            ax.errorbar(
                [max(eps, 1e-3)],
                [np.mean(acc)],
                yerr=[np.std(acc)],
                fmt="o",
                label=label,
                capsize=3,
            )
    if finite:
        ax.set_xscale("symlog", linthresh=0.1)
    finish(
        fig,
        ax,
        "accuracy-vs-epsilon.png",
        "epsilon per client (total; 0 = never reads client data)",
    )

    fig, ax = plt.subplots(figsize=(6, 4))
    for (method, budget), group in groups.items():
        up = np.mean([_mean_bytes(r["bytes_up_per_client"]) for r in group])
        acc = [100 * r["accuracy_mean"] for r in group]
        label = method if budget is None else f"{method} B={budget}"
        ax.errorbar(
            [max(up, 1.0)], [np.mean(acc)], yerr=[np.std(acc)], fmt="o", label=label, capsize=3
        )
    ax.set_xscale("log")
    finish(fig, ax, "accuracy-vs-bytes.png", "bytes uploaded per client (log)")

    sampling = {k: g for k, g in groups.items() if k[1] is not None}
    if sampling:
        fig, ax = plt.subplots(figsize=(6, 4))
        by_method: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
        for (method, budget), group in sampling.items():
            acc = [100 * r["accuracy_mean"] for r in group]
            by_method[method].append((budget, float(np.mean(acc)), float(np.std(acc))))
        for method, points in by_method.items():
            points.sort()
            ax.errorbar(
                [p[0] for p in points],
                [p[1] for p in points],
                yerr=[p[2] for p in points],
                marker="o",
                label=method,
                capsize=3,
            )
        finish(fig, ax, "accuracy-vs-budget.png", "budget (selected pool samples)")
    return paths
