"""A run's report: per-client accuracy, privacy and bytes, as a printed table and as JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ecos_flower.flower.payload import MeteredGrid
from ecos_flower.privacy.units import NONE, UNITS, PrivacyUnit

# The keys every results.json record has (the schema documented in the README; keep it stable).
RECORD_KEYS = (
    "method",
    "preset",
    "seed",
    "budget",
    "accuracy_mean",
    "accuracy_per_client",
    "epsilon",
    "epsilon_per_client",
    "delta",
    "bytes_up_per_client",
    "bytes_down_per_client",
    "client_compute_s",
    "wall_s",
    "domain_precision",
    "settings",
    "epsilon_target",
    "privacy_unit",
    "noise_by",
)


@dataclass
class RunReport:
    """What one run of one method measured; `settings` records how it was configured."""

    method: str
    seed: int
    scenario: str
    accuracy_per_client: dict[int, float] = field(default_factory=dict)
    epsilon_per_client: dict[int, float] = field(default_factory=dict)
    delta: float = 0.0
    bytes_up_per_client: dict[int, int] = field(default_factory=dict)
    bytes_down_per_client: dict[int, int] = field(default_factory=dict)
    client_compute_s: dict[int, float] = field(default_factory=dict)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    # What the epsilon protects (a `PrivacyUnit.label` from ecos_flower.privacy.units), set by
    # whoever knows the run config (the CLI, the comparison); printed next to every epsilon.
    privacy_unit: str = ""

    @property
    def accuracy_mean(self) -> float:
        values = list(self.accuracy_per_client.values())
        return sum(values) / len(values) if values else float("nan")

    @property
    def epsilon(self) -> float:
        """The largest total epsilon any client spent (infinity for a non-private method)."""
        values = list(self.epsilon_per_client.values())
        return max(values) if values else math.inf

    def add_traffic(self, grid: MeteredGrid, node_to_client: dict[int, int]) -> None:
        """Attribute the grid's metered bytes to clients (partition ids)."""
        for node_id, client in node_to_client.items():
            self.bytes_up_per_client[client] = int(grid.bytes_up.get(node_id, 0))
            self.bytes_down_per_client[client] = int(grid.bytes_down.get(node_id, 0))
            self.client_compute_s[client] = float(grid.compute_seconds.get(node_id, 0.0))

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["accuracy_mean"] = self.accuracy_mean
        record["epsilon"] = self.epsilon
        for key in (
            "accuracy_per_client",
            "epsilon_per_client",
            "bytes_up_per_client",
            "bytes_down_per_client",
            "client_compute_s",
        ):
            record[key] = {str(k): v for k, v in sorted(record[key].items())}
        return _json_safe(record)

    def record(
        self,
        preset: str | None = None,
        budget: int | None = None,
        *,
        unit: PrivacyUnit | None = None,
        epsilon_target: float | None = None,
    ) -> dict[str, Any]:
        """This run as one results.json record: the stable schema the README documents, the
        same for `ecos-flower run`/`compare` and a ServerApp's `results-dir`. `preset` defaults
        to the method, `unit` to the one `privacy_unit` names. `epsilon` is the largest ledger
        total a client reported: in a simulation what the run spent; on a deployed node with a
        persistent ledger its lifetime total (DSSGD also reports `extra.epsilon-this-run`)."""
        if unit is None:
            unit = next((u for u in UNITS.values() if u.label == self.privacy_unit), NONE)
        full = self.to_json()
        return {
            "method": preset or self.method,
            "preset": preset or self.method,
            "seed": self.seed,
            "budget": budget,
            "accuracy_mean": self.accuracy_mean,
            "accuracy_per_client": full["accuracy_per_client"],
            "epsilon": full["epsilon"],
            "epsilon_per_client": full["epsilon_per_client"],
            "delta": self.delta,
            "bytes_up_per_client": full["bytes_up_per_client"],
            "bytes_down_per_client": full["bytes_down_per_client"],
            "client_compute_s": full["client_compute_s"],
            "wall_s": self.wall_s,
            "domain_precision": self.extra.get("domain-precision"),
            "settings": full["settings"],
            "epsilon_target": epsilon_target,
            "privacy_unit": unit.name,
            "noise_by": unit.noise_by,
            "phase_seconds": full["phase_seconds"],
            "extra": _json_safe(self.extra),
        }

    def table(self) -> str:
        """Per-client lines: accuracy, epsilon, bytes up and down."""
        lines = [
            f"{'client':>6}  {'accuracy':>8}  {'epsilon':>8}  {'bytes up':>12}  {'bytes down':>12}"
        ]
        for client in sorted(self.accuracy_per_client):
            eps = self.epsilon_per_client.get(client, math.inf)
            lines.append(
                f"{client:>6}  {self.accuracy_per_client[client]:>8.4f}  {eps:>8.3f}  "
                f"{self.bytes_up_per_client.get(client, 0):>12,}  "
                f"{self.bytes_down_per_client.get(client, 0):>12,}"
            )
        unit = f", {self.privacy_unit}" if self.privacy_unit else ""
        eps_text = (
            "inf"
            if math.isinf(self.epsilon)
            else f"{self.epsilon:.3f} (delta={self.delta:g}{unit})"
        )
        lines.append(
            f"{self.method}: mean accuracy {self.accuracy_mean:.4f} over "
            f"{len(self.accuracy_per_client)} clients; epsilon per client {eps_text}; "
            f"{self.wall_s:.1f} s"
        )
        return "\n".join(lines)

    def write(self, directory: str | Path, budget: int | None = None) -> Path:
        """Write `results.json` (a list holding this run's `record`) into `directory`."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "results.json"
        path.write_text(json.dumps([self.record(budget=budget)], indent=2))
        return path


def _json_safe(value: Any) -> Any:
    """JSON has no infinity: write it as the string "inf" (read back with float())."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def no_results_message(errors: dict[int, str]) -> str:
    """Why a run produced no client result: the first client errors, so the user sees the cause."""
    if not errors:
        return "no client returned an evaluation result"
    first = "; ".join(
        f"node {node}: {reason.strip().splitlines()[-1] if reason.strip() else '?'}"
        for node, reason in list(errors.items())[:3]
    )
    return f"no client returned an evaluation result ({len(errors)} failed): {first}"
