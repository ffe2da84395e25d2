"""A node's one lifetime privacy accountant: composes every mechanism it runs, refuses past
its limit.

Privacy unit. Record-level add/remove neighbouring datasets of the node's own data (one record of
the node's data added or removed). Every mechanism the node runs is stated at that unit:

- "gaussian": one release of a query with L2 sensitivity D plus N(0, sigma^2) noise, recorded by
  its noise multiplier z = sigma / D (ECOS counts, kNN votes, DP head fits).
- "laplace": one pure epsilon-DP release (Laplace noise of scale L1-sensitivity / epsilon, or a
  sparse-vector / SVT round with its total epsilon), recorded by its epsilon (DSSGD uploads). A
  pure-DP event stated at participant level is also valid here: a guarantee for replacing all of a
  participant's data implies the guarantee for adding or removing one of its records, so composing
  it as a record-level epsilon-DP event is sound (possibly loose).
- "dpsgd": DP-SGD (Opacus): `steps` steps of the Poisson-subsampled Gaussian mechanism with rate
  q = `sampling_rate` and per-step noise multiplier z. With q = 1 (full batch) it is exactly a
  Gaussian release with multiplier z / sqrt(steps) and is treated as one.

Composition (all events, adaptively, in any order) gives epsilon at the ledger's delta as the
smallest of the valid upper bounds that apply:

- All events Gaussian: exact. k Gaussian releases with multipliers z_i are together exactly one
  Gaussian mechanism with multiplier (sum z_i^-2)^(-1/2) (Gaussian DP, Dong, Roth & Su 2022);
  its epsilon at delta is the analytic one (`analytic_gaussian_epsilon`), which is tight.
- Otherwise: Google's `dp_accounting` privacy-loss-distribution accountant (`PLDAccountant`,
  add/remove neighbouring relation, pessimistic discretisation, so an upper bound): the Gaussian
  events merged into the one equivalent Gaussian above, Laplace events grouped by epsilon and
  subsampled DP-SGD steps grouped by (z, q) as `SelfComposedDpEvent`s (500 equal events cost one
  evaluation). The discretisation interval is 1e-3 (with connect-the-dots its error is far
  below that: ~1e-4 relative at epsilon ~ 2), refined to 1e-4 when epsilon < 0.1. The PLD of each
  group is built with `dp_accounting.pld.privacy_loss_distribution` exactly as `PLDAccountant`
  builds it, and cached per group, so a new charge recomputes only the group it changes.
- With Laplace and Gaussian events only, basic composition is also valid: the sum of the pure
  epsilons plus the exact Gaussian epsilon at delta. The smaller one is used; with only Laplace
  events this is min(PLD, sum of epsilons).
- Near-noiseless events (whose PLD arrays would take seconds or gigabytes; a hostile request can
  ask for them): a Laplace epsilon or a Gaussian part above 20 composes by basic composition
  (split delta where two non-pure parts remain), and DP-SGD steps with z < 0.3 (or z > 1e6)
  are counted as full-batch Gaussian steps (subsampling only helps), and when the Gaussian and
  DP-SGD part has a Renyi-DP epsilon above 50 (dp_accounting's RdpAccountant), or a DP-SGD
  group has more than 1e6 steps, that RDP bound plus the sum of pure epsilons is used. All are
  valid upper bounds.

Computed values are cached in-process, keyed by the grouped event list and delta.

Persistence and integrity. The ledger lives at `path` as JSON: a format version, the events, the
`sequence` (number of charges ever made) and a hash chain (sha256 over the previous hash and each
event's canonical JSON). A witness file `<path>.witness` holds the latest sequence and chain head.
Every charge runs under an exclusive `fcntl.flock` on `<path>.lock`: reload, verify, compute,
refuse (recording nothing) or append, write the ledger and then the witness atomically (temporary
file in the same folder, fsync, os.replace, fsync of the folder). Reads take a shared lock. A
missing ledger whose witness exists ("deleted"), a ledger behind its witness ("rolled back"), an
unreadable file, a broken hash chain, or any event with a negative, zero, non-finite or unknown
parameter raises LedgerCorruptError; the ledger is never silently reset. The hash chain is unkeyed:
it catches edits and truncation by anything that does not recompute it, and the witness catches
restoring an older copy; it is no defence against someone who controls the node's disk (the
adversary modelled here is the server, which only sees answered queries). Deleting both the ledger
and its witness cannot be detected from the node's folder alone.

Error messages carry only budget numbers (limits, epsilons, counts), never data or notes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import math
import numbers
import os
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ecos_flower.privacy.gaussian import analytic_gaussian_epsilon

LEDGER_FORMAT = "ecos-flower-node-ledger"
WITNESS_FORMAT = "ecos-flower-node-ledger-witness"
LEDGER_FORMAT_VERSION = 2
KINDS = ("gaussian", "laplace", "dpsgd")
GENESIS_HASH = hashlib.sha256(f"{LEDGER_FORMAT}/v{LEDGER_FORMAT_VERSION}".encode()).hexdigest()
PLD_INTERVAL = 1e-3
PLD_FINE_INTERVAL = 1e-4
PLD_REFINE_BELOW = 0.1
PLD_MAX_LAPLACE_EPSILON = 20.0  # above it, Laplace events compose by basic composition
PLD_MAX_GAUSSIAN_EPSILON = 20.0  # above it, the Gaussian part composes by basic composition
PLD_MIN_SUBSAMPLED_Z = 0.3  # below it (or above the max), DP-SGD steps count as full-batch
PLD_MAX_SUBSAMPLED_Z = 1e6
PLD_MAX_RDP_EPSILON = 50.0  # DP-SGD whose Renyi-DP epsilon exceeds it is accounted by RDP
PLD_MAX_STEPS = 10**6  # a DP-SGD group with more steps is accounted by RDP
RDP_ORDERS = tuple(float(a) for a in range(2, 65)) + (80.0, 128.0, 256.0, 512.0, 1024.0, 4096.0)
_EVENT_FIELDS = ("kind", "noise_multiplier", "epsilon", "sampling_rate", "steps", "note")


class BudgetExceededError(RuntimeError):
    """Raised when a charge would take the ledger past its epsilon limit (nothing is recorded)."""


class LedgerCorruptError(ValueError):
    """The ledger is unreadable, tampered, rolled back or deleted; it is never silently reset."""


def _real(name: str, value: object) -> float:
    if type(value) is float or type(value) is int:  # fast path (reloads verify every event)
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number")
    return float(value)


def _positive(name: str, value: object) -> float:
    x = _real(name, value)
    if not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {x!r}")
    return x


@dataclass(frozen=True)
class PrivacyEvent:
    """One mechanism run on the node's data (see the module docstring for the kinds)."""

    kind: str
    noise_multiplier: float = 0.0  # gaussian: sigma / L2-sensitivity; dpsgd: per-step multiplier
    epsilon: float = 0.0  # laplace: pure epsilon of the release
    sampling_rate: float = 1.0  # dpsgd: Poisson rate q in (0, 1]
    steps: int = 1  # dpsgd: number of steps
    note: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown privacy event kind; expected one of {KINDS}")
        if not isinstance(self.note, str):
            raise ValueError("note must be a string")
        if type(self.steps) is not int and (
            isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral)
        ):
            raise ValueError("steps must be an integer")
        steps = int(self.steps)
        z = _real("noise_multiplier", self.noise_multiplier)
        eps = _real("epsilon", self.epsilon)
        q = _real("sampling_rate", self.sampling_rate)
        if self.kind == "gaussian":
            z = _positive("noise_multiplier", z)
            if eps != 0.0 or q != 1.0 or steps != 1:
                raise ValueError("a gaussian event has only a noise_multiplier")
        elif self.kind == "laplace":
            eps = _positive("epsilon", eps)
            if z != 0.0 or q != 1.0 or steps != 1:
                raise ValueError("a laplace event has only an epsilon")
        else:
            z = _positive("noise_multiplier", z)
            if not (0.0 < q <= 1.0):
                raise ValueError(f"sampling_rate must lie in (0, 1], got {q!r}")
            if steps < 1:
                raise ValueError(f"steps must be >= 1, got {steps!r}")
            if eps != 0.0:
                raise ValueError("a dpsgd event has no epsilon")
        object.__setattr__(self, "noise_multiplier", z)
        object.__setattr__(self, "epsilon", eps)
        object.__setattr__(self, "sampling_rate", q)
        object.__setattr__(self, "steps", steps)

    @classmethod
    def gaussian(cls, noise_multiplier: float, note: str = "") -> PrivacyEvent:
        """One Gaussian release with noise multiplier sigma / L2-sensitivity."""
        return cls("gaussian", noise_multiplier=noise_multiplier, note=note)

    @classmethod
    def laplace(cls, epsilon: float, note: str = "") -> PrivacyEvent:
        """One pure epsilon-DP release (Laplace with scale L1-sensitivity / epsilon, or SVT)."""
        return cls("laplace", epsilon=epsilon, note=note)

    @classmethod
    def dpsgd(
        cls, noise_multiplier: float, sampling_rate: float, steps: int, note: str = ""
    ) -> PrivacyEvent:
        """`steps` Poisson-subsampled Gaussian steps (rate `sampling_rate`, multiplier z)."""
        return cls(
            "dpsgd",
            noise_multiplier=noise_multiplier,
            sampling_rate=sampling_rate,
            steps=steps,
            note=note,
        )

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in _EVENT_FIELDS}

    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)


