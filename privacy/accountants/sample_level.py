"""Sample-level DP accounting for DP-SGD (Poisson-subsampled Gaussian mechanism).

Follows Abadi et al. 2016 ("Deep Learning with Differential Privacy") with the Renyi-DP
analysis of Mironov et al. 2019 ("Renyi Differential Privacy of the Sampled Gaussian
Mechanism"), through Opacus's `RDPAccountant` and its RDP -> (epsilon, delta) conversion
(Balle et al. 2020). A history is a list of (noise_multiplier, sample_rate, steps) entries,
exactly Opacus's `RDPAccountant.history`, so it composes and restores losslessly.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

HistoryEntry = tuple[float, float, int]

# Opacus's default RDP orders stop at 63; at the large epsilons (~8) and few steps of
# federated rounds the optimum sits at that edge. Higher orders only tighten the bound
# (epsilon is a minimum over orders), and leave results with an interior optimum unchanged.
RDP_ORDERS = list(RDPAccountant.DEFAULT_ALPHAS) + [64, 72, 80, 96, 112, 128, 160, 192, 256]
# Opacus warns when the best order is the largest of RDP_ORDERS: the epsilon is then still a
# valid upper bound, only not the tightest possible. A site cannot act on it: not shown.
warnings.filterwarnings("ignore", message="Optimal order is the largest alpha", category=UserWarning)


def compose_history(
    history: Sequence[Sequence[float]], noise_multiplier: float, sample_rate: float, steps: int
) -> list[HistoryEntry]:
    """`history` plus `steps` steps, merged into the last entry when (noise, rate) are equal.

    The same merge as Opacus's `RDPAccountant.step`, so histories stay one entry per
    (noise multiplier, sampling rate) run and compare equal to Opacus's own.
    """
    out = [(float(s), float(q), int(n)) for s, q, n in history]
    if out and out[-1][0] == noise_multiplier and out[-1][1] == sample_rate:
        s, q, n = out.pop()
        out.append((s, q, n + int(steps)))
    else:
        out.append((float(noise_multiplier), float(sample_rate), int(steps)))
    return out


class PrivacyBudgetError(ValueError):
    """The requested (epsilon, delta, sampling rate, steps) cannot be met or is invalid."""


def epsilon_for_history(
    history: Iterable[Sequence[float]], delta: float, orders: Sequence[float] | None = None
) -> float:
    """Epsilon (at `delta`) spent by a composed history of subsampled Gaussian steps.

    history: entries (noise_multiplier, sample_rate, steps); orders: RDP orders to
    optimise the conversion over (default `RDP_ORDERS`). Returns 0.0 for an empty
    history and inf when an entry has noise_multiplier 0. Raises PrivacyBudgetError when
    delta is not in (0, 1).
    """
    if not 0.0 < delta < 1.0:
        raise PrivacyBudgetError(f"delta must be in (0, 1), got {delta}")
    entries = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not entries:
        return 0.0
    if any(s <= 0.0 for s, _, _ in entries):
        return float("inf")
    accountant = RDPAccountant()
    accountant.history = entries
    return float(accountant.get_epsilon(delta=delta, alphas=list(orders or RDP_ORDERS)))


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Smallest noise multiplier (std / clipping norm) whose `steps` steps spend <= target_epsilon.

    Uses Opacus's binary search (`get_noise_multiplier`, RDP accountant, tolerance 0.01),
    so the result spends between target_epsilon - 0.01 and target_epsilon at `delta`.
    Raises PrivacyBudgetError for out-of-range arguments or an unreachable target.
    """
    if target_epsilon <= 0:
        raise PrivacyBudgetError(f"epsilon must be > 0, got {target_epsilon}")
    if not 0.0 < delta < 1.0:
        raise PrivacyBudgetError(f"delta must be in (0, 1), got {delta}")
    if not 0.0 < sample_rate <= 1.0:
        raise PrivacyBudgetError(f"sampling rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise PrivacyBudgetError(f"steps must be >= 1, got {steps}")
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant="rdp",
                alphas=RDP_ORDERS,
            )
        )
    except ValueError as err:  # Opacus: "The privacy budget is too low."
        raise PrivacyBudgetError(
            f"epsilon={target_epsilon} at delta={delta} is unreachable with sampling rate "
            f"{sample_rate:.4g} over {steps} steps: {err}"
        ) from err
