import numpy as np
import pytest

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


def test_round_parameters_come_from_the_bounds_and_set_ones_below_them_are_refused():
    from privacy.secagg.parameters import SecAggParameterError
    from server.federation import FederationSettings, round_parameters, round_threshold

    # defaults: up to 20% corrupt and 20% dropping. 10 nodes: c = 2, so t >= c + 2 = 4 and
    # 2t > n + c = 12, i.e. t = 7, on the complete graph; 8 survive for sure (>= 7).
    chosen = round_parameters(FederationSettings(rounds=1), 10)
    assert (chosen.num_shares, chosen.threshold, chosen.corrupt, chosen.dropouts) == (10, 7, 2, 2)
    assert round_threshold(FederationSettings(rounds=1), 3) == 2  # c = 0: t = max(2, 3 // 2 + 1)
    assert round_threshold(FederationSettings(rounds=1, threshold=8), 10) == 8
    with pytest.raises(SecAggParameterError, match="k = 5, t = 4 refused"):  # the old defaults
        round_parameters(FederationSettings(rounds=1, num_shares=5, threshold=4), 10)
    with pytest.raises(SecAggParameterError, match="needs t in"):
        round_parameters(FederationSettings(rounds=1, threshold=6), 10)


def test_a_node_known_only_by_its_id_until_it_replies_is_one_node_in_the_ledger():
    ledger = CoordinatorLedger()
    ledger.record_failure("node-id-77", 1, "no reply within 20 s")
    ledger.record_reply("site-a", 2, {"num-examples": 10}, declined=False)
    ledger.record_failure("site-a", 3, "ValueError: bad data")
    ledger.merge_alias("node-id-77", "site-a")
    out = ledger.to_dict()
    assert list(out) == ["site-a"]
    assert out["site-a"]["failed_rounds"] == [1, 3] and out["site-a"]["rounds_trained"] == [2]
    assert [f["round"] for f in out["site-a"]["failures"]] == [1, 3]
    ledger.merge_alias("node-id-5", "site-a")  # nothing recorded under that id: no change
    assert ledger.to_dict() == out


class _Grid:
    """Connected nodes over time: get_node_ids() returns the next list each call (the last one sticks)."""

    def __init__(self, *snapshots):
        self.snapshots = list(snapshots)

    def get_node_ids(self):
        return self.snapshots.pop(0) if len(self.snapshots) > 1 else self.snapshots[0]


def test_waiting_for_nodes_returns_once_enough_are_connected_and_names_the_shortfall():
    import pytest

    from server.federation import wait_for_nodes

    assert wait_for_nodes(_Grid([1], [1, 2], [1, 2, 3]), 2, timeout=10) == [1, 2]
    with pytest.raises(TimeoutError, match="only 1 of the 3 required nodes connected within 0 s"):
        wait_for_nodes(_Grid([1]), 3, timeout=0)


class _FlowerLikeGrid:
    """Stamps message ids on push like Flower's Grid; node 7 answers, node 8 went offline, so
    the SuperLink answers for it with an error whose source is the SuperLink (node id 1)."""

    def send_and_receive(self, messages, timeout):
        from flwr.app import Error, Message, RecordDict

        replies = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
            if msg.metadata.dst_node_id == 7:
                replies.append(Message(RecordDict(), reply_to=msg))
            else:
                error = Message(Error(code=0, reason="node offline"), reply_to=msg)
                error.metadata.__dict__["_src_node_id"] = 1
                replies.append(error)
        return replies


def test_replies_are_keyed_by_the_node_asked_even_when_the_superlink_answers_for_an_offline_node(monkeypatch):
    from flwr.app import Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from server.messaging import exchange

    # What a ServerApp process has set when it builds messages.
    monkeypatch.setattr(TaskIdentity, "_run_id", 42)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 3)

    messages = [Message(RecordDict(), dst_node_id=nid, message_type="train") for nid in (7, 8)]
    replies = exchange(_FlowerLikeGrid(), messages, timeout=1)
    assert sorted(replies) == [7, 8]
    assert not replies[7].has_error() and replies[8].has_error() and replies[8].metadata.src_node_id == 1


def test_client_level_noise_is_sized_for_colluding_survivors():
    from flwr.app import ArrayRecord

    from server.federation import FederationSettings, secagg_train_config

    arrays = ArrayRecord([np.zeros(100, dtype=np.float32)])
    settings = FederationSettings(rounds=1, secagg=True, num_shares=10, threshold=7, clip_norm=2.0,
                                  client_noise_multiplier=0.5)
    # Default: t - 1 = 6 survivors may collude and subtract their own noise, so each node adds
    # all of sigma*C; with 1 colluder, the 6 honest survivors share it.
    assert secagg_train_config(settings, arrays, 10)["min-clients"] == 1
    settings.colluding_nodes = 1
    assert secagg_train_config(settings, arrays, 10)["min-clients"] == 6
    settings.colluding_nodes = 9  # more than t - 1 is t - 1: one survivor must be honest
    assert secagg_train_config(settings, arrays, 10)["min-clients"] == 1


def test_client_level_epsilon_claims_no_amplification_from_a_sample_the_server_picks():
    from opacus.accountants import RDPAccountant

    from privacy.accountants import ClientLevelAccountant
    from privacy.accountants.sample_level import RDP_ORDERS
    from server.federation import FederationSettings, release_client_level

    settings = FederationSettings(rounds=10, secagg=True, fraction_train=0.1, client_noise_multiplier=2.0)
    ledger, accountant = CoordinatorLedger(), ClientLevelAccountant(delta=1e-5)
    for _ in range(10):
        epsilon = release_client_level(ledger, accountant, settings, num_sampled=10)
    unamplified, amplified = RDPAccountant(), RDPAccountant()
    unamplified.history, amplified.history = [(2.0, 1.0, 10)], [(2.0, 0.1, 10)]
    assert epsilon == pytest.approx(unamplified.get_epsilon(1e-5, alphas=RDP_ORDERS), rel=1e-12)
    assert epsilon > 3 * amplified.get_epsilon(1e-5, alphas=RDP_ORDERS)  # what q = 0.1 would have claimed
    # 10 sampled nodes at the default fractions: t = 7 (see the test above), t - 1 colluding
    assert ledger.client_level["sample_rate"] == 1.0 and ledger.client_level["colluding_nodes"] == 6
    assert "no amplification by sampling" in ledger.client_level["assumption"]


def test_a_refusal_is_recorded_with_its_reason_and_counts_as_neither_trained_nor_failed():
    ledger = CoordinatorLedger()
    ledger.record_refusal("site-b", 1, "DP is required by the site")
    out = ledger.to_dict()["site-b"]
    assert out["refused_rounds"] == [1] and out["refusals"] == [{"round": 1, "reason": "DP is required by the site"}]
    assert out["rounds_trained"] == [] and out["failed_rounds"] == [] and out["epsilon"] is None
