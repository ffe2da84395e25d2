"""`ecos-flower compare --epsilons`: the epsilon table, the sweep's plan, what the runs really
charge, the privacy units in every row, plots and results.md, errors, repeatability."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from flower_helpers import FAST, reply_from, tiny_scenario

from ecos_flower import compare as compare_module
from ecos_flower.cli import main
from ecos_flower.compare import (
    BUDGET_PNG,
    BYTES_PNG,
    EPSILON_SWEEP,
    PRIVACY_UTILITY_PNG,
    available_methods,
    make_figures,
    plan_runs,
    preset_config,
    run_compare,
)
from ecos_flower.config import SETTINGS_BY_NAME
from ecos_flower.flower.settings import merge_run_config
from ecos_flower.privacy.units import CLIENT, NONE, PARTICIPANT, RECORD, privacy_unit

# Presets being written elsewhere that EPSILON_SWEEP may name before their file lands.
PENDING: frozenset[str] = frozenset()
# Small enough that one run takes well under a second in process.
TINY = {
    **FAST,
    "local-train-epochs": 2,
    "dssgd-epochs": 2,
    "finetune-steps": 3,
    "semi-rounds": 1,
    "semi-epochs": 1,
    "teacher-epochs": 1,
    "dp-sample-rate": 0.5,  # sample-level DP-FedAvg: 2 DP-SGD steps per local epoch
}
PRIVATE = sorted(
    m
    for m in EPSILON_SWEEP
    if (Path(compare_module.PACKAGE_ROOT) / "strategies" / f"{m}.toml").is_file()
)


def unit_of(method: str):
    return privacy_unit(merge_run_config(preset_config(method)))


def test_every_private_preset_has_an_epsilon_entry_with_declared_keys():
    presets = set(available_methods())
    private = {m for m in presets if unit_of(m) is not NONE}
    assert private == set(PRIVATE)  # no private preset without an entry, no entry for a public one
    assert {"ecos", "dp-fedavg", "dssgd-dp", "dssgd-dp-eps1", "ecos-knn"} <= private
    for method, entry in EPSILON_SWEEP.items():
        if method not in presets:
            assert method in PENDING, f"EPSILON_SWEEP names {method!r}, which has no preset"
            continue
        for key, kind in entry:
            assert key in SETTINGS_BY_NAME, (method, key)
            assert kind in ("total", "gaussian", "svt-step")


def test_units_of_the_presets():
    assert unit_of("ecos") is RECORD and unit_of("random-knn") is RECORD
    assert unit_of("ecos-finetune-ls") is RECORD and unit_of("dp-linear-probe") is RECORD
    assert unit_of("dssgd-dp-eps1") is PARTICIPANT and unit_of("dssgd") is NONE
    assert unit_of("dp-fedavg") is CLIENT and unit_of("fedavg") is NONE
    assert unit_of("dp-fedavg-sample") is RECORD
    assert unit_of("random") is NONE and unit_of("local") is NONE
    assert RECORD.strength < PARTICIPANT.strength < CLIENT.strength
    assert CLIENT.noise_by == "server" and RECORD.noise_by == PARTICIPANT.noise_by == "client"


@pytest.fixture()
def scenario(tmp_path, flwr_home):
    return tiny_scenario(tmp_path)


def test_the_plan_is_private_x_epsilons_x_seeds_plus_public_x_seeds(scenario):
    methods = ["ecos", "dp-fedavg", "dssgd-dp-eps1", "random", "local", "fedavg"]
    epsilons = [0.25, 1.0, 8.0]
    plan = plan_runs(scenario, methods, 2, epsilons=epsilons, overrides=TINY)
    assert len(plan) == 3 * 3 * 2 + 3 * 2
    for run in plan:
        if run.method in ("ecos", "dp-fedavg", "dssgd-dp-eps1"):
            assert run.epsilon_target in epsilons and run.unit is not NONE
        else:
            assert run.epsilon_target is None and run.unit is NONE
    assert {(r.method, r.epsilon_target, r.seed) for r in plan if r.method == "ecos"} == {
        ("ecos", e, s) for e in epsilons for s in (0, 1)
    }
    # With budgets, the private sampling method runs at every (budget, epsilon, seed).
    plan = plan_runs(scenario, ["ecos", "random"], 1, budgets=[30, 60], epsilons=epsilons)
    assert len(plan) == 2 * 3 + 2
    assert {(r.budget, r.config["budget"]) for r in plan} == {(30, 30), (60, 60)}


def test_dssgd_per_upload_budget_follows_its_epochs_and_split(scenario):
    (run,) = plan_runs(scenario, ["dssgd-dp"], 1, epsilons=[1.0], overrides={"dssgd-epochs": 4})
    # published split: 5/9 of dssgd-epsilon per upload, 4 uploads per participant.
    assert run.config["dssgd-epsilon"] * 5 / 9 * 4 == pytest.approx(1.0)
    (run,) = plan_runs(scenario, ["dssgd-dp-eps1"], 1, epsilons=[1.0])
    assert run.config["dssgd-epsilon"] == pytest.approx(0.025)  # the preset's comment: 80 x 0.0125


def test_epsilons_preset_runs_each_preset_at_its_own_epsilon(tmp_path, flwr_home, monkeypatch):
    seen = {}

    def fake_run_compare(scenario, methods, seeds, out, **kwargs):
        seen.update(kwargs)
        return []

    monkeypatch.setattr(compare_module, "run_compare", fake_run_compare)
    assert main(["compare", "--epsilons", "preset", "--out", str(tmp_path / "cmp")]) == 0
    assert seen["epsilons"] is None
    assert main(["compare", "--epsilons", "0.25, 8", "--out", str(tmp_path / "cmp")]) == 0
    assert seen["epsilons"] == [0.25, 8.0]


def test_a_private_preset_missing_from_the_table_is_an_error_naming_it(scenario, monkeypatch):
    table = {k: v for k, v in EPSILON_SWEEP.items() if k != "ecos-knn"}
    monkeypatch.setattr(compare_module, "EPSILON_SWEEP", table)
    with pytest.raises(ValueError, match="'ecos-knn' is private .*no entry in EPSILON_SWEEP"):
        plan_runs(scenario, ["random", "ecos-knn"], 1, epsilons=[1.0])
    assert len(plan_runs(scenario, ["ecos-knn"], 1)) == 1  # without a sweep: its own epsilon


def test_a_set_that_the_sweep_overrides_is_an_error(scenario):
    with pytest.raises(ValueError, match="--set epsilon conflicts with --epsilons"):
        plan_runs(scenario, ["ecos"], 1, epsilons=[1.0], overrides={"epsilon": 2.0})


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Every private preset at two epsilons, and three public ones: one in-process compare."""
    folder = tmp_path_factory.mktemp("sweep")
    home = folder / "home"
    home.mkdir()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HOME", str(home))
        env.setenv("FLWR_HOME", str(home / ".flwr"))
        scenario = tiny_scenario(folder)
        out = folder / "cmp"
        methods = [*PRIVATE, "random", "local", "fedavg"]
        records = run_compare(
            scenario,
            methods,
            seeds=1,
            out=out,
            epsilons=[0.5, 2.0],
            engine="in-process",
            overrides=TINY,
        )
    return methods, records, out


