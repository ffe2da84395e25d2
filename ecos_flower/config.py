"""Every run-config key, declared once: its type, default, allowed values and meaning.

`SETTINGS` is the one place a run-config key is defined. `DEFAULT_RUN_CONFIG` (what
`[tool.flwr.app.config]` in pyproject.toml repeats, a test keeps them equal) and the README's
"Run config keys" table (`python -m ecos_flower.config --markdown` prints it) are derived from
it. `merge_run_config` validates every layer it merges (presets, `--set`, `--run-config`, the
ServerApp's run config): an unknown key or a value of the wrong type or out of range is a
`RunConfigError` (a `ValueError`) naming the key, and values come out with their declared type
(`"1e-5"` from a TOML string becomes the float 1e-05), so consumers need no casts.

Only the standard library here: the ClientApp imports it too.
"""

from __future__ import annotations

import difflib
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any


class RunConfigError(ValueError):
    """A run-config layer names an unknown key or a value its declaration does not allow."""


@dataclass(frozen=True)
class Check:
    """A constraint on a (typed) value: `test(value)` and the text a reader sees (">= 1")."""

    test: Callable[[Any], bool]
    text: str
    choices: tuple[str, ...] = ()


def at_least(low: float) -> Check:
    return Check(lambda v: v >= low, f">= {low:g}")


def above(low: float) -> Check:
    return Check(lambda v: v > low, f"> {low:g}")


def between(low: float, high: float, *, open_low: bool = False, open_high: bool = False) -> Check:
    """`low <= v <= high`, either end open on request: between(0, 1, open_low=True) is (0, 1]."""

    def test(v: float) -> bool:
        return (v > low if open_low else v >= low) and (v < high if open_high else v <= high)

    text = f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    return Check(test, text)


def one_of(*choices: str) -> Check:
    return Check(lambda v: v in choices, " \\| ".join(choices), choices)


NON_EMPTY = Check(bool, "non-empty")
POSITIVE = above(0)
NON_NEGATIVE = at_least(0)
AT_LEAST_ONE = at_least(1)
AT_LEAST_TWO = at_least(2)
PROBABILITY = between(0, 1, open_low=True, open_high=True)
FRACTION = between(0, 1, open_low=True)  # (0, 1]
UNIT = between(0, 1)  # [0, 1]

METHODS = (
    "ecos",
    "oracle",
    "random",
    "kcenter",
    "in-domain",
    "fedavg",
    "dp-fedavg",
    "dp-fedavg-sample",
    "dssgd",
    "local",
    "centralized",
    "dp-linear-probe",
)
MODELS = ("small-cnn", "wide-cnn", "paper-mlp", "paper-cnn", "linear-head", "mlp-head")
HEAD_MODELS = MODELS[-2:]  # train on the run's pretrained `extractor` features
EXTRACTORS = ("random", "supervised", "pca", "efficientnet-lite0")
TORCHVISION_PREFIX = "torchvision:"  # + a torchvision classification architecture (resnet18)
# The architecture name is checked where torchvision is imported (this module is stdlib only).
EXTRACTOR = Check(
    lambda v: v in EXTRACTORS or (v.startswith(TORCHVISION_PREFIX) and v != TORCHVISION_PREFIX),
    " \\| ".join((*EXTRACTORS, TORCHVISION_PREFIX + "<arch>")),
    (*EXTRACTORS, TORCHVISION_PREFIX + "<arch>"),
)


@dataclass(frozen=True)
class Setting:
    """One run-config key. `default` None: no default, the server fills it in at run time."""

    name: str
    default: int | float | str | None
    kind: type  # int | float | str
    check: Check | None
    help: str
    group: str = ""

    def coerce(self, value: Any) -> int | float | str:
        """`value` as this key's type, or RunConfigError naming the key and the value."""
        typed = _as_kind(self.kind, value)
        if typed is None:
            raise RunConfigError(
                f"run-config key {self.name!r}: expected {_KIND_TEXT[self.kind]}, got {value!r}"
            )
        if self.check is not None and not self.check.test(typed):
            if self.check.choices:
                raise RunConfigError(
                    f"run-config key {self.name!r}: unknown {self.name} {typed!r}; "
                    f"choose one of {', '.join(self.check.choices)}"
                )
            raise RunConfigError(
                f"run-config key {self.name!r}: {self.name}={typed!r} must be {self.check.text}"
            )
        return typed