# --------------------------------------------------------------------------------- accounting
_Key = tuple[float, tuple[tuple[float, int], ...], tuple[tuple[float, float, int], ...]]


def _inverse_square(z: float) -> float:
    try:
        return z**-2
    except OverflowError:  # z < ~1e-154: no noise to speak of
        return math.inf


def _summarise(events: Iterable[PrivacyEvent]) -> _Key:
    """Group events: Gaussian precision sum(z^-2), Laplace {eps: count}, DP-SGD {(z, q): steps}."""
    precision: list[float] = []
    laplace: Counter[float] = Counter()
    subsampled: Counter[tuple[float, float]] = Counter()
    for event in events:
        if event.kind == "gaussian":
            precision.append(_inverse_square(event.noise_multiplier))
        elif event.kind == "laplace":
            laplace[event.epsilon] += 1
        elif event.sampling_rate == 1.0:
            precision.append(event.steps * _inverse_square(event.noise_multiplier))
        else:
            subsampled[(event.noise_multiplier, event.sampling_rate)] += event.steps
    return (
        math.fsum(precision),  # correctly rounded: independent of the order of events
        tuple(sorted(laplace.items())),
        tuple(sorted((z, q, n) for (z, q), n in subsampled.items())),
    )


_Group = tuple  # ("gaussian", z) | ("laplace", eps, count) | ("dpsgd", z, q, steps)


