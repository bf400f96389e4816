"""Membership-inference scores and how well they separate members from non-members.

Two attacks against a trained classifier, both black-box on its outputs:

- Loss threshold (Yeom, Giacomelli, Fredrikson, Jha, "Privacy risk in machine learning",
  CSF 2018): a record is called a member when the model's cross-entropy loss on it is low.
  Score = -loss (higher = more likely a member).
- LiRA, offline variant (Carlini, Chien, Nasr, Song, Terzis, Tramer, "Membership inference
  attacks from first principles", IEEE S&P 2022, Sec. VI-C "offline"): train K shadow models
  on data that excludes the targets; for each target record fit a Gaussian to the
  logit-scaled confidence phi = log(p_y / (1 - p_y)) of its true label under those OUT
  models, and score the target model's phi by the one-sided test
  score = log Phi((phi_target - mu_out) / sigma_out) (higher = more likely a member). With
  few shadow models the paper recommends one variance shared by all records ("fixed
  variance"); that is the default here.

Group-level membership (the privacy unit is a patient, user or speaker: all of a group's
records are in training or none are): a group's score is the mean of its records' scores,
as in the user inference attack of Kandpal, Pillutla, Oprea, Kairouz, Choquette-Choo, Xu,
"User inference attacks on large language models" (arXiv 2310.09266, 2023), whose test
statistic averages a per-example log-likelihood ratio over the user's examples
(`group_scores`, `group_attack_metrics`). Either attack above gives the per-record scores.

Metrics: ROC AUC (scikit-learn), the membership advantage max(TPR - FPR) (Yeom et al.), and
TPR at fixed low FPRs taken from the empirical ROC *without interpolation*: the largest TPR
among thresholds whose empirical FPR does not exceed the target. With n non-members the
smallest non-zero FPR is 1/n, so TPR at 0.1% FPR needs n >= 1000 to mean anything; below
that the reported figure is TPR at FPR = 0 (stated in `fpr_resolution`). Each reported
point carries exact (Clopper-Pearson) intervals, so a comparison with a DP bound can tell a
real violation from the luck of a few hundred records.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import norm
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from shared_models.records import LabeledArrays

DEFAULT_FPRS = (0.001, 0.01)


@torch.no_grad()
def per_example_outputs(model: nn.Module, data: LabeledArrays, device: torch.device | str = "cpu",
                        batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(loss, phi) per record of `data` under `model`, each shape (N,) float64.

    loss: cross-entropy of the true label (nats). phi: logit-scaled confidence of the true
    label, log p_y - log(1 - p_y), computed from logits as z_y - logsumexp(z_others) so that
    it stays finite when p_y rounds to 1 (Carlini et al. 2022, Sec. IV-B).
    """
    model = model.to(device).eval()
    loader = DataLoader(TensorDataset(torch.from_numpy(np.ascontiguousarray(data.x)), torch.from_numpy(data.y)),
                        batch_size=batch_size)
    losses, phis = [], []
    for x, y in loader:
        logits = model(x.to(device)).double().cpu()
        losses.append(nn.functional.cross_entropy(logits, y, reduction="none").numpy())
        true = logits.gather(1, y[:, None]).squeeze(1)
        others = logits.scatter(1, y[:, None], float("-inf"))
        phis.append((true - torch.logsumexp(others, dim=1)).numpy())
    if not losses:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(losses), np.concatenate(phis)


def loss_threshold_scores(losses: np.ndarray) -> np.ndarray:
    """Yeom et al. 2018: membership score = -loss, shape (N,). Raises ValueError on NaN."""
    losses = np.asarray(losses, dtype=float)
    if np.isnan(losses).any():
        raise ValueError("losses contain NaN: the model's outputs are not finite")
    return -losses


def lira_offline_scores(target_phi: np.ndarray, shadow_phi: np.ndarray, fixed_variance: bool = True) -> np.ndarray:
    """LiRA offline (Carlini et al. 2022): one-sided Gaussian log-likelihood score per record.

    target_phi: (N,) phi of each record under the attacked model. shadow_phi: (K, N) phi of
    the same records under K shadow models that did NOT train on them (K >= 2).
    fixed_variance: one variance pooled over all records (recommended for small K) instead
    of one per record. Returns (N,) scores log Phi((phi - mu_out) / sigma_out); higher =
    more likely a member. Raises ValueError on mismatched shapes or K < 2.
    """
    target_phi = np.asarray(target_phi, dtype=float)
    shadow_phi = np.asarray(shadow_phi, dtype=float)
    if shadow_phi.ndim != 2 or shadow_phi.shape[1] != target_phi.shape[0]:
        raise ValueError(f"shadow_phi must have shape (K, {target_phi.shape[0]}), got {shadow_phi.shape}")
    if shadow_phi.shape[0] < 2:
        raise ValueError(f"LiRA needs at least 2 shadow models to fit a variance, got {shadow_phi.shape[0]}")
    mu = shadow_phi.mean(axis=0)
    if fixed_variance:
        sigma = np.full_like(mu, np.sqrt(np.mean(shadow_phi.var(axis=0, ddof=1))))
    else:
        sigma = shadow_phi.std(axis=0, ddof=1)
    sigma = np.maximum(sigma, 1e-6)  # identical shadow outputs: avoid a division by zero
    return norm.logcdf((target_phi - mu) / sigma)


