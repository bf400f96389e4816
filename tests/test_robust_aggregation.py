"""Robust aggregation without SecAgg+: 2 of 10 nodes poison their updates.

Expected values come from separate computations (Python's statistics.median, scipy's
trim_mean, Krum's scores by loops); the training test runs real local training on the
embedded digits set and the product's aggregation, and checks accuracies.
"""

import argparse
import statistics

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from scipy import stats

from privacy.dp_sgd import LocalTrainingSession, evaluate
from server.federation import FederationSettings
from server.robust_aggregation import aggregate_in_clear, byzantine_nodes
from shared_models import build_model
from shared_models.datasets import load_digits_embedded
from simulations.cli_options import add_training_options, check_training_args


def _reply(weights: dict[str, np.ndarray], n: int = 10) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in weights.items()}),
                       "metrics": MetricRecord({"num-examples": float(n)})})


def _poisoned_updates(seed=0, d=7):
    rng = np.random.default_rng(seed)
    honest = [rng.normal(1.0, 0.1, d) for _ in range(8)]
    attack = -10 * np.mean(honest, axis=0)  # sign-flipped and scaled
    return honest, [attack + rng.normal(0, 0.01, d) for _ in range(2)]


def test_each_rule_matches_an_independent_computation_and_fedavg_alone_is_dragged_away():
    honest, poisoned = _poisoned_updates()
    vectors = honest + poisoned
    replies = [_reply({"w": v.astype(np.float64)}) for v in vectors]
    honest_mean = np.mean(honest, axis=0)
    out = {rule: aggregate_in_clear(rule, replies)["w"].numpy() for rule in ("fedavg", "median", "trimmed-mean", "krum")}

    assert np.allclose(out["fedavg"], np.mean(vectors, axis=0))  # equal weights here
    assert np.allclose(out["median"], [statistics.median(v[i] for v in vectors) for i in range(7)])
    assert np.allclose(out["trimmed-mean"], stats.trim_mean(np.stack(vectors), 0.2, axis=0))
    # Krum, by loops: f = 2, each update scored by its n - f - 2 = 6 nearest others.
    scores = []
    for i, v in enumerate(vectors):
        distances = sorted(float(np.sum((v - w) ** 2)) for j, w in enumerate(vectors) if j != i)
        scores.append(sum(distances[:6]))
    assert np.array_equal(out["krum"], vectors[int(np.argmin(scores))])

    assert np.linalg.norm(out["fedavg"] - honest_mean) > 5  # pulled to about -1.2x the honest mean
    for rule in ("median", "trimmed-mean", "krum"):
        assert np.linalg.norm(out[rule] - honest_mean) < 0.5, rule


def test_the_weighted_mean_the_median_of_a_counter_and_bad_settings():
    replies = [_reply({"w": np.full(2, 1.0, np.float32), "count": np.array(3)}, n=1),
               _reply({"w": np.full(2, 4.0, np.float32), "count": np.array(8)}, n=2)]
    assert aggregate_in_clear("fedavg", replies)["w"].numpy().tolist() == [3.0, 3.0]  # (1 + 2 * 4) / 3
    median = aggregate_in_clear("median", replies + [_reply({"w": np.zeros(2, np.float32), "count": np.array(5)})])
    assert median["count"].numpy().dtype == np.int64 and int(median["count"].numpy()) == 5
    assert median["w"].numpy().dtype == np.float32
    assert byzantine_nodes(10, 0.2) == 2 and byzantine_nodes(4, 0.5) == 1
    with pytest.raises(ValueError, match="aggregation must be one of"):
        aggregate_in_clear("mean", replies)
    with pytest.raises(ValueError, match=r"trim fraction must be in \[0, 0.5\)"):
        aggregate_in_clear("trimmed-mean", replies, trim_fraction=0.5)
    # With SecAgg+ the server holds only the sum: a robust rule is refused, by the server and by the CLI.
    with pytest.raises(ValueError, match="needs each node's update in the clear"):
        FederationSettings(rounds=1, secagg=True, aggregation="median")
    parser = argparse.ArgumentParser()
    add_training_options(parser, "dataset")
    with pytest.raises(ValueError, match="--aggregation krum needs each node's update in the clear.*--no-secagg"):
        check_training_args(parser.parse_args(["--aggregation", "krum"]), nodes=10)
    check_training_args(parser.parse_args(["--aggregation", "krum", "--no-secagg"]), nodes=10)


def _federated_digits(rule: str, rounds: int = 4, attackers: int = 2) -> float:
    """Test accuracy after `rounds` of 10 nodes on disjoint digits shares, 2 of which send
    w_global - 10 (w_local - w_global) (sign-flipped, scaled updates). No DP: the attack's
    effect is the point, not the noise."""
    data = load_digits_embedded()
    train, test = data["train"], data["test"]
    shares = np.array_split(np.random.default_rng(0).permutation(len(train)), 10)
    torch.manual_seed(0)
    model = build_model("vision", None, train.input_shape, train.num_classes)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    sessions = [LocalTrainingSession(build_model("vision", None, train.input_shape, train.num_classes),
                                     train.subset(idx), batch_size=16, lr=0.1, optimizer="sgd", noise_multiplier=None,
                                     max_grad_norm=1.0, device=torch.device("cpu")) for idx in shares]
    for _ in range(rounds):
        replies = []
        for node, session in enumerate(sessions):
            session.load_global(global_state)
            torch.manual_seed(node)
            local = session.train_epochs(1).state
            if node >= 10 - attackers:
                local = {k: global_state[k] - 10 * (local[k] - global_state[k]) for k in local}
            replies.append(_reply({k: v.numpy() for k, v in local.items()}, n=len(shares[node])))
        arrays = aggregate_in_clear(rule, replies)
        global_state = {k: torch.from_numpy(arrays[k].numpy().copy()) for k in global_state}
    model.load_state_dict(global_state)
    return evaluate(model, test, torch.device("cpu"))["accuracy"]


def test_two_poisoning_nodes_of_ten_break_fedavg_and_not_the_robust_rules():
    clean = _federated_digits("fedavg", attackers=0)
    accuracy = {rule: _federated_digits(rule) for rule in ("fedavg", "median", "trimmed-mean", "krum")}
    print(f"digits, 10 nodes, 4 rounds: FedAvg without attackers {clean:.3f}; with 2 poisoning: {accuracy}")
    assert clean > 0.8
    assert accuracy["fedavg"] < 0.3  # chance is 0.1
    for rule in ("median", "trimmed-mean", "krum"):  # less efficient than the mean (Krum keeps one node's model)
        assert accuracy[rule] > max(0.75, clean - 0.15), (rule, accuracy)