@functools.lru_cache(maxsize=512)
def _group_pld(group: _Group, interval: float):
    """The PLD of one group of equal events, exactly as `dp_accounting.pld.PLDAccountant` builds
    it for GaussianDpEvent / SelfComposedDpEvent(LaplaceDpEvent) /
    SelfComposedDpEvent(PoissonSampledDpEvent(GaussianDpEvent)), cached so that a new charge only
    recomputes the group it changes."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    if group[0] == "gaussian":
        return pld.from_gaussian_mechanism(
            standard_deviation=group[1], value_discretization_interval=interval
        )
    if group[0] == "laplace":
        _, eps, count = group
        return pld.from_laplace_mechanism(
            parameter=1.0 / eps, value_discretization_interval=interval
        ).self_compose(count)
    _, z, q, steps = group
    return pld.from_gaussian_mechanism(
        standard_deviation=z, value_discretization_interval=interval, sampling_prob=q
    ).self_compose(steps)


def _pld_epsilon(groups: list[_Group], delta: float) -> float:
    """PLD epsilon at `delta` of the composed groups (pessimistic: an upper bound)."""

    def run(interval: float) -> float:
        composed = None
        for group in groups:
            part = _group_pld(group, interval)
            composed = part if composed is None else composed.compose(part)
        assert composed is not None
        return float(composed.get_epsilon_for_delta(delta))

    epsilon = run(PLD_INTERVAL)
    if epsilon < PLD_REFINE_BELOW:
        epsilon = min(epsilon, run(PLD_FINE_INTERVAL))  # both are valid upper bounds
    return max(epsilon, 0.0)


def _full_batch_epsilon(precision: float, subsampled, delta: float) -> float:
    """Upper bound ignoring subsampling: every step a full-batch Gaussian step."""
    total = math.fsum([precision] + [n * _inverse_square(z) for z, _, n in subsampled])
    if math.isinf(total):
        return math.inf
    return analytic_gaussian_epsilon(total**-0.5, delta)


def _rdp_epsilon(precision: float, subsampled, delta: float) -> float:
    """Renyi-DP bound (dp_accounting's RdpAccountant, integer orders) of the Gaussian part and
    the subsampled DP-SGD steps composed."""
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    orders = np.asarray(RDP_ORDERS)
    rdp = orders * (precision / 2.0)  # Gaussian: alpha / (2 z^2), additive over releases
    for z, q, steps in subsampled:
        rdp = rdp + steps * _rdp_one_step(z, q)
    epsilon, _ = compute_epsilon(orders, rdp, delta)
    return float(epsilon)


@functools.lru_cache(maxsize=512)
def _rdp_one_step(z: float, q: float) -> np.ndarray:
    """RDP curve (at RDP_ORDERS) of one Poisson-subsampled Gaussian step, from RdpAccountant."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant(orders=list(RDP_ORDERS))
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)))
    curve = np.array(accountant.rdp, dtype=float)
    curve.setflags(write=False)
    return curve