def _clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    """Clopper-Pearson interval for a binomial rate k/n; each end fails with probability <= alpha."""
    from scipy.stats import beta

    lo = 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha, k + 1, n - k))
    return lo, hi


def _roc_point(tpr: float, fpr: float, n_pos: int, n_neg: int, alpha: float) -> dict:
    tp, fp = int(round(tpr * n_pos)), int(round(fpr * n_neg))
    return {"tpr": float(tpr), "fpr": float(fpr),
            "tpr_ci": _clopper_pearson(tp, n_pos, alpha), "fpr_ci": _clopper_pearson(fp, n_neg, alpha)}


def attack_metrics(member_scores: np.ndarray, nonmember_scores: np.ndarray,
                   fprs: tuple[float, ...] = DEFAULT_FPRS, confidence: float = 0.95) -> dict:
    """How well `scores` (higher = member) separate members from non-members.

    member_scores: (M,), nonmember_scores: (N,), both non-empty. Returns a dict with
    `auc`; `advantage` = max over thresholds of TPR - FPR; `tpr_at_fpr` {str(fpr): TPR at
    the lowest threshold whose empirical FPR <= fpr}; `roc_points` {str(fpr) or
    "advantage": {"tpr", "fpr", "tpr_ci", "fpr_ci"}}: the empirical points with
    Clopper-Pearson intervals, jointly at `confidence` (Bonferroni over the points);
    `fpr_resolution` = 1/N; `members`, `nonmembers` counts. Raises ValueError when either
    set is empty or a score is NaN.
    """
    pos, neg = np.asarray(member_scores, dtype=float), np.asarray(nonmember_scores, dtype=float)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"need members and non-members, got {len(pos)} and {len(neg)}")
    if np.isnan(pos).any() or np.isnan(neg).any():
        raise ValueError("attack scores contain NaN")
    y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    s = np.concatenate([pos, neg])
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    # Two intervals (TPR, FPR) per point, all of them holding together at `confidence`.
    alpha = (1 - confidence) / (2 * (len(fprs) + 1))
    best = int(np.argmax(tpr - fpr))
    out = {
        "auc": float(roc_auc_score(y, s)),
        "advantage": float(tpr[best] - fpr[best]),
        "tpr_at_fpr": {},
        "roc_points": {"advantage": _roc_point(tpr[best], fpr[best], len(pos), len(neg), alpha)},
        "fpr_resolution": 1.0 / len(neg),
        "members": int(len(pos)),
        "nonmembers": int(len(neg)),
        "confidence": confidence,
    }
    for target in fprs:
        # roc_curve's points run up in both FPR and TPR: the last one within the FPR
        # budget has the largest TPR there (fpr[0] == 0, so one always exists).
        i = int(np.flatnonzero(fpr <= target + 1e-12)[-1])
        out["tpr_at_fpr"][str(target)] = float(tpr[i])
        out["roc_points"][str(target)] = _roc_point(tpr[i], fpr[i], len(pos), len(neg), alpha)
    return out


def group_scores(record_scores: np.ndarray, record_groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-group membership score: the mean of the per-record scores over each group's records.

    Kandpal et al. (user inference, 2023) score a user by averaging a per-example statistic
    over the user's examples; the mean (not the sum) keeps groups of different sizes on one
    scale. record_scores: (N,) float, higher = more likely a member (`loss_threshold_scores`,
    `lira_offline_scores`). record_groups: (N,) group keys (compared as strings). Returns
    (keys, scores): the G distinct keys, sorted, as a (G,) str array, and their (G,) float64
    mean scores in the same order. Raises ValueError on mismatched lengths or a NaN score.
    """
    scores = np.asarray(record_scores, dtype=float)
    groups = np.asarray(record_groups)
    if scores.ndim != 1 or groups.shape != scores.shape:
        raise ValueError(f"need one group key per record score, got shapes {groups.shape} and {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError("record scores contain NaN")
    keys, inverse = np.unique(groups.astype(str), return_inverse=True)
    # -inf scores (a LiRA log-CDF underflow) stay -inf in their group's mean, as they should.
    sums = np.bincount(inverse, weights=scores, minlength=len(keys))
    counts = np.bincount(inverse, minlength=len(keys))
    return keys, sums / counts


def group_attack_metrics(member_scores: np.ndarray, member_groups: np.ndarray, nonmember_scores: np.ndarray,
                         nonmember_groups: np.ndarray, fprs: tuple[float, ...] = DEFAULT_FPRS,
                         confidence: float = 0.95) -> dict:
    """`attack_metrics` of a group-level game: each side's per-record scores averaged per group.

    member_scores/member_groups: (M,) scores and group keys of the member groups' records;
    nonmember_*: (N,) the same for the non-member groups. The ROC is over groups (one point
    per group, `group_scores`), so `members`/`nonmembers` in the result count groups.
    Raises ValueError when a group key occurs on both sides, either side is empty, or as
    `group_scores` does.
    """
    mem_keys, mem = group_scores(member_scores, member_groups)
    non_keys, non = group_scores(nonmember_scores, nonmember_groups)
    both = np.intersect1d(mem_keys, non_keys)
    if len(both):
        raise ValueError(f"{len(both)} groups are on both sides of the game (e.g. {both[0]!r})")
    return attack_metrics(mem, non, fprs, confidence)
