"""Shamir t-out-of-n secret sharing of 32-byte secrets over GF(p), p = 2^521 - 1 (Shamir 1979).

The field is the Mersenne prime M521, large enough to hold a 256-bit secret whole; shares
are 66-byte big-endian field elements and share index i (1-based) goes to the i-th member
of the owner's neighbourhood. Arithmetic is Python's arbitrary-precision integers (C), not
GF(2^128) elements in Python: pycryptodome's `Shamir`, used before, took 0.6 s per node to
split its two secrets into 119 shares of threshold 80 (the bounds' parameters at 200
nodes) and 0.6 s per secret the server rebuilds; this module takes 3 ms and 0.1 ms
(measured here, one core). Coefficients come from `secrets`
(the OS's CSPRNG); Lagrange coefficients at 0 are cached per set of share indices, the
same set for most owners of a round.
"""

from __future__ import annotations

import secrets
from functools import lru_cache

SECRET_BYTES = 32
PRIME = 2**521 - 1  # M521, a Mersenne prime > 2^256
SHARE_BYTES = 66  # ceil(521 / 8)


class ReconstructionError(ValueError):
    """Too few (or inconsistent) shares to reconstruct a secret."""


def split_secret(secret: bytes, threshold: int, num_shares: int) -> list[tuple[int, bytes]]:
    """`num_shares` shares (index 1..n, 66-byte share) of which any `threshold` rebuild `secret`.

    Raises ValueError for a secret that is not 32 bytes or 1 <= threshold <= num_shares failing.
    """
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= num_shares:
        raise ValueError(f"need 1 <= threshold <= num_shares, got {threshold}, {num_shares}")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, num_shares + 1):
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares.append((x, y.to_bytes(SHARE_BYTES, "big")))
    return shares


@lru_cache(maxsize=64)
def _lagrange_at_zero(indices: tuple[int, ...]) -> tuple[int, ...]:
    weights = []
    for j, xj in enumerate(indices):
        num, den = 1, 1
        for m, xm in enumerate(indices):
            if m != j:
                num = num * -xm % PRIME
                den = den * (xj - xm) % PRIME
        weights.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(weights)


def combine_shares(shares: list[tuple[int, bytes]], threshold: int) -> bytes:
    """The secret from at least `threshold` distinct shares (the lowest indices are used).

    Raises ReconstructionError for too few shares, a malformed share, or shares that do not
    interpolate to a 32-byte secret (shares of different secrets).
    """
    distinct = {}
    for i, s in shares:
        if not 1 <= int(i) < PRIME or len(s) != SHARE_BYTES or int.from_bytes(s, "big") >= PRIME:
            raise ReconstructionError(f"malformed share (index {i}, {len(s)} bytes)")
        distinct[int(i)] = int.from_bytes(s, "big")
    if len(distinct) < threshold:
        raise ReconstructionError(f"{len(distinct)} shares received, {threshold} needed")
    chosen = sorted(distinct)[:threshold]
    secret = sum(w * distinct[x] for w, x in zip(_lagrange_at_zero(tuple(chosen)), chosen)) % PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise ReconstructionError("the shares do not interpolate to a 32-byte secret (inconsistent shares)")
    return secret.to_bytes(SECRET_BYTES, "big")
