"""Patient-level (user-level) DP-SGD, issue 19: the unit is a group of records.

What is checked, each on the real code path:
- a group with many records changes the noised sum of one step by at most the clipping
  norm C (the group's clipped contribution), where record-level DP-SGD lets it move the
  sum by about k*C;
- the node's epsilon is the subsampled Gaussian's at the *group* sampling rate, checked
  against an independent computation (the exact integer-order RDP of Mironov et al. 2019);
- the ledger charges groups, composes a record's spend with its group's, and declines a
  group whose records spent outside it (group privacy is never silently assumed);
- loaders' keys reach training: validation and partitions keep groups whole; synthetic
  patients are fixed; a site that asks for patient-level DP refuses data without keys.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from client.config import NodeIdentity, privacy_unit
from client.node_training import NodeData, split_validation, train_round, training_units
from privacy.accountants import PrivacyLedger
from privacy.accountants.ledger import group_unit_id
from privacy.dp_sgd import LocalTrainingSession
from privacy.secret_randomness import SecretRandom
from privacy.user_level import GroupPoissonSampler, group_index
from server.ledger import CoordinatorLedger
from server.summary import run_privacy_unit
from shared_models.datasets.partitioning import partition_indices
from shared_models.datasets.synthetic_patients import assign_synthetic_patients
from shared_models.records import LabeledArrays
from shared_models.run_config import TrainingPlan

CPU = torch.device("cpu")


def _data(groups: list[int], dim: int = 6, seed: int = 0) -> LabeledArrays:
    """Records with one label pattern, so records of a group push the model the same way."""
    rng = np.random.default_rng(seed)
    n = len(groups)
    x = (rng.normal(size=(n, dim)) + 2.0).astype(np.float32)
    y = np.zeros(n, dtype=np.int64)
    y[::3] = 1
    return LabeledArrays("vision", x, y, ["a", "b"], [f"r{seed}-{i}" for i in range(n)],
                         groups=np.asarray([f"p{g}" for g in groups]))


def _one_step_sum(data: LabeledArrays, user_level: bool, expected_units: int) -> torch.Tensor:
    """The clipped gradient sum of one noiseless full-batch DP-SGD step, read back from the weights.

    w1 = w0 - lr * sum / E with E = expected batch size; lr = 1 and q = 1 (every unit sampled).
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(data.x.shape[1], 2))
    w0 = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    _, group_of = group_index(data.groups)
    session = LocalTrainingSession(model, data, batch_size=10_000, lr=1.0, optimizer="sgd", noise_multiplier=0.0,
                                   max_grad_norm=1.0, device=CPU, groups=group_of if user_level else None)
    assert session.sample_rate == 1.0
    assert session.optimizer.expected_batch_size == expected_units
    session.train_epochs(1, SecretRandom())
    w1 = torch.cat([p.detach().flatten() for p in session.module.parameters()])
    return (w0 - w1) * expected_units


def test_a_group_with_many_records_moves_the_step_by_at_most_the_clipping_norm():
    small = [g for g in range(8) for _ in range(2)]  # 8 patients with 2 records each
    with_big = small + [99] * 40  # plus one patient with 40 records
    base, big = _data(small), _data(with_big)
    big.x[: len(small)] = base.x  # neighbouring datasets: the same records plus one whole group
    big.y[: len(small)] = base.y
    base.record_ids[:] = big.record_ids[: len(small)]
    diff = _one_step_sum(big, True, 9) - _one_step_sum(base, True, 8)
    assert 0.5 < float(diff.norm()) <= 1.0 + 1e-4  # the group's clipped contribution: at most C = 1
    # Record-level DP-SGD on the same data: the patient's 40 records each add up to C.
    diff_records = _one_step_sum(big, False, len(with_big)) - _one_step_sum(base, False, len(small))
    assert float(diff_records.norm()) > 10.0


