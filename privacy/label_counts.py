"""A node's one DP release of its label counts, for logit adjustment of the released model.

Why: a model trained with cross-entropy learns the training prior p(y) into its logits. Where
the classes are imbalanced (PneumoniaMNIST's training split is 74% pneumonia), its decisions
favour the majority class; subtracting log p(y) from the logits (post-hoc logit adjustment,
Menon et al., ICLR 2021, "Long-tail learning via logit adjustment") gives the classifier that
is Bayes-optimal for balanced error. The coordinator needs p(y), which is the nodes' data: each
node releases its label counts once per run through the Gaussian mechanism.

The mechanism: counts n_k of the node's training records per class, plus N(0, s^2) each, with
s from the node's secret entropy (`privacy.secret_randomness`). Adding or removing one record
changes one count by 1 (L2 sensitivity 1), so the release is one Gaussian mechanism of noise
multiplier s at sampling rate 1: the RDP history entry (s, 1.0, 1), charged to every training
record in the node's ledger like DP-SGD steps (Mironov 2017). Record-level only: under
user-level DP a group changes the counts by up to its size.

How much of the budget: `share` in (0, MAX_LABEL_COUNT_SHARE] sets s = sigma / sqrt(share * T)
for DP-SGD's noise multiplier sigma over its T steps, so at full batch (sampling rate 1, where a
step's RDP is alpha / (2 sigma^2)) the release's RDP is `share` times the training's; under
subsampling it is more than that share of epsilon. Either way `calibrate_with_label_counts`
chooses sigma so that the training steps and the release together spend the node's epsilon.
"""

from __future__ import annotations

import math

import numpy as np

from privacy.accountants.sample_level import HistoryEntry, PrivacyBudgetError, epsilon_for_history
from privacy.secret_randomness import SecretRandom

# The ledger's name for this release (`LedgerEntry.mechanism`); DP-SGD steps are "dp-sgd".
LABEL_COUNTS = "label-counts"


def release_noise_multiplier(sigma: float, steps: int, share: float) -> float:
    """Noise multiplier s of the label-count release: sigma / sqrt(share * steps).

    sigma: DP-SGD's noise multiplier; steps: DP-SGD steps of the whole run (rounds x local
    steps); share > 0. Raises PrivacyBudgetError for a non-positive argument.
    """
    if sigma <= 0 or steps < 1 or share <= 0:
        raise PrivacyBudgetError(f"invalid label-count release: sigma={sigma}, steps={steps}, share={share}")
    return sigma / math.sqrt(share * steps)


def run_history(sigma: float, sample_rate: float, steps: int, share: float) -> list[HistoryEntry]:
    """RDP history of a run: `steps` DP-SGD steps at (sigma, sample_rate) and, when share > 0,
    the one label-count release at (release_noise_multiplier, 1.0, 1)."""
    history = [(float(sigma), float(sample_rate), int(steps))]
    if share > 0:
        history.append((release_noise_multiplier(sigma, steps, share), 1.0, 1))
    return history


def calibrate_with_label_counts(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                                share: float, tolerance: float = 0.01) -> float:
    """Smallest DP-SGD noise multiplier (to `tolerance` in epsilon) whose run history
    (`run_history`) spends <= target_epsilon at `delta`: between target - tolerance and target.

    Bisection on the RDP accountant (`epsilon_for_history`), as Opacus's `get_noise_multiplier`
    does for DP-SGD alone. Raises PrivacyBudgetError for a target no noise below 1e6 reaches.
    """
    if target_epsilon <= 0 or steps < 1 or not 0 < sample_rate <= 1 or share <= 0:
        raise PrivacyBudgetError(f"invalid calibration: epsilon={target_epsilon}, sample_rate={sample_rate}, "
                                 f"steps={steps}, share={share}")

    def spent(sigma: float) -> float:
        return epsilon_for_history(run_history(sigma, sample_rate, steps, share), delta)

    low, high = 0.0, 10.0
    while spent(high) > target_epsilon:
        low, high = high, 2 * high
        if high > 1e6:
            raise PrivacyBudgetError(f"epsilon={target_epsilon} at delta={delta} is unreachable with a "
                                     f"label-count release of share {share}")
    while spent(high) < target_epsilon - tolerance:
        mid = (low + high) / 2
        if mid <= 0:
            break
        low, high = (mid, high) if spent(mid) > target_epsilon else (low, mid)
        if high - low < 1e-9:
            break
    return high


def noisy_label_counts(labels: np.ndarray, num_classes: int, noise_multiplier: float,
                       randomness: SecretRandom) -> np.ndarray:
    """(num_classes,) float64: each class's count among `labels` ((N,) ints in [0, num_classes))
    plus Gaussian noise of std `noise_multiplier` (sensitivity 1) from the node's secret
    randomness. Raises ValueError for a label outside [0, num_classes) or a non-positive multiplier.
    """
    labels = np.asarray(labels)
    if noise_multiplier <= 0:
        raise ValueError(f"label-count noise multiplier must be > 0, got {noise_multiplier}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    counts = np.bincount(labels.astype(np.int64), minlength=num_classes).astype(np.float64)
    return counts + randomness.gaussian(num_classes, noise_multiplier)
