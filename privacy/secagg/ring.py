"""The ring Z_(2^k), k <= 32, of SecAgg+'s masked vectors, held in numpy uint32.

Bonawitz et al. (CCS 2017) and Bell et al. (CCS 2020) mask inputs in Z_R and sum
them mod R; with R = 2^k the ring's arithmetic is the machine's: numpy's uint32 adds and
subtracts wrap mod 2^32 natively, and since 2^k divides 2^32 a chain of adds/subtracts mod
2^32 followed by ONE `& (2^k - 1)` equals the same chain mod 2^k. So callers add and
subtract in place (`+=`, `-=`) and `reduce_` once at the end; for k = 32 even that AND is
a no-op. (The earlier uint64 code did `(a + b) & mask` per add: 3 temporaries per add.)

Wire format (`pack_ring` / `unpack_ring`): the d values as one little-endian bit stream, k
bits each, value i in bits [i*k, (i+1)*k) (bit j of the stream is bit j % 8 of byte j // 8),
zero-padded to whole bytes: ceil(d*k/8) bytes, i.e. k/32 of the float32 update's bytes.
Masked values are uniform over Z_(2^k), so no lossless code can do better than k bits.

Sizing (`no_wrap_bits`, `ring_scale`): a sum of n integers each in [-Z, Z] decodes without
wrapping in Z_(2^k), read as signed [-2^(k-1), 2^(k-1) - 1], iff n * Z <= 2^(k-1) - 1.

Everything here is vectorised numpy: no Python loop over coordinates (the loops below run
over the <= 64 positions inside a group of values, or a handful of ulps).
"""

from __future__ import annotations

import math

import numpy as np

RING_DTYPE = np.uint32
MAX_RING_BITS = 32


def check_bits(modulus_bits: int) -> int:
    """`modulus_bits` as an int in [1, 32]; raises ValueError otherwise (wider rings are refused, not emulated)."""
    k = int(modulus_bits)
    if not 1 <= k <= MAX_RING_BITS:
        raise ValueError(f"modulus_bits must be in [1, {MAX_RING_BITS}] (the ring is held in uint32), got {modulus_bits}")
    return k


def ring_mask(modulus_bits: int) -> np.uint32:
    """2^k - 1 as a numpy uint32 scalar (the AND that reduces mod 2^k)."""
    return np.uint32((1 << check_bits(modulus_bits)) - 1)


def reduce_(x: np.ndarray, modulus_bits: int) -> np.ndarray:
    """In place: x <- x mod 2^k for a uint32 array x (one AND; nothing for k = 32). Returns x."""
    k = check_bits(modulus_bits)
    if k < MAX_RING_BITS:
        np.bitwise_and(x, ring_mask(k), out=x)
    return x


def to_ring(z: np.ndarray, modulus_bits: int) -> np.ndarray:
    """(d,) signed integers (or integral floats) with |z| < 2^31 -> (d,) uint32 residues z mod 2^k.

    Negative values wrap: -1 -> 2^k - 1 (int32 two's complement read as uint32, then one AND).
    The caller guarantees |z| < 2^31 (the encoding's clamp and `modulus_bits` do); larger
    values are not checked here. Raises ValueError for modulus_bits outside [1, 32].
    """
    k = check_bits(modulus_bits)
    z = np.asarray(z)
    out = z.astype(np.int32).view(np.uint32) if z.dtype != np.uint32 else z.copy()
    return reduce_(out, k)


def ring_neg(x: np.ndarray, modulus_bits: int) -> np.ndarray:
    """(d,) uint32 -> (d,) uint32 additive inverse in Z_(2^k): (2^k - x) mod 2^k, so x + neg(x) = 0 mod 2^k."""
    k = check_bits(modulus_bits)
    out = np.subtract(np.uint32(0), np.asarray(x, dtype=RING_DTYPE), dtype=RING_DTYPE)
    return reduce_(out, k)


