"""The nodes' DP label-count release and the server's logit adjustment (issue 14).

Expected epsilons come from Opacus's RDP analysis called directly (not through fedpriv's
accountant), the adjusted logits from numpy by hand.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from torch import nn

from client.config import NodeIdentity
from client.node_training import load_node_data, plan_noise, train_round
from privacy.accountants import PrivacyLedger
from privacy.accountants.sample_level import RDP_ORDERS, calibrate_noise_multiplier
from privacy.label_counts import calibrate_with_label_counts, noisy_label_counts, release_noise_multiplier
from privacy.secret_randomness import SecretRandom
from server.ledger import CoordinatorLedger
from server.logit_adjustment import LogitAdjusted, adjusted, class_prior, summed_label_counts
from shared_models import build_model
from shared_models.run_config import ConfigError, TrainingPlan

RUN_CONFIG = {
    "task": "vision", "dataset": "digits", "model": "", "num-server-rounds": 2, "local-epochs": 1,
    "batch-size": 64, "lr": 0.1, "optimizer": "sgd", "dp": True, "epsilon": 2.0, "max-epsilon": 0.0,
    "delta": 1e-5, "max-grad-norm": 1.0, "val-fraction": 0.0, "partition": "iid", "alpha": 0.5,
    "seed": 0, "run-name": "t", "label-count-share": 0.1,
}


def _opacus_epsilon(history, delta=1e-5):
    """Epsilon of a list of (noise multiplier, sampling rate, steps) by Opacus's RDP analysis, directly."""
    rdp = sum(np.asarray(compute_rdp(q=q, noise_multiplier=s, steps=n, orders=RDP_ORDERS)) for s, q, n in history)
    return get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)[0]


@pytest.mark.parametrize("epsilon,sample_rate,steps", [(1.0, 1.0, 60), (8.0, 1.0, 40), (3.0, 0.05, 200)])
def test_the_calibrated_noise_and_the_release_together_spend_the_budget(epsilon, sample_rate, steps):
    share = 0.05
    sigma = calibrate_with_label_counts(epsilon, 1e-5, sample_rate, steps, share)
    s = release_noise_multiplier(sigma, steps, share)
    assert s == pytest.approx(sigma / math.sqrt(share * steps))
    spent = _opacus_epsilon([(sigma, sample_rate, steps), (s, 1.0, 1)])
    assert epsilon - 0.01 <= spent <= epsilon
    # The release costs: DP-SGD alone could have used less noise for the same epsilon.
    assert sigma > calibrate_noise_multiplier(epsilon, 1e-5, sample_rate, steps)
    if sample_rate == 1.0:  # a full-batch step's RDP is alpha / (2 sigma^2): the release takes `share` of it
        alpha = 8.0
        training = steps * alpha / (2 * sigma ** 2)
        assert alpha / (2 * s ** 2) == pytest.approx(share * training)


def test_noisy_counts_are_the_counts_plus_gaussian_noise_of_the_stated_std():
    labels = np.array([0] * 70 + [1] * 20 + [2] * 10)
    draws = np.stack([noisy_label_counts(labels, 3, 4.0, SecretRandom.reproducible("t", str(i))) for i in range(2000)])
    assert draws.mean(0) == pytest.approx([70, 20, 10], abs=0.4)  # 4 / sqrt(2000) = 0.09 per count
    assert draws.std(0) == pytest.approx([4.0] * 3, rel=0.06)
    # From the node's secret entropy: two releases of the same counts differ.
    assert not np.array_equal(noisy_label_counts(labels, 3, 4.0, SecretRandom()),
                              noisy_label_counts(labels, 3, 4.0, SecretRandom()))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        noisy_label_counts(np.array([0, 3]), 3, 4.0, SecretRandom())
    with pytest.raises(ValueError, match="must be > 0"):
        noisy_label_counts(labels, 3, 0.0, SecretRandom())


def test_run_config_bounds_the_share():
    with pytest.raises(ConfigError, match="label-count-share"):
        TrainingPlan.from_run_config({**RUN_CONFIG, "label-count-share": 0.6})
    assert TrainingPlan.from_run_config({k: v for k, v in RUN_CONFIG.items() if k != "label-count-share"}
                                        ).label_count_share == 0.0


def _node(tmp_path, max_epsilon=8.0, unit="record"):
    return NodeIdentity(name="node-0", state_dir=tmp_path, max_epsilon=max_epsilon, delta=1e-5, data_path=None,
                        partition_id=0, num_partitions=3, privacy_unit=unit)


def test_a_node_releases_its_counts_once_per_run_charged_to_every_record_within_the_epsilon(tmp_path):
    plan = TrainingPlan.from_run_config(RUN_CONFIG)
    node = _node(tmp_path)
    data = load_node_data(node, plan)
    sigma, q, steps = plan_noise(plan, len(data.train), node.delta)
    s = release_noise_multiplier(sigma, 2 * steps, 0.1)
    torch.manual_seed(0)
    state = build_model("vision", None, data.train.input_shape, 10).state_dict()
    first, second = (train_round(node, plan, data, state, r, "run-1") for r in (1, 2))

    counts = np.bincount(data.train.y, minlength=10)
    released = np.asarray(first.metrics["label-counts"])
    assert released.shape == (10,) and first.metrics["label-count-noise"] == pytest.approx(s)
    assert np.abs(released - counts).max() < 6 * s and not np.array_equal(released, counts)
    assert "label-counts" not in second.metrics  # once per run
    # Charged to every training record, after round 1's steps, and the run spends the plan's epsilon.
    ledger = PrivacyLedger(tmp_path)
    history = [(sigma, q, steps), (s, 1.0, 1), (sigma, q, steps)]
    for record in (data.train.record_ids[0], data.train.record_ids[-1]):
        assert ledger.worst([record], 1e-5)[1] == history
    assert second.metrics["epsilon"] == pytest.approx(_opacus_epsilon(history), rel=1e-9)
    assert 2.0 - 0.01 <= second.metrics["epsilon"] <= 2.0
    events = [e for e in ledger.events("node-0") if e.mechanism == "label-counts"]
    assert [(e.run, e.round, e.steps, e.sample_rate, e.noise_multiplier) for e in events] == [("run-1", 1, 1, 1.0, s)]

    # A coordinator that starts the run again under another id gets another release, charged again.
    again = train_round(node, plan, data, state, 1, "run-2")
    assert "label-counts" in again.metrics
    assert len([e for e in ledger.events("node-0") if e.mechanism == "label-counts"]) == 2
    assert again.metrics["epsilon"] == pytest.approx(
        _opacus_epsilon([(sigma, q, 3 * steps), (s, 1.0, 2)]), rel=1e-9)


