"""The per-record privacy ledger: composition per record, across instances, processes and nodes."""

import json
import multiprocessing

import pytest

from privacy.accountants import PrivacyBudgetError, PrivacyLedger, epsilon_for_history

D = 1e-5


def _charge(ledger, records, steps, max_eps=100.0, node="node-0", rnd=1, run="r1", sigma=1.0, q=0.05):
    return ledger.charge(records, node=node, delta=D, noise_multiplier=sigma, sample_rate=q, steps=steps,
                         max_epsilon=max_eps, run=run, round=rnd)


def _eps(*entries):
    return epsilon_for_history(list(entries), D)


def test_each_record_composes_the_charges_it_took_part_in_across_instances(tmp_path):
    first = PrivacyLedger(tmp_path)
    _charge(first, ["a", "b"], 100)
    # A new instance (a new process) continues where the first ended; b trains again with c.
    again = PrivacyLedger(tmp_path)
    _charge(again, ["b", "c"], 100, rnd=2, run="r2")
    assert again.epsilon(["a"], D) == pytest.approx(_eps((1.0, 0.05, 100)))
    assert again.epsilon(["c"], D) == pytest.approx(_eps((1.0, 0.05, 100)))
    assert again.epsilon(["b"], D) == pytest.approx(_eps((1.0, 0.05, 200)))
    # A set's epsilon is its worst record's; records never charged have spent nothing.
    assert again.epsilon(["a", "c", "new"], D) == pytest.approx(_eps((1.0, 0.05, 100)))
    assert again.epsilon(["a", "b"], D) == pytest.approx(_eps((1.0, 0.05, 200)))
    assert again.epsilon(["new"], D) == 0.0
    assert again.worst(["a", "b", "c"], D)[1] == [(1.0, 0.05, 200)]
    # Different noise on a later charge composes as a second history entry.
    _charge(again, ["a"], 10, sigma=2.0, q=0.1, rnd=3)
    assert again.worst(["a"], D)[1] == [(1.0, 0.05, 100), (2.0, 0.1, 10)]
    assert again.epsilon(["a"], D) == pytest.approx(_eps((1.0, 0.05, 100), (2.0, 0.1, 10)))


def test_nodes_with_disjoint_records_in_one_state_folder_do_not_charge_each_other(tmp_path):
    ledger = PrivacyLedger(tmp_path)
    for rnd in (1, 2):
        _charge(ledger, ["a1", "a2"], 50, node="node-0", rnd=rnd)
        _charge(ledger, ["b1", "b2"], 50, node="node-1", rnd=rnd)
    assert ledger.epsilon(["a1", "a2"], D) == pytest.approx(_eps((1.0, 0.05, 100)))
    assert ledger.epsilon(["b2"], D) == pytest.approx(_eps((1.0, 0.05, 100)))
    # Records with equal histories are kept as one cohort, so the file does not grow per round.
    cohorts = json.loads(ledger.path.read_text())["cohorts"]
    assert [sorted(c["records"]) for c in cohorts] == [["a1", "a2", "b1", "b2"]]
    assert [e.node for e in ledger.events()] == ["node-0", "node-1"] * 2 and len(ledger.events("node-1")) == 2


def test_a_charge_that_would_pass_the_budget_for_any_record_is_declined_and_spends_nothing(tmp_path):
    ledger = PrivacyLedger(tmp_path)
    _charge(ledger, ["old"], 100)
    budget = _eps((1.0, 0.05, 150))  # "old" may take 50 more steps, fresh records far more
    entry = _charge(ledger, ["old", "fresh"], 100, max_eps=budget, rnd=2)
    assert entry.declined and "max-epsilon" in entry.reason and entry.steps == 0
    assert entry.epsilon_after == pytest.approx(_eps((1.0, 0.05, 100)))
    assert ledger.epsilon(["fresh"], D) == 0.0 and ledger.epsilon(["old"], D) == pytest.approx(_eps((1.0, 0.05, 100)))
    assert not _charge(ledger, ["fresh"], 100, max_eps=budget, rnd=3).declined
    assert [e.declined for e in ledger.events()] == [False, True, False]


def test_delta_cannot_change_and_a_damaged_ledger_refuses(tmp_path):
    ledger = PrivacyLedger(tmp_path)
    _charge(ledger, ["a"], 10)
    with pytest.raises(PrivacyBudgetError, match="delta"):
        ledger.epsilon(["a", "b"], 1e-6)
    assert ledger.epsilon(["b"], 1e-6) == 0.0  # a record never charged has no delta yet
    ledger.path.write_text("{ not json")
    with pytest.raises(PrivacyBudgetError, match="unreadable"):
        ledger.epsilon(["a"], D)


def test_ledgers_of_the_earlier_layout_are_adopted_never_dropped(tmp_path):
    old = tmp_path / "ledgers" / "site-a--0123456789abcdef.json"
    old.parent.mkdir(parents=True)
    old.write_text(json.dumps({"node": "site-a", "fingerprint": "0123456789abcdef" * 4, "delta": D,
                               "history": [[1.2, 0.02, 300]], "events": []}))
    ledger = PrivacyLedger(tmp_path)
    assert not old.exists() and (tmp_path / "ledgers" / "migrated" / old.name).exists()
    # The old ledger had no record ids: its spend goes to every record the node holds.
    assert ledger.adopt_legacy("site-a", ["r1", "r2"], D) == 2
    assert ledger.adopt_legacy("site-a", ["r1", "r2"], D) == 0  # once per record
    assert ledger.epsilon(["r2"], D) == pytest.approx(_eps((1.2, 0.02, 300)))
    _charge(ledger, ["r1"], 10, node="site-a")
    assert ledger.worst(["r1"], D)[1] == [(1.2, 0.02, 300), (1.0, 0.05, 10)]
    # ... also to records the node opens later (the old spend may have been on those).
    assert PrivacyLedger(tmp_path).adopt_legacy("site-a", ["r1", "later"], D) == 1
    assert ledger.epsilon(["later"], D) == pytest.approx(_eps((1.2, 0.02, 300)))
    assert PrivacyLedger(tmp_path).adopt_legacy("site-b", ["x"], D) == 0


def _charge_many(state_dir, records, times):
    ledger = PrivacyLedger(state_dir)
    for i in range(times):
        _charge(ledger, records, 1, node="node-0", rnd=i)


def test_charges_from_concurrent_processes_are_all_kept(tmp_path):
    procs = [multiprocessing.get_context("spawn").Process(target=_charge_many, args=(tmp_path, ["shared", f"own{i}"], 5))
             for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    ledger = PrivacyLedger(tmp_path)
    assert ledger.worst(["shared"], D)[1] == [(1.0, 0.05, 20)]
    assert ledger.worst(["own3"], D)[1] == [(1.0, 0.05, 5)]
    assert len(ledger.events()) == 20


def test_invalid_node_names_and_charges_are_rejected(tmp_path):
    ledger = PrivacyLedger(tmp_path)
    with pytest.raises(ValueError, match="node name"):
        _charge(ledger, ["a"], 1, node="../escape")
    with pytest.raises(PrivacyBudgetError):
        _charge(ledger, ["a"], 1, sigma=0.0)
    with pytest.raises(PrivacyBudgetError):
        _charge(ledger, [], 1)