def to_signed(x: np.ndarray, modulus_bits: int) -> np.ndarray:
    """(d,) uint32 residues mod 2^k -> (d,) int32 representatives in [-2^(k-1), 2^(k-1) - 1].

    Bits above k are ignored (so an unreduced sum decodes like a reduced one). Vectorised as
    a sign extension: shift the k-bit value to the top of the word, then shift back arithmetically.
    """
    k = check_bits(modulus_bits)
    x = np.asarray(x, dtype=RING_DTYPE)
    if k == MAX_RING_BITS:
        return x.view(np.int32)
    shift = MAX_RING_BITS - k
    return np.left_shift(x, np.uint32(shift)).view(np.int32) >> np.int32(shift)


def no_wrap_bits(max_abs_sum: int) -> int:
    """Smallest k >= 1 whose signed range [-2^(k-1), 2^(k-1) - 1] holds every integer of
    absolute value <= max_abs_sum (an int >= 0). May exceed 32; callers refuse that."""
    bound = int(max_abs_sum)
    if bound < 0:
        raise ValueError(f"max_abs_sum must be >= 0, got {max_abs_sum}")
    return bound.bit_length() + 1


def ring_scale(clamp: float, max_clients: int, modulus_bits: int = MAX_RING_BITS) -> float:
    """The largest grid density s (grid points per model unit, a float) whose sums fit in Z_(2^k).

    Each client sends integers z with |z| <= ceil(fl(clamp * s)) (the clamped value times s,
    stochastically rounded); the largest s with max_clients * ceil(fl(clamp * s)) <= 2^(k-1) - 1
    makes the sum of any max_clients of them decode without wrapping (fl: the float64 product
    that `encode` computes, so the bound holds bit for bit, not up to rounding).
    Raises ValueError if clamp is not a positive finite number, max_clients < 1, or the ring
    is too small to give each client even one grid point (max_clients > 2^(k-1) - 1).
    """
    k = check_bits(modulus_bits)
    if not (math.isfinite(clamp) and clamp > 0):
        raise ValueError(f"clamp must be a positive finite number, got {clamp}")
    if max_clients < 1:
        raise ValueError(f"max_clients must be >= 1, got {max_clients}")
    per_client = ((1 << (k - 1)) - 1) // int(max_clients)  # the largest Z allowed per client
    if per_client < 1:
        raise ValueError(f"Z_(2^{k}) cannot hold a sum of {max_clients} clients (each needs at least one grid point)")
    scale = per_client / clamp
    while math.ceil(clamp * scale) > per_client:  # float rounding put clamp*scale a hair above: step down one ulp
        scale = math.nextafter(scale, 0.0)
    return scale


def packed_size(dimension: int, modulus_bits: int) -> int:
    """Bytes of `pack_ring`'s output for `dimension` values of k bits: ceil(dimension * k / 8)."""
    return (int(dimension) * check_bits(modulus_bits) + 7) // 8


