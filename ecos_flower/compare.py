"""`ecos-flower compare`: every selected method on one scenario, over seeds, budgets (for the
sampling methods) and epsilons (for the private methods); writes results.json (one record per
run), results.md (mean ± std, privacy units, versions, machine) and plots.

The epsilon sweep. `--epsilons` runs every private method at every epsilon: a client's total for
the whole run, at the run's delta. `EPSILON_SWEEP` is the one table saying which run-config keys
of a preset carry that total and how (a Gaussian release at that epsilon, DSSGD's per-step SVT
budget, ...). A private preset missing from it is an error before anything runs. Each record
keeps the target next to the epsilon the run really charged (the clients' ledgers).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import os
import platform
import time
import tomllib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:  # matplotlib is imported only when plotting
    from matplotlib.figure import Figure

from ecos_flower.config import DEFAULT_RUN_CONFIG
from ecos_flower.console import logs_to_file
from ecos_flower.data import DataError, Scenario, load_scenario
from ecos_flower.dssgd.svt import svt_scales
from ecos_flower.flower.engines import ENGINES, run_once
from ecos_flower.flower.settings import PACKAGE_ROOT, merge_run_config, resolve_path
from ecos_flower.privacy.gaussian import analytic_gaussian_epsilon, analytic_gaussian_sigma
from ecos_flower.privacy.units import NONE, UNITS, PrivacyUnit, privacy_unit, units_note

LOG_NAME = "compare.log"  # in the output folder: Flower's log, warnings, Ray's output
SAMPLING = ("ecos", "oracle", "random", "kcenter", "in-domain")
PRIVACY_UTILITY_PNG = "privacy-utility.png"
BYTES_PNG = "accuracy-vs-bytes.png"
BUDGET_PNG = "accuracy-vs-budget.png"
LINE_STYLES = ("-", "--", ":", "-.")
VERSIONED = ("ecos-flower", "flwr", "torch", "numpy", "opacus")

# How a run-config key carries the sweep's epsilon (a client's total for the run):
#   "total":     the key is that total (the method calibrates its whole run to it).
#   "gaussian":  one Gaussian release at (key, delta); a preset with several composes them
#                exactly (Gaussian DP), so each gets the epsilon whose noise multiplier is
#                sqrt(n) times the target's: together exactly the target.
#   "svt-step":  DSSGD's SVT budget per upload; a participant uploads dssgd-epochs times at the
#                split's true cost per upload (ecos_flower/dssgd/svt.py), composed basically.
EpsilonKind = Literal["total", "gaussian", "svt-step"]
EPSILON_SWEEP: dict[str, tuple[tuple[str, EpsilonKind], ...]] = {
    "ecos": (("epsilon", "gaussian"),),
    "ecos-distill": (("epsilon", "gaussian"),),
    "ecos-semi": (("epsilon", "gaussian"),),
    "ecos-knn": (("epsilon", "gaussian"), ("knn-epsilon", "gaussian")),
    "random-knn": (("knn-epsilon", "gaussian"),),
    "kcenter-knn": (("knn-epsilon", "gaussian"),),
    # ECOS, then a DP head fit on every client: two Gaussian releases, one ledger.
    "ecos-finetune": (("epsilon", "gaussian"), ("finetune-epsilon", "gaussian")),
    "ecos-finetune-fc": (("epsilon", "gaussian"), ("finetune-epsilon", "gaussian")),
    "ecos-finetune-ls": (("epsilon", "gaussian"), ("finetune-epsilon", "gaussian")),
    "dp-linear-probe": (("finetune-epsilon", "gaussian"),),
    "dp-fedavg": (("dp-target-epsilon", "total"),),
    "dssgd-dp": (("dssgd-epsilon", "svt-step"),),
    "dssgd-dp-eps1": (("dssgd-epsilon", "svt-step"),),
    # Sample-level DP-FedAvg (written alongside this table): its preset's run total. TODO(lead):
    # confirm the key once that work is final (tests check it is declared in config.py).
    "dp-fedavg-sample": (("dp-sample-epsilon", "total"),),
}


def available_methods() -> list[str]:
    """Method names: the presets in strategies/ (each is a run-config TOML)."""
    return sorted(p.stem for p in (PACKAGE_ROOT / "strategies").glob("*.toml"))


def preset_config(method: str) -> dict[str, Any]:
    """The run-config layer of a method's preset; unknown names raise listing the choices."""
    path = PACKAGE_ROOT / "strategies" / f"{method}.toml"
    if not path.is_file():
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(available_methods())}")
    return tomllib.loads(path.read_text())


