"""The empirical privacy audit's mechanisms: membership attacks, DP bounds, canaries.

- `bounds`: what (epsilon, delta)-DP allows any membership test (Kairouz et al. 2015).
- `membership`: loss-threshold (Yeom et al. 2018) and LiRA offline (Carlini et al. 2022)
  scores, ROC AUC and TPR at fixed FPR.
- `canaries`: out-of-distribution records to insert and score (Jagielski et al. 2020).
The harness that rebuilds a run, trains shadow federations and writes the report is
`simulations.audit`.
"""

from .bounds import advantage_bound, auc_bound, epsilon_lower_bound, tpr_bound
from .membership import attack_metrics, lira_offline_scores, loss_threshold_scores, per_example_outputs

__all__ = [
    "advantage_bound", "auc_bound", "epsilon_lower_bound", "tpr_bound",
    "attack_metrics", "lira_offline_scores", "loss_threshold_scores", "per_example_outputs",
]
