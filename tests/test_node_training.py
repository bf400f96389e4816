"""A node's round of training without Flower: budget, ledger continuity, declines."""

import dataclasses

import numpy as np
import pytest
import torch

from client.config import NodeIdentity
from client.node_training import load_node_data, plan_noise, split_validation, train_round
from privacy.accountants import PrivacyLedger, epsilon_for_history
from shared_models import build_model
from shared_models.run_config import ConfigError, TrainingPlan

RUN_CONFIG = {
    "task": "vision", "dataset": "digits", "model": "", "num-server-rounds": 2, "local-epochs": 1,
    "batch-size": 64, "lr": 0.1, "optimizer": "sgd", "dp": True, "epsilon": 2.0, "max-epsilon": 0.0,
    "delta": 1e-5, "max-grad-norm": 1.0, "val-fraction": 0.1, "partition": "iid", "alpha": 0.5,
    "seed": 0, "run-name": "t",
}


def _node(tmp_path, max_epsilon, delta=1e-5):
    return NodeIdentity(name="node-0", state_dir=tmp_path, max_epsilon=max_epsilon, delta=delta,
                        data_path=None, partition_id=0, num_partitions=3, val_fraction=0.1)


def _global(data):
    torch.manual_seed(0)
    return build_model("vision", None, data.train.input_shape, 10).state_dict()


def test_rounds_spend_the_run_budget_and_a_second_run_continues_then_declines(tmp_path):
    plan = TrainingPlan.from_run_config(RUN_CONFIG)
    node = _node(tmp_path, max_epsilon=2.5)  # 2 rounds spend 2.0, 3 rounds 2.35, 4 rounds 2.66
    data = load_node_data(node, plan)
    assert len(data.train) + len(data.val) == 479  # 1437 / 3 records
    assert set(data.val.record_ids) == _validation_by_hand(data.record_ids, 0.1)
    sigma, q, steps = plan_noise(plan, len(data.train), node.delta)
    state = _global(data)

    first = [train_round(node, plan, data, state, r, "run-1") for r in (1, 2)]
    assert all(not o.declined for o in first)
    assert first[0].metrics["epsilon"] < first[1].metrics["epsilon"] <= 2.0
    assert first[1].metrics["epsilon"] == pytest.approx(epsilon_for_history([(sigma, q, 2 * steps)], 1e-5))
    assert first[1].metrics["steps-total"] == 2 * steps == 2 * -(-len(data.train) // 64)
    changed = [k for k in state if not torch.equal(state[k], first[0].state[k])]
    assert len(changed) == len(state)

    # Same node, same data, a new run: epsilon starts where the first run ended.
    second = [train_round(node, plan, data, first[-1].state, r, "run-2") for r in (1, 2)]
    assert not second[0].declined
    assert second[0].metrics["epsilon"] > first[1].metrics["epsilon"]
    assert second[0].metrics["epsilon"] == pytest.approx(epsilon_for_history([(sigma, q, 3 * steps)], 1e-5))
    # The fourth round would pass max-epsilon=2.5: declined with a reason, nothing spent.
    assert second[1].declined and second[1].state is None
    assert "max-epsilon=2.5" in second[1].reason
    assert second[1].metrics["epsilon"] == pytest.approx(second[0].metrics["epsilon"])
    ledger = PrivacyLedger(tmp_path)
    assert ledger.worst(data.train.record_ids, 1e-5)[1] == [(sigma, q, 3 * steps)]
    assert [e.declined for e in ledger.events("node-0")] == [False, False, False, True]
    # Validation records were never trained: the ledger holds nothing for them.
    assert ledger.epsilon(data.val.record_ids, 1e-5) == 0.0


def test_delta_must_be_below_one_over_n(tmp_path):
    plan = TrainingPlan.from_run_config(RUN_CONFIG)
    node = _node(tmp_path, max_epsilon=8.0, delta=0.01)
    data = load_node_data(node, plan)
    with pytest.raises(ValueError, match="must be < 1/n"):
        train_round(node, plan, data, _global(data), 1, "run")


def test_without_dp_there_is_no_ledger_and_weights_change(tmp_path):
    plan = TrainingPlan.from_run_config({**RUN_CONFIG, "dp": False})
    node = _node(tmp_path, max_epsilon=8.0)
    data = load_node_data(node, plan)
    state = _global(data)
    out = train_round(node, plan, data, state, 1, "run")
    assert "epsilon" not in out.metrics and not (tmp_path / "ledgers").exists()
    assert any(not torch.equal(state[k], out.state[k]) for k in state)
    assert out.metrics["num-examples"] == len(data.train) and 0.0 <= out.metrics["val-accuracy"] <= 1.0


def test_run_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="missing 'lr'"):
        TrainingPlan.from_run_config({k: v for k, v in RUN_CONFIG.items() if k != "lr"})
    with pytest.raises(ConfigError, match=r"'epsilon' must be in \(0, 1000\]"):
        TrainingPlan.from_run_config({**RUN_CONFIG, "epsilon": 0.0})
    # Values a coordinator could send to break DP-SGD's arithmetic: refused, naming the key.
    for key, value, message in (("epsilon", 1e15, "epsilon"), ("epsilon", float("inf"), "epsilon"),
                                ("max-grad-norm", 1e-44, r"max-grad-norm' must be in \[0.0001, 10000\]"),
                                ("max-grad-norm", float("nan"), "max-grad-norm"), ("lr", float("inf"), "lr"),
                                ("dp", "false", None), ("dp", "no", "'dp' must be true or false"),
                                ("reproducible-noise", 1, "'reproducible-noise' must be true or false")):
        cfg = {**RUN_CONFIG, key: value}
        if message is None:  # the string "false" is read as False, never as a truthy string
            assert TrainingPlan.from_run_config(cfg).dp is False
            continue
        with pytest.raises(ConfigError, match=message):
            TrainingPlan.from_run_config(cfg)
    with pytest.raises(ConfigError, match="'optimizer'"):
        TrainingPlan.from_run_config({**RUN_CONFIG, "optimizer": "lbfgs"})
    plan = TrainingPlan.from_run_config(RUN_CONFIG)
    assert dataclasses.replace(plan, rounds=3).rounds == 3


