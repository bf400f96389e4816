"""Privacy accountants: how much (epsilon, delta) a history of DP-SGD steps has spent."""

from .sample_level import (
    PrivacyBudgetError,
    calibrate_noise_multiplier,
    epsilon_for_history,
)
from .client_level import ClientLevelAccountant
from .ledger import LedgerEntry, PrivacyLedger

__all__ = [
    "ClientLevelAccountant",
    "PrivacyBudgetError",
    "calibrate_noise_multiplier",
    "epsilon_for_history",
    "LedgerEntry",
    "PrivacyLedger",
]