@functools.lru_cache(maxsize=4096)
def _epsilon_of_key(key: _Key, delta: float) -> float:
    precision, laplace, subsampled = key
    if precision <= 0.0 and not laplace and not subsampled:
        return 0.0
    if any(not (PLD_MIN_SUBSAMPLED_Z <= z <= PLD_MAX_SUBSAMPLED_Z) for z, _, _ in subsampled):
        # Almost noiseless DP-SGD steps have a huge PLD (and extreme ones overflow it). Poisson
        # subsampling only helps, so counting such steps as full-batch Gaussian steps
        # (z / sqrt(steps)) is a valid bound.
        def folded(z: float) -> bool:
            return not (PLD_MIN_SUBSAMPLED_Z <= z <= PLD_MAX_SUBSAMPLED_Z)

        precision = math.fsum(
            [precision] + [n * _inverse_square(z) for z, _, n in subsampled if folded(z)]
        )
        subsampled = tuple(g for g in subsampled if not folded(g[0]))
    if math.isinf(precision):
        gaussian_epsilon = math.inf
    elif precision > 0.0:
        gaussian_epsilon = analytic_gaussian_epsilon(precision**-0.5, delta)
    else:
        gaussian_epsilon = 0.0
    if not laplace and not subsampled:
        return gaussian_epsilon  # exact Gaussian DP
    if gaussian_epsilon > PLD_MAX_GAUSSIAN_EPSILON:
        # Almost no Gaussian noise: its PLD support grows like z^-2 (seconds, then gigabytes).
        # Basic composition instead: (sum eps, 0), (e_g, delta/2), (e_sub, delta/2) -> (sum, delta).
        pure = math.fsum(eps * count for eps, count in laplace)
        if not subsampled:
            return pure + gaussian_epsilon
        half = analytic_gaussian_epsilon(precision**-0.5, delta / 2)
        # The DP-SGD part alone, accounted exactly as it would be on its own (so adding a
        # Gaussian release never lowers the total).
        return pure + half + _epsilon_of_key((0.0, (), subsampled), delta / 2)
    most_steps = max((steps for _, _, steps in subsampled), default=0)
    if most_steps > PLD_MAX_STEPS or (
        subsampled and _full_batch_epsilon(precision, subsampled, delta) > PLD_MAX_GAUSSIAN_EPSILON
    ):
        # The PLD may be huge (its arrays grow with the composed privacy loss: 1e12 DP-SGD steps
        # asked for 244 TiB). Check with Renyi DP (cheap, valid); if even that is beyond
        # PLD_MAX_RDP_EPSILON (or a group has more than PLD_MAX_STEPS steps), use it with basic
        # composition for the pure part.
        rdp = _rdp_epsilon(precision, subsampled, delta)
        if rdp > PLD_MAX_RDP_EPSILON or most_steps > PLD_MAX_STEPS:
            return math.fsum(eps * count for eps, count in laplace) + rdp
    groups: list[_Group] = [("gaussian", precision**-0.5)] if precision > 0.0 else []
    if any(eps > PLD_MAX_LAPLACE_EPSILON for eps, _ in laplace):
        # A PLD's arrays grow with epsilon / interval (a hostile eps = 5e11 asked for petabytes);
        # at such epsilons the PLD cannot beat basic composition by much: (sum eps, 0) composed
        # with the rest's (eps_rest, delta) is a valid (sum + eps_rest, delta).
        pure = math.fsum(eps * count for eps, count in laplace)
        rest = groups + [("dpsgd", z, q, steps) for z, q, steps in subsampled]
        rest_epsilon = _pld_epsilon(rest, delta) if subsampled else gaussian_epsilon
        return pure + rest_epsilon
    groups += [("laplace", eps, count) for eps, count in laplace]
    groups += [("dpsgd", z, q, steps) for z, q, steps in subsampled]
    best = _pld_epsilon(groups, delta)
    if laplace and not subsampled:
        # Basic composition: (sum eps, 0) then (eps_gauss, delta) is (sum + eps_gauss, delta).
        # (With subsampled steps as well it could only beat the PLD by its discretisation error,
        # which is not worth a second PLD evaluation.)
        pure = math.fsum(eps * count for eps, count in laplace)
        best = min(best, pure + gaussian_epsilon)
    return best