def test_no_release_under_client_level_noise(tmp_path):
    plan = TrainingPlan.from_run_config(RUN_CONFIG)
    node = _node(tmp_path)
    data = load_node_data(node, plan)
    torch.manual_seed(0)
    state = build_model("vision", None, data.train.input_shape, 10).state_dict()
    outcome = train_round(node, plan, data, state, 1, "run-1", label_counts_allowed=False)
    assert not outcome.declined and "label-counts" not in outcome.metrics
    assert [e.mechanism for e in PrivacyLedger(tmp_path).events()] == ["dp-sgd"]


def test_no_release_without_a_share_without_dp_or_for_a_patient_unit(tmp_path):
    for i, cfg in enumerate(({**RUN_CONFIG, "label-count-share": 0.0}, {**RUN_CONFIG, "dp": False},
                             {**RUN_CONFIG, "synthetic-patients": True})):
        plan = TrainingPlan.from_run_config(cfg)
        node = _node(tmp_path / str(i), unit="patient" if cfg.get("synthetic-patients") else "record")
        data = load_node_data(node, plan)
        torch.manual_seed(0)
        state = build_model("vision", None, data.train.input_shape, 10).state_dict()
        outcome = train_round(node, plan, data, state, 1, "run-1")
        assert not outcome.declined and "label-counts" not in outcome.metrics
        if plan.dp:
            assert all(e.mechanism == "dp-sgd" for e in PrivacyLedger(tmp_path / str(i)).events())
    assert outcome.unit == "patient"


def _ledger_with(counts_by_node):
    ledger = CoordinatorLedger()
    for name, counts in counts_by_node.items():
        ledger.record_reply(name, 1, {"num-examples": 100.0, "label-counts": counts, "label-count-noise": 2.0}, False)
    return ledger


def test_the_server_sums_the_nodes_counts_and_leaves_out_a_malformed_reply():
    ledger = _ledger_with({"a": [30.5, 9.5], "b": [-3.0, 20.0], "bad": [1.0, 2.0, 3.0], "nan": [float("nan"), 1.0]})
    ledger.record_reply("silent", 1, {"num-examples": 5.0}, False)
    ledger.record_reply("scalar", 1, {"num-examples": 5.0, "label-counts": 3.0}, False)  # not a list: ignored
    assert ledger.nodes["scalar"].label_counts is None
    counts, nodes = summed_label_counts(ledger, 2)
    assert nodes == 2 and counts.tolist() == [30.5, 29.5]  # b's -3 clipped to 0
    # Finite but huge counts (their sum would overflow) are clipped to the node's record count.
    ledger.record_reply("huge", 1, {"num-examples": 100.0, "label-counts": [1e308, 1e308]}, False)
    counts, nodes = summed_label_counts(ledger, 2)
    assert nodes == 3 and counts.tolist() == [130.5, 129.5]
    released, info = adjusted(nn.Linear(2, 2), ledger, 2)
    assert info["class_prior"] == pytest.approx([130.5 / 260, 129.5 / 260])
    assert class_prior(np.array([-4.0, 3.0])).tolist() == [0.25, 0.75]  # a negative sum counts as 1 record
    assert summed_label_counts(CoordinatorLedger(), 2) is None
    model = nn.Linear(2, 2)
    assert adjusted(model, CoordinatorLedger(), 2) == (model, None)


def test_the_adjusted_model_subtracts_the_log_prior_from_its_logits():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ledger = CoordinatorLedger()
    ledger.record_reply("a", 1, {"num-examples": 400.0, "label-counts": [300.0, 100.0], "label-count-noise": 2.0}, False)
    released, info = adjusted(model, ledger, 2)
    assert info == {"label_counts": [300.0, 100.0], "class_prior": [0.75, 0.25], "nodes": 1, "tau": 1.0}
    x = torch.randn(5, 3)
    w, b = model.weight.detach().numpy(), model.bias.detach().numpy()
    by_hand = x.numpy() @ w.T + b - np.log([0.75, 0.25])
    assert released(x).detach().numpy() == pytest.approx(by_hand, abs=1e-6)
    # A balanced prior changes no decision; this one moves the threshold towards the rarer class.
    assert isinstance(released, LogitAdjusted)
    with pytest.raises(ValueError, match="prior must be"):
        LogitAdjusted(model, np.array([0.5, 0.6]))


def test_the_coordinator_ledger_keeps_the_counts_through_a_checkpoint():
    ledger = _ledger_with({"a": [3.0, 1.0]})
    restored = CoordinatorLedger.from_dict(ledger.to_dict())
    assert restored.nodes["a"].label_counts == [3.0, 1.0] and restored.nodes["a"].label_count_noise == 2.0
    assert dataclasses.asdict(restored.nodes["a"]) == dataclasses.asdict(ledger.nodes["a"])
