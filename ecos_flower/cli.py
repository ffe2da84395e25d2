"""`ecos-flower`: run a method on a scenario through Flower's simulation engine, and small tools."""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
import tomllib
from pathlib import Path
from typing import Any

from ecos_flower.config import SETTINGS_BY_NAME
from ecos_flower.flower.report import RunReport
from ecos_flower.flower.settings import merge_run_config, resolve_path


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs; values parsed as TOML (numbers, booleans, strings), else kept as text
    (so is the text of a key declared as a string: `--set results-dir=2024`). merge_run_config
    validates them: an unknown key or a bad value is an error naming the key."""
    parsed: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"error: --set expects key=value, got {pair!r}")
        key, value = (part.strip() for part in pair.split("=", 1))
        try:
            parsed[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed[key] = value
        setting = SETTINGS_BY_NAME.get(key)
        if setting is not None and setting.kind is str and not isinstance(parsed[key], str):
            parsed[key] = value
    return parsed


def run_config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults < preset file (`--preset`, a strategies/*.toml) < --scenario/--out < --set pairs."""
    layers: list[dict[str, Any]] = []
    if args.preset:
        preset = resolve_path(args.preset, "preset")
        try:
            layers.append(tomllib.loads(preset.read_text()))
        except tomllib.TOMLDecodeError as exc:
            raise SystemExit(f"error: preset {preset} is not valid TOML: {exc}") from exc
    direct: dict[str, Any] = {}
    if args.scenario:
        direct["scenario"] = str(Path(args.scenario).resolve())
    if args.out:
        direct["results-dir"] = str(Path(args.out).resolve())
    layers.append(direct)
    layers.append(parse_overrides(args.set or []))
    config = merge_run_config(*layers)
    config["scenario"] = str(resolve_path(config["scenario"], "scenario"))
    return config


def run(args: argparse.Namespace) -> RunReport:
    """Run one method on one scenario; Ray simulation unless --in-process."""
    from ecos_flower.data import load_scenario
    from ecos_flower.flower.engines import run_once

    config = run_config_from_args(args)
    num_clients = load_scenario(config["scenario"], config["data-root"] or None).num_clients
    report = run_once(config, num_clients, "in-process" if args.in_process else "ray")
    print(report.table())
    return report


def compare(args: argparse.Namespace) -> None:
    """Run several methods on one scenario over seeds (budgets, epsilons); write results.json,
    results.md and the plots."""
    from ecos_flower.compare import LOG_NAME, run_compare, table_markdown
    from ecos_flower.privacy.units import UNITS, units_note

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    records = run_compare(
        args.scenario,
        methods,
        args.seeds,
        args.out,
        budgets=args.budgets or None,
        epsilons=args.epsilons or None,
        engine=args.engine,
        overrides=parse_overrides(args.set or []),
        verbose=args.verbose,
        resume=args.resume,
    )
    print(table_markdown(records, aligned=True) + "\n")
    print(units_note([UNITS[r["privacy_unit"]] for r in records]))
    print(
        f"results in {args.out}: results.json, results.md, privacy-utility.png, "
        f"accuracy-vs-*.png; log in {Path(args.out) / LOG_NAME}"
    )


def montage(args: argparse.Namespace) -> None:
    """Save a PNG with sample images of every domain of a scenario."""
    from ecos_flower.data import load_scenario
    from ecos_flower.data.montage import save_domain_montage

    scenario = load_scenario(resolve_path(args.scenario, "scenario"))
    save_domain_montage(scenario, Path(args.output))
    print(f"wrote {args.output}")


def export_shards(args: argparse.Namespace) -> None:
    """Write each client shard of a scenario as a per-node ImageFolder tree (PNG files)."""
    from ecos_flower.data.node_data import export_shards as write_shards

    scenario = resolve_path(args.scenario, "scenario")
    folders = write_shards(scenario, Path(args.out), train_only=args.train_only)
    for folder in folders:
        print(f"wrote {folder}")
    if args.pool:
        from ecos_flower.data.pool import export_pool

        print(f"wrote {export_pool(scenario, Path(args.out) / 'pool')} (run-config `pool`)")


