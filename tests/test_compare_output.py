"""What `ecos-flower compare` shows a person: one progress bar and the table on the console,
Flower's log, warnings and Ray's output in OUT/compare.log; CLI errors before anything starts."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings

import pytest
from flower_helpers import FAST, tiny_scenario

from ecos_flower import compare as compare_module
from ecos_flower.cli import DEFAULT_EPSILONS, DEFAULT_METHODS, main
from ecos_flower.compare import LOG_NAME, run_compare
from ecos_flower.flower.fedavg import without_labels

FLOWER_LINE = "mean accuracy"  # the report's last line, logged by the ServerApp at INFO


@pytest.fixture()
def scenario(tmp_path, flwr_home):
    return tiny_scenario(tmp_path)


def compare_args(scenario, out, *extra):
    args = ["compare", str(scenario), "--methods", "random,local", "--engine", "in-process"]
    args += ["--out", str(out), *extra]
    for key, value in FAST.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    return args


def test_console_shows_the_progress_bar_and_the_table_the_log_has_flowers_lines(
    scenario, tmp_path, capfd
):
    out = tmp_path / "cmp"
    assert main(compare_args(scenario, out)) == 0
    stdout, stderr = capfd.readouterr()
    console = stdout + stderr
    assert "| random" in stdout and "| local" in stdout and "accuracy (%)" in stdout
    assert "compare: 100%" in stderr and "2/2" in stderr  # the progress bar, finished
    assert "local seed 0" in stderr  # the current run in the bar's postfix
    assert "INFO" not in console and FLOWER_LINE not in console
    assert str(out / LOG_NAME) in stdout  # the console says where the log is
    log = (out / LOG_NAME).read_text()
    assert "INFO" in log and FLOWER_LINE in log
    assert "compare: random B=60, seed 0" in log and "compare: local, seed 0" in log


def test_console_table_is_aligned(scenario, tmp_path, capfd):
    assert main(compare_args(scenario, tmp_path / "cmp", "--methods", "random")) == 0
    rows = [line for line in capfd.readouterr().out.splitlines() if line.startswith("|")]
    assert len(rows) == 3 and len({len(row) for row in rows}) == 1


def test_warnings_prints_and_raw_descriptor_writes_go_to_the_log(
    scenario, tmp_path, capfd, monkeypatch
):
    """What Ray does (a Python warning, a print, a write to fd 2 from another layer) lands in
    the log, not on the console."""
    real_run_once = compare_module.run_once

    def noisy_run_once(*args, **kwargs):
        warnings.warn("a-python-warning", FutureWarning, stacklevel=1)
        print("a-print-to-stdout")
        print("a-print-to-stderr", file=sys.stderr)
        os.write(1, b"a-raw-write-to-fd-1\n")
        os.write(2, b"a-raw-write-to-fd-2\n")
        logging.getLogger("flwr").warning("a-flower-warning")
        return real_run_once(*args, **kwargs)

    monkeypatch.setattr(compare_module, "run_once", noisy_run_once)
    out = tmp_path / "cmp"
    assert main(compare_args(scenario, out, "--methods", "random")) == 0
    stdout, stderr = capfd.readouterr()
    log = (out / LOG_NAME).read_text()
    for text in (
        "a-python-warning",
        "a-print-to-stdout",
        "a-print-to-stderr",
        "a-raw-write-to-fd-1",
        "a-raw-write-to-fd-2",
        "a-flower-warning",
    ):
        assert text in log and text not in stdout + stderr, text
    assert "| random" in stdout and "compare: 100%" in stderr


def test_verbose_prints_everything_on_the_terminal(scenario, tmp_path, capfd):
    out = tmp_path / "cmp"
    assert main(compare_args(scenario, out, "--verbose")) == 0
    stdout, stderr = capfd.readouterr()
    assert "INFO" in stderr and FLOWER_LINE in stderr
    assert "| random" in stdout
    assert FLOWER_LINE in (out / LOG_NAME).read_text()  # and the log is still written


def test_a_failed_run_shows_the_end_of_the_log(scenario, tmp_path, capfd, monkeypatch):
    def failing_run_once(*args, **kwargs):
        logging.getLogger("flwr").error("the-reason-it-failed")
        raise RuntimeError("the run ended without a report")

    monkeypatch.setattr(compare_module, "run_once", failing_run_once)
    out = tmp_path / "cmp"
    with pytest.raises(RuntimeError, match="without a report"):
        run_compare(scenario, ["random"], seeds=1, out=out, engine="in-process")
    stderr = capfd.readouterr().err
    assert "the-reason-it-failed" in stderr and str(out / LOG_NAME) in stderr
    # The console is the console again: Flower's handler is back, stdout/stderr restored.
    logging.getLogger("flwr").info("after-the-compare")
    assert "after-the-compare" not in (out / LOG_NAME).read_text()


@pytest.mark.parametrize("seeds", ["0", "-1", "two"])
def test_seeds_below_one_is_an_error_naming_the_flag(seeds, tmp_path, capsys):
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--seeds", seeds, "--engine", "in-process", "--out", str(out)])
    assert exc.value.code == 2
    assert "argument --seeds" in capsys.readouterr().err
    assert not out.exists()


def test_run_compare_rejects_zero_seeds(scenario, tmp_path):
    with pytest.raises(ValueError, match="seeds must be an integer >= 1, got 0"):
        run_compare(scenario, ["random"], seeds=0, out=tmp_path / "cmp", engine="in-process")
    assert not (tmp_path / "cmp").exists()


def test_bad_budgets_are_an_error_naming_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--budgets", "100,0", "--out", str(tmp_path / "cmp")])
    assert "argument --budgets: must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


def test_missing_data_path_is_reported_before_any_run(tmp_path, flwr_home, capsys, monkeypatch):
    missing = tmp_path / "no-such-mnist"
    text = tiny_scenario(tmp_path).read_text()
    text = text.replace(
        'loader = "embedded"\nvariant = "plain"', f'loader = "mnist-idx"\npath = "{missing}"'
    )
    assert "mnist-idx" in text
    bad = tmp_path / "bad.toml"
    bad.write_text(text)

    def no_run(*args, **kwargs):
        raise AssertionError("a run started despite the missing data")

    monkeypatch.setattr(compare_module, "run_once", no_run)
    out = tmp_path / "cmp"
    assert main(["compare", str(bad), "--methods", "random", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "'plain'" in err and "does not exist" in err
    assert not out.exists()


def test_missing_scenario_leaves_no_output_folder(tmp_path, flwr_home, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", str(tmp_path / "missing.toml"), "--out", str(out)]) == 2
    assert "missing.toml" in capsys.readouterr().err
    assert not out.exists()


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for default in (
        "(default: simulations/embedded.toml)",
        f"(default: {DEFAULT_METHODS})",
        "(default: 1)",
        f"(default: {DEFAULT_EPSILONS})",
        "(default: each preset's budget)",
        "(default: ray)",
        "default: none)",
        "(default: results/compare)",
        "(default: only in OUT/compare.log)",
    ):
        assert default in text, default


def test_fedavg_reports_no_averaged_partition_id(scenario, tmp_path, capfd):
    out = tmp_path / "cmp"
    args = compare_args(scenario, out, "--methods", "fedavg,dp-fedavg", "--verbose")
    assert main(args) == 0
    stdout, stderr = capfd.readouterr()
    log = (out / LOG_NAME).read_text()
    assert "Aggregated ClientApp-side Train Metrics" in log  # the summary that had it
    assert "partition-id" not in log and "partition-id" not in stdout + stderr


def test_without_labels_keeps_the_measurements():
    from flwr.app import MetricRecord

    metrics = MetricRecord({"partition-id": 0.9985, "train-loss": 2.2, "compute-s": 0.4})
    assert dict(without_labels(metrics)) == {"train-loss": 2.2, "compute-s": 0.4}
    assert without_labels(None) is None


def test_resume_runs_only_what_an_interrupted_compare_left_and_reruns_a_changed_config(
    scenario, tmp_path, monkeypatch
):
    out = tmp_path / "cmp"
    real_run_once = compare_module.run_once
    calls: list[tuple[str, int]] = []

    def interrupted(config, num_clients, engine):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the third run never finishes
        calls.append((config["method"], config["seed"]))
        return real_run_once(config, num_clients, engine)

    monkeypatch.setattr(compare_module, "run_once", interrupted)
    common = {"engine": "in-process", "overrides": FAST}
    with pytest.raises(KeyboardInterrupt):
        run_compare(scenario, ["random", "local"], seeds=2, out=out, **common)
    assert calls == [("random", 0), ("random", 1)]
    assert len(json.loads((out / "results.json").read_text())) == 2

    calls.clear()
    records = run_compare(scenario, ["random", "local"], seeds=2, out=out, resume=True, **common)
    assert calls == [("local", 0), ("local", 1)]  # the two random runs are reused
    assert [(r["method"], r["seed"]) for r in records] == [
        ("random", 0),
        ("random", 1),
        ("local", 0),
        ("local", 1),
    ]
    assert "| random |" in (out / "results.md").read_text()
    assert "resuming, 2 of 4 runs reused" in (out / LOG_NAME).read_text()

    # A different run config (same method, budget and seed) is not the same comparison.
    calls.clear()
    changed = {**FAST, "num-centroids": 5}
    run_compare(
        scenario, ["random"], seeds=1, out=out, resume=True, engine="in-process", overrides=changed
    )
    assert calls == [("random", 0)]
