"""Shamir sharing over GF(2^521 - 1): shares checked against an independent polynomial
evaluation, reconstruction from any t of n, refusal below t and of mixed shares."""

import itertools
import os

import pytest

from privacy.secagg import sharing
from privacy.secagg.sharing import PRIME, SHARE_BYTES, ReconstructionError, combine_shares, split_secret


def test_the_prime_is_m521_and_holds_any_32_byte_secret():
    assert PRIME == (1 << 521) - 1 and PRIME > 1 << 256 and SHARE_BYTES * 8 >= 521
    assert pow(3, PRIME - 1, PRIME) == 1  # Fermat witness (M521 is a known Mersenne prime)


def test_shares_are_the_polynomial_evaluated_at_their_index(monkeypatch):
    coefficients = iter([11, 22, 33])
    monkeypatch.setattr(sharing.secrets, "randbelow", lambda _: next(coefficients))
    secret = bytes(range(32))
    s = int.from_bytes(secret, "big")
    shares = split_secret(secret, 4, 6)
    for x, share in shares:
        expected = (s + 11 * x + 22 * x**2 + 33 * x**3) % ((1 << 521) - 1)
        assert int.from_bytes(share, "big") == expected


def test_any_t_of_n_shares_rebuild_the_secret_and_fewer_do_not():
    secret = os.urandom(32)
    shares = split_secret(secret, 3, 6)
    for subset in itertools.combinations(shares, 3):
        assert combine_shares(list(subset), 3) == secret
    assert combine_shares(shares, 3) == secret
    with pytest.raises(ReconstructionError, match="2 shares received, 3 needed"):
        combine_shares(shares[:2], 3)
    with pytest.raises(ReconstructionError, match="2 shares received"):
        combine_shares([shares[0], shares[0], shares[1]], 3)  # a repeated index counts once


def test_shares_of_two_secrets_do_not_combine_into_a_secret():
    a, b = split_secret(os.urandom(32), 3, 5), split_secret(os.urandom(32), 3, 5)
    with pytest.raises(ReconstructionError, match="inconsistent shares"):
        combine_shares([a[0], a[1], b[2]], 3)
    with pytest.raises(ReconstructionError, match="malformed share"):
        combine_shares([(1, b"\0" * 32), *a[1:]], 3)


def test_large_neighbourhoods_share_and_rebuild():
    secret = os.urandom(32)
    shares = split_secret(secret, 80, 119)  # the bounds' parameters at 200 nodes
    assert combine_shares(shares[39:], 80) == secret
