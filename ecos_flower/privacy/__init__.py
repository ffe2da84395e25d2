"""Differential-privacy building blocks: Gaussian mechanism calibration and the node's ledger."""

from ecos_flower.privacy.gaussian import (
    GaussianMechanism,
    analytic_gaussian_epsilon,
    analytic_gaussian_sigma,
    classic_gaussian_sigma,
    gaussian_delta,
)
from ecos_flower.privacy.ledger import (
    BudgetExceededError,
    LedgerCorruptError,
    NodeLedger,
    PrivacyEvent,
    compose_epsilon,
)

__all__ = [
    "BudgetExceededError",
    "GaussianMechanism",
    "LedgerCorruptError",
    "NodeLedger",
    "PrivacyEvent",
    "analytic_gaussian_epsilon",
    "analytic_gaussian_sigma",
    "classic_gaussian_sigma",
    "compose_epsilon",
    "gaussian_delta",
]