def pack_ring(y: np.ndarray, modulus_bits: int) -> bytes:
    """(d,) integers in [0, 2^k) -> ceil(d*k/8) bytes: the values as a little-endian k-bit stream.

    Input: any integer dtype (uint32 from the ring), 1-D. Raises ValueError for a value
    outside [0, 2^k) (packing would drop its high bits) or an input that is not 1-D integers.
    Vectorised: values are taken in groups of 64/gcd(k, 64), whose codes fill whole 64-bit
    words; each of the <= 64 positions in a group is shifted into <= 2 of the group's words,
    for all groups at once. About 3-4 ms for 10^6 values (k = 32, 16, 8: a plain cast, < 1 ms).
    """
    k = check_bits(modulus_bits)
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"pack_ring packs a 1-D integer vector, got shape {y.shape}, dtype {y.dtype}")
    if y.size and (int(y.min()) < 0 or int(y.max()) >= (1 << k)):
        raise ValueError(f"values must lie in [0, 2^{k}) to be packed to {k} bits")
    d = y.size
    if k in (8, 16, 32):
        return y.astype(f"<u{k // 8}").tobytes()
    g = 64 // math.gcd(k, 64)  # values per group
    words_per_group = k * g // 64
    m = -(-d // g)
    values = np.zeros(m * g, dtype=np.uint64)
    values[:d] = y
    columns = np.ascontiguousarray(values.reshape(m, g).T)  # (g, m): position j of every group
    words = np.zeros((words_per_group, m), dtype=np.uint64)
    for j in range(g):  # positions within a group, each vectorised over all m groups
        word, shift = divmod(j * k, 64)
        words[word] |= columns[j] << np.uint64(shift)
        if shift + k > 64:
            words[word + 1] |= columns[j] >> np.uint64(64 - shift)
    stream = np.ascontiguousarray(words.T).astype("<u8", copy=False).reshape(-1).view(np.uint8)
    return stream[: packed_size(d, k)].tobytes()


def unpack_ring(blob, modulus_bits: int, dimension: int) -> np.ndarray:
    """Inverse of `pack_ring`: ceil(d*k/8) bytes -> (d,) uint32 in [0, 2^k), exact.

    blob: bytes or any contiguous buffer (bytearray, memoryview, uint8 ndarray).
    Raises ValueError naming the expected size if the blob has the wrong length.
    Vectorised: for each position j in a group, an unaligned strided little-endian uint64 view
    starting at that value's first byte, shifted and masked (all groups at once).
    """
    k = check_bits(modulus_bits)
    d = int(dimension)
    raw = np.frombuffer(blob, dtype=np.uint8) if not isinstance(blob, np.ndarray) else blob.reshape(-1).view(np.uint8)
    expected = packed_size(d, k)
    if raw.size != expected:
        raise ValueError(f"packed ring vector has {raw.size} bytes, expected {expected} "
                         f"({d} values of {k} bits)")
    if k in (8, 16, 32) or d == 0:
        return raw.view(f"<u{k // 8}").astype(RING_DTYPE) if d else np.zeros(0, dtype=RING_DTYPE)
    g = 8 // math.gcd(k, 8)  # values per group: the fewest whose k-bit codes end on a byte boundary
    group_bytes = g * k // 8
    m = -(-d // g)
    padded = np.zeros(m * group_bytes + 8, dtype=np.uint8)  # + 8: the last 64-bit read stays inside
    padded[:expected] = raw
    out = np.empty((m, g), dtype=RING_DTYPE)
    mask = np.uint64((1 << k) - 1)
    for j in range(g):
        offset, shift = divmod(j * k, 8)
        words = np.ndarray((m,), dtype="<u8", buffer=padded, offset=offset, strides=(group_bytes,))
        out[:, j] = (words >> np.uint64(shift)) & mask
    return out.reshape(-1)[:d]


def as_ring_vector(y, modulus_bits: int, dimension: int) -> np.ndarray:
    """A masked input as received -> (d,) uint32 in the ring (the server's side of the wire format).

    y: the `pack_ring` payload (bytes-like, or a uint8 ndarray as Flower's Array returns it),
    which is unpacked; or a (d,) array of another unsigned integer dtype (the ring values
    themselves, in memory), returned as uint32 (no copy if it already is; values are taken
    mod 2^32, the ring mod 2^k). Raises ValueError for a payload of the wrong length or an
    array of the wrong shape or dtype.
    """
    if isinstance(y, (bytes, bytearray, memoryview)) or (isinstance(y, np.ndarray) and y.dtype == np.uint8):
        return unpack_ring(y, modulus_bits, dimension)
    y = np.asarray(y)
    if y.shape != (int(dimension),):
        raise ValueError(f"shape {y.shape}, expected ({dimension},)")
    if y.dtype.kind != "u":
        raise ValueError(f"dtype {y.dtype}: expected packed bytes (uint8) or unsigned ring values")
    return y.astype(RING_DTYPE, copy=False)