def _rdp_integer_order(q: float, sigma: float, alpha: int) -> float:
    """RDP of the Poisson-subsampled Gaussian at integer order alpha: Mironov, Talwar, Zhang 2019,
    Sec. 3.3, A_alpha = sum_k C(alpha, k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 sigma^2)), RDP = log(A)/(alpha-1)."""
    log_terms = [math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
                 + (alpha - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma ** 2)
                 for k in range(alpha + 1)]
    top = max(log_terms)  # in log space: the terms overflow a float at large orders
    return (top + math.log(math.fsum(math.exp(t - top) for t in log_terms))) / (alpha - 1)


def _epsilon_independent(q: float, sigma: float, steps: int, delta: float) -> float:
    """(epsilon, delta) by the conversion of Balle et al. 2020 (Thm. 21) over integer orders 2..256."""
    return min(steps * _rdp_integer_order(q, sigma, a) + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
               for a in range(2, 257))


PLAN = {
    "task": "vision", "dataset": "digits", "model": "", "num-server-rounds": 3, "local-epochs": 1,
    "batch-size": 16, "lr": 0.1, "optimizer": "sgd", "dp": True, "epsilon": 3.0, "max-epsilon": 0.0,
    "delta": 1e-5, "max-grad-norm": 1.0, "val-fraction": 0.2, "partition": "iid", "alpha": 0.5,
    "seed": 0, "run-name": "t", "synthetic-patients": True,
}


def _node(tmp_path, unit="patient", max_epsilon=3.0, num_partitions=2) -> NodeIdentity:
    return NodeIdentity(name="node-0", state_dir=tmp_path, max_epsilon=max_epsilon, delta=1e-5, data_path=None,
                        partition_id=0, num_partitions=num_partitions, val_fraction=0.2, privacy_unit=unit)


def _global(node, plan):
    from client.node_training import load_node_data
    from shared_models import build_model

    data = load_node_data(node, plan)
    torch.manual_seed(0)
    return data, build_model("vision", None, data.train.input_shape, 10).state_dict()


def test_the_node_accounts_at_the_group_sampling_rate_and_reports_its_unit(tmp_path):
    plan = TrainingPlan.from_run_config(PLAN)
    node = _node(tmp_path)
    data, state = _global(node, plan)
    groups = sorted(set(data.train.groups))
    assert len(groups) < len(data.train)  # the synthetic patients do group the records
    out = train_round(node, plan, data, state, 1, "run-a")
    assert out.unit == "patient" and not out.declined
    q_groups = 1.0 / math.ceil(len(groups) / plan.batch_size)
    assert out.metrics["sample-rate"] == pytest.approx(q_groups)
    assert out.metrics["num-groups"] == len(groups)
    steps = int(out.metrics["round-steps"])
    assert steps == math.ceil(len(groups) / plan.batch_size)
    sigma = out.metrics["noise-multiplier"]
    independent = _epsilon_independent(q_groups, sigma, steps, 1e-5)
    # Opacus also optimises over fractional orders, so its epsilon may sit just below the integer-order one.
    assert independent * 0.97 <= out.metrics["epsilon"] <= independent + 1e-9
    # Three rounds spend the run's epsilon 3 per patient, at the group rate (not the record rate).
    for r in (2, 3):
        out = train_round(node, plan, data, state, r, "run-a")
    assert out.metrics["epsilon"] == pytest.approx(_epsilon_independent(q_groups, sigma, 3 * steps, 1e-5), rel=0.03)
    assert out.metrics["epsilon"] <= 3.0 + 1e-9
    q_records = 1.0 / math.ceil(len(data.train) / plan.batch_size)
    assert q_records != q_groups
    # The ledger knows the patients by hashed key, and its events say the unit.
    doc = json.loads((tmp_path / "ledgers" / "records.json").read_text())
    assert not any(g in json.dumps(doc) for g in groups)
    assert {group_unit_id(g) for g in groups} <= {r for c in doc["cohorts"] for r in c["records"]}
    events = PrivacyLedger(tmp_path).events("node-0")
    assert [(e.unit, e.groups) for e in events] == [("patient", len(groups))] * 3
    # A fourth round would pass the budget of 3 per patient: declined, nothing trained.
    out = train_round(node, plan, data, state, 4, "run-a")
    assert out.declined and out.state is None and "per patient" in out.reason


