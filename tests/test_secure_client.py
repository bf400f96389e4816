"""SecAgg+ over Flower messages: the real coordinator (`server.secure_aggregation.secure_sum`)
and the real node handlers (`client.secure_aggregation.handle_stage`) on an in-memory Grid
(`tests/secagg_grid.py`), each node with its own persistent flwr Context, every message and
context through Flower's serialisation.

Expected sums are computed here from the encodings the nodes spooled, with Python integers.
A dropout is shown to have happened (the node is named in `outcome.dropped` for that stage,
and the transcript shows it never handled the stage), not assumed. The lying and curious
servers are hooks on the Grid; the U3-splitting attack that read a node's input on 75fae35
is now caught by the signed consistency round.
"""

import numpy as np
import pytest
import torch
from flwr.app import Array, ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode
from scipy import stats

from client import secure_aggregation as node_side
from privacy.secagg import EncodingParams, RoundSetup, SecAggAbort, default_scale
from privacy.secagg.primitives import agree, prg_mask
from privacy.secagg.protocol import SecAggClient, encoding_from_config, encoding_to_config
from privacy.secagg.ring import unpack_ring
from privacy.secagg.sharing import combine_shares
from privacy.secret_randomness import SecretRandom
from secagg_grid import TO_SERVER, SecAggGrid, serverapp_identity
from server.secure_aggregation import secure_sum

D = 1_000
STAGES = ["secagg_advertise", "secagg_share", "secagg_masked", "secagg_consistency", "secagg_unmask"]


@pytest.fixture(autouse=True)
def _serverapp():
    with serverapp_identity():
        yield


