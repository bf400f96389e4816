"""Cryptographic primitives of fedpriv's SecAgg+, all from `cryptography` (hazmat layer).

| purpose                    | primitive                                  | parameters                       |
|----------------------------|--------------------------------------------|----------------------------------|
| key agreement              | X25519 (RFC 7748)                          | 32-byte keys                     |
| key derivation             | HKDF-SHA256 (RFC 5869)                     | 32-byte output, info names use   |
| share transport            | AES-256-GCM (NIST SP 800-38D)              | 12-byte random nonce, 16-byte tag, AAD binds sender/receiver/round |
| mask expansion (PRG)       | ChaCha20 keystream (RFC 8439)              | 32-byte seed as key, zero nonce (each seed is used once), read as little-endian uint32 words |

Every derived key names its purpose and the round in its HKDF `info`, so a key is never
reused across purposes or rounds.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PrivateFormat, PublicFormat, NoEncryption

from .ring import RING_DTYPE, check_bits, reduce_

PROTOCOL_LABEL = b"fedpriv-secagg+/v1"
NONCE_BYTES = 12  # AES-GCM nonce


class SecAggCryptoError(ValueError):
    """A ciphertext failed authentication or a key is malformed (the message names the party)."""


def new_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw bytes: (private 32 B, public 32 B)."""
    sk = X25519PrivateKey.generate()
    return (
        sk.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
        sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
    )


def agree(private_raw: bytes, peer_public_raw: bytes, purpose: bytes, round_id: bytes) -> bytes:
    """32-byte key from X25519(private, peer public) through HKDF-SHA256.

    purpose: b"share-transport" or b"pairwise-mask"; round_id binds the key to one round.
    Raises SecAggCryptoError for a malformed key.
    """
    try:
        shared = X25519PrivateKey.from_private_bytes(private_raw).exchange(X25519PublicKey.from_public_bytes(peer_public_raw))
    except ValueError as err:
        raise SecAggCryptoError(f"malformed X25519 key: {err}") from err
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=PROTOCOL_LABEL + b"/" + purpose + b"/" + round_id).derive(shared)


def encrypt(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """AES-256-GCM: nonce (12 B) || ciphertext || tag (16 B)."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def decrypt(key: bytes, blob: bytes, associated_data: bytes, sender: str) -> bytes:
    """Inverse of `encrypt`. Raises SecAggCryptoError naming `sender` if the blob was altered."""
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated_data)
    except (InvalidTag, ValueError) as err:
        raise SecAggCryptoError(f"encrypted share from {sender} failed authentication (tampered or wrong key)") from err


def prg_mask(seed: bytes, length: int, modulus_bits: int, out: np.ndarray | None = None) -> np.ndarray:
    """(length,) uint32 uniform over Z_(2^modulus_bits), expanded from a 32-byte seed with ChaCha20.

    One ChaCha20 keystream (RFC 8439: key = seed, all-zero 16-byte counter+nonce) of
    4 * length bytes, read directly as little-endian 32-bit words, each ANDed down to its low
    k bits when k < 32: a uniform word's low k bits are uniform on Z_(2^k), so the mask is
    exactly uniform (no modular bias). This is the PRG of Bonawitz et al. (CCS 2017)
    and Bell et al. (CCS 2020) for both the self mask b_u and the pairwise masks s_uv.
    Each seed is fresh per round (derived with the round in HKDF info, or random), so the
    fixed all-zero nonce never repeats under one key.

    out: optional (length,) C-contiguous uint32 array to write into (no allocation; the
    server reuses one buffer for all its mask expansions); returned.
    Raises ValueError for modulus_bits outside [1, 32] or an `out` of the wrong shape/dtype.
    """
    k = check_bits(modulus_bits)
    if out is None:
        out = np.empty(length, dtype=RING_DTYPE)
    elif out.dtype != RING_DTYPE or out.shape != (length,) or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous ({length},) uint32 array, got {out.shape} {out.dtype}")
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    encryptor.update_into(bytes(4 * length), out.view(np.uint8))  # keystream XOR 0 = keystream
    if sys.byteorder != "little":  # the words are defined as little-endian
        out.byteswap(inplace=True)
    return reduce_(out, k)