def test_a_record_epsilon_composes_its_own_spend_with_its_groups(tmp_path):
    ledger = PrivacyLedger(tmp_path)
    groups = {group_unit_id("p1"): ["r1", "r2"], group_unit_id("p2"): ["r3"]}
    entry = ledger.charge(["r1", "r2", "r3"], node="n", delta=1e-5, noise_multiplier=1.0, sample_rate=0.5, steps=10,
                          max_epsilon=50, run="a", round=1, groups=groups, unit="patient")
    group_eps = entry.epsilon_after
    assert group_eps == pytest.approx(_epsilon_independent(0.5, 1.0, 10, 1e-5), rel=0.03)
    # The group-level guarantee holds for each of the group's records.
    assert ledger.epsilon(["r1"], 1e-5) == pytest.approx(group_eps)
    # A later record-level run on r1 composes with its group's spend (one history of both).
    ledger.charge(["r1"], node="n", delta=1e-5, noise_multiplier=1.0, sample_rate=0.1, steps=10, max_epsilon=50,
                  run="b", round=1)
    both = _epsilon_independent_mixed([(0.5, 1.0, 10), (0.1, 1.0, 10)], 1e-5)
    assert ledger.epsilon(["r1"], 1e-5) == pytest.approx(both, rel=0.03)
    assert ledger.epsilon(["r2"], 1e-5) == pytest.approx(group_eps)
    # Now p1 has a record with spend of its own: patient-level accounting would need group privacy.
    declined = ledger.charge(["r1", "r2"], node="n", delta=1e-5, noise_multiplier=1.0, sample_rate=0.5, steps=1,
                             max_epsilon=50, run="c", round=1, groups={group_unit_id("p1"): ["r1", "r2"]},
                             unit="patient")
    assert declined.declined and "group privacy" in declined.reason
    # It states the one figure it can prove there: the records' own epsilon, per record.
    assert declined.unit == "record" and declined.epsilon_after == pytest.approx(ledger.epsilon(["r1", "r2"], 1e-5))
    # A record charged in p2 cannot move into another group unnoticed.
    moved = ledger.charge(["r3"], node="n", delta=1e-5, noise_multiplier=1.0, sample_rate=0.5, steps=1,
                          max_epsilon=50, run="c", round=1, groups={group_unit_id("p9"): ["r3"]}, unit="patient")
    assert moved.declined
    # A new record joining p2 is fine: it has no spend the group lacks.
    grown = ledger.charge(["r3", "r4"], node="n", delta=1e-5, noise_multiplier=1.0, sample_rate=0.5, steps=1,
                          max_epsilon=50, run="c", round=1, groups={group_unit_id("p2"): ["r3", "r4"]}, unit="patient")
    assert not grown.declined and ledger.epsilon(["r4"], 1e-5) == pytest.approx(grown.epsilon_after)


def _epsilon_independent_mixed(entries, delta):
    return min(sum(n * _rdp_integer_order(q, s, a) for q, s, n in entries) + math.log((a - 1) / a)
               - (math.log(delta) + math.log(a)) / (a - 1) for a in range(2, 257))


def test_the_group_sampler_takes_whole_groups_and_caps_records_per_step():
    group_of = np.repeat(np.arange(5), [1, 2, 3, 10, 4])
    sampler = GroupPoissonSampler(group_of, 0.4, 400, SecretRandom.reproducible("t"), max_records_per_group=3)
    seen = np.zeros(5)
    for batch in sampler:
        assert len(batch.records) == len(batch.slots)
        for slot in range(batch.groups):
            rows = batch.records[batch.slots == slot]
            g = set(group_of[rows].tolist())
            assert len(g) == 1  # one group per slot
            g = g.pop()
            seen[g] += 1
            assert len(rows) == min(3, int((group_of == g).sum()))
    assert np.all(np.abs(seen / 400 - 0.4) < 0.1)  # each group sampled at q whatever its size