def _federation(n, t, spool, num_shares=None, d=D, seed=0):
    """A Grid of n nodes that each trained and spooled an encoded delta, and the round's setup.

    Returns (grid, setup, deltas, encodings): encodings are the spooled vectors, read here
    before the round (the coordinator never sees them).
    """
    grid = SecAggGrid(list(range(101, 101 + n)))
    params = EncodingParams(clip_norm=10.0, noise_multiplier=0.0, min_clients=t, scale=default_scale(10.0, d),
                            max_clients=n)
    rng = np.random.default_rng(seed)
    deltas, encodings = {}, {}
    for nid in grid.node_ids:
        global_state = {"w": torch.zeros(d // 2), "b": torch.zeros(d - d // 2)}
        local = {"w": torch.from_numpy(rng.normal(0, 0.1, d // 2)).float(),
                 "b": torch.from_numpy(rng.normal(0, 0.1, d - d // 2)).float()}
        deltas[nid] = node_side.flatten_delta(local, global_state)
        path = node_side.store_encoded_update(grid.contexts[nid], deltas[nid], encoding_to_config(params),
                                              SecretRandom(), spool_dir=spool)
        assert path.stat().st_mode & 0o777 == 0o600
        encodings[nid] = np.load(path)
    setup = RoundSetup(round_id=b"r/1", participants=tuple(str(n) for n in grid.node_ids),
                       num_shares=num_shares or n, threshold=t, params=params, graph_seed=b"g")
    return grid, setup, deltas, encodings


def _expected(encodings, nodes, params):
    """Decoded sum over `nodes`: each residue read as a signed integer, summed as Python ints."""
    k, d = params.modulus_bits, len(next(iter(encodings.values())))
    total = [0] * d
    for nid in nodes:
        for i, v in enumerate(encodings[nid].tolist()):
            total[i] += v - (1 << k) if v >= 1 << (k - 1) else v
    return np.array(total, dtype=np.float64) / params.scale


def _revealed(grid):
    """[(holder, owner, kind, index, share)] for every share the server received at unmask."""
    out = []
    for w in grid.transcript:
        if w.direction == TO_SERVER and w.stage == "secagg_unmask" and not w.message.has_error():
            c = w.message.content["secagg"]
            out += [(w.node_id, str(o), k, int(i), bytes(s))
                    for o, k, i, s in zip(c["owners"], c["kinds"], c["indices"], c["shares"])]
    return out


def _secrets(grid, nid, setup):
    """Node `nid`'s round secrets, read from its own state (only a test can do this)."""
    return SecAggClient.from_bytes(bytes(grid.contexts[nid].state["secagg-state"]["client"]), setup,
                                   grid.identities[str(nid)])


def test_secure_sum_over_the_grid_is_the_exact_sum_of_the_nodes_encodings(tmp_path):
    for n, num_shares, t in ((4, 4, 3), (9, 5, 3)):  # the complete graph, then a ring
        grid, setup, deltas, encodings = _federation(n, t, tmp_path / str(n), num_shares=num_shares)
        outcome = secure_sum(grid, grid.names, setup, D, timeout=30)
        assert outcome.survivors == grid.node_ids and outcome.errors == {}
        assert all(outcome.dropped[s] == [] for s in STAGES)
        assert np.array_equal(outcome.total, _expected(encodings, grid.node_ids, setup.params))
        assert np.abs(outcome.total - sum(deltas.values())).max() < n / setup.params.scale
        # Secrets and the plain encoding are gone from every node's state and disk after the round.
        assert all("secagg-state" not in c.state and "secagg-input" not in c.state for c in grid.contexts.values())
        assert list((tmp_path / str(n)).iterdir()) == []


@pytest.mark.parametrize("offline", [False, True], ids=["silent", "superlink-says-offline"])
@pytest.mark.parametrize("stage", STAGES)
def test_four_of_ten_nodes_dropping_at_a_stage_are_left_out_and_the_sum_is_exact(tmp_path, stage, offline):
    """Mutations checked: SecAggServer.unmask without its s_sk branch (secagg_masked fails);
    no drop in the Grid (all fail); exchange() keying replies by their source (offline fails)."""
    grid, setup, _, encodings = _federation(10, 6, tmp_path)
    droppers = [102, 105, 107, 110]
    for nid in droppers:
        grid.drop(nid, stage, offline=offline)
    outcome = secure_sum(grid, grid.names, setup, D, timeout=30)

    at = STAGES.index(stage)
    assert outcome.dropped[stage] == droppers
    assert all(outcome.dropped[s] == [] for s in STAGES if s != stage)
    assert not set(droppers) & set(grid.sent(stage)), "a dropper handled the stage it dropped at"
    assert set(droppers) <= set(grid.asked(stage))
    assert all(not set(droppers) & set(grid.asked(s)) for s in STAGES[at + 1:]), "a dropper was asked again"
    assert all(("Node Unavailable" if offline else "no reply") in outcome.errors[nid] for nid in droppers)
    kept = [n for n in grid.node_ids if n not in droppers]
    if stage in ("secagg_consistency", "secagg_unmask"):
        # Their masked inputs were summed before they vanished; they never revealed their shares.
        assert outcome.survivors == grid.node_ids
        assert all("secagg-state" in grid.contexts[nid].state for nid in droppers)
    else:
        assert outcome.survivors == kept
    assert np.array_equal(outcome.total, _expected(encodings, outcome.survivors, setup.params))
    if stage == "secagg_masked":  # in U2, not U3: their masks were removed through their rebuilt s_sk
        assert {kind for _, owner, kind, _, _ in _revealed(grid) if int(owner) in droppers} == {"sk"}


def test_a_simulated_dropout_is_an_error_reply_and_the_node_is_left_out(tmp_path):
    grid, setup, _, encodings = _federation(5, 3, tmp_path)
    grid.contexts[103].state["secagg-dropout"] = ConfigRecord({"stage": "secagg_share"})
    outcome = secure_sum(grid, grid.names, setup, D, timeout=30)
    assert outcome.dropped["secagg_share"] == [103]
    assert "SimulatedDropout" in outcome.errors[103] and "vanished" in outcome.errors[103]
    assert grid.received("secagg_share")[103].has_error()
    assert outcome.survivors == [101, 102, 104, 105]
    assert np.array_equal(outcome.total, _expected(encodings, outcome.survivors, setup.params))


@pytest.mark.parametrize("stage", STAGES)
def test_too_few_survivors_abort_and_nothing_is_revealed(tmp_path, stage):
    grid, setup, _, _ = _federation(10, 6, tmp_path)
    droppers = [101, 103, 104, 108, 109]
    for nid in droppers:
        grid.drop(nid, stage)
    with pytest.raises(SecAggAbort, match="threshold") as aborted:
        secure_sum(grid, grid.names, setup, D, timeout=30)
    assert aborted.value.outcome.dropped[stage] == droppers
    revealed = _revealed(grid)
    if stage != "secagg_unmask":
        assert grid.asked("secagg_unmask") == [] and revealed == []  # no node was asked to reveal
    # Whatever was revealed is fewer than t shares of any secret, and no s_sk share at all.
    per_owner = {}
    for _, owner, kind, _, _ in revealed:
        per_owner[(owner, kind)] = per_owner.get((owner, kind), 0) + 1
    assert all(kind == "b" and count < setup.threshold for (_, kind), count in per_owner.items())


def test_a_node_without_a_trained_update_refuses_to_aggregate():
    grid = SecAggGrid([101, 102])
    params = EncodingParams(clip_norm=10.0, noise_multiplier=0.0, min_clients=2, scale=default_scale(10.0, D),
                            max_clients=2)
    setup = RoundSetup(round_id=b"r", participants=("101", "102"), num_shares=2, threshold=2, params=params,
                       graph_seed=b"g")
    with pytest.raises(SecAggAbort):
        secure_sum(grid, grid.names, setup, D, timeout=30)
    reply = grid.received("secagg_advertise")[101]
    assert reply.has_error() and "holds no trained update" in reply.error.reason


def test_the_grid_answers_like_flower_where_the_coordinator_relies_on_it():
    """Message ids, reply metadata, error replies, a persistent context, refused pushes."""
    def counter(stage, content, context, identity):
        cid, node = identity.name, f"node-{identity.name}"
        seen = context.state.get("seen", ConfigRecord({"n": 0}))
        context.state["seen"] = ConfigRecord({"n": int(seen["n"]) + 1})
        if content["secagg"]["fail"]:
            raise ValueError(f"{node} refuses {stage}")
        return RecordDict({"secagg": ConfigRecord({"n": context.state["seen"]["n"], "cid": cid})})

    def ask(grid, nid, fail=False, kind="query.secagg_count"):
        msg = Message(RecordDict({"secagg": ConfigRecord({"fail": fail})}), dst_node_id=nid, message_type=kind)
        replies = list(grid.send_and_receive([msg], timeout=1))
        return msg, replies[0] if replies else None

    grid = SecAggGrid([7, 8], node_handler=counter)
    msg, reply = ask(grid, 7)
    assert msg.metadata.message_id and reply.metadata.reply_to_message_id == msg.metadata.message_id
    assert (reply.metadata.src_node_id, reply.metadata.dst_node_id) == (7, 1)
    assert reply.content["secagg"]["cid"] == "7" and ask(grid, 7)[1].content["secagg"]["n"] == 2
    _, error = ask(grid, 7, fail=True)
    assert error.has_error() and error.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert error.error.reason == "<class 'ValueError'>:<'node-7 refuses secagg_count'>"
    assert ask(grid, 7)[1].content["secagg"]["n"] == 4  # kept what the failed call changed
    grid = SecAggGrid([7, 8], node_handler=counter, keep_state_on_error=False)
    ask(grid, 7, fail=True)
    assert ask(grid, 7)[1].content["secagg"]["n"] == 1  # as the simulation engine: dropped
    assert "no handler" in ask(grid, 8, kind="train")[1].error.reason
    assert ask(grid, 9)[1] is None and grid.undeliverable[-1].metadata.dst_node_id == 9
    grid.on_reply(lambda stage, nid, m: None if nid == 8 else m)
    assert ask(grid, 8)[1] is None and ask(grid, 7)[1] is not None
    grid.drop(7, "secagg_count", offline=True)
    _, gone = ask(grid, 7)
    assert gone.has_error() and gone.error.code == ErrorCode.NODE_UNAVAILABLE and gone.metadata.src_node_id == 1


def test_a_masked_input_of_the_wrong_size_costs_its_sender_not_the_round(tmp_path):
    """One node's malformed reply (a truncated vector) is left out of U3 and named; the others'
    sum is exact, the bad node's pairwise masks removed through its rebuilt s_sk.

    Mutation checked: collect_masked raising SecAggAbort on the bad size (as on 371ea29) -> the round fails.
    """
    grid, setup, _, encodings = _federation(6, 4, tmp_path)

    def truncate(stage, nid, reply):
        if stage == "secagg_masked" and nid == 104:
            y = reply.content["masked"]["y"].numpy()
            reply.content["masked"]["y"] = Array(y[:-3].copy())
        return reply

    grid.on_reply(truncate)
    outcome = secure_sum(grid, grid.names, setup, D, timeout=30)
    assert outcome.survivors == [101, 102, 103, 105, 106]
    assert outcome.dropped["secagg_masked"] == [104]
    assert "masked input of 104" in outcome.errors[104] and "expected" in outcome.errors[104]
    assert np.array_equal(outcome.total, _expected(encodings, outcome.survivors, setup.params))
    assert {kind for _, owner, kind, _, _ in _revealed(grid) if owner == "104"} == {"sk"}


# ---- a lying server, a curious server -------------------------------------------------------

def test_a_node_asked_to_unmask_again_with_another_u3_reveals_nothing_more(tmp_path):
    """The lying server asks again, now saying 102 dropped, to get s_sk_102 beside b_102.

    Mutation checked: handle_stage keeping the round state after unmask (the node's only
    guard: SecAggClient's "asked twice" flag is not saved) -> nodes answer with sk-shares.
    """
    grid, setup, _, _ = _federation(5, 3, tmp_path)
    outcome = secure_sum(grid, grid.names, setup, D, timeout=30)
    lie = RecordDict({"secagg": ConfigRecord({"u3": [str(n) for n in outcome.survivors if n != 102]})})
    for stage in ("secagg_consistency", "secagg_unmask"):
        replies = grid.send_and_receive([Message(lie, dst_node_id=n, message_type=f"query.{stage}")
                                         for n in grid.node_ids], timeout=30)
        assert len(replies) == 5 and all(r.has_error() for r in replies)
    kinds = {}
    for holder, owner, kind, _, _ in _revealed(grid):
        kinds.setdefault((holder, owner), set()).add(kind)
    assert len(kinds) == 25 and all(k == {"b"} for k in kinds.values())


def test_a_node_refuses_to_sign_a_u3_it_cannot_accept_and_the_round_goes_on(tmp_path):
    """A rewritten U3 (outside U2 for one node, below t for another) is refused by that node;
    the other three sign, check each other's signatures and reveal enough to unmask the
    exact sum of all five."""
    grid, setup, _, encodings = _federation(5, 3, tmp_path)

    def rewrite(stage, nid, msg):
        if stage == "secagg_consistency" and nid == 101:
            msg.content["secagg"]["u3"] = list(msg.content["secagg"]["u3"]) + ["999"]
        if stage == "secagg_consistency" and nid == 102:
            msg.content["secagg"]["u3"] = ["101", "102"]
        return msg

    grid.on_request(rewrite)
    outcome = secure_sum(grid, grid.names, setup, D, timeout=30)
    assert "must be a subset of U2" in outcome.errors[101] and "revealing nothing" in outcome.errors[102]
    assert outcome.dropped["secagg_consistency"] == [101, 102]
    assert {holder for holder, *_ in _revealed(grid)} == {103, 104, 105}
    assert outcome.survivors == grid.node_ids
    assert np.array_equal(outcome.total, _expected(encodings, grid.node_ids, setup.params))


def test_a_late_masked_input_is_hidden_by_the_self_mask_from_a_server_that_rebuilt_its_s_sk(tmp_path):
    """y_103 reaches the coordinator after the deadline: 103 counts as dropped, the protocol has
    the others reveal s_sk_103, and with it every pairwise mask in y_103. Only PRG(b_103) is left.

    Mutation checked: no PRG(b_u) in SecAggClient.masked_input -> the server reads x_103.
    """
    d = 100_000
    grid, setup, _, encodings = _federation(5, 3, tmp_path, d=d)
    k = setup.params.modulus_bits
    late = {}

    def delay(stage, nid, reply):
        if stage == "secagg_masked" and nid == 103:
            late[nid] = reply
            return None
        return reply

    grid.on_reply(delay)
    outcome = secure_sum(grid, grid.names, setup, d, timeout=30)
    assert outcome.dropped["secagg_masked"] == [103] and outcome.survivors == [101, 102, 104, 105]
    assert np.array_equal(outcome.total, _expected(encodings, outcome.survivors, setup.params))

    # The curious server, from its transcript: s_pk of all, sk-shares of 103, U2, the late y_103.
    s_pk = {n: bytes(r.content["secagg"]["s-pk"]) for n, r in grid.received("secagg_advertise").items()}
    sk_shares = [(i, s) for _, o, kind, i, s in _revealed(grid) if o == "103" and kind == "sk"]
    s_sk = combine_shares(sk_shares, setup.threshold)
    u2 = [str(u) for u in grid.sent("secagg_masked")[101].content["secagg"]["u2"]]
    view = unpack_ring(late[103].content["masked"]["y"].numpy(), k, d).astype(np.uint64)  # k-bit wire format
    modulus = np.uint64((1 << k) - 1)
    for v in u2:
        if v != "103":
            mask = prg_mask(agree(s_sk, s_pk[int(v)], b"pairwise-mask", setup.round_id), d, k).astype(np.uint64)
            view = (view - mask) & modulus if "103" < v else (view + mask) & modulus
    x = encodings[103].astype(np.uint64)
    assert np.mean(view == x) < 0.01, "the server reads x_103"
    counts = np.bincount((view >> np.uint64(k - 8)).astype(np.int64), minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-6
    signed = np.where(x >= 1 << (k - 1), x.astype(np.float64) - 2.0**k, x.astype(np.float64))
    assert abs(np.corrcoef(view.astype(np.float64), signed)[0, 1]) < 5 / np.sqrt(d)
    # Holding 103's secrets: every pairwise mask was stripped, only PRG(b_103) is left.
    assert np.array_equal(view, (x + prg_mask(_secrets(grid, 103, setup)._b, d, k).astype(np.uint64)) & modulus)


def test_a_lying_server_splitting_u3_between_two_halves_is_caught_before_any_share_leaves(tmp_path):
    """The attack that read a node's input on 75fae35 (6 nodes, t = 3): tell 101-103 that 106
    dropped (reveal your sk-share of 106) and 104-106 that it survived (reveal its b-share).

    Now a setup with 2t <= |N(u)| is refused, and at t = 4 the halves' signatures over their
    two survivor sets fall short of t: every node aborts the unmask and reveals nothing.
    Mutation checked: SecAggClient.unmask without its consistency check -> both kinds leak.
    """
    with pytest.raises(ValueError, match="at most half the neighbourhood"):
        _federation(6, 3, tmp_path / "t3")
    d = 20_000
    grid, setup, _, _ = _federation(6, 4, tmp_path, d=d)
    victim, liars_told = 106, {101, 102, 103}

    def split(stage, nid, msg):
        if stage == "secagg_consistency" and nid in liars_told:  # "106 dropped"
            msg.content["secagg"]["u3"] = [u for u in msg.content["secagg"]["u3"] if u != str(victim)]
        return msg

    grid.on_request(split)
    with pytest.raises(SecAggAbort):
        secure_sum(grid, grid.names, setup, d, timeout=30)
    assert _revealed(grid) == []
    failed = {nid: why for nid, why in grid.received("secagg_unmask").items() if why.has_error()}
    assert sorted(failed) == grid.node_ids
    assert all("consistency check failed" in m.error.reason for m in failed.values())


def _weighted_round(tmp_path, counts, noise_multiplier=0.0):
    """One secure round through the coordinator's own aggregation (`_aggregate_secure`): nodes of
    `counts` records encode a known delta each with the round's config (`secagg_train_config`,
    weight cap from the records they reported before: `secure_weight_cap`). Returns (deltas, the
    mean the server applied, the round report)."""
    from flwr.app import ArrayRecord, MetricRecord

    from server.federation import (FederationSettings, RoundReport, TrainReplies, _aggregate_secure,
                                   secagg_train_config, secure_weight_cap)
    from server.ledger import CoordinatorLedger

    d = 400
    grid = SecAggGrid(list(range(101, 101 + len(counts))))
    settings = FederationSettings(rounds=2, run_id="w", secagg=True, num_shares=len(counts), threshold=len(counts) - 1,
                                  clip_norm=10.0, client_noise_multiplier=noise_multiplier)
    ledger = CoordinatorLedger()
    for nid, n in zip(grid.node_ids, counts):  # round 1's replies: what each node reported
        ledger.record_reply(str(nid), 1, {"num-examples": float(n)}, False, "", "record")
    global_state = {"w": torch.zeros(d // 2), "b": torch.zeros(d - d // 2)}
    arrays = ArrayRecord({k: Array(v.numpy()) for k, v in global_state.items()})
    config = ConfigRecord({"server-round": 2, "run-id": "w",
                           **secagg_train_config(settings, arrays, len(counts), secure_weight_cap(settings, ledger))})
    rng = np.random.default_rng(7)
    train, deltas = TrainReplies(), {}
    for nid, n in zip(grid.node_ids, counts):
        local = {k: v + torch.from_numpy(rng.normal(0, 0.05, v.numel())).float() for k, v in global_state.items()}
        deltas[nid] = node_side.flatten_delta(local, global_state)
        node_side.store_encoded_update(grid.contexts[nid], deltas[nid], config, SecretRandom(), spool_dir=tmp_path,
                                       num_examples=float(n))
        train.trained[nid] = RecordDict({"metrics": MetricRecord({"num-examples": float(n)})})
        train.names[nid] = str(nid)
    report = RoundReport(round=2)
    new = _aggregate_secure(grid, arrays, config, train, settings, ledger, report)
    applied = np.concatenate([new[k].numpy().ravel() for k in ("w", "b")]).astype(np.float64)
    return deltas, applied, report, encoding_from_config(config)


def test_without_client_noise_the_secure_mean_is_weighted_by_each_nodes_records(tmp_path):
    counts = (100, 300, 600)
    deltas, applied, report, params = _weighted_round(tmp_path, counts)
    assert params.weight_cap == 600
    record_weighted = sum(n * deltas[nid] for nid, n in zip(sorted(deltas), counts)) / sum(counts)
    equal = sum(deltas.values()) / len(deltas)
    # Within float32 storage and the quantisation bound of the sum (n / scale), divided by the weights' sum.
    assert np.abs(applied - record_weighted).max() < 1e-6 + len(counts) / params.scale / (sum(counts) / 600)
    assert np.abs(applied - equal).max() > 0.01  # the equal-weight mean is far off
    assert report.secure["weights"] == {"101": pytest.approx(1 / 6), "102": pytest.approx(0.5), "103": 1.0}


def test_under_client_level_noise_every_node_keeps_an_equal_weight(tmp_path):
    deltas, applied, report, params = _weighted_round(tmp_path, (100, 300, 600), noise_multiplier=1e-6)
    assert params.weight_cap == 0 and "weights" not in report.secure
    equal = sum(deltas.values()) / len(deltas)
    assert np.abs(applied - equal).max() < 1e-3  # noise std 1e-5 per node, plus the grid


def test_a_node_weights_its_update_after_clipping_and_refuses_a_weight_without_its_count():
    params = EncodingParams(clip_norm=1.0, noise_multiplier=0.0, min_clients=1, scale=default_scale(1.0, 4),
                            max_clients=2, weight_cap=400.0)
    x = np.array([3.0, 4.0, 0.0, 0.0])  # norm 5: clipped to 1, then weighted by 100/400
    from privacy.secagg.encoding import decode_sum, encode
    decoded = decode_sum(encode(x, params, SecretRandom(), num_examples=100), params)
    assert np.allclose(decoded, x / 5 * 0.25, atol=2 / params.scale)
    assert np.allclose(decode_sum(encode(x, params, SecretRandom(), num_examples=900), params), x / 5,
                       atol=2 / params.scale)  # more records than W: weight 1, never above
    with pytest.raises(ValueError, match="num-examples >= 1"):
        encode(x, params, SecretRandom())
    with pytest.raises(ValueError, match="weight-cap must be a finite number >= 0"):
        encoding_from_config({**encoding_to_config(params), "weight-cap": -1.0})
