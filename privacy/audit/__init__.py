"""Empirical privacy audit: membership inference against a run's released model.

- `bounds`: what (epsilon, delta)-DP allows any membership test (Kairouz et al. 2015).
- `membership`: loss-threshold (Yeom et al. 2018) and LiRA offline (Carlini et al. 2022)
  scores, ROC AUC and TPR at fixed FPR.
- `audit`: a run folder -> a JSON report comparing the attacks with the bound.
"""

from .audit import AuditError, audit_run
from .bounds import advantage_bound, auc_bound, epsilon_lower_bound, tpr_bound
from .membership import attack_metrics, lira_offline_scores, loss_threshold_scores, per_example_outputs

__all__ = [
    "AuditError", "audit_run", "advantage_bound", "auc_bound", "epsilon_lower_bound", "tpr_bound",
    "attack_metrics", "lira_offline_scores", "loss_threshold_scores", "per_example_outputs",
]