def check_epsilons(epsilons: Sequence[Any]) -> list[float]:
    """The sweep's epsilons as floats; ValueError unless each is a positive finite number."""
    values = []
    for value in epsilons:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"epsilons must be positive numbers, got {value!r}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"epsilons must be positive finite numbers, got {value!r}")
        values.append(float(value))
    if not values:
        raise ValueError("epsilons: give at least one value")
    return sorted(set(values))


def epsilon_settings(preset: str, config: Mapping[str, Any], epsilon: float) -> dict[str, float]:
    """The run-config values that make `preset` (merged `config`) spend `epsilon` per client over
    the whole run, at the config's delta (`EPSILON_SWEEP`). ValueError for a preset not in it."""
    entry = EPSILON_SWEEP.get(preset)
    if entry is None:
        raise ValueError(
            f"method {preset!r} is private ({privacy_unit(config).label}) but has no entry in "
            "EPSILON_SWEEP (ecos_flower/compare.py): say which run-config keys carry its epsilon"
        )
    gaussians = [key for key, kind in entry if kind == "gaussian"]
    settings: dict[str, float] = {}
    for key, kind in entry:
        if kind == "total":
            settings[key] = epsilon
        elif kind == "gaussian":
            if len(gaussians) == 1:
                settings[key] = epsilon
            else:
                z = analytic_gaussian_sigma(epsilon, config["delta"]) * math.sqrt(len(gaussians))
                settings[key] = analytic_gaussian_epsilon(z, config["delta"])
        else:  # svt-step: the true cost per upload is a fixed share of dssgd-epsilon
            per_unit = svt_scales(1.0, 1, 1.0, config["svt-split"]).epsilon_spent
            settings[key] = epsilon / (config["dssgd-epochs"] * per_unit)
    return settings


def check_data_paths(scenario: Scenario) -> None:
    """Every domain's data path exists (DataError naming the scenario, the domain and the path):
    checked before anything starts, so a typo does not surface inside a simulated client."""
    for domain in scenario.domains:
        if domain.path is not None and not domain.path.exists():
            raise DataError(
                f"{scenario.source}: domain {domain.name!r}: data path {domain.path} does not exist"
            )


