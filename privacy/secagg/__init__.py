"""Secure aggregation: SecAgg+ (Bell et al. 2020) with distributed client-level DP.

- `primitives`: X25519, HKDF-SHA256, AES-GCM, ChaCha20 PRG (all from `cryptography`).
- `sharing`: Shamir t-of-n sharing of 32-byte secrets over GF(2^521 - 1).
- `encoding`: clip, distributed Gaussian noise, stochastic rounding into Z_(2^k); the grid (scale).
- `ring`: Z_(2^k), k <= 32, in uint32: reduction, negation, sign decoding, k-bit wire packing.
- `parameters`: k and t from Bell et al.'s bounds; `identity`: Ed25519 node signing keys.
- `protocol`: the client and server state machines, stage by stage.
- `local_round`: one round in memory (tests, benchmarks).

The Flower Message API stages are `client/secure_aggregation.py` (the node) and
`server/secure_aggregation.py` (the coordinator).
"""

from .encoding import EncodingParams, decode_sum, default_scale, encode
from .primitives import SecAggCryptoError
from .protocol import RoundSetup, SecAggAbort, SecAggClient, SecAggServer

__all__ = [
    "EncodingParams", "decode_sum", "default_scale", "encode", "SecAggCryptoError",
    "RoundSetup", "SecAggAbort", "SecAggClient", "SecAggServer",
]