_KIND_TEXT = {int: "an integer", float: "a finite number", str: "a string"}


def _as_kind(kind: type, value: Any) -> int | float | str | None:
    """`value` converted to `kind` if it denotes one exactly, else None. Booleans are never
    numbers; strings denoting numbers ("1e-5", "500") are parsed; an integral float (1e3) is
    an integer; a string key takes only strings (quote a number meant as text)."""
    if isinstance(value, bool):
        return None
    if kind is str:
        return value if isinstance(value, str) else None
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        try:
            value = int(text) if kind is int and text.lstrip("+-").isdigit() else float(text)
        except ValueError:
            return None
    if not isinstance(value, int | float) or not math.isfinite(value):
        return None
    if kind is int:
        return int(value) if float(value).is_integer() else None
    return float(value)


def _group(name: str, *settings: Setting) -> tuple[Setting, ...]:
    return tuple(replace(s, group=name) for s in settings)


S = Setting
SETTINGS: tuple[Setting, ...] = (
    *_group(
        "run",
        S("scenario", "simulations/embedded.toml", str, NON_EMPTY,
          "the experiment: a scenario TOML (absolute, or relative to the working directory / "
          "project root)"),
        S("data-root", "", str, None,
          "resolve the scenario's relative data paths against this folder (empty: the "
          "scenario's)"),
        S("pool", "", str, None,
          "deployment: a pool TOML naming the public pool the server owns; the server then "
          "reads only those paths, never the scenario (empty: the scenario's pool, simulation)"),
        S("method", "ecos", str, one_of(*METHODS), "which server loop runs"),
        S("seed", 0, int, NON_NEGATIVE, "model init, training order, sampling"),
        S("model", "small-cnn", str, one_of(*MODELS), "the task model"),
        S("results-dir", "", str, None, "where to write `results.json` (empty: don't write)"),
        S("feature-cache", "", str, None, "folder to cache pool features in (empty: no cache)"),
        S("timeout", 3600.0, float, POSITIVE, "seconds a round waits for the clients' replies"),
    ),
    *_group(
        "engine",
        S("device", "cpu", str, NON_EMPTY, "torch device of every app"),
        S("torch-threads", 1, int, AT_LEAST_ONE,
          "torch and BLAS threads of every app (one per simulated client avoids "
          "oversubscription)"),
        S("node-wait", 30.0, float, NON_NEGATIVE,
          "seconds to wait for the scenario's nodes to connect (deployment) before starting "
          "with those that did"),
        S("min-clients", 1, int, NON_NEGATIVE,
          "fewest clients whose results a round needs; rounds go on without clients that "
          "fail while at least this many answer (the report names the dropped ones)"),
        S("num-clients", None, int, AT_LEAST_ONE,
          "number of connected nodes, set by the server at the start of a run"),
        S("num-classes", None, int, AT_LEAST_TWO,
          "the scenario's number of classes, set by the server at the start of a run and sent "
          "to every client (no client assumes a default)"),
    ),
    *_group(
        "fedavg",
        S("num-server-rounds", 3, int, AT_LEAST_ONE, "FedAvg rounds"),
        S("local-epochs", 1, int, AT_LEAST_ONE, "client epochs per FedAvg round"),
        S("batch-size", 32, int, AT_LEAST_ONE, "training batch size"),
        S("learning-rate", 0.05, float, POSITIVE, "training learning rate"),
        S("fraction-train", 1.0, float, FRACTION, "fraction of the clients training per round"),
    ),
    *_group(
        "sampling",
        S("budget", 500, int, AT_LEAST_ONE, "pool samples to select (sampling methods)"),
        S("num-centroids", 50, int, AT_LEAST_ONE, "K of ECOS's K-means"),
        S("epsilon", 1.0, float, POSITIVE, "epsilon of one ECOS query (per client)"),
        S("delta", 1e-5, float, PROBABILITY, "delta of one ECOS query (per client)"),
        S("score-mode", "nearest", str, one_of("nearest", "radius"),
          "`nearest` (count of samples whose nearest centroid is j; sensitivity 1) or "
          "`radius` (within `radius`, at most `max-per-sample` centroids per sample; "
          "sensitivity sqrt(m))"),
        S("radius", 0.0, float, NON_NEGATIVE, "the radius of score-mode `radius`"),
        S("max-per-sample", 1, int, AT_LEAST_ONE,
          "most centroids one sample counts for (score-mode `radius`)"),
        S("threshold-multiple", 2.0, float, NON_NEGATIVE,
          "drop clusters whose summed score is below this many aggregate-noise standard "
          "deviations (0: off)"),
        S("max-client-count", 1000, int, AT_LEAST_ONE,
          "the most samples any client holds (public): each node's noisy score vector is "
          "clipped to this count per centroid and in total, plus the noise's slack, so no node "
          "weighs more than one full client (post-processing: no privacy cost)"),
        S("extractor", "random", str, EXTRACTOR,
          "the feature map phi: `random` (untrained small CNN: keeps style, measured best for "
          "domain precision), `supervised` (trained on the labelled pool), `pca`, "
          "`efficientnet-lite0` (ImageNet-pretrained, the `pretrained` extra; 1280-d), "
          "`torchvision:<arch>` (e.g. `torchvision:resnet18`, weights from `extractor-weights`)"),
        S("extractor-weights", "", str, None,
          "the `torchvision:<arch>` map's state-dict file (a local .pth; never downloaded)"),
        S("extractor-shipping", "by-name", str, one_of("by-name", "weights"),
          "how a pretrained map (`efficientnet-lite0`) reaches clients: `by-name` (its name and "
          "weights SHA-256 only; a client without the same weights file refuses, naming both "
          "digests) or `weights` (shipped and counted like any map)"),
        S("extractor-epochs", 5, int, NON_NEGATIVE, "training epochs of the `supervised` map"),
        S("pca-components", 64, int, AT_LEAST_ONE, "components of the `pca` map"),
        S("cloud-epochs", 30, int, NON_NEGATIVE, "epochs of cloud training on the selection"),
    ),
    *_group(
        "applications",
        S("application", "supervised", str, NON_EMPTY,
          "how the cloud uses the selection: `supervised` (label outsourcing), "
          "`semi-supervised`, `distill`, `private-knn`"),
        S("semi-rounds", 2, int, NON_NEGATIVE, "semi-supervised: pseudo-labelling rounds"),
        S("semi-threshold", 0.95, float, UNIT, "semi-supervised: confidence threshold"),
        S("semi-epochs", 3, int, NON_NEGATIVE, "semi-supervised: epochs per round"),
        S("semi-max-unlabelled", 4000, int, NON_NEGATIVE,
          "semi-supervised: unlabelled pool samples drawn (0: all)"),
        S("semi-unlabelled", "pool", str, one_of("pool", "near-selection"),
          "semi-supervised: which unlabelled samples (a random draw, or the closest to the "
          "selection)"),
        S("teacher-model", "wide-cnn", str, one_of(*MODELS),
          "distill (and dp-linear-probe's backbone): the model trained on the labelled pool"),
        S("teacher-epochs", 3, int, NON_NEGATIVE, "distill: the teacher's epochs"),
        S("distill-temperature", 4.0, float, POSITIVE, "distill: the temperature"),
        S("knn-k", 30, int, AT_LEAST_ONE, "private-knn: neighbours"),
        S("knn-k-per-query", 0.0, float, UNIT,
          "private-knn: > 0: neighbours as this fraction of the queried samples, instead of "
          "`knn-k`"),
        S("knn-mode", "capped", str, one_of("query", "capped"),
          "private-knn: vote sensitivity `query` (sqrt(2n)) or `capped` (sqrt(k))"),
        S("knn-epsilon", 1.0, float, POSITIVE,
          "private-knn: epsilon of the vote release per client"),
        S("knn-threshold", 2.0, float, NON_NEGATIVE,
          "private-knn: kept-sample threshold in aggregate-noise stds"),
        S("knn-extractor", "run", str, one_of("run", *EXTRACTORS),
          "private-knn: the feature map clients label in (`run`: the run's extractor)"),
    ),
    *_group(
        "fine-tuning",
        S("finetune-epsilon", 0.0, float, NON_NEGATIVE,
          "> 0: every client refits the received model's head on its private data with DP at "
          "this epsilon before evaluating"),
        S("finetune-method", "dp-sgd", str, one_of("dp-sgd", "dp-least-squares", "dp-fc"),
          "how the head is refitted (see Privacy)"),
        S("finetune-steps", 100, int, between(1, 10_000),
          "full-batch steps of `dp-sgd` / `dp-fc`"),
        S("finetune-clip", 1.0, float, POSITIVE, "clipping norm of `dp-sgd` / `dp-fc`"),
        S("finetune-lr", 1.0, float, POSITIVE, "learning rate of `dp-sgd` / `dp-fc`"),
        S("finetune-init", "zero", str, one_of("zero", "received"),
          "head start of `dp-sgd` / `dp-fc`"),
        S("finetune-ridge", 1.0, float, POSITIVE,
          "`dp-least-squares`' ridge, in multiples of sigma·sqrt(d)"),
        S("finetune-covariance-share", 0.3, float, PROBABILITY,
          "`dp-fc`'s share of the budget for the covariance"),
        S("finetune-floor", 0.01, float, POSITIVE, "`dp-fc`'s floor on the eigenvalues"),
        S("finetune-normaliser", 100.0, float, POSITIVE,
          "`dp-sgd` / `dp-fc` divide the noisy gradient sum by this public constant (a typical "
          "client's train size), never by the client's own count, which would leak it"),
    ),
    *_group(
        "dssgd",
        S("dssgd-epochs", 20, int, AT_LEAST_ONE,
          "local epochs per participant (server rounds are derived from them)"),
        S("dssgd-schedule", "round-robin", str, one_of("round-robin", "random", "parallel"),
          "who trains in a server round"),
        S("theta-u", 0.1, float, FRACTION, "fraction of the parameters uploaded"),
        S("theta-d", 1.0, float, FRACTION, "fraction of the parameters downloaded"),
        S("upload-mode", "largest", str, one_of("largest", "threshold"),
          "which parameters are uploaded"),
        S("gamma", 0.001, float, NON_NEGATIVE,
          "upload clip bound, the paper's 0.001; the server rejects uploaded values beyond it "
          "(0: no clipping, the server still rejects values beyond `max-update`)"),
        S("max-update", 1.0, float, POSITIVE,
          "with `gamma` 0: the largest absolute value the server accepts in an upload"),
        S("tau", 0.0, float, NON_NEGATIVE, "upload threshold (upload-mode `threshold`)"),
        S("dssgd-epsilon", 0.0, float, NON_NEGATIVE,
          "SVT epsilon per participant per epoch (0: no DP)"),
        S("svt-split", "published", str, one_of("published", "corrected"),
          "how the SVT budget is split"),
        S("stat-beta", 1.0, float, FRACTION,
          "multiply the server's update counters by this every `stat-decay-every` uploads"),
        S("stat-decay-every", 0, int, NON_NEGATIVE, "uploads between counter decays (0: never)"),
        S("evaluate-every", 0, int, NON_NEGATIVE,
          "evaluate every this many server rounds as well as at the end (0: end only)"),
    ),
    *_group(
        "reference points",
        S("local-train-epochs", 30, int, AT_LEAST_ONE,
          "epochs of a client training alone (method `local`)"),
        S("dp-noise-multiplier", 1.0, float, NON_NEGATIVE, "DP-FedAvg's noise multiplier"),
        S("dp-clipping-norm", 1.0, float, POSITIVE, "DP-FedAvg's client-side clipping norm"),
        S("dp-server-noise-seed", -1, int, at_least(-1),
          "client-level DP-FedAvg: seed of the server's noise (-1: fresh OS entropy; research "
          "only: a known seed makes the noise replayable)"),
        S("dp-target-epsilon", 0.0, float, NON_NEGATIVE,
          "> 0: calibrate `dp-noise-multiplier` so the whole run costs this epsilon (at delta) "
          "per client"),
        S("dp-sample-epsilon", 1.0, float, POSITIVE,
          "sample-level DP-FedAvg: the whole run's record-level epsilon (at delta) per client; "
          "each client calibrates its DP-SGD noise to it and charges its own ledger"),
        S("dp-sample-rate", 0.1, float, FRACTION,
          "sample-level DP-FedAvg: the public Poisson rate q of each DP-SGD step (a local epoch "
          "is int(1/q) steps, whatever a client's size); set `batch-size`, the public divisor of "
          "the noisy gradient sum, near q times a typical client's train size"),
        S("dp-max-grad-norm", 1.0, float, POSITIVE,
          "sample-level DP-FedAvg: the per-sample gradient clipping norm"),
    ),
)  # fmt: skip
del S

