"""Per-class results of the final model on the test split (summary.json `final.per_class`, `final.roc`).

Accuracy alone hides a model that answers the majority class (a skewed medical test set
makes that look good): the per-class precision, recall and F1 and the confusion matrix say
which classes the model gets right, and for a binary task the ROC curve says what other
decision thresholds would trade. Computed with scikit-learn's metrics on the coordinator's
test split only (the coordinator's own data: nothing here comes from a node).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score, roc_curve
from torch import nn

from shared_models.records import LabeledArrays

ROC_POINTS = 101  # the ROC curve kept in summary.json: at most this many points


@torch.no_grad()
def predict_proba(model: nn.Module, data: LabeledArrays, device: torch.device, batch_size: int = 512) -> np.ndarray:
    """(N, C) float64 softmax probabilities of `model` on `data.x`, in record order."""
    model.eval()
    out = []
    for start in range(0, len(data), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(data.x[start:start + batch_size])).to(device)
        out.append(torch.softmax(model(x).float(), 1).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, data.num_classes))


def class_report(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """{"per_class": {...}} and, with two classes, {"roc": {...}} for predictions argmax(probs).

    y_true: (N,) int class indices; probs: (N, C) probabilities; classes: the C names.
    per_class: "classes", and per class (lists in class order) "precision", "recall", "f1"
    (0 where undefined: no prediction or no record of the class), "support" (records);
    "confusion_matrix": C x C counts, rows = true class, columns = predicted.
    roc (binary): "fpr", "tpr", "thresholds" (at most ROC_POINTS, thresholds on the
    probability of classes[1], the first point's threshold capped at 1), "auc", and
    "threshold_used": 0.5 (argmax of two probabilities). Raises ValueError when the shapes
    disagree.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape != (len(y_true), len(classes)):
        raise ValueError(f"probs must be (N, C) = ({len(y_true)}, {len(classes)}), got {probs.shape}")
    labels = list(range(len(classes)))
    y_pred = probs.argmax(1)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    out = {"per_class": {
        "classes": list(classes),
        "precision": [float(v) for v in precision],
        "recall": [float(v) for v in recall],
        "f1": [float(v) for v in f1],
        "support": [int(v) for v in support],
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }}
    if len(classes) == 2 and len(np.unique(y_true)) == 2:
        fpr, tpr, thresholds = roc_curve(y_true, probs[:, 1])
        keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), ROC_POINTS)).round().astype(int))
        out["roc"] = {
            "fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist(),
            "thresholds": np.minimum(thresholds[keep], 1.0).tolist(),  # sklearn's first threshold is +inf
            "auc": float(roc_auc_score(y_true, probs[:, 1])), "threshold_used": 0.5,
        }
    return out
