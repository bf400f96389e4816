"""Per-class results of the final model: values computed here by counting, not by scikit-learn."""

import numpy as np
import pytest

from server.class_report import class_report
from server.report import RunRecord, plot_classes


def test_per_class_precision_recall_f1_and_confusion_matrix_by_counting():
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 1])
    pred = np.array([0, 1, 0, 1, 1, 2, 0, 2, 2, 0])
    probs = np.eye(3)[pred] * 0.8 + 0.1  # argmax = pred
    out = class_report(y, probs, ["a", "b", "c"])["per_class"]
    cm = [[sum((y == t) & (pred == p)) for p in range(3)] for t in range(3)]
    assert out["confusion_matrix"] == cm == [[2, 1, 0], [1, 2, 0], [1, 0, 3]]
    precision = [2 / 4, 2 / 3, 3 / 3]  # predicted 0: 4 times, 2 right; 1: 3 times, 2 right; 2: 3 times, all right
    recall = [2 / 3, 2 / 3, 3 / 4]
    assert out["precision"] == pytest.approx(precision) and out["recall"] == pytest.approx(recall)
    assert out["f1"] == pytest.approx([2 * p * r / (p + r) for p, r in zip(precision, recall)])
    assert out["support"] == [3, 3, 4] and out["classes"] == ["a", "b", "c"]
    # A class never predicted and never present: 0, not NaN (JSON has no NaN).
    none = class_report(np.array([0, 0]), np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0]]), ["a", "b", "c"])["per_class"]
    assert none["precision"][2] == none["recall"][2] == none["f1"][2] == 0.0 and "roc" not in none
    with pytest.raises(ValueError, match=r"probs must be \(N, C\) = \(2, 2\)"):
        class_report(np.array([0, 1]), np.zeros((2, 3)), ["a", "b"])


def test_binary_roc_auc_by_pair_counting_and_the_threshold_used():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    p1 = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    out = class_report(y, np.stack([1 - p1, p1], 1), ["normal", "pneumonia"])
    roc = out["roc"]
    pos, neg = p1[y == 1], p1[y == 0]
    auc = np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])  # Mann-Whitney, by pairs
    assert roc["auc"] == pytest.approx(auc, abs=1e-12)
    assert len(roc["fpr"]) <= 101 and roc["fpr"][0] == 0.0 and roc["fpr"][-1] == 1.0 and roc["thresholds"][0] <= 1.0
    assert all(a <= b for a, b in zip(roc["fpr"], roc["fpr"][1:]))
    assert roc["threshold_used"] == 0.5
    # The recall of the positive class is the true positive rate at the argmax threshold.
    assert out["per_class"]["recall"][1] == pytest.approx(np.mean(pos > 0.5))


def test_the_report_draws_the_confusion_matrix_and_the_roc_curve():
    y = np.array([0, 1, 1, 0, 1])
    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.4, 0.6], [0.1, 0.9]])
    final = {"test_accuracy": 0.6, **class_report(y, probs, ["no", "yes"])}
    pngs = [plot_classes(RunRecord(path=None, summary={"final": f}, rows=[], ledger={}, config={}))
            for f in (final, {**final, "roc": None}, {"test_accuracy": 0.6})]
    assert all(png[:8] == b"\x89PNG\r\n\x1a\n" for png in pngs)
    assert len({len(p) for p in pngs}) == 3  # with the ROC panel, without it, and the older-folder note differ


def test_the_coordinators_test_metrics_give_balanced_accuracy_by_counting_and_a_nodes_do_not():
    import torch
    from torch import nn

    from privacy.dp_sgd import evaluate
    from shared_models.records import LabeledArrays

    # The model's prediction is the input's one-hot class (identity logits), so the counts are known.
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 1])
    pred = np.array([0, 1, 0, 1, 1, 2, 0, 2, 2, 0])
    data = LabeledArrays(task="vision", x=np.eye(3, dtype=np.float32)[pred], y=y, classes=["a", "b", "c"],
                         record_ids=[str(i) for i in range(10)])
    model = nn.Linear(3, 3)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3) * 5)
        model.bias.zero_()
    out = evaluate(model, data, torch.device("cpu"), balanced_accuracy=True)
    assert out["accuracy"] == pytest.approx(7 / 10)
    assert out["balanced_accuracy"] == pytest.approx((2 / 3 + 2 / 3 + 3 / 4) / 3)  # mean recall per class
    # Always answering the majority class: accuracy 0.4, balanced accuracy 1/3 (chance).
    majority = LabeledArrays(task="vision", x=np.eye(3, dtype=np.float32)[np.full(10, 2)], y=y,
                             classes=["a", "b", "c"], record_ids=[str(i) for i in range(10)])
    skewed = evaluate(model, majority, torch.device("cpu"), balanced_accuracy=True)
    assert skewed["accuracy"] == pytest.approx(0.4) and skewed["balanced_accuracy"] == pytest.approx(1 / 3)
    # A node's validation metrics keep their listed releases (privacy.releases): no new key.
    assert set(evaluate(model, data, torch.device("cpu"))) == {"loss", "accuracy"}


def test_the_summary_and_the_report_say_the_last_rounds_balanced_accuracy(tmp_path):
    from server.ledger import CoordinatorLedger
    from server.run_folder import RunFolder
    from server.summary import build_summary, write_report
    from shared_models.run_config import TrainingPlan

    from simulations.cli import build_parser
    from simulations.cli_options import training_run_config

    cfg = {**training_run_config(build_parser().parse_args(["simulate"]), "vision", tmp_path / "run"),
           "partition": "iid", "alpha": 0.5}
    plan = TrainingPlan.from_run_config(cfg)
    rows = [{"round": 1, "test": {"accuracy": 0.9, "balanced_accuracy": 0.55, "loss": 0.3}, "aggregated": True}]
    summary = build_summary(plan, cfg, rows, CoordinatorLedger(), {"accuracy": 0.1, "loss": 2.0}, 0.87, 1.0)
    assert summary["final"]["test_balanced_accuracy"] == 0.55 and summary["final"]["test_accuracy"] == 0.9
    folder = RunFolder(tmp_path)
    write_report(folder, summary)
    assert "balanced accuracy 0.5500" in (tmp_path / "report.md").read_text()
    # Rows written before the key existed (a resumed older run): no key, no invented value.
    old = build_summary(plan, {}, [{**rows[0], "test": {"accuracy": 0.9, "loss": 0.3}}], CoordinatorLedger(), {}, 0.87, 1.0)
    assert "test_balanced_accuracy" not in old["final"]
