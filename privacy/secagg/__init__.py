"""Secure aggregation: SecAgg+ (Bell et al. 2020) with distributed client-level DP.

- `primitives`: X25519, HKDF-SHA256, AES-GCM, ChaCha20 PRG (all from `cryptography`).
- `sharing`: Shamir t-of-n sharing of 32-byte secrets (pycryptodome).
- `encoding`: clip, distributed Gaussian noise, stochastic rounding into Z_(2^k); the grid (scale).
- `ring`: Z_(2^k), k <= 32, in uint32: reduction, negation, sign decoding, k-bit wire packing.
- `protocol`: the client and server state machines, stage by stage.
- `local_round`: one round in memory (tests, benchmarks).

Status: the protocol and encoding are complete and tested in memory; wiring them into
Flower's Message API stages (`server/`, `client/`) is the next step of issue 3.
"""

from .encoding import EncodingParams, decode_sum, default_scale, encode
from .primitives import SecAggCryptoError
from .protocol import RoundSetup, SecAggAbort, SecAggClient, SecAggServer

__all__ = [
    "EncodingParams", "decode_sum", "default_scale", "encode", "SecAggCryptoError",
    "RoundSetup", "SecAggAbort", "SecAggClient", "SecAggServer",
]