def test_mapped_runs_charge_the_target_total(sweep):
    methods, records, out = sweep
    assert len(records) == len(PRIVATE) * 2 + 3
    stored = json.loads((out / "results.json").read_text())
    for record in stored:
        assert record["privacy_unit"] == unit_of(record["method"]).name
        charged = float(record["epsilon"])
        if record["method"] in PRIVATE:
            target = record["epsilon_target"]
            assert target in (0.5, 2.0)
            # The clients' ledgers: never more than the target, and not much less (DSSGD's PLD
            # composition is a hair under the basic sum it was calibrated with; DP-SGD's noise is
            # calibrated to "at most" the target by the ledger's PLD accountant).
            assert charged <= target * (1 + 1e-9), record["method"]
            assert charged == pytest.approx(target, rel=5e-3), record["method"]
        else:
            assert record["epsilon_target"] is None and record["noise_by"] == "-"
            assert charged == 0.0 or math.isinf(charged)


def test_results_md_states_every_unit_and_embeds_both_plots(sweep):
    methods, records, out = sweep
    text = (out / "results.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    for method in methods:
        unit = unit_of(method)
        mine = [row for row in rows if row.startswith(f"| {method} | {unit.label} | ")]
        assert len(mine) == (2 if unit is not NONE else 1), method
    for unit in (RECORD, PARTICIPANT, CLIENT, NONE):
        assert f"| {unit.label} | {unit.protects} | {unit.noise_by} |" in text
    assert f"![Privacy-utility]({PRIVACY_UTILITY_PNG})" in text
    assert f"({BYTES_PNG})" in text
    assert "--epsilons 0.5,2" in text and "ecos-flower compare" in text
    assert "far stronger promise" in text  # the sentence about units next to the numbers
    for key in ("| python |", "| flwr |", "| torch |", "| numpy |", "| opacus |", "| CPUs |"):
        assert key in text, key
    assert "| ecos-flower |" in text and "| date |" in text
    for name in (PRIVACY_UTILITY_PNG, BYTES_PNG):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / BUDGET_PNG).exists() and BUDGET_PNG not in text  # one budget only


