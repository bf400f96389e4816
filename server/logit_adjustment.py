"""Post-hoc logit adjustment of the released model with the nodes' DP label counts.

Menon et al., ICLR 2021 ("Long-tail learning via logit adjustment"), post-hoc form: a model
trained with cross-entropy estimates p_train(y | x), which carries the training prior pi_y;
the classifier argmax_y f_y(x) - tau log pi_y is Bayes-optimal for the balanced error at
tau = 1. The prior comes from the nodes' label-count releases (`privacy.label_counts`, each
sample-level DP and charged in the node's epsilon): the server sums what the nodes sent, so the
adjustment is post-processing and costs nothing more.

What is adjusted: every evaluation of the released model on the coordinator's test split (the
per-round curves and `summary.json`'s final figures) and `final_model.pt2`; `final_model.pt`
keeps the trained weights as they are (its state_dict), and nodes evaluate their validation
share on those too. `summary.json` records what was used (`logit_adjustment`).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import nn

from server.ledger import CoordinatorLedger

log = logging.getLogger("fedpriv.server")

# A class whose summed noisy count comes out below this is counted as this many records: the
# log of a non-positive count is undefined, and noise can push a rare class's sum below zero.
MIN_CLASS_COUNT = 1.0


def summed_label_counts(ledger: CoordinatorLedger, num_classes: int) -> tuple[np.ndarray, int] | None:
    """((num_classes,) float64 sum of the nodes' noisy label counts, nodes summed), or None when
    no node sent counts. Each node's counts are clipped to [0, its `num-examples`] (post-processing
    of its release; the record count is public metadata), so no node can move the sum by more than
    its size; a node whose counts are not `num_classes` finite numbers, or that reported no
    records, is left out (logged): one node's bad reply never skews the others' or stops the run."""
    total, nodes = np.zeros(num_classes), 0
    for name, rec in sorted(ledger.nodes.items()):
        if rec.label_counts is None:
            continue
        counts = np.asarray(rec.label_counts, dtype=np.float64)
        if counts.shape != (num_classes,) or not np.isfinite(counts).all() or rec.num_examples <= 0:
            log.warning("label counts of %s left out: expected %d finite numbers and a record count, got %r",
                        name, num_classes, rec.label_counts)
            continue
        total, nodes = total + np.clip(counts, 0.0, float(rec.num_examples)), nodes + 1
    return (total, nodes) if nodes else None


def class_prior(counts: np.ndarray) -> np.ndarray:
    """(K,) float64 prior pi from (K,) summed noisy counts: each floored at MIN_CLASS_COUNT, normalised."""
    floored = np.maximum(np.asarray(counts, dtype=np.float64), MIN_CLASS_COUNT)
    return floored / floored.sum()


class LogitAdjusted(nn.Module):
    """`model` with tau log(prior) subtracted from its logits: (B, ...) -> (B, K) adjusted logits.

    prior: (K,) class probabilities > 0; tau: the adjustment's strength (1: balanced-error
    optimal, Menon et al. 2021). The adjustment is a buffer, so `torch.export` keeps it.
    """

    def __init__(self, model: nn.Module, prior: np.ndarray, tau: float = 1.0) -> None:
        super().__init__()
        prior = np.asarray(prior, dtype=np.float64)
        if prior.ndim != 1 or (prior <= 0).any() or not math.isclose(prior.sum(), 1.0, rel_tol=1e-6):
            raise ValueError(f"prior must be (K,) positive probabilities summing to 1, got {prior}")
        self.model = model
        self.register_buffer("shift", torch.as_tensor(tau * np.log(prior), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) - self.shift.to(x.device)


def adjusted(model: nn.Module, ledger: CoordinatorLedger, num_classes: int) -> tuple[nn.Module, dict | None]:
    """(the model to evaluate and release, what `summary.json` records under `logit_adjustment`).

    `model` itself and None when no node sent label counts; else `LogitAdjusted(model, prior)`
    and {"label_counts": summed (K,), "class_prior": (K,), "nodes": how many sent counts, "tau": 1.0}.
    """
    summed = summed_label_counts(ledger, num_classes)
    if summed is None:
        return model, None
    counts, nodes = summed
    prior = class_prior(counts)
    return LogitAdjusted(model, prior), {"label_counts": [round(float(c), 3) for c in counts],
                                         "class_prior": [float(p) for p in prior], "nodes": nodes, "tau": 1.0}