def compose_epsilon(events: Iterable[PrivacyEvent], delta: float) -> float:
    """Epsilon at `delta` of all `events` composed (see the module docstring)."""
    return _epsilon_of_key(_summarise(events), float(delta))


# -------------------------------------------------------------------------------- persistence
def _chain(previous: str, event: PrivacyEvent) -> str:
    return hashlib.sha256(f"{previous}\n{event.canonical_json()}".encode()).hexdigest()


def _reject_constant(name: str) -> float:
    raise ValueError("non-finite number in ledger file")


def _parse_json(text: str) -> object:
    return json.loads(text, parse_constant=_reject_constant)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as error:  # a few file systems cannot fsync a folder; the rename still stands
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _atomic_write(path: Path, payload: str) -> None:
    folder = path.parent
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    _fsync_folder(folder)


@dataclass(frozen=True)
class _State:
    events: tuple[PrivacyEvent, ...]
    hashes: tuple[str, ...]  # hashes[i] = chain head after events[i]
    witness_ok: bool  # the witness records exactly this state

    @property
    def head(self) -> str:
        return self.hashes[-1] if self.hashes else GENESIS_HASH


def _parse_ledger(text: str) -> _State:
    try:
        data = _parse_json(text)
        if not isinstance(data, dict):
            raise ValueError("top level is not an object")
        if data.get("format") != LEDGER_FORMAT:
            raise ValueError("not a node ledger")
        if data.get("format_version") != LEDGER_FORMAT_VERSION:
            raise ValueError("unsupported format version")
        items = data["events"]
        sequence = data["sequence"]
        head = data["head"]
        if not isinstance(items, list) or not isinstance(sequence, int):
            raise ValueError("malformed ledger")
        events: list[PrivacyEvent] = []
        hashes: list[str] = []
        previous = GENESIS_HASH
        for item in items:
            if not isinstance(item, dict) or set(item) != {*_EVENT_FIELDS, "hash"}:
                raise ValueError("malformed event")
            event = PrivacyEvent(**{name: item[name] for name in _EVENT_FIELDS})
            previous = _chain(previous, event)
            if item["hash"] != previous:
                raise ValueError("broken hash chain")
            events.append(event)
            hashes.append(previous)
        if sequence != len(events) or head != previous:
            raise ValueError("sequence or chain head does not match the events")
    except (ValueError, TypeError, KeyError) as error:
        raise LedgerCorruptError(
            "privacy ledger is unreadable or tampered (invalid events, or a broken hash chain); "
            "refusing to reset it"
        ) from error
    return _State(tuple(events), tuple(hashes), witness_ok=False)