def synthetic_records():
    """Records of four methods over two budgets, three epsilons and two seeds (no runs)."""
    records = []

    def add(method, unit, budget, target, seed, accuracy, epsilon, up):
        records.append(
            {
                "method": method,
                "seed": seed,
                "budget": budget,
                "epsilon_target": target,
                "privacy_unit": unit.name,
                "accuracy_mean": accuracy,
                "epsilon": epsilon,
                "delta": 1e-5,
                "bytes_up_per_client": {"0": up, "1": up},
                "bytes_down_per_client": {"0": 10 * up, "1": 10 * up},
                "client_compute_s": {"0": 0.1},
                "wall_s": 1.0,
                "domain_precision": None,
            }
        )

    for seed in (0, 1):
        for eps in (0.25, 1.0, 8.0):
            for budget in (100, 500):
                add("ecos", RECORD, budget, eps, seed, 0.5 + 0.04 * seed + eps / 20, eps, 2000)
            add("dp-fedavg", CLIENT, None, eps, seed, 0.1 + 0.01 * seed, eps, 10**7)
        for budget in (100, 500):
            add("random", NONE, budget, None, seed, 0.8 + 0.01 * seed, 0.0, 400)
        add("fedavg", NONE, None, None, seed, 0.83 - 0.02 * seed, "inf", 10**7)
    return records


def _colours_by_method(fig) -> dict[str, set[str]]:
    from matplotlib.colors import to_hex

    ax = fig.axes[0]
    handles, labels = ax.get_legend_handles_labels()
    found: dict[str, set[str]] = {}
    for handle, label in zip(handles, labels, strict=True):
        artist = handle.lines[0] if hasattr(handle, "lines") else handle
        found.setdefault(label.split(" ")[0], set()).add(to_hex(artist.get_color()))
    return found


def test_one_colour_per_method_in_every_plot_and_nothing_clipped_or_covered():
    import matplotlib.pyplot as plt

    figures = make_figures(synthetic_records())
    assert set(figures) == {PRIVACY_UTILITY_PNG, BYTES_PNG, BUDGET_PNG}  # several budgets
    colours = {name: _colours_by_method(fig) for name, fig in figures.items()}
    reference = colours[PRIVACY_UTILITY_PNG]
    assert set(reference) == {"ecos", "dp-fedavg", "random", "fedavg"}
    assert all(len(c) == 1 for c in reference.values())  # one colour per method
    assert len({next(iter(c)) for c in reference.values()}) == 4  # distinct methods differ
    for name, found in colours.items():
        for method, colour in found.items():
            assert colour == reference[method], (name, method)
    for name, fig in figures.items():
        ax = fig.axes[0]
        fig.canvas.draw()
        # The legend sits right of the axes: it covers no point.
        legend = ax.get_legend().get_window_extent()
        assert legend.x0 >= ax.get_window_extent().x1, name
        # Every plotted point, error bars included, lies strictly inside the axis limits.
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        for line in ax.lines:
            xs, ys = line.get_xdata(), line.get_ydata()
            if line.get_transform() != ax.transData:  # axhline: x is in axes coordinates
                assert all(y0 < y < y1 for y in ys), name
                continue
            assert all(x0 < x < x1 for x in xs) and all(y0 < y < y1 for y in ys), name
        for collection in ax.collections:  # error-bar segments
            for segment in collection.get_segments():
                for x, y in segment:
                    assert x0 < x < x1 and y0 < y < y1, name
    ticks = [t.get_text() for t in figures[PRIVACY_UTILITY_PNG].axes[0].get_xticklabels()]
    assert ticks == ["0.25", "1", "8"]  # the epsilons themselves on the log axis
    assert figures[PRIVACY_UTILITY_PNG].axes[0].get_xscale() == "log"
    for fig in figures.values():
        plt.close(fig)


