"""Client-side encoding of a model delta for secure aggregation, with distributed DP.

Pipeline per client (DESIGN 4.2 and 5), for a flattened delta x of d float32 values:
1. clip to L2 norm C:                      x <- x * min(1, C / ||x||_2)
2. add Gaussian noise (distributed DP):    x <- x + N(0, (sigma * C)^2 / n_min) per coordinate,
   so any n_min honest survivors carry total noise std >= sigma * C on the sum (the server
   sets n_min = t - colluding nodes: colluders know, and can subtract, their own noise);
   drawn, like the rounding of step 4, from the node's secret entropy;
3. clamp each coordinate to [-B, B], B = C + 8 * sigma * C / sqrt(n_min) (a Gaussian passes 8
   standard deviations with probability < 1.3e-15 per coordinate; the clamp makes the no-wrap
   bound hold always rather than with high probability);
4. stochastic rounding to the grid 1/scale: an unbiased integer z with |z - x*scale| < 1;
5. map to Z_(2^k): z mod 2^k, with k chosen so that |sum of n clients| * 2 < 2^k.

Decoding the modular sum: values >= 2^(k-1) are negative; divide by scale.

Error bound of the decoded sum of n clients, per coordinate: |sum_dec - sum(x_clamped)| < n / scale
(each stochastic rounding moves a value by less than one grid step).

Mechanism gap, stated plainly: steps 3-5 make the released sum a clamped, discretised
Gaussian sum rather than the continuous Gaussian the accountant assumes. Kairouz, Liu and
Steinke (ICML 2021, "The Distributed Discrete Gaussian Mechanism") give the exact analysis;
with scale >= 2^16 per unit of C and the 8-sigma clamp the difference is far below the
accountant's own slack, but it is not zero and is not yet accounted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from privacy.secret_randomness import SecretRandom


@dataclass(frozen=True)
class EncodingParams:
    """Parameters every client and the server agree on for one round.

    clip_norm C (L2, model units); noise_multiplier sigma (0 = no client-level DP noise);
    min_clients n_min (noise is split so that any n_min honest clients carry sigma*C); scale: grid
    points per model unit; max_clients: the most clients whose sum must not wrap.
    """

    clip_norm: float
    noise_multiplier: float
    min_clients: int
    scale: float
    max_clients: int

    @property
    def noise_std(self) -> float:
        """Per-client noise std per coordinate: sigma * C / sqrt(n_min)."""
        return self.noise_multiplier * self.clip_norm / math.sqrt(self.min_clients)

    @property
    def clamp(self) -> float:
        """B: each coordinate is clamped to [-B, B] before quantisation."""
        return self.clip_norm + 8.0 * self.noise_std

    @property
    def modulus_bits(self) -> int:
        """k such that the sum of max_clients values in [-(B*scale+1), B*scale+1] never wraps."""
        bound = self.max_clients * (math.ceil(self.clamp * self.scale) + 1)
        k = math.ceil(math.log2(2 * bound + 1)) + 1
        if k > 62:
            raise ValueError(f"modulus would need {k} bits (> 62): lower the scale or the number of clients")
        return k


def default_scale(clip_norm: float, dimension: int) -> float:
    """Grid points per model unit: 2^16 per unit of C / sqrt(d) (a typical coordinate's size)."""
    return float(2**16) * math.sqrt(dimension) / clip_norm


def clip_l2(x: np.ndarray, clip_norm: float) -> np.ndarray:
    """x scaled down (never up) to L2 norm <= clip_norm."""
    norm = float(np.linalg.norm(x))
    return x * min(1.0, clip_norm / norm) if norm > 0 else x.copy()


def encode(x: np.ndarray, params: EncodingParams, randomness: SecretRandom) -> np.ndarray:
    """Steps 1-5 of the module docstring: float (d,) delta -> (d,) uint64 in Z_(2^k).

    randomness: the node's secret source of the noise (step 2) and the rounding (step 4);
    a server that knows the run's seed and the node's name cannot regenerate either.
    Raises ValueError for a non-finite delta (it would poison the sum).
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    if not np.isfinite(x).all():
        raise ValueError("model delta has NaN/Inf values; refusing to encode it")
    x = clip_l2(x, params.clip_norm)
    if params.noise_multiplier > 0:
        x = x + randomness.gaussian(x.size, params.noise_std)
    x = np.clip(x, -params.clamp, params.clamp) * params.scale
    floor = np.floor(x)
    z = floor + (randomness.uniform(x.size) < (x - floor))  # unbiased stochastic rounding
    return to_ring(z.astype(np.int64), params.modulus_bits)


def to_ring(z: np.ndarray, modulus_bits: int) -> np.ndarray:
    """Signed int64 -> uint64 residues mod 2^k."""
    return z.astype(np.uint64) & np.uint64((1 << modulus_bits) - 1)


def decode_sum(total: np.ndarray, params: EncodingParams) -> np.ndarray:
    """Modular sum (uint64 in Z_(2^k)) -> float64 sum of the clients' clamped, noised deltas."""
    k = params.modulus_bits
    signed = total.astype(np.int64)
    signed = np.where(signed >= (1 << (k - 1)), signed - (1 << k), signed)
    return signed.astype(np.float64) / params.scale
