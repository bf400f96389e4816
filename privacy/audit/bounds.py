"""What (epsilon, delta)-DP allows any membership test to achieve.

Hypothesis-testing view of DP (Kairouz, Oh, Viswanath, "The composition theorem for
differential privacy", ICML 2015, Thm. 2.1; Wasserman & Zhou 2010): for an
(epsilon, delta)-DP mechanism, every test of "record in" vs "record out" with false
positive rate FPR has true positive rate

    TPR <= min(1, e^eps * FPR + delta, 1 - e^-eps * (1 - delta - FPR)).

From that region follow the largest membership advantage TPR - FPR (Yeom et al., CSF
2018, define the advantage; the maximum over the region is (e^eps - 1 + 2 delta) /
(e^eps + 1)) and the largest ROC AUC (the area under the boundary above).

These bound an attack against *one* record's inclusion, or one group's (all of a
patient's or user's records) when the mechanism is DP with respect to groups (user-level
DP-SGD: neighbouring datasets differ in one whole group) and epsilon is that group-level
epsilon. A record-level epsilon bounds a group of k records only through group privacy
(roughly k * epsilon, Dwork & Roth 2014, Thm. 2.2), which these functions do not apply.
The empirical attacks in `privacy.audit.membership` average over many records (or
groups), which the same bound also covers (each target's test obeys it, and the bound is
concave in FPR).
"""

from __future__ import annotations

import math

import numpy as np


def _check(epsilon: float, delta: float) -> None:
    if not (epsilon >= 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta!r}")


def tpr_bound(fpr: float | np.ndarray, epsilon: float, delta: float) -> float | np.ndarray:
    """Largest TPR any test can reach at false positive rate `fpr` under (epsilon, delta)-DP.

    fpr: a rate in [0, 1] (scalar or array, same shape returned). epsilon >= 0 (natural
    log units), delta in [0, 1). Kairouz et al. 2015, Thm. 2.1. Raises ValueError for an
    epsilon, delta or fpr out of range.
    """
    _check(epsilon, delta)
    x = np.asarray(fpr, dtype=float)
    if np.any((x < 0) | (x > 1)) or np.any(~np.isfinite(x)):
        raise ValueError(f"fpr must lie in [0, 1], got {fpr!r}")
    bound = np.minimum.reduce([
        np.ones_like(x),
        math.exp(epsilon) * x + delta,
        1.0 - math.exp(-epsilon) * (1.0 - delta - x),
    ])
    return float(bound) if np.ndim(fpr) == 0 else bound


def advantage_bound(epsilon: float, delta: float) -> float:
    """Largest membership advantage max(TPR - FPR) under (epsilon, delta)-DP.

    (e^eps - 1 + 2 delta) / (e^eps + 1): where the two lines of `tpr_bound` cross.
    Raises ValueError for epsilon < 0 or delta outside [0, 1).
    """
    _check(epsilon, delta)
    e = math.exp(epsilon)
    return min(1.0, (e - 1.0 + 2.0 * delta) / (e + 1.0))


def auc_bound(epsilon: float, delta: float) -> float:
    """Largest ROC AUC under (epsilon, delta)-DP: the area under `tpr_bound` on [0, 1].

    The boundary is piecewise linear, so the trapezoid rule over its breakpoints is exact.
    Raises ValueError for epsilon < 0 or delta outside [0, 1).
    """
    _check(epsilon, delta)
    e = math.exp(epsilon)
    # Breakpoints: the two lines cross at (1 - d)/(e + 1); the second reaches 1 at x = 1 - d.
    xs = np.unique(np.clip([0.0, (1.0 - delta) / (e + 1.0), 1.0 - delta, 1.0], 0.0, 1.0))
    ys = tpr_bound(xs, epsilon, delta)
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))


def epsilon_lower_bound(tpr_lo: float, fpr_hi: float, delta: float) -> float:
    """Smallest epsilon consistent with an attack's ROC point, from its confidence interval.

    Inverts `tpr_bound` (Jagielski et al., NeurIPS 2020, Sec. 3; Nasr et al. 2021): a test
    with TPR >= tpr_lo at FPR <= fpr_hi proves eps >= log((tpr_lo - delta) / fpr_hi), and by
    the bound's other line eps >= log((1 - delta - fpr_hi) / (1 - tpr_lo)). Rates in [0, 1],
    delta in [0, 1). Returns the larger, at least 0 (inf when a denominator is 0 and its
    numerator positive). Raises ValueError on rates outside [0, 1] or a bad delta.
    """
    for name, v in (("tpr_lo", tpr_lo), ("fpr_hi", fpr_hi)):
        if not 0 <= v <= 1:
            raise ValueError(f"{name} must lie in [0, 1], got {v!r}")
    _check(0.0, delta)
    best = 0.0
    for num, den in ((tpr_lo - delta, fpr_hi), (1.0 - delta - fpr_hi, 1.0 - tpr_lo)):
        if num > 0:
            best = max(best, math.inf if den <= 0 else math.log(num / den))
    return best
