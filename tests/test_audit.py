"""The empirical privacy audit: the DP bound, the attacks on known cases, `fedpriv audit` on a real run."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from shared_models.records import LabeledArrays
from privacy.audit import (
    advantage_bound,
    attack_metrics,
    auc_bound,
    epsilon_lower_bound,
    lira_offline_scores,
    loss_threshold_scores,
    per_example_outputs,
    tpr_bound,
)
from shared_models.run_config import TrainingPlan
from simulations.audit.audit import compare_with_bound, node_records, run_bound


# --- the (epsilon, delta) bound, against values worked out by hand ---------------------------

def test_tpr_bound_hand_computed():
    # eps = ln 2, delta = 0: min(2x, 1 - (1 - x)/2)
    assert tpr_bound(0.1, math.log(2), 0.0) == pytest.approx(0.2)
    assert tpr_bound(0.5, math.log(2), 0.0) == pytest.approx(0.75)
    # eps = 1, delta = 0.05 at FPR 1%: e * 0.01 + 0.05
    assert tpr_bound(0.01, 1.0, 0.05) == pytest.approx(math.e * 0.01 + 0.05)
    # eps = 0, delta = 0: no test beats chance
    assert np.allclose(tpr_bound(np.array([0.0, 0.3, 1.0]), 0.0, 0.0), [0.0, 0.3, 1.0])
    assert tpr_bound(0.9, 5.0, 0.0) == pytest.approx(1 - math.exp(-5) * 0.1)
    assert tpr_bound(0.99, 1.0, 0.05) == 1.0  # past FPR = 1 - delta the cap binds


def test_advantage_and_auc_bounds_hand_computed():
    # eps = ln 3: lines 3x and 1 - (1 - x)/3 cross at (1/4, 3/4): advantage 1/2,
    # area 1/4 * 3/4 / 2 + 3/4 * (3/4 + 1) / 2 = 0.75
    assert advantage_bound(math.log(3), 0.0) == pytest.approx(0.5)
    assert auc_bound(math.log(3), 0.0) == pytest.approx(0.75)
    assert auc_bound(0.0, 0.0) == pytest.approx(0.5)
    assert advantage_bound(0.0, 0.1) == pytest.approx(0.1)
    # The area matches a dense numerical integral with delta > 0.
    x = np.linspace(0, 1, 200_001)
    assert auc_bound(1.0, 0.01) == pytest.approx(np.trapezoid(tpr_bound(x, 1.0, 0.01), x), abs=1e-8)


def test_epsilon_lower_bound_inverts_the_bound():
    # The point (FPR 1/4, TPR 3/4) lies on the eps = ln 3 boundary: both lines give ln 3.
    assert epsilon_lower_bound(0.75, 0.25, 0.0) == pytest.approx(math.log(3))
    assert epsilon_lower_bound(0.5, 0.05, 0.0) == pytest.approx(math.log(10))
    assert epsilon_lower_bound(0.1, 0.2, 0.0) == 0.0  # worse than chance proves nothing
    # Any point the (eps, delta) region allows proves at most eps.
    for fpr in (0.001, 0.01, 0.3):
        assert epsilon_lower_bound(tpr_bound(fpr, 2.0, 1e-5), fpr, 1e-5) <= 2.0 + 1e-9


@pytest.mark.parametrize("args", [(0.1, -1.0, 0.0), (0.1, 1.0, 1.0), (1.5, 1.0, 0.0), (0.1, math.inf, 0.0)])
def test_bound_rejects_bad_input(args):
    with pytest.raises(ValueError):
        tpr_bound(*args)


def test_no_dp_bound_is_vacuous_and_dp_bound_reads_summary():
    assert run_bound({"dp": False}, {})["vacuous"] is True
    bound = run_bound({"dp": True, "max_client_epsilon": math.log(3), "delta": 0.0}, {})
    assert bound["advantage"] == pytest.approx(0.5) and bound["tpr_at_fpr"]["0.01"] == pytest.approx(0.03)
    with pytest.raises(ValueError, match="max_client_epsilon"):
        run_bound({"dp": True}, {})


# --- attack metrics and attacks on synthetic cases with a known answer ----------------------

def test_attack_metrics_on_separable_and_tied_scores():
    m = attack_metrics(np.array([3.0, 4.0, 5.0]), np.array([0.0, 1.0, 2.0]))
    assert m["auc"] == 1.0 and m["advantage"] == 1.0 and m["tpr_at_fpr"]["0.001"] == 1.0
    # 10 non-members: FPR 1% cannot be resolved, so the point used is FPR 0.
    members, non = np.arange(10, 20, dtype=float), np.arange(0, 10, dtype=float)
    members[:2] = [0.5, 1.5]  # two members below some non-members
    m = attack_metrics(members, non)
    assert m["roc_points"]["0.01"]["fpr"] == 0.0 and m["tpr_at_fpr"]["0.01"] == pytest.approx(0.8)
    assert m["fpr_resolution"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="non-members"):
        attack_metrics(np.ones(3), np.zeros(0))


def test_a_lucky_point_on_few_records_is_not_called_a_violation():
    # 4 of 200 members score above every non-member: empirical TPR 2% at FPR 0, above the
    # eps=1 bound (TPR <= delta at FPR 0), but 0 false positives in 200 is no proof of FPR 0.
    members = np.r_[np.full(4, 10.0), np.linspace(0, 1, 196)]
    non = np.linspace(0, 1, 200)
    m = attack_metrics(members, non)
    flags = compare_with_bound(m, run_bound({"dp": True, "max_client_epsilon": 1.0, "delta": 1e-5}, {}))
    assert flags["above_bound"]["0.001"] is True and flags["bound_violated"] is False
    # The same pattern on 100x the records is beyond sampling error (TPR ~2.1% at FPR 0.1%).
    m = attack_metrics(np.r_[np.full(400, 10.0), np.linspace(0, 1, 19600)], np.linspace(0, 1, 20000))
    flags = compare_with_bound(m, run_bound({"dp": True, "max_client_epsilon": 1.0, "delta": 1e-5}, {}))
    assert flags["violated_at"]["0.001"] is True and flags["bound_violated"] is True
    assert flags["epsilon_lower_bound"] > 1.0  # the same evidence, as an epsilon


def test_identical_distributions_give_chance_auc():
    rng = np.random.default_rng(1)
    m = attack_metrics(rng.normal(size=3000), rng.normal(size=3000))
    assert abs(m["auc"] - 0.5) < 0.03 and m["advantage"] < 0.06
    assert compare_with_bound(m, run_bound({"dp": True, "max_client_epsilon": 1.0, "delta": 1e-5}, {}))[
        "bound_violated"] is False


def test_a_model_that_memorises_its_members_is_caught_by_the_loss_attack():
    # Random labels on random inputs: only memorisation can fit the members.
    gen = torch.Generator().manual_seed(0)
    # 1000 dimensions: fresh inputs are near-orthogonal to the members, so non-members get
    # unconfident outputs.
    x = torch.randn(200, 1000, generator=gen)
    y = torch.randint(0, 2, (200,), generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1000, 64), nn.ReLU(), nn.Linear(64, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:100]), y[:100]).backward()
        opt.step()
    data = LabeledArrays(task="vision", x=x.numpy(), y=y.numpy(), classes=["a", "b"],
                         record_ids=[str(i) for i in range(200)])
    losses, phi = per_example_outputs(model, data)
    m = attack_metrics(loss_threshold_scores(losses[:100]), loss_threshold_scores(losses[100:]))
    assert m["auc"] > 0.95
    # Two classes: phi = -log(expm1(loss)), where the loss has not underflowed; where it has,
    # phi (taken from the logits) still tells the records apart.
    ok = losses > 1e-6
    assert np.allclose(phi[ok], -np.log(np.expm1(losses[ok])), atol=1e-6)
    assert np.all(phi[~ok] > 13) and len(np.unique(phi[~ok])) == (~ok).sum()
    # An (eps = 1)-DP run could never do this: the flag goes up.
    flags = compare_with_bound(m, run_bound({"dp": True, "max_client_epsilon": 1.0, "delta": 1e-5}, {}))
    assert flags["bound_violated"] is True and flags["above_bound"]["auc"] is True


def test_lira_calibrates_per_example_difficulty():
    # Each record has its own OUT mean; members sit 2 std above theirs. Raw phi is swamped by
    # the spread of difficulty, LiRA's per-example calibration is not.
    rng = np.random.default_rng(0)
    n, k = 2000, 8
    difficulty = rng.normal(0, 5, size=2 * n)
    shadow = difficulty + rng.normal(size=(k, 2 * n))
    target = difficulty + rng.normal(size=2 * n) + np.r_[np.full(n, 2.0), np.zeros(n)]
    lira = attack_metrics(*np.split(lira_offline_scores(target, shadow), 2))
    raw = attack_metrics(*np.split(target, 2))
    assert lira["auc"] > 0.88 and raw["auc"] < 0.7
    # Same distribution IN and OUT: chance.
    null = difficulty + rng.normal(size=2 * n)
    assert abs(attack_metrics(*np.split(lira_offline_scores(null, shadow), 2))["auc"] - 0.5) < 0.04
    with pytest.raises(ValueError, match="at least 2"):
        lira_offline_scores(target, shadow[:1])


def test_targets_are_balanced_per_label():
    from simulations.audit.audit import balanced_targets

    member_y = np.r_[np.zeros(100), np.ones(300)].astype(int)  # 75% label 1, like PneumoniaMNIST train
    nonmember_y = np.r_[np.zeros(60), np.ones(40)].astype(int)
    mem, non = balanced_targets(member_y, nonmember_y, seed=0)
    assert len(mem) == len(non) == 100
    assert np.bincount(member_y[mem]).tolist() == np.bincount(nonmember_y[non]).tolist() == [60, 40]
    mem, non = balanced_targets(member_y, nonmember_y, seed=0, max_targets=7)
    assert len(mem) == len(non) == 7 and np.bincount(member_y[mem]).tolist() == [4, 3]


# --- the group-level game (issue 19: the privacy unit is a patient, user or speaker) -----------

def test_group_scores_are_the_mean_of_each_groups_record_scores():
    from privacy.audit.membership import group_scores

    rng = np.random.default_rng(0)
    groups = rng.choice(["p1", "p2", "p10", "q", "speaker-7"], size=200)
    scores = rng.normal(size=200)
    keys, means = group_scores(scores, groups)
    # Independently: a dict of lists, averaged by hand.
    by_key = {}
    for g, v in zip(groups.tolist(), scores.tolist()):
        by_key.setdefault(g, []).append(v)
    assert keys.tolist() == sorted(by_key)
    assert np.allclose(means, [sum(by_key[k]) / len(by_key[k]) for k in sorted(by_key)])
    # Integer keys are keys as strings; one record, one group.
    keys, means = group_scores(np.array([1.0, 3.0, 5.0]), np.array([7, 7, 8]))
    assert keys.tolist() == ["7", "8"] and means.tolist() == [2.0, 5.0]
    with pytest.raises(ValueError, match="one group key per record"):
        group_scores(np.ones(3), np.array(["a", "b"]))
    with pytest.raises(ValueError, match="NaN"):
        group_scores(np.array([1.0, np.nan]), np.array(["a", "b"]))


def test_member_and_nonmember_groups_never_share_a_group():
    from simulations.audit.audit import balanced_groups, member_and_nonmember_groups

    trained = np.array(["a", "a", "b", "c", "c"])
    held_out = np.array(["c", "d", "d", "e", "a"])  # "c" and "a" straddle train and held-out
    members, nonmembers = member_and_nonmember_groups(trained, held_out)
    assert members.tolist() == ["a", "b", "c"] and nonmembers.tolist() == ["d", "e"]
    assert not set(members) & set(nonmembers)
    # Balanced by count, seeded, capped.
    mem, non = balanced_groups(np.array([f"m{i}" for i in range(30)]), np.array([f"n{i}" for i in range(12)]), seed=3)
    assert len(mem) == len(non) == 12 and len(set(mem)) == 12 and set(non) == {f"n{i}" for i in range(12)}
    again, _ = balanced_groups(np.array([f"m{i}" for i in range(30)]), np.array([f"n{i}" for i in range(12)]), seed=3)
    assert mem.tolist() == again.tolist()
    mem, non = balanced_groups(np.array(["a", "b", "c"]), np.array(["d", "e", "f"]), seed=0, max_targets=2)
    assert len(mem) == len(non) == 2
    with pytest.raises(ValueError, match="non-member groups"):
        balanced_groups(np.array(["a"]), np.array([], dtype=str), seed=0)


def test_groups_are_balanced_by_majority_label():
    from simulations.audit.audit import balanced_groups, group_labels

    groups = np.array(["p", "p", "p", "q", "q", "r", "s", "s"])
    y = np.array([1, 1, 0, 0, 1, 2, 0, 0])  # q: a tie, the lowest label wins
    assert group_labels(np.array(["s", "p", "q", "r"]), groups, y).tolist() == [0, 1, 0, 2]
    with pytest.raises(ValueError, match="no record"):
        group_labels(np.array(["zz"]), groups, y)
    # 75% of member patients have label 1, 40% of the non-member ones: matched per label.
    mem_keys, non_keys = np.array([f"m{i}" for i in range(40)]), np.array([f"n{i}" for i in range(20)])
    mem_y, non_y = np.r_[np.zeros(10), np.ones(30)].astype(int), np.r_[np.zeros(12), np.ones(8)].astype(int)
    mem, non = balanced_groups(mem_keys, non_keys, 0, None, mem_y, non_y)
    label = {**dict(zip(mem_keys, mem_y)), **dict(zip(non_keys, non_y))}
    assert sorted(label[k] for k in mem) == sorted(label[k] for k in non) == [0] * 10 + [1] * 8


def test_held_out_records_of_a_trained_group_are_left_out():
    from simulations.audit.audit import stack, without_groups

    def part(groups):
        n = len(groups)
        return LabeledArrays(task="vision", x=np.zeros((n, 1, 2, 2), np.float32), y=np.zeros(n, np.int64),
                             classes=["a"], record_ids=[f"{g}-{i}" for i, g in enumerate(groups)],
                             groups=None if groups is None else np.array(groups))

    held = without_groups(part(["c", "d", "c", "e"]), np.array(["a", "c"]))
    assert held.record_ids == ["d-1", "e-3"] and held.groups.tolist() == ["d", "e"]
    assert stack([part(["x"]), part(["y", "z"])]).groups.tolist() == ["x", "y", "z"]
    no_groups = LabeledArrays(task="vision", x=np.zeros((1, 1, 2, 2), np.float32), y=np.zeros(1, np.int64),
                              classes=["a"], record_ids=["r"])
    assert stack([part(["x"]), no_groups]).groups is None  # a part without keys: no group keys at all
    assert without_groups(no_groups, np.array(["x"])).record_ids == ["r"]


def test_group_game_separates_members_only_by_their_groups():
    from privacy.audit.membership import group_attack_metrics

    # 40 member and 40 non-member groups of 50 records. A member record's score is only 1
    # std above a non-member's (one record tells little: AUC ~0.76); a group's mean over 50
    # records is 7 of its std apart: the group-level game separates them.
    rng = np.random.default_rng(0)
    mem_groups = np.repeat([f"m{i}" for i in range(40)], 50)
    non_groups = np.repeat([f"n{i}" for i in range(40)], 50)
    mem, non = rng.normal(1.0, 1.0, size=2000), rng.normal(0.0, 1.0, size=2000)
    assert attack_metrics(mem, non)["auc"] < 0.8
    m = group_attack_metrics(mem, mem_groups, non, non_groups)
    assert m["auc"] > 0.99 and m["advantage"] > 0.9 and m["members"] == m["nonmembers"] == 40
    # Identical scores: a coin toss.
    m = group_attack_metrics(np.ones(2000), mem_groups, np.ones(2000), non_groups)
    assert m["auc"] == 0.5 and m["advantage"] == 0.0
    # Same distribution on both sides: chance, within sampling error.
    m = group_attack_metrics(rng.normal(size=2000), mem_groups, rng.normal(size=2000), non_groups)
    assert abs(m["auc"] - 0.5) < 0.2
    with pytest.raises(ValueError, match="both sides"):
        group_attack_metrics(mem, mem_groups, non, np.repeat([f"m{i}" for i in range(40)], 50))


def test_unit_defaults_to_the_runs_and_a_group_bound_needs_group_level_dp():
    from simulations.audit.audit import AuditError, audit_unit

    assert audit_unit({}) == "record"  # runs made before issue 19 have no privacy_unit
    assert audit_unit({"privacy_unit": "record"}) == "record"
    assert audit_unit({"privacy_unit": "patient"}) == audit_unit({"privacy_unit": "mixed"}) == "group"
    assert audit_unit({"privacy_unit": "patient"}, "record") == "record"
    with pytest.raises(ValueError, match="unit"):
        audit_unit({}, "patient")
    dp = {"dp": True, "max_client_epsilon": math.log(3), "delta": 0.0}
    bound = run_bound({**dp, "privacy_unit": "patient"}, {}, unit="group")
    assert bound["unit"] == "patient" and "patient-level" in bound["note"] and bound["advantage"] == pytest.approx(0.5)
    assert "whole patient" in run_bound({**dp, "privacy_unit": "patient"}, {}, unit="record")["note"]
    assert run_bound(dp, {})["unit"] == "record" and "sample-level" in run_bound(dp, {})["note"]
    # A record-level epsilon does not bound a group's membership (group privacy is not applied).
    for summary in (dp, {**dp, "privacy_unit": "record"}):
        with pytest.raises(AuditError, match="group privacy"):
            run_bound(summary, {}, unit="group")
    with pytest.raises(AuditError, match="mixed"):
        run_bound({**dp, "privacy_unit": "mixed"}, {}, unit="group")
    # Without DP there is no bound to compare with, whatever the unit.
    assert run_bound({"dp": False}, {}, unit="group")["vacuous"] is True


def _audit_command(run_dir, *flags):
    """`fedpriv audit RUN_DIR FLAGS` in this process: (exit code, printed text)."""
    import argparse
    import io

    from rich.console import Console

    from simulations.audit.command import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["audit", str(run_dir), *flags])
    out = io.StringIO()
    code = args.handler(args, Console(file=out, width=200))
    return code, out.getvalue()


@pytest.mark.parametrize("summary,flags,expected", [
    # A record-level DP run: its epsilon says nothing about a whole group.
    ({"dp": True, "max_client_epsilon": 2.0, "delta": 1e-5, "privacy_unit": "record"}, ["--unit", "group"],
     "group privacy"),
    # No DP, so no bound to refuse; but digits records carry no group keys.
    ({"dp": False}, ["--unit", "group"], "group key"),
    # A patient-level run audits groups by default, and needs the keys.
    ({"dp": True, "max_client_epsilon": 2.0, "delta": 1e-5, "privacy_unit": "patient"}, [], "group key"),
])
def test_fedpriv_audit_unit_group_errors(tmp_path, summary, flags, expected):
    (tmp_path / "config.json").write_text(json.dumps({**_DIGITS_PLAN, "dp": summary["dp"]}))
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    code, text = _audit_command(tmp_path, *flags)
    assert code == 2 and expected in text, text
    assert not (tmp_path / "audit.json").exists()


def test_group_audit_of_a_run_scores_whole_groups(tmp_path, monkeypatch):
    # A digits run whose records are given patient keys (the real ones come from
    # --synthetic-patients): the audit picks whole patients, keeps a patient with records on
    # both sides out of the non-members and every target patient out of the shadow pool.
    import simulations.audit.audit as audit_mod
    from shared_models import build_model

    real_node_records = audit_mod.node_records

    def with_patients(config, plan):
        trains, vals = real_node_records(config, plan)
        for pid, (t, v) in enumerate(zip(trains, vals)):
            t.groups = np.array([f"n{pid}-p{i // 3}" for i in range(len(t))])  # 3 records a patient
            v.groups = np.array([f"n{pid}-v{i // 2}" for i in range(len(v))])
            v.groups[0] = t.groups[0]  # this patient straddles training and validation
        return trains, vals

    pools = []
    real_central = audit_mod.train_shadow_models_central

    def spy(plan, pool, *args, **kwargs):
        pools.append(pool)
        return real_central(plan, pool, *args, **kwargs)

    monkeypatch.setattr(audit_mod, "node_records", with_patients)
    monkeypatch.setattr(audit_mod, "train_shadow_models_central", spy)
    config = {**_DIGITS_PLAN, "val-fraction": 0.2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "summary.json").write_text(json.dumps({"dp": False, "privacy_unit": "patient"}))
    torch.manual_seed(0)
    torch.save(build_model("vision", None, (1, 8, 8), 10).state_dict(), tmp_path / "final_model.pt")

    report = audit_mod.audit_run(tmp_path, shadow_models=2, shadow_training="central", shadow_epochs=1)
    trains, vals = with_patients(config, TrainingPlan.from_run_config(config))
    trained = {g for t in trains for g in t.groups}
    straddling = {v.groups[0] for v in vals}
    held_out = {g for v in vals for g in v.groups} - trained
    sizes = report["sizes"]
    assert report["unit"] == "group" and report["target"] == "patient" and report["bound"]["unit"] == "patient"
    assert sizes["training_groups"] == len(trained) and sizes["held_out_groups"] == len(held_out)
    assert sizes["members"] == sizes["nonmembers"] == sizes["member_groups"] == len(held_out)  # balanced by count
    # Whole patients: 3 records each, but a node's last patient may have fewer.
    assert 3 * sizes["member_groups"] - 2 * len(trains) <= sizes["member_records"] <= 3 * sizes["member_groups"]
    assert sizes["held_out_records"] == sum(len(v) for v in vals) - len(vals)  # less the straddling patients' records
    for a in report["attacks"].values():
        assert a["members"] == a["nonmembers"] == len(held_out) and 0.0 <= a["auc"] <= 1.0
    assert set(report["attacks"]) == {"loss_threshold", "lira_offline"}
    assert straddling <= trained and not straddling & held_out
    # The shadow models never saw a record of a target patient: not one in the pool.
    pool_groups = set(pools[0].groups)
    assert len(pool_groups & trained) == len(trained) - sizes["member_groups"]
    assert len(pool_groups & held_out) == len(held_out) - sizes["nonmember_groups"] == 0


# --- non-members and shadow models -------------------------------------------------------------

_DIGITS_PLAN = {"task": "vision", "dataset": "digits", "model": "", "num-server-rounds": 2, "local-epochs": 1,
                "batch-size": 32, "lr": 0.5, "optimizer": "sgd", "dp": False, "epsilon": 8.0, "delta": 1e-5,
                "max-grad-norm": 1.0, "val-fraction": 0.1, "partition": "iid", "alpha": 0.5, "seed": 0,
                "run-name": "t", "num-supernodes": 3}


def test_non_members_are_validation_shares_and_held_out_splits_never_training_records():
    from simulations.audit.audit import held_out_records
    from shared_models.datasets.named import load_dataset

    plan = TrainingPlan.from_run_config(_DIGITS_PLAN)
    trains, vals = node_records(_DIGITS_PLAN, plan)
    held = held_out_records(plan, vals)
    test = load_dataset("digits")["test"]
    assert held.record_ids == [r for v in vals for r in v.record_ids] + test.record_ids
    assert not set(held.record_ids) & {r for t in trains for r in t.record_ids}


def test_pneumoniamnist_test_split_is_not_used_as_non_members(shared_data):
    # Its test split is Kermany et al.'s separate test set (62.5% pneumonia vs 74% in train,
    # and every model does worse on it): members vs it measures the shift, not memorisation.
    from simulations.audit.audit import held_out_records
    from shared_models.datasets.named import load_dataset

    cfg = {**_DIGITS_PLAN, "dataset": "pneumoniamnist", "partition": "dirichlet", "num-supernodes": 5,
           "data-dir": str(shared_data)}
    plan = TrainingPlan.from_run_config(cfg)
    _, vals = node_records(cfg, plan)
    held = held_out_records(plan, vals)
    test_ids = set(load_dataset("pneumoniamnist", "vision", cfg["data-dir"])["test"].record_ids)
    assert not test_ids & set(held.record_ids)
    assert len(held) == sum(len(v) for v in vals) + 524  # + the official validation split


def test_fedavg_weights_floating_tensors_and_keeps_integer_buffers():
    from simulations.audit.shadows import fedavg

    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(7)}
    b = {"w": torch.tensor([4.0, 8.0]), "n": torch.tensor(9)}
    out = fedavg([a, b], [1.0, 2.0])
    assert torch.allclose(out["w"], torch.tensor([3.0, 6.0])) and int(out["n"]) == 7
    with pytest.raises(ValueError, match="zero"):
        fedavg([a, b], [0.0, 0.0])


def test_shadow_subset_size():
    from simulations.audit.shadows import shadow_subset_size

    assert shadow_subset_size(5000, 4236) == 4236  # as many records as the run trained on
    assert shadow_subset_size(3241, 4236) == 2592  # a smaller pool: 80% of it
    with pytest.raises(ValueError, match="empty"):
        shadow_subset_size(0, 10)


def test_shadow_federations_train_like_the_run_on_different_data():
    from simulations.audit.shadows import train_shadow_federations
    from privacy.dp_sgd import evaluate
    from shared_models.datasets.named import load_dataset

    # (DP-SGD shadows run in test_fedpriv_audit_on_a_dp_run.)
    plan = TrainingPlan.from_run_config({**_DIGITS_PLAN, "lr": 0.05, "num-server-rounds": 3, "local-epochs": 2})
    splits = load_dataset("digits")
    pool, test = splits["train"], splits["test"]
    messages = []
    shadows = train_shadow_federations(plan, pool, 2, seed=0, nodes=3, records_each=600, progress=messages.append)
    accuracies = [evaluate(m, test, torch.device("cpu"))["accuracy"] for m in shadows]
    assert all(a > 0.6 for a in accuracies), accuracies  # 10 classes: chance is 0.1
    first, second = (torch.cat([p.flatten() for p in m.parameters()]) for m in shadows)
    assert not torch.allclose(first, second)  # other records, other seed
    assert len(messages) == 2 and "600 records on 3 nodes, 3 rounds x 2 epochs" in messages[0]
    with pytest.raises(ValueError, match="at least 2"):
        train_shadow_federations(plan, pool, 1, seed=0, nodes=3, records_each=600)


def test_user_level_shadows_draw_whole_groups_and_train_with_group_dp():
    from shared_models.datasets.named import load_dataset
    from simulations.audit.shadows import _shadow_subsets, train_shadow_federations

    pool = load_dataset("digits", synthetic_patients=True)["train"]
    sizes = dict(zip(*np.unique(pool.groups, return_counts=True)))
    first, second = _shadow_subsets(pool, 2, seed=0, records_each=300, by_group=True)
    for subset in (first, second):
        keys, counts = np.unique(subset.groups, return_counts=True)
        assert all(sizes[k] == c for k, c in zip(keys, counts))  # every drawn patient whole
        assert 300 <= len(subset) < 300 + 8  # up to one patient (1-8 records) past the target
    assert set(first.groups) != set(second.groups)
    # Under DP each shadow node samples and clips patients (user-level DP-SGD).
    plan = TrainingPlan.from_run_config({**_DIGITS_PLAN, "dp": True, "epsilon": 4.0, "num-server-rounds": 1,
                                         "privacy-unit": "patient", "synthetic-patients": True})
    messages = []
    models = train_shadow_federations(plan, pool, 2, seed=0, nodes=2, records_each=300, by_group=True,
                                      progress=messages.append)
    assert len(models) == 2 and "groups) on 2 nodes" in messages[0] and "DP-SGD" in messages[0]


# --- canaries ---------------------------------------------------------------------------------

def test_canaries_are_deterministic_and_half_are_dealt_to_the_nodes():
    from client.config import NodeIdentity
    from client.node_training import load_node_data
    from privacy.audit.canaries import inserted_mask, make_canaries, node_canaries
    from shared_models.datasets.named import load_dataset

    train = load_dataset("digits")["train"]
    a, b = make_canaries(train, 11, seed=3), make_canaries(train, 11, seed=3)
    assert np.array_equal(a.x, b.x) and a.input_shape == train.input_shape and a.x.dtype == train.x.dtype
    assert 0.0 <= a.x.min() and a.x.max() <= 1.0 and a.record_ids[0] == "canary-0"
    assert inserted_mask(11, 3).sum() == 5
    dealt = [r for pid in range(3) for r in node_canaries(train, 11, 3, pid, 3).record_ids]
    expected = [f"canary-{i}" for i in np.flatnonzero(inserted_mask(11, 3))]
    assert sorted(dealt) == sorted(expected)  # every inserted canary on exactly one node
    # A node's training share gains its canaries; its validation share never does.
    cfg = {"task": "vision", "dataset": "digits", "model": "", "num-server-rounds": 1, "local-epochs": 1,
           "batch-size": 32, "lr": 0.5, "optimizer": "sgd", "dp": True, "epsilon": 8.0, "delta": 1e-5,
           "max-grad-norm": 1.0, "val-fraction": 0.1, "partition": "iid", "alpha": 0.5, "seed": 3,
           "run-name": "t"}
    node = NodeIdentity(name="node-0", state_dir=None, max_epsilon=8.0, delta=1e-5, data_path=None,
                        partition_id=0, num_partitions=3, val_fraction=0.1)
    plain = load_node_data(node, TrainingPlan.from_run_config(cfg))
    with_canaries = load_node_data(node, TrainingPlan.from_run_config({**cfg, "canaries": 11}))
    mine = node_canaries(train, 11, 3, 0, 3).record_ids
    assert with_canaries.train.record_ids == plain.train.record_ids + mine
    assert with_canaries.val.record_ids == plain.val.record_ids and len(plain.val) > 0
    # The ledger charges the canaries like any other training record.
    assert set(mine) <= set(with_canaries.record_ids) and with_canaries.train_digest != plain.train_digest
    with pytest.raises(ValueError, match="canaries"):
        TrainingPlan.from_run_config({**cfg, "canaries": -1})


# --- `fedpriv audit` on a tiny real run (embedded digits, needs no shared data) --------------

def _cli(*args, cwd):
    env = {**os.environ, "COLUMNS": "200"}  # rich sizes its table to the (absent) terminal
    return subprocess.run([sys.executable, "-m", "simulations.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env=env)


@pytest.mark.e2e
def test_fedpriv_audit_on_a_dp_run(tmp_path):
    run = tmp_path / "run"
    sim = _cli("simulate", "--dataset", "digits", "--clients", "2", "--rounds", "1", "--epsilon", "4", "--no-secagg",
               "--canaries", "60",
               "--out", str(run), "--state-dir", str(tmp_path / "state"), cwd=tmp_path)
    assert sim.returncode == 0, sim.stdout[-2000:] + sim.stderr[-2000:]
    proc = _cli("audit", str(run), "--shadow-models", "2", "--max-targets", "200", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "loss_threshold" in proc.stdout and "lira_offline" in proc.stdout
    report = json.loads((run / "audit.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert report["sizes"]["members"] == report["sizes"]["nonmembers"] == 200
    assert report["bound"]["epsilon"] == pytest.approx(summary["max_client_epsilon"]) and report["bound"]["epsilon"] <= 4
    assert report["bound"]["tpr_at_fpr"]["0.01"] == pytest.approx(tpr_bound(0.01, summary["max_client_epsilon"], 1e-5))
    for attack in ("loss_threshold", "lira_offline"):
        a = report["attacks"][attack]
        assert 0.3 < a["auc"] < report["bound"]["auc"] and a["bound_violated"] is False
        assert set(a["tpr_at_fpr"]) == {"0.001", "0.01"}
    assert report["bound_violated"] is False and report["shadow_models"]["count"] == 2
    # Canaries are scored apart (30 inserted vs 30 not) and kept out of the natural members.
    canaries = report["canaries"]
    assert canaries["inserted"] == canaries["not_inserted"] == 30
    assert set(canaries["attacks"]) == {"loss_threshold", "lira_offline"}
    config = {**json.loads((run / "config.json").read_text()), "canaries": 0}
    trains, _ = node_records(config, TrainingPlan.from_run_config(config))
    assert report["sizes"]["training_records"] == sum(len(t) for t in trains)


@pytest.mark.e2e
def test_fedpriv_audit_of_a_patient_level_run_targets_whole_patients(tmp_path):
    run = tmp_path / "run"
    sim = _cli("simulate", "--dataset", "digits", "--synthetic-patients", "--privacy-unit", "patient", "--clients", "2",
               "--rounds", "1", "--epsilon", "4", "--val-fraction", "0.2", "--no-secagg",
               "--out", str(run), "--state-dir", str(tmp_path / "state"), cwd=tmp_path)
    assert sim.returncode == 0, sim.stdout[-2000:] + sim.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["privacy_unit"] == "patient"
    proc = _cli("audit", str(run), "--shadow-models", "2", cwd=tmp_path)  # the unit: the run's (patient)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "whole patients (unit: group)" in proc.stdout and "patient-level" in proc.stdout
    report = json.loads((run / "audit.json").read_text())
    sizes = report["sizes"]
    assert report["unit"] == "group" and report["privacy_unit"] == report["bound"]["unit"] == "patient"
    assert sizes["member_groups"] == sizes["nonmember_groups"] == sizes["members"] > 50
    assert sizes["member_records"] > sizes["member_groups"]  # patients of 1-8 records
    assert report["bound"]["epsilon"] == pytest.approx(summary["max_client_epsilon"]) and report["bound"]["epsilon"] <= 4
    for a in report["attacks"].values():
        assert a["members"] == sizes["member_groups"] and a["bound_violated"] is False
    assert "user-level" in report["shadow_models"]["training"]


@pytest.mark.e2e
def test_fedpriv_audit_names_the_missing_file(tmp_path):
    proc = _cli("audit", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2 and "config.json" in proc.stdout
