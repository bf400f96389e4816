"""The uint32 ring of SecAgg+ (issue 13, cost): wire packing, the grid that cannot wrap, masks, negation,
and integer model state kept out of the secure sum.

Expected values come from Python integers (arbitrary precision, no numpy wraparound), never
from the code under test.
"""

import math
import os

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.app import Array, ArrayRecord
from scipy import stats

from client import secure_aggregation as node_side
from privacy.secagg import EncodingParams, RoundSetup, SecAggAbort, SecAggServer, decode_sum, encode
from privacy.secagg.encoding import clip_l2, default_scale, summed_keys
from privacy.secagg.local_round import run_local_round
from privacy.secagg.primitives import prg_mask
from privacy.secagg.ring import pack_ring, reduce_, ring_neg, ring_scale, to_signed, unpack_ring
from privacy.secret_randomness import SecretRandom
from server.federation import apply_secure_mean


def _stream_ints(values, k):
    """The little-endian k-bit stream of `values`, as bytes, built with one Python integer."""
    acc = 0
    for i, v in enumerate(values):
        acc |= int(v) << (i * k)
    return acc.to_bytes((len(values) * k + 7) // 8, "little")


@pytest.mark.parametrize("k", range(1, 33))
def test_pack_unpack_round_trip_matches_a_python_int_bit_stream(k):
    rng = np.random.default_rng(k)
    for d in (1, 3, 7, 13, 63, 65, 129, 1001):
        y = rng.integers(0, 1 << k, d, dtype=np.uint64).astype(np.uint32)
        y[0], y[-1] = (1 << k) - 1, (1 << k) - 1  # all bits set at both ends
        blob = pack_ring(y, k)
        assert blob == _stream_ints(y.tolist(), k)
        back = unpack_ring(blob, k, d)
        assert back.dtype == np.uint32 and back.tolist() == y.tolist()


def test_pack_refuses_values_outside_the_ring_and_unpack_names_the_expected_size():
    with pytest.raises(ValueError, match=r"\[0, 2\^5\)"):
        pack_ring(np.array([0, 32], dtype=np.uint32), 5)
    blob = pack_ring(np.arange(10, dtype=np.uint32), 25)
    assert len(blob) == 32  # ceil(10 * 25 / 8)
    with pytest.raises(ValueError, match="31 bytes, expected 32"):
        unpack_ring(blob[:-1], 25, 10)
    with pytest.raises(ValueError, match="33 bytes, expected 32"):
        unpack_ring(blob + b"\0", 25, 10)


def _worst_case_randomness(sign):
    """Noise far past the clamp, and rounding always away from zero: a client's integers hit +-Z."""
    class Extreme:
        def gaussian(self, count, std):
            return np.full(count, sign * 1e9)

        def uniform(self, count):
            return np.zeros(count) if sign > 0 else np.full(count, np.nextafter(1.0, 0.0))
    return Extreme()


@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("sigma", [0.0, 1.0])
@pytest.mark.parametrize("n", [1, 2, 10, 100, 200, 1000])
def test_the_chosen_scale_never_wraps_the_sum_of_n_clients_all_at_plus_or_minus_the_clamp(n, sigma, sign):
    params = EncodingParams.fitted(clip_norm=10.0, noise_multiplier=sigma, min_clients=max(1, n // 2), max_clients=n,
                                   dimension=1_000_000)
    k = params.modulus_bits
    assert k <= 32
    x = np.zeros(8)
    x[0] = sign * params.clip_norm  # at the clip norm, so clipping leaves it; without noise the clamp B is C
    encoded = encode(x, params, _worst_case_randomness(sign))
    # Python ints: the most extreme integer a client can send is ceil(B * scale) (float product, as encode's).
    worst = sign * math.ceil(params.clamp * params.scale)
    reached = range(8) if sigma > 0 else range(1)  # with noise every coordinate is pushed to the clamp
    assert [int(encoded[i]) for i in reached] == [worst % (1 << k)] * len(reached)
    exact_sum = n * worst  # n clients all at the same extreme; Python ints cannot wrap
    assert abs(exact_sum) <= (1 << (k - 1)) - 1, "the sum leaves the signed range of Z_(2^k): it would wrap"
    total = np.zeros(8, dtype=np.uint32)  # the ring's own sum: uint32 adds, one AND
    for _ in range(n):
        total += encoded
    reduce_(total, k)
    assert int(total[0]) == exact_sum % (1 << k)
    assert decode_sum(total, params)[0] == exact_sum / params.scale


@pytest.mark.parametrize("n,B,k", [(1, 10.0, 24), (10, 10.0, 24), (200, 10.0, 26), (100, 90.0, 32), (3, 0.37, 17)])
def test_ring_scale_is_the_largest_scale_whose_sum_fits(n, B, k):
    s = ring_scale(B, n, k)
    limit = (1 << (k - 1)) - 1
    assert n * math.ceil(B * s) <= limit
    assert math.ceil(B * s) == limit // n  # each client gets all the room the ring has for it
    assert n * math.ceil(B * s * (1 + 1e-9)) > limit  # a denser grid would not fit


@pytest.mark.parametrize("n", [3, 50, 200])
def test_decoded_sum_is_within_n_over_scale_of_the_clamped_sum_and_unbiased(n):
    d = 2_000
    params = EncodingParams.fitted(clip_norm=1.0, noise_multiplier=0.0, min_clients=1, max_clients=n, dimension=d)
    rng = np.random.default_rng(n)
    deltas = [rng.normal(0, 0.05, d) * rng.uniform(0.2, 3.0) for _ in range(n)]
    secret = SecretRandom.reproducible("ring-decode", str(n))
    total = np.zeros(d, dtype=np.uint32)
    for x in deltas:
        total += encode(x, params, secret)
    reduce_(total, params.modulus_bits)
    clamped = sum(np.clip(clip_l2(x, 1.0), -params.clamp, params.clamp) for x in deltas)
    error = decode_sum(total, params) - clamped
    assert np.abs(error).max() < n / params.scale
    # Unbiased: the mean error over d coordinates is within 5 standard errors of 0
    # (each coordinate's error has std <= sqrt(n) / (2 scale)).
    assert abs(error.mean()) < 5 * math.sqrt(n) / (2 * params.scale) / math.sqrt(d)


def test_default_scale_meets_its_precision_in_the_fewest_bits():
    for n in (1, 10, 100, 200, 1000):
        d, C = 1_000_000, 10.0
        params = EncodingParams.fitted(clip_norm=C, noise_multiplier=0.0, min_clients=1, max_clients=n, dimension=d,
                                       precision_bits=12)
        k = params.modulus_bits
        # The std of the mean's quantisation error, 1/(2 scale sqrt(n)), is <= 2^-12 * C / sqrt(d) ...
        assert 1 / (2 * params.scale * math.sqrt(n)) <= 2.0**-12 * C / math.sqrt(d)
        # ... and k - 1 bits could not hold it (Python ints: per-client room floor((2^(k-2) - 1) / n)).
        need = math.ceil(C * 2.0**11 * math.sqrt(d) / (C * math.sqrt(n)))
        assert ((1 << (k - 2)) - 1) // n < need
    assert EncodingParams.fitted(10.0, 0.0, 1, 10, 1_000_000, precision_bits=12).modulus_bits == 24  # the docstring's table
    assert EncodingParams.fitted(10.0, 0.0, 1, 200, 1_000_000, precision_bits=12).modulus_bits == 26
    # the default q = 16: four more bits (k = 28 / 30), 0.875x / 0.94x the float32 bytes
    assert EncodingParams.fitted(10.0, 0.0, 1, 10, 1_000_000).modulus_bits == 28
    assert EncodingParams.fitted(10.0, 0.0, 1, 200, 1_000_000).modulus_bits == 30
    # A scale that needs more than 32 bits is refused, naming the largest that fits.
    with pytest.raises(ValueError, match="33-bit ring"):
        EncodingParams(10.0, 0.0, 1, 2.0**30 / 10, 2).modulus_bits
    assert default_scale(10.0, 1_000_000) > 0


def _keystream_words(seed, count):
    """The first `count` ChaCha20 keystream words as little-endian Python ints."""
    stream = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor().update(bytes(4 * count))
    return [int.from_bytes(stream[4 * i: 4 * i + 4], "little") for i in range(count)]


@pytest.mark.parametrize("k", [3, 8, 25, 32])
def test_masks_are_the_chacha20_words_mod_2k_and_uniform(k):
    seed = bytes(range(32))
    mask = prg_mask(seed, 300_000, k)
    assert mask.dtype == np.uint32 and mask.shape == (300_000,)
    assert mask[:64].tolist() == [w % (1 << k) for w in _keystream_words(seed, 64)]
    assert int(mask.max()) < (1 << k)
    top = min(k, 8)  # chi-square over the top bits
    counts = np.bincount((mask >> np.uint32(k - top)).astype(np.int64), minlength=1 << top)
    assert len(counts) == 1 << top
    assert stats.chisquare(counts).pvalue > 1e-4
    assert not np.array_equal(prg_mask(os.urandom(32), 1000, k), prg_mask(os.urandom(32), 1000, k))
    # Written into a caller's buffer: the same words.
    buf = np.empty(300_000, dtype=np.uint32)
    assert prg_mask(seed, 300_000, k, out=buf) is buf and np.array_equal(buf, mask)


@pytest.mark.parametrize("k", [1, 7, 24, 31, 32])
def test_negation_in_the_ring(k):
    rng = np.random.default_rng(k)
    x = rng.integers(0, 1 << k, 10_000, dtype=np.uint64).astype(np.uint32)
    x[:3] = [0, 1, (1 << k) - 1]
    neg = ring_neg(x, k)
    assert neg.tolist() == [(-int(v)) % (1 << k) for v in x]
    assert not reduce_(x + neg, k).any()
    # Signed reading: the residue of -v reads as -v (Python ints), for v in the signed range.
    small = np.array([0, 1, 5, (1 << (k - 1)) - 1], dtype=np.int64) if k > 1 else np.array([0], dtype=np.int64)
    as_ring = np.array([int(v) % (1 << k) for v in small], dtype=np.uint32)
    assert to_signed(ring_neg(as_ring, k), k).tolist() == [-int(v) for v in small]


def test_masked_inputs_cancel_and_travel_packed(tmp_path):
    setup = RoundSetup(round_id=b"r/1", participants=("a", "b", "c", "d"), num_shares=4, threshold=3,
                       params=EncodingParams.fitted(1.0, 0.0, 3, 4, 5_000), graph_seed=b"g")
    rng = SecretRandom.reproducible("ring-round")
    encoded = {u: encode(np.random.default_rng(i).normal(0, 0.01, 5_000), setup.params, rng)
               for i, u in enumerate(setup.participants)}
    total, _, transcript = run_local_round(setup, encoded)
    k = setup.params.modulus_bits
    expected = [sum(int(encoded[u][i]) for u in encoded) % (1 << k) for i in range(0, 5_000, 97)]
    assert total[::97].tolist() == expected
    # "b" shares its keys, then vanishes: the server must take out the survivors' pairwise masks with b,
    # each with the sign its survivor used.
    dropped_total, u3, _ = run_local_round(setup, encoded, dropouts={"share": {"b"}})
    assert u3 == ["a", "c", "d"]
    expected = [sum(int(encoded[u][i]) for u in u3) % (1 << k) for i in range(0, 5_000, 97)]
    assert dropped_total[::97].tolist() == expected
    # The server sums packed payloads like arrays, and names a client whose payload has the wrong size.
    server = SecAggServer(setup, dimension=5_000)
    server.u2 = list(setup.participants)
    packed = {u: np.frombuffer(pack_ring(y, k), dtype=np.uint8) for u, y in transcript["masked"].items()}
    assert all(p.size == (5_000 * k + 7) // 8 for p in packed.values())
    server.collect_masked(packed)
    masked_sum = [sum(int(transcript["masked"][u][i]) for u in encoded) % (1 << k) for i in range(0, 5_000, 97)]
    assert server._masked_sum[::97].tolist() == masked_sum
    # One client's payload of the wrong size costs its own contribution, not the round: it is
    # left out of U3 (treated as dropped after sharing, so its pairwise masks get removed) and named.
    packed["c"] = packed["c"][:-1]
    server = SecAggServer(setup, dimension=5_000)
    server.u2 = list(setup.participants)
    assert server.collect_masked(packed) == ["a", "b", "d"]
    assert "masked input of c:" in server.rejected["c"] and "expected" in server.rejected["c"]
    masked_sum = [sum(int(transcript["masked"][u][i]) for u in "abd") % (1 << k) for i in range(0, 5_000, 97)]
    assert server._masked_sum[::97].tolist() == masked_sum
    # Too few well-formed inputs left: the round stops (t = 3 here).
    packed["d"] = packed["d"][:-1]
    with pytest.raises(SecAggAbort, match="masked input: 2 clients left"):
        SecAggServer(setup, dimension=5_000, u2=list(setup.participants)).collect_masked(packed)


def test_integer_state_stays_out_of_the_secure_sum_and_keeps_the_global_value():
    d, clip = 1_000, 1.0
    global_state = {"w": torch.zeros(d), "num_batches_tracked": torch.tensor(5, dtype=torch.int64),
                    "b": torch.zeros(3, dtype=torch.float64)}
    rng = np.random.default_rng(0)
    nodes = ("n1", "n2", "n3")
    deltas, flat = {}, {}
    for u in nodes:
        w = torch.from_numpy(rng.normal(0, 0.01, d)).float()  # norm ~0.32 < clip: clipping must leave it alone
        local = {"w": w, "num_batches_tracked": torch.tensor(5 + 17), "b": torch.full((3,), 0.01, dtype=torch.float64)}
        deltas[u] = np.concatenate([w.double().numpy(), np.full(3, 0.01)])
        flat[u] = node_side.flatten_delta(local, global_state)
        assert flat[u].shape == (d + 3,)  # the counter is not in the vector
        assert np.array_equal(flat[u], deltas[u])
    arrays = ArrayRecord({k: Array(v.numpy()) for k, v in global_state.items()})
    assert summed_keys(arrays) == summed_keys(global_state) == ["w", "b"]
    params = EncodingParams.fitted(clip, 0.0, 2, len(nodes), d + 3)
    setup = RoundSetup(round_id=b"r/int", participants=nodes, num_shares=3, threshold=2, params=params, graph_seed=b"g")
    secret = SecretRandom.reproducible("int-state")
    total, _, _ = run_local_round(setup, {u: encode(flat[u], params, secret) for u in nodes})
    mean = decode_sum(total, params) / len(nodes)
    true_mean = sum(deltas.values()) / len(nodes)
    # Unshrunk: had the counter's 17 been in the vector, clipping to 1.0 would scale the update by ~1/17.
    assert np.abs(mean - true_mean).max() < 1 / params.scale
    new = apply_secure_mean(arrays, mean)
    assert int(new["num_batches_tracked"].numpy()) == 5 and new["num_batches_tracked"].numpy().dtype == np.int64
    assert new["w"].numpy().dtype == np.float32 and new["b"].numpy().dtype == np.float64
    assert np.abs(new["w"].numpy() - true_mean[:d]).max() < 1 / params.scale + 1e-7
    with pytest.raises(ValueError, match=r"expected \(1003,\)"):
        apply_secure_mean(arrays, np.zeros(d + 4))
