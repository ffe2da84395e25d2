"""A node's own privacy policy, and the list of everything any node can ever send.

The adversary is the server (DESIGN.md section 2.4). So what a node releases is decided here,
from the node's own configuration (Flower's node config, which the node's operator sets on the
command line of `flower-supernode --node-config ...`), never from a message. This module is pure
Python (no Flower, no torch): the Flower glue in `ecos_flower.client.release` applies it.

Two policies:

- ``private`` (a deployed node): answers only the private mechanisms below, each charged to one
  persistent lifetime ledger before anything leaves; refuses non-private requests (exact ECOS
  counts, raw data upload, DSSGD without the sparse vector technique, FedAvg model updates, exact
  evaluation metrics) unless the operator opts in with ``allow = "..."`` (and
  ``report-metrics = true`` for exact test-set metrics). It answers private queries only once its
  node config names a persistent ``ledger-path`` and an ``epsilon-limit``.
- ``research`` (a simulated node, whose data the researcher running the simulation owns): answers
  every mechanism, charges the private ones to its ledger (so every epsilon reported is real), and
  enforces a limit only if its node config sets one.

Which policy a node has: ``privacy-policy`` in its node config, if set (the operator's word);
otherwise ``research`` only when the ClientApp runs inside Flower's simulation engine (a Ray
actor started by whoever runs the simulation; see `in_flower_simulation`), and ``private``
everywhere else. A hostile server cannot reach the research policy on a deployed node: it can
neither write the node config nor move the SuperNode's ClientApp process into a Ray actor, and
against a server that ships its own ClientApp code the node runs only signed apps
(`flower-supernode --trusted-entities`, see the README's deployment guide).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

POLICIES = ("private", "research")


@dataclass(frozen=True)
class MechanismSpec:
    """What one reply kind releases: its record and metric names (nothing else may leave), whether
    it is differentially private, its privacy unit and what the server learns."""

    name: str
    private: bool
    records: tuple[str, ...]
    metrics: tuple[str, ...]
    unit: str
    reveals: str
    optional_records: tuple[str, ...] = ()


_NODE = ("partition-id",)  # the node's label in a simulation (node config, not data)
_BUDGET = ("epsilon-spent", "epsilon-limit", "delta")  # the node's budget state, not its data

# Every kind of reply any node can send. The Flower glue refuses to build a reply whose fields
# differ from its entry here.
MECHANISMS: dict[str, MechanismSpec] = {
    spec.name: spec
    for spec in (
        MechanismSpec(
            "ecos-counts",
            True,
            ("scores",),
            (*_NODE, "sensitivity", "sigma", *_BUDGET),
            "record-level add/remove of one client sample",
            "K coverage counts + Gaussian noise (analytic calibration, L2 sensitivity 1, or "
            "sqrt(m) in radius mode)",
        ),
        MechanismSpec(
            "knn-votes",
            True,
            ("votes",),
            (*_NODE, "sensitivity", "sigma", *_BUDGET),
            "record-level add/remove of one client sample",
            "n x classes label-vote histograms + Gaussian noise",
        ),
        MechanismSpec(
            "dp-head-fit",
            True,
            (),
            (
                *_NODE,
                "accuracy",
                "loss",
                "accuracy-received",
                "finetuned",
                "finetune-epsilon-opacus",
                "noise-multiplier",
                "steps",
                *_BUDGET,
            ),
            "record-level add/remove of one client sample (the head fit); the test metrics are "
            "exact and leave only under report-metrics",
            "the test accuracy of a head refitted with DP on the train split (and of the "
            "received one); a fit the ledger refuses reports the received accuracy and the "
            "ledger's reason in ConfigRecord finetune-refusal",
            ("finetune-refusal",),
        ),
        MechanismSpec(
            "dssgd-svt",
            True,
            ("upload",),
            (*_NODE, "epsilon-epoch", "local-steps", *_BUDGET),
            "the participant's whole data, per upload (clipping bounds every coordinate query "
            "by gamma whatever the data); implies the record-level guarantee",
            "c sparse (index, clip(clip(dw) + Laplace)) pairs chosen by the sparse vector "
            "technique",
        ),
        MechanismSpec(
            "dpsgd-update",
            True,
            ("arrays",),
            (*_NODE, "weight", "noise-multiplier", "sample-rate", "steps", *_BUDGET),
            "record-level add/remove of one client sample (DP-SGD with Poisson sampling; the "
            "node composes every round into its ledger)",
            "the model after local DP-SGD (per-sample clipped gradients + Gaussian noise, the "
            "noise calibrated by the node; the sum divided by the public expected batch size); "
            "weight is the constant 1; noise-multiplier, sample-rate and steps follow from the "
            "message alone",
        ),
        MechanismSpec(
            "exact-counts",
            False,
            ("scores",),
            (*_NODE, "sensitivity", "sigma"),
            "none (oracle)",
            "the exact coverage counts",
        ),
        MechanismSpec(
            "raw-upload",
            False,
            ("data",),
            _NODE,
            "none (centralized reference point)",
            "the raw training images and labels",
        ),
        MechanismSpec(
            "dssgd-exact",
            False,
            ("upload",),
            (*_NODE, "epsilon-epoch", "local-steps", *_BUDGET),
            "none",
            "the exact top-theta_u share of the local update",
        ),
        MechanismSpec(
            "model-update",
            False,
            ("arrays",),
            (*_NODE, "num-examples", "train-loss"),
            "none (FedAvg)",
            "the exact locally trained model, the train split's size and loss",
        ),
        MechanismSpec(
            "clipped-update",
            False,
            ("arrays",),
            (*_NODE, "num-examples"),
            "one whole client, central DP: the server adds the noise (trusted aggregator)",
            "the exact locally trained model, its update clipped by Flower's fixedclipping_mod; "
            "num-examples is the constant 1 (uniform weights, as the noise calibration assumes)",
        ),
        MechanismSpec(
            "evaluation-metrics",
            False,
            (),
            (*_NODE, "accuracy", "loss", "server-accuracy", "server-loss", "local-steps"),
            "none: exact accuracy and loss on the node's private test split",
            "exact test-set accuracy and loss of the model the server sent (or the local one)",
        ),
    )
}

# Non-private reply kinds a node releases only when its policy allows them (the names used in
# the node config's `allow` list).
OPT_IN = ("exact-counts", "raw-upload", "dssgd-exact", "model-update", "clipped-update")


class PolicyError(ValueError):
    """A node config whose privacy settings are invalid (names the key)."""


def in_flower_simulation() -> bool:
    """True when this process is a Ray actor, i.e. Flower's simulation engine runs the ClientApp.

    A SuperNode runs ClientApps in its own process or in a `flwr-clientapp` process it starts,
    never in a Ray actor; only whoever starts the simulation (and owns all its data) can put a
    ClientApp there.
    """
    ray = sys.modules.get("ray")  # never import Ray for this: a deployed node does not have it
    if ray is None:
        return False
    try:
        return bool(ray.is_initialized()) and ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # an unusual Ray state is not a simulation we can vouch for
        return False


def _flag(node_config: Mapping[str, Any], key: str, default: bool) -> bool:
    value = node_config.get(key, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise PolicyError(f"node config {key}={value!r} must be true or false")


def _positive(node_config: Mapping[str, Any], key: str, default: float) -> float:
    value = node_config.get(key, default)
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise PolicyError(f"node config {key}={value!r} is not a number") from exc
    if isinstance(value, bool) or not number > 0 or math.isnan(number):
        raise PolicyError(f"node config {key}={value!r} must be a positive number")
    return number


@dataclass(frozen=True)
class NodePolicy:
    """A node's privacy policy, read once from its node config.

    Parameters
    ----------
    mode : {"private", "research"}
        ``private`` answers only private mechanisms (plus `allowed` opt-ins); ``research``
        answers everything.
    allowed : frozenset of str
        Non-private reply kinds (see `OPT_IN`) the operator opted into.
    report_metrics : bool
        Whether exact test-set metrics may leave (default: no under ``private``).
    epsilon_limit : float
        Lifetime epsilon limit of the node's ledger (``inf``: charge and report, never refuse;
        only a research node may have no limit).
    delta : float
        The delta at which the ledger states its epsilon.
    ledger_path : Path or None
        The node's persistent ledger file (required for private answers under ``private``).
    noise_seed : int or None
        Research only: replayable privacy noise (never for a deployed node).
    """

    mode: str
    allowed: frozenset[str]
    report_metrics: bool
    epsilon_limit: float
    delta: float
    ledger_path: Path | None
    noise_seed: int | None

    @classmethod
    def from_node_config(
        cls, node_config: Mapping[str, Any], *, simulated: bool | None = None
    ) -> NodePolicy:
        """The policy of a node with this node config (`simulated`: override the detection of
        Flower's simulation engine, for tests)."""
        mode = node_config.get("privacy-policy")
        if mode is None:
            simulated = in_flower_simulation() if simulated is None else simulated
            mode = "research" if simulated else "private"
        if mode not in POLICIES:
            raise PolicyError(f"node config privacy-policy={mode!r}: choose one of {POLICIES}")
        research = mode == "research"
        allow_text = node_config.get("allow", "")
        if not isinstance(allow_text, str):
            raise PolicyError(f"node config allow={allow_text!r} must be a comma-separated text")
        allowed = frozenset(item.strip() for item in allow_text.split(",") if item.strip())
        unknown = sorted(allowed - set(OPT_IN))
        if unknown:
            raise PolicyError(f"node config allow names {unknown}; choose from {OPT_IN}")
        path = node_config.get("ledger-path") or None
        noise_seed = node_config.get("noise-seed")
        if noise_seed is not None:
            if not research:
                raise PolicyError(
                    "node config noise-seed makes privacy noise replayable: research nodes only"
                )
            if isinstance(noise_seed, bool) or not isinstance(noise_seed, int):
                raise PolicyError(f"node config noise-seed={noise_seed!r} must be an integer")
        limit = (
            _positive(node_config, "epsilon-limit", math.inf)
            if ("epsilon-limit" in node_config or research)
            else math.nan
        )  # a private node without a limit answers no private query
        delta = _positive(node_config, "delta", 1e-5)
        if not delta < 1:
            raise PolicyError(f"node config delta={delta:g} must lie in (0, 1)")
        return cls(
            mode=mode,
            allowed=frozenset(MECHANISMS) if research else allowed,
            report_metrics=_flag(node_config, "report-metrics", research),
            epsilon_limit=limit,
            delta=delta,
            ledger_path=Path(str(path)) if path else None,
            noise_seed=noise_seed,
        )

    @property
    def research(self) -> bool:
        return self.mode == "research"

    def refusal(self, mechanism: str) -> str | None:
        """Why this node will not run `mechanism` (None: it will). Depends on the policy and the
        mechanism's name only, never on the node's data."""
        spec = MECHANISMS[mechanism]
        if spec.private:
            if self.research:
                return None
            if self.ledger_path is None or math.isnan(self.epsilon_limit):
                return (
                    f"{mechanism}: this node's config names no persistent ledger-path and "
                    "epsilon-limit; a deployed node answers private queries only under a "
                    "lifetime budget it owns"
                )
            return None
        if mechanism == "evaluation-metrics":
            if self.report_metrics:
                return None
            return (
                "exact evaluation metrics on this node's test data: its policy does not report "
                "them (node config report-metrics = true opts in)"
            )
        if self.research or mechanism in self.allowed:
            return None
        return (
            f"{mechanism} is not differentially private ({spec.reveals}); this node's policy "
            f'answers it only if its node config says allow = "{mechanism}"'
        )
