"""`ecos-flower`: run a method on a scenario through Flower's simulation engine, and small tools."""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

from ecos_flower.flower.report import RunReport
from ecos_flower.flower.settings import merge_run_config, resolve_path


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs, values parsed as TOML (numbers, booleans, quoted strings) or kept as text."""
    parsed: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"error: --set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            parsed[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed[key.strip()] = value
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
    from ecos_flower.client_app import app as client_app
    from ecos_flower.data import load_federation
    from ecos_flower.flower.inprocess import InProcessGrid, run_in_process
    from ecos_flower.server_app import make_server_app

    config = run_config_from_args(args)
    federation = load_federation(config["scenario"], data_root=config["data-root"] or None)
    num_clients = len(federation.clients)
    reports: list[RunReport] = []
    server_app = make_server_app(config, on_report=reports.append)
    if args.in_process:
        run_in_process(server_app, InProcessGrid(client_app, num_clients))
    else:
        from flwr.simulation import run_simulation

        backend_config = {
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
        }
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_clients,
            backend_config=backend_config,
        )
    if not reports:
        raise SystemExit("error: the run ended without a report (see the log above)")
    print(reports[0].table())
    return reports[0]


def montage(args: argparse.Namespace) -> None:
    """Save a PNG with sample images of every domain of a scenario."""
    from ecos_flower.data import load_scenario
    from ecos_flower.data.montage import save_domain_montage

    scenario = load_scenario(resolve_path(args.scenario, "scenario"))
    save_domain_montage(scenario, Path(args.output))
    print(f"wrote {args.output}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ecos-flower", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="run one method on a scenario (Flower simulation)")
    run_parser.add_argument("--scenario", help="scenario TOML (default: simulations/embedded.toml)")
    run_parser.add_argument("--preset", help="a run-config TOML, e.g. strategies/fedavg.toml")
    run_parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                            help="override one run-config key (repeatable)")
    run_parser.add_argument("--out", help="folder for results.json")
    run_parser.add_argument("--in-process", action="store_true",
                            help="drive the apps in this process instead of Ray (fast, for debugging)")
    run_parser.set_defaults(func=run)
    montage_parser = sub.add_parser("montage", help="PNG of a scenario's domains")
    montage_parser.add_argument("scenario")
    montage_parser.add_argument("output")
    montage_parser.set_defaults(func=montage)
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
