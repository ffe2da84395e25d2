"""The run-config declarations: validation at the boundary, and the copies kept equal to them
(pyproject.toml's `[tool.flwr.app.config]`, the README's "Run config keys" table)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from ecos_flower.config import (
    DEFAULT_RUN_CONFIG,
    METHODS,
    SETTINGS,
    SETTINGS_BY_NAME,
    RunConfigError,
    main,
    markdown_table,
    merge_run_config,
)

ROOT = Path(__file__).parents[1]


def test_defaults_are_typed_and_valid():
    assert merge_run_config() == DEFAULT_RUN_CONFIG
    for setting in SETTINGS:
        if setting.default is not None:
            assert type(setting.default) is setting.kind, setting.name
            assert setting.coerce(setting.default) == setting.default
        assert setting.help and setting.group, setting.name


def test_unknown_key_names_it_and_the_closest_known_key():
    with pytest.raises(
        RunConfigError, match=r"unknown run-config key 'budgt' \(did you mean 'budget'"
    ):
        merge_run_config({"budget": 10}, {"budgt": 10})
    with pytest.raises(ValueError, match="unknown run-config key 'zzz'"):
        merge_run_config({"zzz": 1})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("budget", "abc", r"'budget': expected an integer, got 'abc'"),
        ("delta", "tiny", r"'delta': expected a finite number, got 'tiny'"),
        ("epsilon", float("nan"), r"'epsilon': expected a finite number"),
        ("budget", 2.5, r"'budget': expected an integer, got 2.5"),
        ("extractor", 3, r"'extractor': expected a string, got 3"),
        ("budget", 0, r"'budget': budget=0 must be >= 1"),
        ("delta", 1.0, r"'delta': delta=1.0 must be in \(0, 1\)"),
        ("theta-u", 0.0, r"'theta-u': theta-u=0.0 must be in \(0, 1\]"),
        ("seed", -1, r"'seed': seed=-1 must be >= 0"),
        ("learning-rate", 0, r"'learning-rate': learning-rate=0.0 must be > 0"),
        ("extractor", "resnet", r"unknown extractor 'resnet'; choose one of random, supervised"),
        ("method", "fedsgd", r"unknown method 'fedsgd'; choose one of ecos"),
    ],
)
def test_bad_values_name_the_key_and_the_value(key, value, message):
    with pytest.raises(RunConfigError, match=message):
        merge_run_config({key: value})


@pytest.mark.parametrize(("key", "value"), [("budget", True), ("seed", False), ("delta", True)])
def test_booleans_are_not_numbers(key, value):
    with pytest.raises(RunConfigError, match=f"'{key}': expected .*, got {value}"):
        merge_run_config({key: value})


def test_values_come_out_with_their_declared_types():
    config = merge_run_config(
        {"delta": "1e-5", "budget": "500", "epsilon": 2, "num-server-rounds": 1e1, "seed": "7"}
    )
    assert config["delta"] == 1e-5 and type(config["delta"]) is float
    assert config["budget"] == 500 and type(config["budget"]) is int
    assert config["epsilon"] == 2.0 and type(config["epsilon"]) is float
    assert config["num-server-rounds"] == 10 and type(config["num-server-rounds"]) is int
    assert config["seed"] == 7 and type(config["seed"]) is int


def test_string_typed_toml_values_are_parsed():
    layer = tomllib.loads('delta = "1e-5"\nbudget = "250"\nthreshold-multiple = "3"\n')
    config = merge_run_config(layer)
    assert (config["delta"], config["budget"], config["threshold-multiple"]) == (1e-5, 250, 3.0)
    assert type(config["threshold-multiple"]) is float


def test_later_layers_win_and_every_layer_is_validated():
    assert merge_run_config({"budget": 10}, {"budget": 20})["budget"] == 20
    with pytest.raises(RunConfigError, match="'budget'"):
        merge_run_config({"budget": 10}, {"budget": -5})


def test_num_clients_has_no_default_but_is_validated():
    assert "num-clients" not in DEFAULT_RUN_CONFIG
    assert merge_run_config({"num-clients": 3})["num-clients"] == 3
    with pytest.raises(RunConfigError, match="'num-clients'"):
        merge_run_config({"num-clients": 0})


def test_every_preset_is_a_valid_layer():
    for path in sorted((ROOT / "strategies").glob("*.toml")):
        merge_run_config(tomllib.loads(path.read_text()))


def test_method_choices_are_the_server_apps_methods():
    server_app = pytest.importorskip("ecos_flower.server_app")
    assert set(METHODS) == set(server_app.METHODS)


def test_pyproject_run_config_equals_the_declared_defaults():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    config = pyproject["tool"]["flwr"]["app"]["config"]
    assert config == DEFAULT_RUN_CONFIG
    assert {k: type(v) for k, v in config.items()} == {
        k: type(v) for k, v in DEFAULT_RUN_CONFIG.items()
    }


def _readme_table() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("### Run config keys", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows]


def test_readme_table_lists_exactly_the_declared_keys_and_defaults():
    rows = _readme_table()
    assert [row[0].strip("`") for row in rows] == [s.name for s in SETTINGS]
    for row in rows:
        setting = SETTINGS_BY_NAME[row[0].strip("`")]
        if setting.default is None:
            assert row[1] == "set by the server"
            continue
        default = tomllib.loads(f"v = {row[1].strip('`')}")["v"]
        assert default == setting.default and type(default) is type(setting.default), row


def test_readme_table_is_the_generated_one(capsys):
    assert main(["--markdown"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == markdown_table()
    assert printed in (ROOT / "README.md").read_text()


# ------------------------------------------------------------------- the CLI's boundary
def _cli_error(capsys, argv: list[str]) -> str:
    from ecos_flower.cli import main as cli_main

    assert cli_main(argv) == 2
    return capsys.readouterr().err


def test_cli_set_unknown_key_is_an_error_naming_it(capsys):
    err = _cli_error(capsys, ["run", "--in-process", "--set", "budgt=10"])
    assert "unknown run-config key 'budgt'" in err and "'budget'" in err


def test_cli_set_non_number_is_an_error_naming_the_key(capsys):
    err = _cli_error(capsys, ["run", "--in-process", "--set", "budget=abc"])
    assert "'budget': expected an integer, got 'abc'" in err


def test_cli_set_out_of_range_is_an_error_naming_the_key(capsys):
    err = _cli_error(capsys, ["run", "--in-process", "--set", "delta=2"])
    assert "'delta': delta=2.0 must be in (0, 1)" in err


def test_cli_preset_with_a_bad_value_is_an_error_naming_the_key(capsys, tmp_path):
    preset = tmp_path / "bad.toml"
    preset.write_text('method = "ecos"\nnum-centroids = "many"\n')
    err = _cli_error(capsys, ["run", "--in-process", "--preset", str(preset)])
    assert "'num-centroids': expected an integer, got 'many'" in err


def test_cli_compare_set_is_validated_before_any_run(capsys, tmp_path):
    out = tmp_path / "cmp"
    err = _cli_error(
        capsys, ["compare", "--methods", "ecos", "--set", "epsilonn=1", "--out", str(out)]
    )
    assert "unknown run-config key 'epsilonn'" in err and "'epsilon'" in err
    assert not (out / "results.json").exists()


def test_cli_set_keeps_the_text_of_string_keys():
    from ecos_flower.cli import parse_overrides

    parsed = parse_overrides(["results-dir=2024", "delta=1e-5", "budget=300", "device=cuda:0"])
    assert parsed == {"results-dir": "2024", "delta": 1e-5, "budget": 300, "device": "cuda:0"}
    assert merge_run_config(parsed)["results-dir"] == "2024"


# ------------------------------------------------------------- the ServerApp's boundary
def test_server_app_validates_the_run_config():
    """`flwr run --run-config` reaches the ServerApp as context.run_config: merged (and so
    validated) before any method runs."""
    server_app = pytest.importorskip("ecos_flower.server_app")
    from flwr.app import Context, RecordDict

    app = server_app.make_server_app()
    context = Context(
        run_id=1,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={**DEFAULT_RUN_CONFIG, "budget": "abc"},
    )
    main_fn = app._main  # the decorated function
    with pytest.raises(RunConfigError, match="'budget': expected an integer"):
        main_fn(None, context)