def node_worker(args: argparse.Namespace) -> None:
    """Serve this node's messages from one warm process (see `ecos_flower.node`)."""
    from ecos_flower.node.worker import main as serve

    serve(args.socket, args.node_config, args.log_file, args.socket_group)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where the help already says it or there is none;
    never wraps inside a hyphenated name (argparse's textwrap would print `dp-` / `fedavg`)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def positive_int(text: str) -> int:
    """An integer >= 1 (argparse names the option in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_int_list(text: str) -> list[int]:
    """Comma-separated integers >= 1."""
    return [positive_int(part.strip()) for part in text.split(",") if part.strip()]


def positive_float_list(text: str) -> list[float]:
    """Comma-separated positive finite numbers (argparse names the option in its error), or
    `preset`: no sweep (an empty list), each preset's own epsilon."""
    if text.strip() == "preset":
        return []
    values = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {part!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"must be positive and finite, got {part}")
        values.append(value)
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return values


# The main job's default: a small privacy-utility sweep (ECOS against DP-FedAvg at ECOS's record
# unit and at the client unit, and the non-private references) that finishes in a few minutes
# on two cores with Ray (measured: see README).
DEFAULT_METHODS = "ecos,dp-fedavg-sample,dp-fedavg,random,dssgd,fedavg"
DEFAULT_EPSILONS = "1,4"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ecos-flower", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="run one method on a scenario (Flower simulation)")
    run_parser.add_argument("--scenario", help="scenario TOML (default: simulations/embedded.toml)")
    run_parser.add_argument("--preset", help="a run-config TOML, e.g. strategies/fedavg.toml")
    run_parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override one run-config key (repeatable)",
    )
    run_parser.add_argument("--out", help="folder for results.json")
    run_parser.add_argument(
        "--in-process",
        action="store_true",
        help="drive the apps in this process instead of Ray (fast, for debugging)",
    )
    run_parser.set_defaults(func=run)
    compare_parser = sub.add_parser(
        "compare",
        help="compare methods on a scenario",
        description="Run every method on one scenario for every seed (and budget; private "
        "methods also at every epsilon, non-private ones once); write "
        "results.json, results.md and plots into --out. The console shows a progress bar and "
        "the table; Flower's log, warnings and Ray's output go to OUT/compare.log.",
        formatter_class=DefaultsHelpFormatter,
    )
    compare_parser.add_argument(
        "scenario",
        nargs="?",
        default="simulations/embedded.toml",
        help="scenario TOML (relative to the working directory or the project root)",
    )
    compare_parser.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help="comma-separated preset names from strategies/",
    )
    compare_parser.add_argument(
        "--seeds", type=positive_int, default=1, help="runs per method: seeds 0 .. N-1"
    )
    compare_parser.add_argument(
        "--budgets",
        type=positive_int_list,
        help="comma-separated budgets to sweep for the sampling methods "
        "(default: each preset's budget)",
    )
    compare_parser.add_argument(
        "--epsilons",
        type=positive_float_list,
        default=DEFAULT_EPSILONS,
        help="comma-separated epsilons (per client, total for the run) at which every private "
        "method runs; non-private methods run once per seed; 'preset': each preset's own "
        "epsilon, no sweep",
    )
    compare_parser.add_argument(
        "--engine",
        choices=("ray", "in-process"),
        default="ray",
        help="Flower's Ray simulation, or the same apps driven in this process",
    )
    compare_parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override one run-config key for every method (repeatable; default: none)",
    )
    compare_parser.add_argument(
        "--out", default="results/compare", help="folder for the results and compare.log"
    )
    compare_parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs of OUT/results.json that this command plans (same method, budget, "
        "epsilon, seed and run config) and run only the missing ones (default: run all)",
    )
    compare_parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also print Flower's log, warnings and Ray's output on the terminal "
        "(default: only in OUT/compare.log)",
    )
    compare_parser.set_defaults(func=compare)
    montage_parser = sub.add_parser("montage", help="PNG of a scenario's domains")
    montage_parser.add_argument("scenario")
    montage_parser.add_argument("output")
    montage_parser.set_defaults(func=montage)
    export_parser = sub.add_parser(
        "export-shards",
        help="write each client shard as OUT/node-<i>/<class>/<n>.png (a node's own `data`)",
    )
    export_parser.add_argument("scenario")
    export_parser.add_argument("out")
    export_parser.add_argument(
        "--train-only",
        action="store_true",
        help="only each shard's train part (default: train and test, the node splits itself)",
    )
    export_parser.add_argument(
        "--pool",
        action="store_true",
        help="also write the public pool for the server: OUT/pool/<domain>/<class>/<n>.png and "
        "OUT/pool/pool.toml (pass it as run-config `pool`)",
    )
    export_parser.set_defaults(func=export_shards)
    worker_parser = sub.add_parser(
        "node-worker",
        help="a node's warm worker: holds its data, policy and ledger; SuperNodes relay to it",
    )
    worker_parser.add_argument(
        "--socket", required=True, help="Unix socket to listen on (the SuperNode's `worker`)"
    )
    worker_parser.add_argument(
        "--node-config",
        nargs="+",
        default=None,
        help="this node's config, as for flower-supernode: 'k=v ...' or a .toml file",
    )
    worker_parser.add_argument("--log-file", default=None, help="log here (default: stderr)")
    worker_parser.add_argument(
        "--socket-group",
        default=None,
        help="a group whose members may connect (socket mode 0660): run the worker as its own "
        "user owning the data and ledger, the SuperNode as a user in this group "
        "(default: the worker's user only, mode 0600)",
    )
    worker_parser.set_defaults(func=node_worker)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