SETTINGS_BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
assert len(SETTINGS_BY_NAME) == len(SETTINGS), "a run-config key is declared twice"

DEFAULT_RUN_CONFIG: dict[str, Any] = {s.name: s.default for s in SETTINGS if s.default is not None}


def _unknown_key(key: str) -> RunConfigError:
    close = difflib.get_close_matches(key, SETTINGS_BY_NAME, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return RunConfigError(
        f"unknown run-config key {key!r}{hint}; the keys are listed by "
        "`python -m ecos_flower.config --markdown`"
    )


def validate_layer(layer: Mapping[str, Any]) -> dict[str, Any]:
    """One layer with every value typed; RunConfigError on an unknown key or a bad value."""
    typed: dict[str, Any] = {}
    for key, value in layer.items():
        setting = SETTINGS_BY_NAME.get(key)
        if setting is None:
            raise _unknown_key(str(key))
        typed[key] = setting.coerce(value)
    return typed


def merge_run_config(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults, then each layer in order, every layer validated (see `validate_layer`)."""
    merged = dict(DEFAULT_RUN_CONFIG)
    for layer in layers:
        merged.update(validate_layer(layer))
    return merged


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def markdown_table() -> str:
    """The README's "Run config keys" table, one row per declared key."""
    rows = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        default = "set by the server" if s.default is None else f"`{_toml_value(s.default)}`"
        allowed = _KIND_TEXT[s.kind].split(" ", 1)[1]
        if s.check is not None:
            allowed = s.check.text if s.check.choices else f"{allowed}, {s.check.text}"
        rows.append(f"| `{s.name}` | {default} | {allowed} | {s.help} |")
    return "\n".join(rows)


def toml_defaults() -> str:
    """`[tool.flwr.app.config]` as pyproject.toml should hold it (one help comment per key)."""
    lines = ["[tool.flwr.app.config]"]
    for s in SETTINGS:
        if s.default is not None:
            lines += [f"# {s.help.replace('`', '')}", f"{s.name} = {_toml_value(s.default)}"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--markdown"]:
        print(markdown_table())
    elif args == ["--toml"]:
        print(toml_defaults())
    else:
        print("usage: python -m ecos_flower.config --markdown | --toml", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
