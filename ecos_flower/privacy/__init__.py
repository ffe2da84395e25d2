"""Differential-privacy building blocks: Gaussian mechanism calibration and the client's ledger."""

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
    PrivacyLedger,
    Release,
)

__all__ = [
    "BudgetExceededError",
    "GaussianMechanism",
    "LedgerCorruptError",
    "PrivacyLedger",
    "Release",
    "analytic_gaussian_epsilon",
    "analytic_gaussian_sigma",
    "classic_gaussian_sigma",
    "gaussian_delta",
]
