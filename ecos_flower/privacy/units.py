"""Privacy units: what one method's epsilon protects, and who adds the noise (DESIGN 2.4).

An epsilon means nothing without its neighbouring relation. The same number is a far stronger
promise at a coarser unit: a guarantee for any change of a participant's (or a client's) whole
data set implies the same guarantee for adding or removing one of its records, so a
participant- or client-level epsilon is also a valid (and usually loose) record-level epsilon,
never the other way round. Every epsilon the product prints names its unit from `UNITS`, and
`privacy_unit` is the one rule mapping a run config to its unit, used by `ecos-flower compare`
(records, table, plots) and by the run report.

Pure Python (no torch, no Flower), so the table can be imported anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PrivacyUnit:
    """One privacy unit: the neighbouring relation an epsilon is stated at, and the trust model.

    Attributes
    ----------
    name : str
        Stable identifier written into results.json (``record``, ``participant``, ``client``,
        ``none``).
    label : str
        Short text for legends and table cells.
    protects : str
        The neighbouring relation: what changing does not change the output distribution much.
    noise_by : str
        Who adds the noise (``client`` for local/distributed DP, ``server`` for central DP).
    trust : str
        What the guarantee assumes of the server.
    strength : int
        Order of strength for the same epsilon: a larger value protects more data per epsilon
        (0 for no guarantee).
    """

    name: str
    label: str
    protects: str
    noise_by: str
    trust: str
    strength: int


RECORD = PrivacyUnit(
    "record",
    "record-level",
    "adding or removing one record of a client's data",
    "client",
    "none: the client adds the noise before anything leaves it",
    1,
)
PARTICIPANT = PrivacyUnit(
    "participant",
    "participant-level per upload",
    "any change of a participant's whole data set, per upload, composed over its uploads",
    "client",
    "none: the client adds the noise before anything leaves it",
    2,
)
CLIENT = PrivacyUnit(
    "client",
    "client-level (central)",
    "adding or removing one whole client from the federation",
    "server",
    "trusted aggregator: the server sees every clipped update before it adds the noise",
    3,
)
NONE = PrivacyUnit(
    "none",
    "none (no DP)",
    "nothing: epsilon 0 if no client data is read, else no DP guarantee (epsilon inf)",
    "-",
    "-",
    0,
)
UNITS: dict[str, PrivacyUnit] = {unit.name: unit for unit in (RECORD, PARTICIPANT, CLIENT, NONE)}

# Run-config `method` values whose mechanisms are record-level whatever the application.
_RECORD_METHODS = frozenset({"ecos", "dp-linear-probe", "dp-fedavg-sample"})


def _positive(config: Mapping[str, Any], key: str) -> bool:
    value = config.get(key, 0)
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def privacy_unit(config: Mapping[str, Any]) -> PrivacyUnit:
    """The privacy unit of a (merged) run config's method.

    Record-level: ECOS counts, kNN votes (``application = "private-knn"``), DP head fits
    (``finetune-epsilon > 0``, ``dp-linear-probe``) and sample-level DP-FedAvg. Participant-level
    per upload: DSSGD with its SVT (``dssgd-epsilon > 0``). Client-level: Flower's DP-FedAvg
    (``method = "dp-fedavg"``). Anything else releases no DP-noised data: unit ``none``.
    """
    method = config.get("method")
    if method == "dp-fedavg":
        return CLIENT
    if method == "dssgd":
        return PARTICIPANT if _positive(config, "dssgd-epsilon") else NONE
    if (
        method in _RECORD_METHODS
        or config.get("application") == "private-knn"
        or _positive(config, "finetune-epsilon")
    ):
        return RECORD
    return NONE


def units_note(units: list[PrivacyUnit]) -> str:
    """The sentence printed under every table and plot that mixes units."""
    coarse = sorted({u.label for u in units if u.strength > RECORD.strength})
    if not any(u.strength for u in units):
        return (
            "No method here adds DP noise: epsilon 0 means no client data leaves the clients, "
            "inf means no guarantee."
        )
    if not coarse:
        return "Every epsilon here is per client, at the record level."
    return (
        "Epsilons are per client, totals for the run, but not all at the same unit: the same "
        f"epsilon at the {' and '.join(coarse)} unit protects a client's whole data, a far "
        "stronger promise than per record (it implies the same epsilon per record, usually a "
        "loose bound). Client-level DP-FedAvg also trusts the server to add the noise."
    )
