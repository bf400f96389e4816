"""Shamir t-out-of-n secret sharing of 32-byte secrets (Shamir 1979).

Uses pycryptodome's reviewed `Crypto.Protocol.SecretSharing.Shamir`, which shares 16-byte
secrets over GF(2^128); a 32-byte secret is shared as two independent halves with the same
share indices. Share index i (1-based) goes to the i-th member of the owner's neighbourhood.
"""

from __future__ import annotations

from Crypto.Protocol.SecretSharing import Shamir

SECRET_BYTES = 32


class ReconstructionError(ValueError):
    """Too few (or inconsistent) shares to reconstruct a secret."""


def split_secret(secret: bytes, threshold: int, num_shares: int) -> list[tuple[int, bytes]]:
    """`num_shares` shares (index 1..n, 32-byte share) of which any `threshold` rebuild `secret`."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= num_shares:
        raise ValueError(f"need 1 <= threshold <= num_shares, got {threshold}, {num_shares}")
    low = Shamir.split(threshold, num_shares, secret[:16])
    high = Shamir.split(threshold, num_shares, secret[16:])
    return [(i, a + b) for (i, a), (j, b) in zip(low, high) if i == j]


def combine_shares(shares: list[tuple[int, bytes]], threshold: int) -> bytes:
    """The secret from at least `threshold` distinct shares. Raises ReconstructionError otherwise."""
    distinct = {i: s for i, s in shares}
    if len(distinct) < threshold:
        raise ReconstructionError(f"{len(distinct)} shares received, {threshold} needed")
    chosen = sorted(distinct.items())[:threshold]
    low = Shamir.combine([(i, s[:16]) for i, s in chosen])
    high = Shamir.combine([(i, s[16:]) for i, s in chosen])
    return low + high
