import json

import pytest

from privacy.accountants import NodePrivacyLedger, PrivacyBudgetError, dataset_fingerprint, epsilon_for_history

FP = dataset_fingerprint(["a/1", "a/2", "a/3"])


def _charge(ledger, steps, max_eps=100.0, rnd=1, run="r1"):
    return ledger.charge(noise_multiplier=1.0, sample_rate=0.05, steps=steps, max_epsilon=max_eps, run=run, round=rnd)


def test_fingerprint_is_order_independent_and_content_sensitive():
    assert dataset_fingerprint(["x", "y"]) == dataset_fingerprint(["y", "x"])
    assert dataset_fingerprint(["x", "y"]) != dataset_fingerprint(["x", "z"])


def test_ledger_persists_and_composes_across_instances(tmp_path):
    first = NodePrivacyLedger(tmp_path, "node-0", FP, 1e-5)
    _charge(first, 100)
    eps_one = first.epsilon()
    # A new process (new instance) continues where the first ended.
    again = NodePrivacyLedger(tmp_path, "node-0", FP, 1e-5)
    assert again.epsilon() == pytest.approx(eps_one)
    _charge(again, 100, rnd=2, run="r2")
    assert again.steps() == 200
    assert again.history == [(1.0, 0.05, 200)]
    assert again.epsilon() == pytest.approx(epsilon_for_history([(1.0, 0.05, 200)], 1e-5))
    assert again.epsilon() > eps_one
    # Another dataset on the same node has its own budget.
    other = NodePrivacyLedger(tmp_path, "node-0", dataset_fingerprint(["b"]), 1e-5)
    assert other.epsilon() == 0.0


def test_charge_that_would_exceed_budget_is_declined_and_spends_nothing(tmp_path):
    ledger = NodePrivacyLedger(tmp_path, "n", FP, 1e-5)
    budget = ledger.epsilon_if_charged(1.0, 0.05, 150)
    assert not _charge(ledger, 100, max_eps=budget).declined
    spent = ledger.epsilon()
    entry = _charge(ledger, 100, max_eps=budget, rnd=2)
    assert entry.declined and "max-epsilon" in entry.reason
    assert entry.steps == 0 and entry.epsilon_after == pytest.approx(spent)
    assert ledger.epsilon() == pytest.approx(spent) and ledger.steps() == 100
    assert [e.declined for e in ledger.events] == [False, True]


def test_delta_cannot_change_and_damaged_ledger_refuses(tmp_path):
    ledger = NodePrivacyLedger(tmp_path, "n", FP, 1e-5)
    _charge(ledger, 10)
    with pytest.raises(PrivacyBudgetError, match="delta"):
        NodePrivacyLedger(tmp_path, "n", FP, 1e-6)
    ledger.path.write_text("{ not json")
    with pytest.raises(PrivacyBudgetError, match="unreadable"):
        NodePrivacyLedger(tmp_path, "n", FP, 1e-5)


def test_ledger_file_is_plain_json_with_opacus_history_and_no_temp_files(tmp_path):
    ledger = NodePrivacyLedger(tmp_path, "n", FP, 1e-5)
    _charge(ledger, 7)
    data = json.loads(ledger.path.read_text())
    assert data["history"] == [[1.0, 0.05, 7]] and data["delta"] == 1e-5 and data["fingerprint"] == FP
    assert not list(ledger.path.parent.glob("*.tmp"))


def test_invalid_node_names_and_charges_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="node name"):
        NodePrivacyLedger(tmp_path, "../escape", FP, 1e-5)
    ledger = NodePrivacyLedger(tmp_path, "n", FP, 1e-5)
    with pytest.raises(PrivacyBudgetError):
        ledger.charge(noise_multiplier=0.0, sample_rate=0.1, steps=1, max_epsilon=1, run="r", round=1)
