import numpy as np

from server.federation import sample_nodes
from server.ledger import CoordinatorLedger

BIG_IDS = [2**64 - 5, 2**63 + 7, 12, 2**40]


def test_sampling_keeps_64_bit_node_ids_exact_and_is_seeded():
    picked = sample_nodes(BIG_IDS, 0.5, 1, np.random.default_rng(3))
    assert len(picked) == 2 and set(picked) <= set(BIG_IDS)
    assert all(type(i) is int for i in picked)
    assert picked == sample_nodes(BIG_IDS, 0.5, 1, np.random.default_rng(3))
    assert sample_nodes(BIG_IDS, 1.0, 1, np.random.default_rng(0)) == sorted(BIG_IDS)
    assert len(sample_nodes(BIG_IDS, 0.1, 3, np.random.default_rng(0))) == 3  # the minimum wins
    assert len(sample_nodes(BIG_IDS[:2], 0.1, 3, np.random.default_rng(0))) == 2  # never more than exist


def test_coordinator_ledger_records_replies_declines_and_failures():
    ledger = CoordinatorLedger()
    metrics = {"epsilon": 1.5, "delta": 1e-5, "max-epsilon": 3.0, "noise-multiplier": 1.1, "sample-rate": 0.1,
               "steps-total": 20, "num-examples": 200}
    ledger.record_reply("a", 1, metrics, declined=False)
    ledger.record_reply("a", 2, {**metrics, "epsilon": 2.9}, declined=False)
    ledger.record_reply("a", 3, {**metrics, "epsilon": 2.9}, declined=True)
    ledger.record_failure("b", 3, "ValueError: bad data")
    out = ledger.to_dict()
    assert out["a"]["epsilon"] == 2.9 and out["a"]["rounds_trained"] == [1, 2] and out["a"]["declined_rounds"] == [3]
    assert out["a"]["epsilon_by_round"] == {"1": 1.5, "2": 2.9, "3": 2.9}
    assert out["b"]["failed_rounds"] == [3] and out["b"]["failures"] == [{"round": 3, "error": "ValueError: bad data"}]


def test_default_threshold_is_two_thirds_of_the_neighbourhood():
    from server.federation import FederationSettings, round_threshold

    settings = FederationSettings(rounds=1, num_shares=5)
    assert round_threshold(settings, 100) == 4  # ceil(2/3 * 5): never above the neighbourhood
    assert round_threshold(settings, 3) == 2
    assert round_threshold(FederationSettings(rounds=1, num_shares=10), 10) == 7
    assert round_threshold(FederationSettings(rounds=1, num_shares=10, threshold=6), 10) == 6