def _parse_witness(text: str) -> tuple[int, str]:
    try:
        data = _parse_json(text)
        if not isinstance(data, dict) or data.get("format") != WITNESS_FORMAT:
            raise ValueError("not a ledger witness")
        if data.get("format_version") != LEDGER_FORMAT_VERSION:
            raise ValueError("unsupported format version")
        sequence, head = data["sequence"], data["head"]
        if isinstance(sequence, bool) or not isinstance(sequence, int) or sequence < 0:
            raise ValueError("bad sequence")
        if not isinstance(head, str):
            raise ValueError("bad head")
    except (ValueError, TypeError, KeyError) as error:
        raise LedgerCorruptError(
            "privacy ledger witness is unreadable; refusing to trust the ledger"
        ) from error
    return sequence, head


class NodeLedger:
    """One lifetime (epsilon, delta) accountant of a node, persisted at `path`."""

    def __init__(
        self, path: str | os.PathLike[str] | None, epsilon_limit: float, delta: float
    ) -> None:
        """Open the ledger at `path`, creating it if absent (and verifying it if present);
        `path=None` keeps it in memory. `epsilon_limit` may be math.inf (charge and report,
        never refuse). Raises LedgerCorruptError for a deleted, rolled-back or tampered ledger."""
        limit = _real("epsilon_limit", epsilon_limit)
        if math.isnan(limit) or limit <= 0:
            raise ValueError(f"epsilon_limit must be positive (or math.inf), got {limit!r}")
        delta = _real("delta", delta)
        if not (0.0 < delta < 1.0):
            raise ValueError(f"delta must lie in (0, 1), got {delta!r}")
        self.epsilon_limit = limit
        self.delta = delta
        self.path = Path(path) if path is not None else None
        self._thread_lock = threading.Lock()
        self._events: tuple[PrivacyEvent, ...] = ()
        if self.path is not None:
            with self._locked(exclusive=True):
                self._reload(repair=True)

    @classmethod
    def open(cls, path: str | os.PathLike[str], epsilon_limit: float, delta: float) -> NodeLedger:
        """The ledger at `path`, created if absent (subject to the deletion/rollback checks)."""
        return cls(path, epsilon_limit, delta)

    # ------------------------------------------------------------------------- file access
    @property
    def lock_path(self) -> Path | None:
        return None if self.path is None else self.path.with_name(self.path.name + ".lock")

    @property
    def witness_path(self) -> Path | None:
        return None if self.path is None else self.path.with_name(self.path.name + ".witness")

    @contextlib.contextmanager
    def _locked(self, *, exclusive: bool) -> Iterator[None]:
        with self._thread_lock:
            if self.path is None:
                yield
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
                yield
            finally:
                os.close(fd)  # releases the lock

    def _read_state(self) -> _State:
        assert self.path is not None and self.witness_path is not None
        try:
            witness = _parse_witness(self.witness_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            witness = None
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            if witness is not None:
                raise LedgerCorruptError(
                    f"privacy ledger was deleted (its witness records {witness[0]} charge(s)); "
                    "refusing to reset the budget"
                ) from None
            return _State((), (), witness_ok=False)  # new ledger
        state = _parse_ledger(text)
        if witness is None:
            return state  # witness lost (or a crash before its first write): rewrite it
        sequence, head = witness
        if sequence > len(state.events):
            raise LedgerCorruptError(
                f"privacy ledger rolled back: it holds {len(state.events)} charge(s) but its "
                f"witness records {sequence}; refusing to reset the budget"
            )
        expected = state.hashes[sequence - 1] if sequence else GENESIS_HASH
        if head != expected:
            raise LedgerCorruptError(
                f"privacy ledger rolled back or replaced: its chain at charge {sequence} does not "
                "match its witness; refusing to reset the budget"
            )
        return _State(state.events, state.hashes, witness_ok=sequence == len(state.events))

    def _write(self, state: _State) -> None:
        assert self.path is not None and self.witness_path is not None
        ledger = {
            "format": LEDGER_FORMAT,
            "format_version": LEDGER_FORMAT_VERSION,
            "sequence": len(state.events),
            "head": state.head,
            "events": [
                {**event.to_dict(), "hash": digest}
                for event, digest in zip(state.events, state.hashes, strict=True)
            ],
        }
        witness = {
            "format": WITNESS_FORMAT,
            "format_version": LEDGER_FORMAT_VERSION,
            "sequence": len(state.events),
            "head": state.head,
        }
        _atomic_write(self.path, json.dumps(ledger, separators=(",", ":"), allow_nan=False))
        _atomic_write(
            self.witness_path, json.dumps(witness, separators=(",", ":"), allow_nan=False)
        )

    def _reload(self, *, repair: bool) -> _State:
        """Read and verify the file (caller holds the lock); with `repair` (exclusive lock),
        create a missing ledger and bring a lagging witness up to date."""
        if self.path is None:
            return _State(self._events, (), witness_ok=True)
        state = self._read_state()
        if repair and (not state.witness_ok or not self.path.exists()):
            self._write(state)
        self._events = state.events
        return state

    # --------------------------------------------------------------------------- accounting
    @property
    def events(self) -> tuple[PrivacyEvent, ...]:
        """The recorded events, oldest first (reloaded from the file)."""
        with self._locked(exclusive=False):
            return self._reload(repair=False).events

    def epsilon_spent(self) -> float:
        """Epsilon at `self.delta` of every recorded event composed (reloaded from the file)."""
        return compose_epsilon(self.events, self.delta)

    def epsilon_if(self, event: PrivacyEvent) -> float:
        """Epsilon the ledger would show after also charging `event` (records nothing)."""
        if not isinstance(event, PrivacyEvent):
            raise TypeError("event must be a PrivacyEvent")
        return compose_epsilon((*self.events, event), self.delta)

    def remaining(self) -> float:
        """Epsilon left before the limit (never negative; inf for an unlimited ledger)."""
        return max(self.epsilon_limit - self.epsilon_spent(), 0.0)

    def charge(self, event: PrivacyEvent) -> float:
        """Record `event` and return the epsilon spent after it.

        Atomic across processes: under the exclusive lock the file is reloaded and verified, the
        new epsilon computed, and BudgetExceededError raised (recording nothing) if it exceeds the
        limit; otherwise the event is appended and the ledger and witness written durably before
        the lock is released. Call it before releasing: a refused query must not be answered.
        """
        if not isinstance(event, PrivacyEvent):
            raise TypeError("event must be a PrivacyEvent")
        with self._locked(exclusive=True):
            state = self._reload(repair=False)
            events = (*state.events, event)
            after = compose_epsilon(events, self.delta)
            if not (after <= self.epsilon_limit):
                spent = compose_epsilon(state.events, self.delta)
                raise BudgetExceededError(
                    f"privacy budget exceeded: limit epsilon={self.epsilon_limit:g} (delta="
                    f"{self.delta:g}), spent {spent:.6g} over {len(state.events)} charge(s); "
                    f"this charge would bring it to {after:.6g} (requested {after - spent:.4g})"
                )
            if self.path is not None:
                new = _State(events, (*state.hashes, _chain(state.head, event)), witness_ok=True)
                self._write(new)
            self._events = events
        return after

    def __repr__(self) -> str:
        return (
            f"NodeLedger(events={len(self._events)}, limit={self.epsilon_limit:g}, "
            f"delta={self.delta:g}, path={'memory' if self.path is None else 'file'})"
        )