@dataclass(frozen=True)
class PlannedRun:
    """One run of a comparison: the preset, its swept values and the full run config."""

    method: str
    budget: int | None
    epsilon_target: float | None
    seed: int
    config: dict[str, Any]
    unit: PrivacyUnit

    @property
    def key(self) -> tuple[str, int | None, float | None, int]:
        """What identifies the run inside one comparison folder."""
        return (self.method, self.budget, self.epsilon_target, self.seed)

    @property
    def config_sha256(self) -> str:
        """A digest of the run config's non-default values: a resumed folder reuses a record
        only if it was made with the same settings (scenario, overrides, preset contents). Keys
        at their default are left out, so a release that adds a run-config key does not make
        every earlier record look foreign."""
        changed = {k: v for k, v in self.config.items() if DEFAULT_RUN_CONFIG.get(k) != v}
        text = json.dumps(changed, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        parts = [self.method]
        if self.budget is not None:
            parts.append(f"B={self.budget}")
        if self.epsilon_target is not None:
            parts.append(f"eps={self.epsilon_target:g}")
        return " ".join(parts)


def plan_runs(
    scenario: Path,
    methods: Sequence[str],
    seeds: int,
    *,
    budgets: Sequence[int] | None = None,
    epsilons: Sequence[float] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> list[PlannedRun]:
    """Every (method, budget, epsilon, seed) of a comparison, each run config merged and
    validated (errors name the bad key or method): private methods run at every epsilon,
    non-private ones once per seed; sampling methods at every budget."""
    overrides = dict(overrides or {})
    plan: list[PlannedRun] = []
    for method in methods:
        layer = preset_config(method)
        base = merge_run_config(layer, overrides)
        unit = privacy_unit(base)
        sampling = base["method"] in SAMPLING
        method_budgets: list[int | None] = list(budgets) if (budgets and sampling) else [None]
        method_epsilons: list[float | None] = [None]
        if epsilons and unit is not NONE:
            keys = set(epsilon_settings(method, base, epsilons[0]))
            clash = sorted(keys & set(overrides))
            if clash:
                raise ValueError(
                    f"--set {', '.join(clash)} conflicts with --epsilons (the sweep sets it "
                    f"for {method}); give the epsilon with --epsilons, or --epsilons preset"
                )
            method_epsilons = list(epsilons)
        for budget in method_budgets:
            for epsilon in method_epsilons:
                swept: dict[str, Any] = {}
                if epsilon is not None:
                    swept.update(epsilon_settings(method, base, epsilon))
                if budget is not None:
                    swept["budget"] = budget
                for seed in range(seeds):
                    # The swept values and the seed win over the preset and the overrides.
                    config = merge_run_config(
                        layer, overrides, swept, {"scenario": str(scenario), "seed": seed}
                    )
                    plan.append(
                        PlannedRun(
                            method,
                            config["budget"] if sampling else None,
                            epsilon,
                            seed,
                            config,
                            unit,
                        )
                    )
    return plan


def _record_key(record: Mapping[str, Any]) -> tuple[str, int | None, float | None, int]:
    return (record["method"], record["budget"], record["epsilon_target"], record["seed"])


def reusable_records(plan: Sequence[PlannedRun], results: Path) -> dict[int, dict[str, Any]]:
    """The records of an earlier, interrupted run of the same comparison, by plan index.

    A record is reused when its (method, budget, epsilon target, seed) is planned and, if it
    carries a `config_sha256` (every record written since resuming exists), that digest matches
    the planned run's config; records of other runs are dropped."""
    if not results.exists():
        return {}
    try:
        earlier = json.loads(results.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"--resume: {results} is not valid JSON ({error})") from None
    by_key = {_record_key(record): record for record in earlier}
    reused: dict[int, dict[str, Any]] = {}
    for index, run in enumerate(plan):
        record = by_key.get(run.key)
        if record is None:
            continue
        digest = record.get("config_sha256")
        if digest is not None and digest != run.config_sha256:
            continue
        reused[index] = record
    return reused


def run_compare(
    scenario: str | Path,
    methods: Sequence[str],
    seeds: int,
    out: str | Path,
    *,
    budgets: Sequence[int] | None = None,
    epsilons: Sequence[float] | None = None,
    engine: str = "ray",
    overrides: dict[str, Any] | None = None,
    verbose: bool = False,
    resume: bool = False,
) -> list[dict[str, Any]]:
    """Run every planned (method, budget, epsilon, seed); write results.json after each run (so
    nothing is lost if a later run fails), then results.md and the plots. Returns the records.
    `resume`: reuse the records of `out`/results.json that belong to this plan (see
    `reusable_records`) and run only the rest.

    Everything is validated before `out` is created: the seeds, budgets, epsilons, every method
    name and setting, the scenario and its data paths. The console shows one progress bar;
    Flower's log, Python warnings and Ray's output go to `out`/compare.log (`verbose`: they print
    as well)."""
    from tqdm import tqdm

    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an integer >= 1, got {seeds!r}")
    if budgets is not None and any(not isinstance(b, int) or b < 1 for b in budgets):
        raise ValueError(f"budgets must be integers >= 1, got {list(budgets)}")
    sweep = check_epsilons(epsilons) if epsilons is not None else None
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    scenario_path = resolve_path(scenario, "scenario")
    plan = plan_runs(
        scenario_path, methods, seeds, budgets=budgets, epsilons=sweep, overrides=overrides
    )
    num_clients = 0
    for data_root in sorted({run.config["data-root"] or None for run in plan}, key=str):
        parsed = load_scenario(scenario_path, data_root)
        check_data_paths(parsed)
        num_clients = parsed.num_clients
    out = Path(out)
    reused = reusable_records(plan, out / "results.json") if resume else {}
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = [reused[index] for index in sorted(reused)]
    todo = [run for index, run in enumerate(plan) if index not in reused]
    with logs_to_file(out / LOG_NAME, verbose=verbose, append=resume) as console:
        if reused:
            logging.getLogger("flwr").info(
                "compare: resuming, %d of %d runs reused from results.json", len(reused), len(plan)
            )
        progress = tqdm(
            todo,
            desc="compare",
            unit="run",
            file=console,
            dynamic_ncols=True,
            initial=len(reused),
            total=len(plan),
        )
        for run in progress:
            progress.set_postfix_str(f"{run.label} seed {run.seed}")
            logging.getLogger("flwr").info("compare: %s, seed %d", run.label, run.seed)
            start = time.time()
            report = run_once(run.config, num_clients, engine)
            report.wall_s = time.time() - start
            record = report.record(
                run.method, run.budget, unit=run.unit, epsilon_target=run.epsilon_target
            )
            record["config_sha256"] = run.config_sha256
            records.append(record)
            (out / "results.json").write_text(json.dumps(records, indent=2))
        progress.close()
        command = compare_command(
            scenario_path, methods, seeds, budgets, engine, overrides, out, sweep
        )
        write_plots(records, out)  # matplotlib's warnings, if any, go to the log too
        write_results_md(records, out / "results.md", scenario_path, command)
    return records


GroupKey = tuple[str, Any, Any]  # (method, budget, epsilon target)


def _group(records: list[dict[str, Any]]) -> dict[GroupKey, list[dict[str, Any]]]:
    """Records by (method, budget, epsilon target), in run order."""
    groups: dict[GroupKey, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        key = (record["method"], record["budget"], record.get("epsilon_target"))
        groups[key].append(record)
    return groups


def _unit(record: Mapping[str, Any]) -> PrivacyUnit:
    return UNITS.get(record.get("privacy_unit", "none"), NONE)


def mean_std(values: list[float], fmt: str = "{:.1f}", scale: float = 1.0) -> str:
    array = np.asarray(values, dtype=float) * scale
    if len(array) == 1:
        return fmt.format(array[0])
    return f"{fmt.format(array.mean())} ± {fmt.format(array.std(ddof=1))}"


def _std(values: list[float]) -> float:
    """The sample std over seeds (0 for one seed), as the table's ±."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


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
    """One row per (method, budget, epsilon target): the privacy unit and who adds the noise,
    accuracy (%) and domain precision mean ± std over seeds, the epsilon target and the epsilon
    charged per client (max over seeds), bytes up/down per client (mean), client compute and
    wall time. `aligned`: cells padded to their column's width (readable on a terminal)."""
    header = (
        "| method | privacy unit | noise by | budget | epsilon target | seeds | accuracy (%) | "
        "domain precision | epsilon charged (delta) | bytes up / client | "
        "bytes down / client | client compute (s) | wall (s) |"
    )
    lines = [header, "|" + "---|" * 13]
    for (method, budget, target), group in _group(records).items():
        unit = _unit(group[0])
        precision = [r["domain_precision"] for r in group if r["domain_precision"] is not None]
        delta = group[0]["delta"]
        eps = _epsilon_text([r["epsilon"] for r in group])
        eps_cell = eps if eps in ("inf", "0") or not delta else f"{eps} ({delta:g})"
        lines.append(
            f"| {method} | {unit.label} | {unit.noise_by} | "
            f"{budget if budget is not None else '-'} | "
            f"{f'{target:g}' if target is not None else '-'} | {len(group)} | "
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
            cell.ljust(width) if i < 3 or row is rows[0] else cell.rjust(width)
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
    epsilons: Sequence[float] | None = None,
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
    if epsilons:
        parts.append(f"--epsilons {','.join(f'{e:g}' for e in epsilons)}")
    parts.append(f"--engine {engine}")
    for key, value in (overrides or {}).items():
        parts.append(f"--set {key}={json.dumps(value)}")
    parts.append(f"--out {out_text}")
    return " ".join(parts)


def versions() -> dict[str, str]:
    """Python's and the key packages' versions (from their metadata: nothing is imported)."""
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def machine() -> dict[str, str]:
    """Where the comparison ran."""
    return {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "CPUs": str(os.cpu_count()),
    }


def _units_table(records: list[dict[str, Any]]) -> str:
    by_unit: dict[str, list[str]] = defaultdict(list)
    for record in records:
        if record["method"] not in by_unit[record.get("privacy_unit", "none")]:
            by_unit[record.get("privacy_unit", "none")].append(record["method"])
    lines = [
        "| privacy unit | an epsilon protects | noise added by | trust assumption | methods |",
        "|---|---|---|---|---|",
    ]
    for unit in sorted((UNITS[name] for name in by_unit), key=lambda u: -u.strength):
        lines.append(
            f"| {unit.label} | {unit.protects} | {unit.noise_by} | {unit.trust} | "
            f"{', '.join(by_unit[unit.name])} |"
        )
    return "\n".join(lines)


def write_results_md(
    records: list[dict[str, Any]], path: Path, scenario: Path, command: str
) -> None:
    """results.md (renders on GitHub): the command, the table with every method's privacy
    unit, the headline plots (embedded if they exist next to it), versions, machine, date."""
    units = [_unit(r) for r in records]
    plots = [
        ("Privacy-utility", PRIVACY_UTILITY_PNG),
        ("Accuracy against communication", BYTES_PNG),
        ("Accuracy against budget", BUDGET_PNG),
    ]
    figures = "".join(
        f"### {title}\n\n![{title}]({name})\n\n"
        for title, name in plots
        if (path.parent / name).is_file()
    )
    env = {**versions(), **machine()}
    env["date"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    env_rows = "\n".join(f"| {key} | {value} |" for key, value in env.items())
    path.write_text(
        f"# Comparison on `{scenario.name}`\n\n"
        f"```\n{command}\n```\n\n"
        "Accuracy is the mean over clients of each client's test accuracy, then mean ± std over "
        "seeds. Epsilon is per client, the total for the run: the target the sweep asked for "
        "and what the run really charged (max over seeds and clients: the clients' ledgers; for "
        "client-level DP-FedAvg the server's accountant). results.json holds every run.\n\n"
        f"{table_markdown(records)}\n\n{units_note(units)}\n\n"
        f"## Privacy units\n\n{_units_table(records)}\n\n"
        f"## Plots\n\n{figures}"
        f"## Environment\n\n| | |\n|---|---|\n{env_rows}\n"
    )


def method_colours(methods: Sequence[str]) -> dict[str, str]:
    """One colour per method, from the sorted method list: the same in every plot of a run."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    names = sorted(set(methods))
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: to_hex(cmap(i % cmap.N)) for i, name in enumerate(names)}


def _series_label(method: str, unit: PrivacyUnit, extra: str = "") -> str:
    return f"{method}{extra} [{unit.label}]"


def _log_ticks(ax: Any, values: list[float]) -> None:
    """The plotted values themselves as the log axis' ticks, written plainly (0.25, 1, 8)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ticks = sorted(set(values))
    if 0 < len(ticks) <= 12:
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:g}"))
        ax.xaxis.set_minor_locator(NullLocator())


def _finish(fig: Figure, ax: Any, xlabel: str, note: str = "") -> None:
    """Labels; a margin so no point or error bar touches an axis; the legend outside the axes
    (it never hides a point); an optional sentence under the plot."""
    import textwrap

    ax.set_xlabel(xlabel)
    ax.set_ylabel("client test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.margins(x=0.08, y=0.08)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    if note:
        fig.text(0.01, -0.02, textwrap.fill(note, 120), fontsize=7, va="top", ha="left")


def make_figures(records: list[dict[str, Any]]) -> dict[str, Figure]:
    """The plots of a comparison, by file name: privacy-utility.png, accuracy-vs-bytes.png and,
    with several budgets, accuracy-vs-budget.png (one colour per method in all of them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _group(records)
    colours = method_colours([r["method"] for r in records])
    unit_of = {r["method"]: _unit(r) for r in records}
    budgets_of: dict[str, set[Any]] = defaultdict(set)
    for method, budget, _target in groups:
        budgets_of[method].add(budget)
    markers = "osD^v<>p"
    figures: dict[str, Figure] = {}

    def budget_text(method: str, budget: Any) -> str:
        return f" B={budget}" if len(budgets_of[method]) > 1 else ""

    def marker(method: str, budget: Any) -> str:
        """A method's budgets differ by marker (its colour is its own)."""
        ordered = sorted(budgets_of[method], key=lambda b: (b is None, b))
        return markers[ordered.index(budget) % len(markers)]

    def line(method: str, budget: Any) -> str:
        """... and, on lines, by line style."""
        ordered = sorted(budgets_of[method], key=lambda b: (b is None, b))
        return LINE_STYLES[ordered.index(budget) % len(LINE_STYLES)]

    # Privacy-utility: accuracy against epsilon, one line per private (method, budget).
    fig, ax = plt.subplots(figsize=(7, 4.2))
    series: dict[tuple[str, Any], list[tuple[float, float, float]]] = defaultdict(list)
    references = []
    for (method, budget, target), group in groups.items():
        acc = [100 * r["accuracy_mean"] for r in group]
        unit = _unit(group[0])
        eps = target if target is not None else max(float(r["epsilon"]) for r in group)
        if unit is NONE or not (math.isfinite(eps) and eps > 0):
            references.append((method, budget, unit, float(np.mean(acc)), group))
        else:
            series[(method, budget)].append((float(eps), float(np.mean(acc)), _std(acc)))
    xs: list[float] = []
    for (method, budget), points in series.items():
        points.sort()
        xs += [p[0] for p in points]
        ax.errorbar(
            [p[0] for p in points],
            [p[1] for p in points],
            yerr=[p[2] for p in points],
            marker=marker(method, budget),
            linestyle=line(method, budget),
            capsize=3,
            color=colours[method],
            label=_series_label(method, unit_of[method], budget_text(method, budget)),
        )
    for method, budget, unit, mean, group in references:
        eps = _epsilon_text([r["epsilon"] for r in group])
        ax.axhline(
            mean,
            linestyle="--",
            linewidth=1.2,
            color=colours[method],
            label=f"{method}{budget_text(method, budget)} [{unit.label}, epsilon {eps}]",
        )
    ax.set_xscale("log")
    if xs:
        _log_ticks(ax, xs)
    else:
        ax.set_xlim(0.1, 10)
    units = [_unit(r) for r in records]
    _finish(
        fig,
        ax,
        "epsilon per client, total for the run (log)",
        units_note(units) + " Error bars: std over seeds; dashed: methods without DP noise.",
    )
    ax.set_title("Privacy-utility")
    figures[PRIVACY_UTILITY_PNG] = fig

    # Accuracy against bytes (up + down) per client, one point per group; the epsilons (and
    # budgets) of points that coincide share one annotation, so no text overprints another.
    fig, ax = plt.subplots(figsize=(7, 4.2))
    labelled: set[str] = set()
    notes: dict[tuple[float, float], tuple[float, float, list[str]]] = {}
    for (method, budget, target), group in groups.items():
        total = [
            _mean_bytes(r["bytes_up_per_client"]) + _mean_bytes(r["bytes_down_per_client"])
            for r in group
        ]
        acc = [100 * r["accuracy_mean"] for r in group]
        x, y = max(float(np.mean(total)), 1.0), float(np.mean(acc))
        ax.errorbar(
            [x],
            [y],
            yerr=[_std(acc)],
            marker=marker(method, budget),
            capsize=3,
            color=colours[method],
            linestyle="none",
            label=None if method in labelled else _series_label(method, unit_of[method]),
        )
        labelled.add(method)
        if target is not None:
            where = (round(math.log10(x), 1), round(y))
            notes.setdefault(where, (x, y, []))[2].append(
                f"eps {target:g}{budget_text(method, budget)}"
            )
    for x, y, texts in notes.values():
        ax.annotate(
            ", ".join(dict.fromkeys(texts)),
            (x, y),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=6,
        )
    ax.set_xscale("log")
    _finish(fig, ax, "bytes up + down per client (log)")
    ax.set_title("Accuracy against communication")
    figures[BYTES_PNG] = fig

    budgets = {b for (_m, b, _t) in groups if b is not None}
    if len(budgets) > 1:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        by_series: dict[tuple[str, Any], list[tuple[int, float, float]]] = defaultdict(list)
        for (method, budget, target), group in groups.items():
            if budget is not None:
                acc = [100 * r["accuracy_mean"] for r in group]
                by_series[(method, target)].append((budget, float(np.mean(acc)), _std(acc)))
        # A method's colour is its own; its epsilons differ by marker and line style.
        targets_of: dict[str, list[Any]] = defaultdict(list)
        for method, target in by_series:
            targets_of[method].append(target)
        for (method, target), points in by_series.items():
            points.sort()
            extra = f" eps={target:g}" if target is not None else ""
            index = sorted(targets_of[method], key=lambda t: (t is None, t)).index(target)
            ax.errorbar(
                [p[0] for p in points],
                [p[1] for p in points],
                yerr=[p[2] for p in points],
                marker=markers[index % len(markers)],
                linestyle=LINE_STYLES[index % len(LINE_STYLES)],
                capsize=3,
                color=colours[method],
                label=_series_label(method, unit_of[method], extra),
            )
        _finish(fig, ax, "budget (selected pool samples)")
        ax.set_title("Accuracy against budget")
        figures[BUDGET_PNG] = fig
    return figures


def write_plots(records: list[dict[str, Any]], out: Path) -> list[Path]:
    """Save `make_figures` as PNGs in `out` (legend and note included); returns the paths."""
    import matplotlib.pyplot as plt

    paths = []
    for name, fig in make_figures(records).items():
        fig.savefig(out / name, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(out / name)
    return paths
