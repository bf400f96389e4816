"""Secret randomness on the node: every draw that DP or SecAgg+ rests on (DESIGN 3).

DP-SGD's Gaussian noise and Poisson sampling, the client-level noise and the stochastic
rounding of SecAgg+ all come from a `SecretRandom`: a ChaCha20 keystream (RFC 8439, from
`cryptography`) keyed by 32 bytes of OS entropy (`os.urandom`) drawn when the node builds
it, fresh per process and never written anywhere. Nothing the coordinator sends (run-config
`seed`, round, node name) enters the key, so a coordinator that knows every record but one
cannot replay a node's training and match its release (the attack of issue 12, item 1).

Why not torch's or numpy's generators: both are seeded PRNGs (Mersenne Twister, PCG64)
whose state can be recovered from outputs, and Opacus's `secure_mode` needs `torchcsprng`,
which no longer builds for current torch (DESIGN 9).

Gaussian samples: Box-Muller over 53-bit uniforms in float64, and, against the
floating-point attacks on Gaussian samplers (Mironov 2012 for Laplace; Jin et al. 2022 and
Holohan & Braghin 2021 for Gaussians), the same mitigation as Opacus's secure mode: each
value is the sum of 4 independent N(0, std^2) draws divided by 2 (Holohan & Braghin,
"Secure Random Sampling in Differential Privacy", ESORICS 2021, sec. 5.1, n = 2), so the
set of reachable floats no longer reveals which value was added. An exact discrete sampler
(Canonne, Kamath, Steinke 2020) would close the float gap entirely; it is not used here.

A fixed `key` (32 bytes) makes a generator reproducible: only tests and the simulation-only
`reproducible` switch use one (deployed nodes refuse runs that ask for it). The key is
re-drawn from OS entropy if the process forks, so two processes never share a stream.
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

KEY_BYTES = 32  # ChaCha20 key
_UNIT = 2.0**-53  # a 53-bit integer times this is a double in [0, 1)


class SecretRandom:
    """Uniform, Bernoulli and Gaussian draws from a ChaCha20 keystream keyed by OS entropy.

    Each call takes a fresh 96-bit nonce (a call counter) with the block counter starting at
    0, so no keystream block is ever used twice under one key; one call may draw up to
    2^32 blocks (256 GiB). Raises ValueError for a key that is not 32 bytes.
    """

    def __init__(self, key: bytes | None = None) -> None:
        if key is not None and len(key) != KEY_BYTES:
            raise ValueError(f"key must be {KEY_BYTES} bytes, got {len(key)}")
        self._key = key if key is not None else os.urandom(KEY_BYTES)
        self._calls = 0
        self._pid = os.getpid()

    @classmethod
    def reproducible(cls, *labels: str) -> SecretRandom:
        """A generator keyed by SHA-256 of `labels`: for simulations that ask for reproducible
        noise (`fedpriv simulate --reproducible-noise`) and tests, never for a deployed node."""
        material = "\0".join(("fedpriv/reproducible-noise/v1", *labels)).encode()
        return cls(key=hashlib.sha256(material).digest())

    def _words(self, count: int) -> np.ndarray:
        """(count,) uint64 words of fresh keystream."""
        if os.getpid() != self._pid:  # forked: never share a stream with the parent
            self._key, self._calls, self._pid = os.urandom(KEY_BYTES), 0, os.getpid()
        nonce = b"\0\0\0\0" + self._calls.to_bytes(12, "little")  # block counter 0, then a 96-bit nonce
        self._calls += 1
        encryptor = Cipher(algorithms.ChaCha20(self._key, nonce), mode=None).encryptor()
        return np.frombuffer(encryptor.update(bytes(8 * count)), dtype="<u8")

    def _uniform(self, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(count,) float64 tensor uniform on [0, 1): the top 53 bits of each word times 2^-53."""
        words = torch.from_numpy(self._words(count).view(np.int64).copy()).to(device)
        # >> on int64 sign-extends; the mask keeps exactly bits 11..63 of the unsigned word.
        return ((words >> 11) & ((1 << 53) - 1)).to(torch.float64).mul_(_UNIT)

    def _standard_normal(self, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(count,) float64 N(0, 1) by Box-Muller (both outputs of each pair are used)."""
        pairs = (count + 1) // 2
        u = self._uniform(2 * pairs, device)
        radius = torch.sqrt(-2.0 * torch.log1p(-u[:pairs]))  # log(1 - u), 1 - u in (0, 1]: finite
        angle = (2.0 * math.pi) * u[pairs:]
        return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:count]

    def _gaussian(self, count: int, std: float, device: torch.device | str = "cpu") -> torch.Tensor:
        if std < 0 or not math.isfinite(std):
            raise ValueError(f"std must be finite and >= 0, got {std}")
        if std == 0:
            return torch.zeros(count, dtype=torch.float64, device=device)
        return self._standard_normal(4 * count, device).view(4, count).sum(0).mul_(std / 2.0)

    def uniform(self, count: int) -> np.ndarray:
        """(count,) float64 uniform on [0, 1), multiples of 2^-53: the same values as the
        torch path (`_uniform`), computed in numpy (no torch round trip: faster for SecAgg+'s
        stochastic rounding of a 1M-coordinate update)."""
        # Below 2^53 after the shift: exact as int64, whose float conversion is vectorised (uint64's is not).
        return (self._words(count) >> np.uint64(11)).view(np.int64).astype(np.float64) * _UNIT

    def bernoulli(self, count: int, p: float) -> np.ndarray:
        """(count,) bool, each True independently with probability `p` (to 2^-53)."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {p}")
        return self.uniform(count) < p

    def standard_normal(self, count: int) -> np.ndarray:
        """(count,) float64 N(0, 1) by Box-Muller, without the float-attack mitigation (tests, building blocks)."""
        return self._standard_normal(count).numpy()

    def gaussian(self, count: int, std: float) -> np.ndarray:
        """(count,) float64 N(0, std^2), float-attack mitigated: (sum of 4 draws of std) / 2.

        Raises ValueError for a negative or non-finite std.
        """
        return self._gaussian(count, std).numpy()

    def gaussian_like(self, reference: torch.Tensor, std: float) -> torch.Tensor:
        """N(0, std^2) noise (mitigated as `gaussian`) of `reference`'s shape, dtype and device.

        The keystream is made on the CPU; the Box-Muller arithmetic runs on `reference`'s device.
        """
        noise = self._gaussian(reference.numel(), std, reference.device)
        return noise.view(reference.shape).to(reference.dtype)
