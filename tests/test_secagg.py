"""SecAgg+ in memory (privacy/secagg): exact sums, dropouts, what a curious server can compute.

Each guarantee has a test that fails when the code providing it is removed (the mutation
each was checked against is named in its docstring):
- exact sum and dropout recovery: the unmasked sum equals a sum computed here without the
  protocol, with the dropouts shown to have happened and the recovery path used;
- the self-mask PRG(b_u) hides a node whose masked input reaches the server late, after the
  server (following the protocol) has rebuilt its s_sk and so every pairwise mask it used;
- the pairwise masks hide a survivor from a server that rebuilds its b_u, as it must;
- a node reveals one share kind per owner, once;
- the server's view of a node is uniform over Z_(2^k) and uncorrelated with its input even
  where one kind of mask is absent or known, so neither kind alone can pass it.

The curious server is played with the product's own primitives (`agree`, `prg_mask`,
`combine_shares`: the code is open source), applied only to what it received; the test then
checks, holding every party's secrets, that the server removed exactly what it claims to.
"""

import numpy as np
import pytest
from scipy import stats

from privacy.secagg import EncodingParams, RoundSetup, SecAggAbort, SecAggCryptoError, decode_sum, default_scale, encode
from privacy.secagg.encoding import clip_l2
from privacy.secagg.identity import new_identities
from privacy.secagg.local_round import run_local_round
from privacy.secagg.primitives import agree, prg_mask
from privacy.secagg.protocol import SecAggClient, SecAggServer
from privacy.secagg.sharing import SHARE_BYTES, combine_shares
from privacy.secret_randomness import SecretRandom


def _setup(n, num_shares, t, d, noise=0.0, clip=1.0, min_clients=None):
    params = EncodingParams(clip_norm=clip, noise_multiplier=noise, min_clients=min_clients or t,
                            scale=default_scale(clip, d), max_clients=n)
    return RoundSetup(round_id=b"run-1/round-1", participants=tuple(f"c{i:02d}" for i in range(n)),
                      num_shares=num_shares, threshold=t, params=params, graph_seed=b"seed")


def _deltas(setup, d, seed=0):
    rng = np.random.default_rng(seed)
    return {u: rng.normal(0, 0.01, d) * rng.uniform(0.5, 3.0) for u in setup.participants}


def _encoded(setup, d, seed=0):
    rng = SecretRandom.reproducible("test", str(seed))
    return {u: encode(x, setup.params, rng) for u, x in _deltas(setup, d, seed).items()}


def _signed(v, k):
    """Z_(2^k) residues -> the signed integers they encode (a path separate from decode_sum)."""
    v = np.asarray(v, dtype=np.uint64).astype(np.int64)
    return np.where(v >= (1 << (k - 1)), v - (1 << k), v)


def _expected_total(encoded, members, k):
    """Sum over `members` in Z_(2^k), via the signed integers (no modular arithmetic on the way)."""
    total = sum(_signed(encoded[u], k) for u in members)
    return (total % (1 << k)).astype(np.uint64)


def _mod_sub(a, b, k):
    return (np.asarray(a, dtype=np.uint64) - np.asarray(b, dtype=np.uint64)) & np.uint64((1 << k) - 1)


def _mod_add(a, b, k):
    return (np.asarray(a, dtype=np.uint64) + np.asarray(b, dtype=np.uint64)) & np.uint64((1 << k) - 1)


def _pairwise(s_sk, s_pk_peer, me, peer, setup, d):
    """+PRG(s) if me < peer else -PRG(s), s = HKDF(X25519(s_sk, s_pk_peer)): the protocol's docstring."""
    k = setup.params.modulus_bits
    mask = prg_mask(agree(s_sk, s_pk_peer, b"pairwise-mask", setup.round_id), d, k)
    return mask if me < peer else _mod_sub(0, mask, k)


def _uniformity_pvalue(v, k):
    """Chi-square p-value of the top 8 bits of v over 256 equal bins of Z_(2^k)."""
    counts = np.bincount((np.asarray(v, dtype=np.uint64) >> np.uint64(k - 8)).astype(np.int64), minlength=256)
    return stats.chisquare(counts).pvalue