def test_no_budget_plot_with_one_budget():
    import matplotlib.pyplot as plt

    records = [r for r in synthetic_records() if r["budget"] in (None, 500)]
    figures = make_figures(records)
    assert set(figures) == {PRIVACY_UTILITY_PNG, BYTES_PNG}
    for fig in figures.values():
        plt.close(fig)


@pytest.mark.parametrize("value", ["0", "-1", "abc", "1,nan", "inf", "0.5,,x", ","])
def test_bad_epsilons_are_an_error_naming_the_flag_before_anything_runs(
    value, tmp_path, flwr_home, capsys, monkeypatch
):
    def no_run(*args, **kwargs):
        raise AssertionError("a run started despite bad epsilons")

    monkeypatch.setattr(compare_module, "run_once", no_run)
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--epsilons", value, "--engine", "in-process", "--out", str(out)])
    assert exc.value.code == 2
    assert "argument --epsilons" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("bad", [[0.0], [-1.0], [math.nan], [math.inf], ["1"], [True], []])
def test_run_compare_rejects_bad_epsilons(bad, scenario, tmp_path):
    with pytest.raises(ValueError, match="epsilons"):
        run_compare(scenario, ["ecos"], 1, tmp_path / "cmp", epsilons=bad, engine="in-process")
    assert not (tmp_path / "cmp").exists()


def _twice(scenario, tmp_path, methods):
    runs = []
    for attempt in range(2):
        records = run_compare(
            scenario,
            methods,
            seeds=1,
            out=tmp_path / str(attempt),
            epsilons=[1.0],
            engine="in-process",
            overrides=TINY,
        )
        runs.append({r["method"]: r for r in records})
    return runs


def test_the_same_command_twice_gives_the_same_numbers(scenario, tmp_path):
    """Non-DP methods repeat from their seed; the clients' DP noise too, given the nodes'
    noise-seed (the in-process engine derives one per node from the run's seed)."""
    methods = ["random", "local", "fedavg", "dssgd", "ecos", "dssgd-dp-eps1", "random-knn"]
    first, second = _twice(scenario, tmp_path, methods)
    for method in methods:
        assert first[method]["accuracy_per_client"] == second[method]["accuracy_per_client"], method
        assert first[method]["epsilon"] == second[method]["epsilon"], method


def test_client_level_dp_fedavg_repeats_given_the_servers_noise_seed(scenario, tmp_path):
    # The in-process engine derives the server's noise seed from the run's seed.
    first, second = _twice(scenario, tmp_path, ["dp-fedavg"])
    assert first["dp-fedavg"]["accuracy_per_client"] == second["dp-fedavg"]["accuracy_per_client"]


def test_the_servers_noise_seed_replays_flowers_noise_and_leaves_the_global_rng_alone():
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg

    from ecos_flower.flower.baselines_run import SeededServerNoise

    def aggregate(noise_seed: int) -> np.ndarray:
        strategy = SeededServerNoise(
            noise_seed, FedAvg(), noise_multiplier=1.0, clipping_norm=1.0, num_sampled_clients=2
        )
        replies = []
        for node in (1, 2):
            content = RecordDict(
                {
                    "arrays": ArrayRecord({"w": Array(np.zeros(1000, dtype=np.float32))}),
                    "metrics": MetricRecord({"num-examples": 1}),
                }
            )
            replies.append(reply_from(node, "train", content))
        arrays, _ = strategy.aggregate_train(1, replies)
        return arrays["w"].numpy()

    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first, again, other = aggregate(7), aggregate(7), aggregate(8)
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    # Flower's calibration: std = noise multiplier x clipping norm / clients = 0.5.
    assert 0.45 < float(np.std(first)) < 0.55
    assert np.array_equal(np.random.get_state()[1], before)  # the caller's RNG is untouched


def test_units_note_says_when_units_differ():
    from ecos_flower.privacy.units import units_note

    assert "far stronger promise" in units_note([RECORD, CLIENT])
    assert "participant-level" in units_note([RECORD, PARTICIPANT, NONE])
    assert "record level" in units_note([RECORD, NONE]) and "stronger" not in units_note([RECORD])
    assert "No method here adds DP noise" in units_note([NONE])


def test_ecos_flower_run_prints_the_unit_next_to_the_epsilon(scenario, capsys):
    args = ["run", "--scenario", str(scenario), "--preset", "strategies/ecos.toml", "--in-process"]
    for key, value in TINY.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    assert main(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "epsilon per client 1.000 (delta=1e-05, record-level)" in last
