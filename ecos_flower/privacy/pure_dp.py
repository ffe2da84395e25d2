"""A pure epsilon-DP ledger (basic composition) for Laplace / sparse-vector releases, e.g. DSSGD
uploads."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path


class PureBudgetExceededError(RuntimeError):
    """A charge that would take the ledger past its epsilon limit (nothing is recorded)."""


@dataclass(frozen=True)
class PureCharge:
    """One recorded release: its epsilon, a free-text note, and the epoch it belongs to (or
    None)."""

    epsilon: float
    note: str = ""
    epoch: int | None = None


class PureDPLedger:
    """Total epsilon under basic composition (sum of charges), refusing charges beyond
    `epsilon_limit`."""

    def __init__(self, epsilon_limit: float = math.inf) -> None:
        if not epsilon_limit >= 0:
            raise ValueError(f"epsilon_limit must be >= 0, got {epsilon_limit}")
        self.epsilon_limit = float(epsilon_limit)
        self.charges: list[PureCharge] = []

    @property
    def spent(self) -> float:
        """Total epsilon charged so far."""
        return math.fsum(c.epsilon for c in self.charges)

    @property
    def remaining(self) -> float:
        return self.epsilon_limit - self.spent

    def can_charge(self, epsilon: float) -> bool:
        """Whether `epsilon` more stays within the limit (tiny float slack allowed)."""
        return self.spent + epsilon <= self.epsilon_limit * (1 + 1e-12) + 1e-12

    def charge(self, epsilon: float, note: str = "", epoch: int | None = None) -> PureCharge:
        """Record a release of `epsilon`; raises PureBudgetExceededError (recording nothing) past
        the limit."""
        epsilon = float(epsilon)
        if not (epsilon >= 0 and math.isfinite(epsilon)):
            raise ValueError(f"epsilon must be finite and >= 0, got {epsilon}")
        if not self.can_charge(epsilon):
            raise PureBudgetExceededError(
                f"charging {epsilon:g} ({note or 'no note'}) would spend {self.spent + epsilon:g}"
                f" > limit {self.epsilon_limit:g}"
            )
        entry = PureCharge(epsilon, note, epoch)
        self.charges.append(entry)
        return entry

    def per_epoch(self) -> dict[int | None, float]:
        """Epsilon summed per epoch (None collects charges without an epoch)."""
        out: dict[int | None, float] = {}
        for c in self.charges:
            out[c.epoch] = out.get(c.epoch, 0.0) + c.epsilon
        return out

    def to_dict(self) -> dict:
        limit = None if math.isinf(self.epsilon_limit) else self.epsilon_limit
        return {
            "kind": "pure-dp",
            "epsilon_limit": limit,
            "charges": [asdict(c) for c in self.charges],
        }

    @classmethod
    def from_dict(cls, data: dict) -> PureDPLedger:
        if data.get("kind") != "pure-dp":
            raise ValueError("not a pure-DP ledger document")
        limit = data.get("epsilon_limit")
        ledger = cls(math.inf if limit is None else float(limit))
        for c in data.get("charges", []):
            epoch = c.get("epoch")
            ledger.charges.append(
                PureCharge(
                    float(c["epsilon"]),
                    str(c.get("note", "")),
                    None if epoch is None else int(epoch),
                )
            )
        return ledger

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON atomically: a temporary file in the same folder, then os.replace."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(self.to_dict(), handle, indent=2)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> PureDPLedger:
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))