def test_cli_preflight_refuses_a_run_whose_nodes_all_spent_their_budget(tmp_path):
    from simulations.cli import preflight

    run_config = {**RUN_CONFIG, "max-epsilon": 2.0, "state-dir": str(tmp_path)}
    assert preflight(run_config, 2) == []  # fresh ledgers: nothing to decline
    plan = TrainingPlan.from_run_config(run_config)
    for pid in range(2):
        node = NodeIdentity(name=f"node-{pid}", state_dir=tmp_path, max_epsilon=2.0, delta=1e-5,
                            data_path=None, partition_id=pid, num_partitions=2, val_fraction=0.1)
        data = load_node_data(node, plan)
        sigma, q, steps = plan_noise(plan, len(data.train), 1e-5)
        PrivacyLedger(tmp_path).charge(data.train.record_ids, node=node.name, delta=1e-5, noise_multiplier=sigma,
                                       sample_rate=q, steps=2 * steps, max_epsilon=2.0, run="r", round=1)
        if pid == 0:  # one node spent: it is listed, the run may go on
            assert [n.split()[0] for n in preflight(run_config, 2)] == ["node-0"]
    with pytest.raises(ValueError, match="every node has already spent its privacy budget"):
        preflight(run_config, 2)


def _train_for_long(state_dir):
    plan = TrainingPlan.from_run_config({**RUN_CONFIG, "local-epochs": 500})
    node = _node(state_dir, max_epsilon=100.0)
    data = load_node_data(node, plan)
    train_round(node, plan, data, _global(data), 1, "run-killed")


def test_a_node_killed_mid_round_keeps_the_whole_rounds_charge(tmp_path):
    import multiprocessing
    import signal
    import time

    child = multiprocessing.get_context("spawn").Process(target=_train_for_long, args=(tmp_path,))
    child.start()
    events = tmp_path / "ledgers" / "events.jsonl"
    deadline = time.monotonic() + 120
    while not (events.exists() and events.read_text().strip()):
        assert child.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1.0)  # well inside the 500 epochs
    assert child.is_alive()
    child.kill()
    child.join(timeout=30)
    assert child.exitcode == -signal.SIGKILL
    # The charge was written before training (write-ahead): the ledger holds all 500 epochs'
    # steps although the process died early in them, so privacy is over-counted, never under.
    plan = TrainingPlan.from_run_config({**RUN_CONFIG, "local-epochs": 500})
    node = _node(tmp_path, max_epsilon=100.0)
    data = load_node_data(node, plan)
    sigma, q, steps = plan_noise(plan, len(data.train), node.delta)
    assert steps == 500 * -(-len(data.train) // 64)
    ledger = PrivacyLedger(tmp_path)
    assert ledger.worst(data.train.record_ids, 1e-5)[1] == [(sigma, q, steps)]
    assert ledger.epsilon(data.train.record_ids, 1e-5) == pytest.approx(epsilon_for_history([(sigma, q, steps)], 1e-5))


def _validation_by_hand(record_ids, fraction):
    """The validation share recomputed independently: SHA-256 of the id, first 8 bytes < fraction * 2^64."""
    import hashlib

    return {rid for rid in record_ids
            if int.from_bytes(hashlib.sha256(b"fedpriv-validation\0" + rid.encode()).digest()[:8], "big") < fraction * 2**64}


def test_the_validation_share_is_fixed_by_record_content_not_by_the_run(tmp_path):
    from shared_models.datasets import load_npz

    images = np.random.default_rng(0).integers(0, 256, (200, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "site.npz", train_images=images, train_labels=np.arange(200) % 2)
    data = load_npz(tmp_path / "site.npz")["train"]
    train, val = split_validation(data, 0.1)
    assert set(val.record_ids) == _validation_by_hand(data.record_ids, 0.1) and 5 < len(val) < 40
    assert not set(val.record_ids) & set(train.record_ids) and len(train) + len(val) == 200
    # Another order of the same records: the same validation records.
    shuffled = data.subset(np.random.default_rng(1).permutation(200))
    assert set(split_validation(shuffled, 0.1)[1].record_ids) == set(val.record_ids)
    # Records added: none of the others changes side.
    more = np.random.default_rng(2).integers(0, 256, (50, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "grown.npz", train_images=np.concatenate([images, more]), train_labels=np.arange(250) % 2)
    grown_train, grown_val = split_validation(load_npz(tmp_path / "grown.npz")["train"], 0.1)
    assert set(val.record_ids) <= set(grown_val.record_ids) and set(train.record_ids) <= set(grown_train.record_ids)
    # A deployed node's share is its owner's: the run-config's seed and val-fraction change nothing.
    node = NodeIdentity(name="site", state_dir=tmp_path, max_epsilon=8.0, delta=1e-5, data_path=str(tmp_path / "site.npz"),
                        partition_id=None, num_partitions=None, val_fraction=0.1)
    runs = [{**RUN_CONFIG, "seed": 0, "val-fraction": 0.1}, {**RUN_CONFIG, "seed": 9, "val-fraction": 0.4}]
    shares = [load_node_data(node, TrainingPlan.from_run_config(run)) for run in runs]
    assert shares[0].val.record_ids == shares[1].val.record_ids and set(shares[0].val.record_ids) == set(val.record_ids)
