"""SecAgg+ in memory: exact sums, dropouts, a uniform view for the server, tamper detection."""

import numpy as np
import pytest
from scipy import stats

from privacy.secagg import EncodingParams, RoundSetup, SecAggAbort, SecAggCryptoError, decode_sum, default_scale, encode
from privacy.secagg.encoding import clip_l2
from privacy.secagg.local_round import run_local_round
from privacy.secret_randomness import SecretRandom


def _setup(n, num_shares, t, d, noise=0.0, clip=1.0, min_clients=None):
    params = EncodingParams(clip_norm=clip, noise_multiplier=noise, min_clients=min_clients or t,
                            scale=default_scale(clip, d), max_clients=n)
    return RoundSetup(round_id=b"run-1/round-1", participants=tuple(f"c{i:02d}" for i in range(n)),
                      num_shares=num_shares, threshold=t, params=params, graph_seed=b"seed")


def _deltas(setup, d, seed=0):
    rng = np.random.default_rng(seed)
    return {u: rng.normal(0, 0.01, d) * rng.uniform(0.5, 3.0) for u in setup.participants}


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
    # The encoding is also modular-exact: masks cancel to the bit.
    assert np.array_equal(total, sum(encoded.values()) & np.uint64((1 << setup.params.modulus_bits) - 1))


@pytest.mark.parametrize("stage", ["advertise", "share", "masked"])
def test_ten_clients_threshold_six_survive_four_dropouts_at_each_stage(stage):
    setup = _setup(10, 10, 6, 2_000)
    rng = SecretRandom.reproducible("test", "2")
    encoded = {u: encode(x, setup.params, rng) for u, x in _deltas(setup, 2_000).items()}
    dropped = set(setup.participants[:4])
    total, u3, _ = run_local_round(setup, encoded, dropouts={stage: dropped})
    survivors = [u for u in setup.participants if u not in dropped] if stage != "masked" else list(setup.participants)
    assert u3 == sorted(survivors)
    expected = sum(encoded[u] for u in survivors) & np.uint64((1 << setup.params.modulus_bits) - 1)
    assert np.array_equal(total, expected)


@pytest.mark.parametrize("stage", ["advertise", "share", "masked"])
def test_five_dropouts_with_threshold_six_abort_cleanly(stage):
    setup = _setup(10, 10, 6, 500)
    rng = SecretRandom.reproducible("test", "3")
    encoded = {u: encode(x, setup.params, rng) for u, x in _deltas(setup, 500).items()}
    with pytest.raises(SecAggAbort, match="threshold"):
        run_local_round(setup, encoded, dropouts={stage: set(setup.participants[:5])})


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
    counts = np.bincount((y >> np.uint64(k - 8)).astype(np.int64), minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-4
    # ... and uncorrelated with the delta it hides (|r| well inside 5 standard errors).
    r = np.corrcoef(y.astype(np.float64), deltas["c00"])[0, 1]
    assert abs(r) < 5 / np.sqrt(d)
    # The unmasked encoding itself is strongly structured, so the test can fail.
    structured = np.bincount((encoded["c00"] >> np.uint64(k - 8)).astype(np.int64), minlength=256)
    assert stats.chisquare(structured).pvalue < 1e-10
    # Nothing the server received contains a client's private key material or raw encoding.
    raw = encoded["c00"].tobytes()[:64]
    assert all(raw not in (blob if isinstance(blob, bytes) else b"") for blobs in transcript["share"].values() for blob in blobs.values())


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