def _assert_hides(view, encoding, k, what):
    """`view` (a vector the server can compute) is uniform over Z_(2^k) and tells nothing of `encoding`."""
    d = encoding.shape[0]
    assert np.mean(view == encoding) < 0.01, f"{what}: the server recovers the node's input"
    assert _uniformity_pvalue(view, k) > 1e-6, f"{what}: not uniform over Z_(2^k)"
    r = np.corrcoef(view.astype(np.float64), _signed(encoding, k).astype(np.float64))[0, 1]
    assert abs(r) < 5 / np.sqrt(d), f"{what}: correlated with the input (r={r:.3g})"


def _drive(setup, inputs, vanish=None, late=()):
    """One round in which the test holds every party; returns (clients, server, view).

    vanish: {"share"|"masked"|"consistency"|"unmask": ids that never answer that stage};
    late: ids whose masked input reaches the server only after it fixed U3 (in view["late"]).
    view holds everything the server received; the caller runs `server.unmask(view["unmask"])`.
    """
    vanish = {s: set((vanish or {}).get(s, ())) for s in ("share", "masked", "consistency", "unmask")}
    d = len(next(iter(inputs.values())))
    ids = new_identities(list(setup.participants))
    clients = {u: SecAggClient(u, setup, ids[u]) for u in setup.participants}
    server = SecAggServer(setup, dimension=d)
    view = {"advertise": {u: c.advertise_keys() for u, c in clients.items()}}
    keys = server.collect_keys(view["advertise"])
    view["share"] = {u: clients[u].share_keys(keys[u]) for u in keys if u not in vanish["share"]}
    routed = server.route_shares(view["share"])
    masked = {u: clients[u].masked_input(routed[u], server.u2, inputs[u])
              for u in server.u2 if u not in vanish["masked"]}
    view["late"] = {u: masked.pop(u) for u in late}
    view["masked"] = masked
    u3 = server.collect_masked(masked)
    view["consistency"] = {u: clients[u].sign_survivors(u3) for u in u3 if u not in vanish["consistency"]}
    view["signatures"] = server.collect_signatures(view["consistency"]) \
        if len(view["consistency"]) >= setup.threshold else {}
    view["unmask"] = {u: clients[u].unmask(view["signatures"]) for u in view["consistency"] if u not in vanish["unmask"]}
    return clients, server, view


def _revealed(view, kind):
    """{owner: [(index, share)]} of one kind ("b" or "sk") from the unmask replies the server holds."""
    out = {}
    for reply in view["unmask"].values():
        for owner, (k, idx, share) in reply.items():
            if k == kind:
                out.setdefault(owner, []).append((idx, share))
    return out


# ---- exact sums and dropouts ------------------------------------------------------------

@pytest.mark.parametrize("n,num_shares,t,d", [(3, 3, 2, 100_000), (5, 3, 2, 1_000_000), (50, 7, 4, 20_000)])
def test_unmasked_sum_equals_plaintext_sum_within_the_quantisation_bound(n, num_shares, t, d):
    setup = _setup(n, num_shares, t, d)
    deltas = _deltas(setup, d)
    rng = SecretRandom.reproducible("test", "1")
    encoded = {u: encode(x, setup.params, rng) for u, x in deltas.items()}
    total, u3, _ = run_local_round(setup, encoded)
    assert u3 == sorted(setup.participants)
    decoded = decode_sum(total, setup.params)
    plain = sum(clip_l2(x, setup.params.clip_norm) for x in deltas.values())
    bound = n / setup.params.scale  # each stochastic rounding errs by < 1 grid step
    assert np.abs(decoded - plain).max() < bound
    # Exact: the masks cancel to the bit, checked against a sum of the signed integers.
    k = setup.params.modulus_bits
    assert np.array_equal(total, _expected_total(encoded, setup.participants, k))
    assert np.array_equal(decoded, sum(_signed(encoded[u], k) for u in setup.participants) / setup.params.scale)