def test_validation_and_partitions_keep_groups_whole():
    keys = [g for g in range(60) for _ in range(1 + g % 5)]
    data = _data(keys)
    train, val = split_validation(data, 0.3, by_group=True)
    assert len(val) and not set(train.groups) & set(val.groups)
    parts = partition_indices(data.y, 3, "dirichlet", alpha=0.5, groups=data.groups, seed=1, whole_groups=True)
    owners = [set(data.groups[p]) for p in parts]
    assert sum(len(o) for o in owners) == 60 and len(set().union(*owners)) == 60
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(data)))


def test_synthetic_patients_are_fixed_single_label_and_1_to_8_records():
    data = _data(list(range(500)))
    data.groups = None
    a, b = assign_synthetic_patients(data, "train"), assign_synthetic_patients(data, "train")
    assert (a.groups == b.groups).all()
    names, sizes = np.unique(a.groups, return_counts=True)
    assert sizes.min() >= 1 and sizes.max() <= 8 and len(names) < 250
    for name in names:
        assert len(set(a.y[a.groups == name])) == 1
    with pytest.raises(ValueError, match="already has group keys"):
        assign_synthetic_patients(a, "train")


def test_a_site_that_asks_for_patient_level_refuses_data_without_group_keys(tmp_path):
    data = _data([0, 1, 2])
    assert privacy_unit("auto", data) == "user" and privacy_unit("record", data) == "record"
    data.groups = None
    assert privacy_unit("auto", data) == "record"
    with pytest.raises(ValueError, match="no group keys"):
        privacy_unit("patient", data)
    plan = TrainingPlan.from_run_config({**PLAN, "synthetic-patients": False})
    node = _node(tmp_path, unit="patient")
    nodedata = NodeData(train=data, val=data.subset(np.arange(0)))
    with pytest.raises(ValueError, match="no group keys"):
        train_round(node, plan, nodedata, {}, 1, "r")
    assert not (tmp_path / "ledgers" / "records.json").exists()  # nothing charged


def test_the_coordinator_shows_each_nodes_unit():
    ledger = CoordinatorLedger()
    metrics = {"epsilon": 1.0, "delta": 1e-5, "max-epsilon": 8, "noise-multiplier": 1, "sample-rate": 0.1,
               "steps-total": 3, "num-examples": 10, "num-groups": 4}
    ledger.record_reply("a", 1, metrics, False, unit="patient")
    ledger.record_reply("b", 1, {k: v for k, v in metrics.items() if k != "num-groups"}, False, unit=None)
    nodes = ledger.to_dict()
    assert (nodes["a"]["privacy_unit"], nodes["a"]["num_groups"]) == ("patient", 4)
    assert nodes["b"]["privacy_unit"] == "record"
    assert run_privacy_unit(nodes) == "mixed"
    assert run_privacy_unit({"a": nodes["a"]}) == "patient"


def test_training_units_name_groups_by_hash_and_count_validation_groups():
    data = _data([0, 0, 1, 2, 2, 2])
    train, val = data.subset(np.arange(4)), data.subset(np.arange(4, 6))
    units = training_units("patient", NodeData(train=train, val=val))
    assert units.trained == [group_unit_id("p0"), group_unit_id("p1"), group_unit_id("p2")]
    assert units.groups[group_unit_id("p2")] == [train.record_ids[3]]
    assert units.held == units.trained  # p2's validation records belong to a trained group
    assert dataclasses.replace(units).group_of.tolist() == [0, 0, 1, 2]


def test_a_node_whose_records_were_trained_at_record_level_declines_patient_level_and_says_per_record(tmp_path):
    plan = TrainingPlan.from_run_config(PLAN)
    data, state = _global(_node(tmp_path, unit="record"), plan)
    first = train_round(_node(tmp_path, unit="record"), plan, data, state, 1, "run-a")
    assert first.unit == "record" and not first.declined
    then = train_round(_node(tmp_path, unit="patient"), plan, data, state, 1, "run-b")
    assert then.declined and then.state is None and "group privacy" in then.reason
    # No patient-level figure is reported for these patients: the records' own epsilon, per record.
    assert then.unit == "record" and then.metrics["epsilon"] == pytest.approx(first.metrics["epsilon"])