@pytest.mark.parametrize("stage", ["advertise", "share", "masked"])
def test_ten_clients_threshold_six_survive_four_dropouts_at_each_stage(stage):
    """Mutation checked: SecAggServer.unmask without its s_sk branch fails the "share" case."""
    setup = _setup(10, 10, 6, 2_000)
    encoded = _encoded(setup, 2_000, seed=2)
    dropped = {"c01", "c04", "c06", "c09"}
    total, u3, transcript = run_local_round(setup, encoded, dropouts={stage: dropped})
    # local_round's stage names say after which stage a client vanishes: it never answers the next one.
    next_stage = {"advertise": "share", "share": "masked", "masked": "unmask"}[stage]
    assert not dropped & set(transcript[next_stage]), "the dropouts did not happen"
    assert dropped <= set(transcript[stage])
    survivors = [u for u in setup.participants if u not in dropped] if stage != "masked" else list(setup.participants)
    assert u3 == sorted(survivors)
    assert np.array_equal(total, _expected_total(encoded, survivors, setup.params.modulus_bits))
    if stage == "share":  # in U2, not in U3: their masks were removed through their rebuilt s_sk
        kinds = {kind for reply in transcript["unmask"].values()
                 for owner, (kind, _, _) in reply.items() if owner in dropped}
        assert kinds == {"sk"}


@pytest.mark.parametrize("stage", ["advertise", "share", "masked"])
def test_five_dropouts_with_threshold_six_abort_cleanly(stage):
    setup = _setup(10, 10, 6, 500)
    encoded = _encoded(setup, 500, seed=3)
    with pytest.raises(SecAggAbort, match="threshold"):
        run_local_round(setup, encoded, dropouts={stage: set(setup.participants[:5])})


def test_dropout_recovery_rebuilds_the_dropped_nodes_masks_from_t_shares():
    """Mutation checked: without the s_sk branch of SecAggServer.unmask the sum is wrong."""
    setup = _setup(7, 5, 3, 5_000)  # a ring: each node shares with 4 neighbours
    encoded = _encoded(setup, 5_000, seed=8)
    gone = {"c02", "c05"}
    clients, server, view = _drive(setup, encoded, vanish={"masked": gone})
    assert set(server.u2) == set(setup.participants) and set(server.u3) == set(setup.participants) - gone
    assert np.array_equal(server.unmask(view["unmask"]), _expected_total(encoded, server.u3, setup.params.modulus_bits))
    # The server rebuilt exactly the dropped nodes' s_sk (and no survivor's).
    sk = _revealed(view, "sk")
    assert set(sk) == gone
    assert all(combine_shares(sk[u], setup.threshold) == clients[u]._s_sk for u in gone)


# ---- what a curious server can compute ---------------------------------------------------

def test_a_late_masked_input_is_hidden_by_the_self_mask_once_the_server_rebuilds_its_s_sk():
    """The self-mask's job (Bonawitz et al. 2017, 4): y_u arrives after U3 is fixed, so u counts
    as dropped, its s_sk is rebuilt and every pairwise mask in y_u is known to the server.

    Mutation checked: no PRG(b_u) in SecAggClient.masked_input (and none removed by
    SecAggServer.unmask) -> the server reads x_u here, while every sum test still passes.
    """
    d = 200_000
    setup = _setup(5, 5, 3, d)
    k = setup.params.modulus_bits
    encoded = _encoded(setup, d, seed=4)
    u = "c02"
    clients, server, view = _drive(setup, encoded, late={u})
    assert u in server.u2 and u not in server.u3
    assert np.array_equal(server.unmask(view["unmask"]), _expected_total(encoded, server.u3, k))

    # The curious server: rebuild s_sk_u from the sk-shares it was sent, strip every pairwise mask.
    s_sk = combine_shares(_revealed(view, "sk")[u], setup.threshold)
    view_u = view["late"][u]
    for v in server.u2:
        if v != u:
            view_u = _mod_sub(view_u, _pairwise(s_sk, view["advertise"][v][1], u, v, setup, d), k)
    _assert_hides(view_u, encoded[u], k, "late y_u without its pairwise masks")
    # Holding u's secrets: the server did strip every pairwise mask; only PRG(b_u) is left.
    assert np.array_equal(view_u, _mod_add(encoded[u], prg_mask(clients[u]._b, d, k), k))
    assert u not in _revealed(view, "b")  # and the server was never sent a share of b_u


def test_a_survivor_is_hidden_by_its_pairwise_masks_from_a_server_that_rebuilds_its_self_mask():
    """The server rebuilds b_u of every survivor (it must, to unmask the sum).

    Mutation checked: no pairwise masks in SecAggClient.masked_input (and none removed for
    dropped nodes by SecAggServer.unmask) -> y_u - PRG(b_u) is x_u.
    """
    d = 200_000
    setup = _setup(5, 5, 3, d)
    k = setup.params.modulus_bits
    encoded = _encoded(setup, d, seed=5)
    clients, server, view = _drive(setup, encoded)
    assert np.array_equal(server.unmask(view["unmask"]), _expected_total(encoded, setup.participants, k))
    b_shares = _revealed(view, "b")
    for u in ("c00", "c03"):
        b_u = combine_shares(b_shares[u], setup.threshold)
        view_u = _mod_sub(view["masked"][u], prg_mask(b_u, d, k), k)
        _assert_hides(view_u, encoded[u], k, f"y_{u} - PRG(b_{u})")
        # Holding u's secrets: what is left is exactly its pairwise masks with the other survivors.
        rest = view_u
        for v in setup.participants:
            if v != u:
                rest = _mod_sub(rest, _pairwise(clients[u]._s_sk, view["advertise"][v][1], u, v, setup, d), k)
        assert np.array_equal(rest, encoded[u])


def test_a_node_whose_neighbours_all_dropped_sends_no_masked_input():
    """N(u) ∩ U2 = {u}: y_u would carry no pairwise mask at all; the node checks its own
    neighbourhood (|N(u) ∩ U2| >= t, Bell et al.) and refuses to send it.

    Mutation checked: masked_input checking |U2| instead of |N(u) ∩ U2| -> no abort.
    """
    d = 2_000
    setup = _setup(6, 3, 2, d)  # a ring: u and one neighbour on each side
    encoded = _encoded(setup, d, seed=6)
    u = "c00"
    neighbours = set(setup.neighbourhoods()[u]) - {u}
    with pytest.raises(SecAggAbort, match=r"c00: only 1 of its neighbours completed key sharing"):
        _drive(setup, encoded, vanish={"share": neighbours})


def test_server_view_of_one_client_is_uniform_and_uncorrelated_with_its_delta():
    d = 200_000
    setup = _setup(5, 5, 3, d)
    deltas = _deltas(setup, d, seed=4)
    rng = SecretRandom.reproducible("test", "5")
    encoded = {u: encode(x, setup.params, rng) for u, x in deltas.items()}
    _, _, transcript = run_local_round(setup, encoded)
    k = setup.params.modulus_bits
    y = transcript["masked"]["c00"]
    # Uniform over Z_(2^k): chi-square over 256 equal bins of the value range.
    assert _uniformity_pvalue(y, k) > 1e-6
    # ... and uncorrelated with the delta it hides (|r| well inside 5 standard errors).
    r = np.corrcoef(y.astype(np.float64), deltas["c00"])[0, 1]
    assert abs(r) < 5 / np.sqrt(d)
    # The unmasked encoding itself is strongly structured, so the test can fail.
    assert _uniformity_pvalue(encoded["c00"], k) < 1e-10


def test_nothing_the_server_receives_holds_a_secret_or_a_share_in_the_clear():
    """Keys, self-mask seeds and Shamir shares cross the server only encrypted or not at all.

    Mutation checked: share transport without AES-GCM (encrypt returns the plaintext).
    """
    setup = _setup(5, 5, 3, 1_000)
    encoded = _encoded(setup, 1_000, seed=7)
    clients, server, view = _drive(setup, encoded, vanish={"masked": {"c04"}})
    server.unmask(view["unmask"])
    before_unmask = b"".join([c + s + sig for c, s, sig in view["advertise"].values()]
                             + [blob for out in view["share"].values() for blob in out.values()]
                             + [y.tobytes() for y in view["masked"].values()])
    secrets = [s for c in clients.values() for s in (c._c_sk, c._s_sk, c._b)]
    shares = [s for c in clients.values() for (_, b, sk) in c._held.values() for s in (b, sk)]
    # Every holder's shares of every owner, except c04's (it vanished before decrypting any).
    assert all(len(s) == 32 for s in secrets) and all(len(s) == SHARE_BYTES for s in shares)
    assert len(shares) == 2 * (4 * 5 + 1)
    assert not [s for s in secrets + shares if s in before_unmask]
    revealed = b"".join(share for reply in view["unmask"].values() for (_, _, share) in reply.values())
    assert not [s for s in secrets if s in revealed]


def test_tampered_share_is_detected_and_the_sender_named():
    setup = _setup(4, 4, 3, 100)
    rng = SecretRandom.reproducible("test", "6")
    encoded = {u: encode(x, setup.params, rng) for u, x in _deltas(setup, 100).items()}

    def flip(routed):
        blob = bytearray(routed["c01"]["c02"])
        blob[20] ^= 0x01
        routed["c01"]["c02"] = bytes(blob)

    with pytest.raises(SecAggCryptoError, match="share from c02 failed authentication"):
        run_local_round(setup, encoded, tamper=flip)


# ---- a node reveals one share kind per owner, once ----------------------------------------

def test_a_node_reveals_one_share_kind_per_owner_and_refuses_a_second_unmask():
    """Mutation checked: SecAggClient.unmask without its "asked twice" check answers again,
    with sk-shares of owners whose b-shares it already revealed."""
    setup = _setup(5, 5, 3, 1_000)
    encoded = _encoded(setup, 1_000, seed=9)
    clients, server, view = _drive(setup, encoded, vanish={"masked": {"c04"}})
    u3 = server.u3
    for holder, reply in view["unmask"].items():
        expected = {o: ("b" if o in u3 else "sk") for o in setup.participants}
        assert {o: kind for o, (kind, _, _) in reply.items()} == expected
    # The shares are the right ones: t of them rebuild the owner's secret.
    assert all(combine_shares(s, 3) == clients[o]._b for o, s in _revealed(view, "b").items())
    assert combine_shares(_revealed(view, "sk")["c04"], 3) == clients["c04"]._s_sk
    # A second unmask, with the same U3 or one that now says c01 dropped, is refused.
    with pytest.raises(SecAggAbort, match="asked twice"):
        clients["c00"].unmask(view["signatures"])
    with pytest.raises(SecAggAbort, match="sign a survivor set twice"):
        clients["c00"].sign_survivors([u for u in u3 if u != "c01"])


def test_a_node_refuses_to_sign_a_u3_outside_u2_or_below_threshold_and_reveals_nothing():
    """Mutation checked: sign_survivors without its U3 checks signs a U3 of t-1."""
    setup = _setup(5, 5, 3, 1_000)
    encoded = _encoded(setup, 1_000, seed=10)
    clients, server, view = _drive(setup, encoded, vanish={"consistency": {"c00"}, "unmask": set(setup.participants)})
    c = clients["c00"]
    with pytest.raises(SecAggAbort, match="must be a subset of U2"):
        c.sign_survivors(list(server.u3) + ["c99"])
    with pytest.raises(SecAggAbort, match=r"\|N\(u\) ∩ U3\| < t"):
        c.sign_survivors(list(server.u3)[:2])
    with pytest.raises(SecAggAbort, match="unmask before signing"):
        c.unmask(view["signatures"])
    # The refusals had no effect: the node signs a correct U3 and answers once.
    signatures = {**view["signatures"], "c00": c.sign_survivors(server.u3)}
    assert {kind for kind, _, _ in c.unmask(signatures).values()} == {"b"}


# ---- parameters and encoding -------------------------------------------------------------

def test_neighbourhoods_are_symmetric_rings_including_self():
    setup = _setup(12, 5, 3, 10)
    hoods = setup.neighbourhoods()
    for u, members in hoods.items():
        assert u in members and len(members) == 5
        assert all(u in hoods[v] for v in members)


def test_distributed_noise_sums_to_the_target_std():
    d, n = 200_000, 8
    setup = _setup(n, n, 5, d, noise=1.0, clip=0.5, min_clients=4)
    rng = SecretRandom.reproducible("test", "7")
    zero = np.zeros(d)
    total, _, _ = run_local_round(setup, {u: encode(zero, setup.params, rng) for u in setup.participants})
    decoded = decode_sum(total, setup.params)
    # n clients, each std sigma*C/sqrt(n_min): the sum has std sigma*C*sqrt(n/n_min) >= sigma*C.
    expected = 1.0 * 0.5 * np.sqrt(n / 4)
    assert decoded.std() == pytest.approx(expected, rel=0.01)


def test_encode_refuses_non_finite_updates_and_bad_setups():
    setup = _setup(3, 3, 2, 4)
    with pytest.raises(ValueError, match="NaN/Inf"):
        encode(np.array([0.0, np.nan, 0, 0]), setup.params, SecretRandom())
    with pytest.raises(ValueError, match="threshold"):
        _setup(3, 3, 4, 4)
