"""Client-side encoding of a model delta for secure aggregation, with distributed DP.

Pipeline per client (DESIGN 4.2 and 5), for a flattened delta x of d float values (the
floating-point tensors of the model only, see `summed_keys`):
1. clip to L2 norm C:                      x <- x * min(1, C / ||x||_2)
1b. weight by record count (issue 14; only without client-level noise, see `weight`):
                                           x <- x * min(1, n / W)
   for the node's n training records (its public `num-examples`) and the round's weight cap W
   (the most records any node reported before); the server divides the sum by the survivors'
   sum of weights, so the mean is FedAvg's record-weighted one (McMahan et al. 2017) whenever
   W >= every n. The weight is <= 1: the clamp and no-wrap bounds below hold unchanged, and it
   is post-processing of the node's DP-SGD output with public values (no privacy cost);
2. add Gaussian noise (distributed DP):    x <- x + N(0, (sigma * C)^2 / n_min) per coordinate,
   so any n_min honest survivors carry total noise std >= sigma * C on the sum (the server
   sets n_min = t - colluding nodes: colluders know, and can subtract, their own noise);
   drawn, like the rounding of step 4, from the node's secret entropy;
3. clamp each coordinate to [-B, B], B = C + 8 * sigma * C / sqrt(n_min) (a Gaussian passes 8
   standard deviations with probability < 1.3e-15 per coordinate; the clamp makes the no-wrap
   bound hold always rather than with high probability);
4. stochastic rounding to the grid 1/scale: an unbiased integer z with |z - x*scale| < 1,
   so |z| <= Z = ceil(B * scale);
5. map to the ring Z_(2^k), k <= 32, held in uint32 (`privacy.secagg.ring`): z mod 2^k, with
   k the smallest width such that n * Z <= 2^(k-1) - 1 for n = max_clients (the sum of any
   max_clients encodings, even all at +B or all at -B, never wraps).

Decoding the modular sum: values >= 2^(k-1) are negative; divide by scale.

Error of the decoded sum of n clients, per coordinate: |sum_dec - sum(x_clamped)| < n / scale
(each stochastic rounding moves a value by less than one grid step); the rounding is
unbiased, so the error has mean 0 and, the clients' roundings being independent, standard
deviation <= sqrt(n) / (2 * scale) (each rounding's variance is <= 1/4 grid step^2).

Choosing the grid (`default_scale`, what the server sends as `scale`): the ring width k is
the wire width (Bonawitz et al., CCS 2017, and Bell et al., CCS 2020, send k bits
per coordinate; masked values are uniform on Z_(2^k), so no code is shorter), so the scale
buys precision with bytes. The server asks for a precision, `precision_bits` q (default 16):
the standard deviation of the quantisation error of the released MEAN (sum / n) per
coordinate at most 2^-q times C / sqrt(d), a typical coordinate of an update at the clip
norm. That fixes a minimum scale 2^(q-1) sqrt(d) / (C sqrt(n)); k is the smallest width that
holds it (capped at 32), and the scale is then raised to the largest that still fits in
that k (`ring_scale`), so no bit of the chosen width is wasted. With client-level noise,
B > C costs log2(B / C) more bits for the same precision.

Figures for the shipped benchmark (`benchmarks/secagg_round.py`: d = 10^6 parameters,
C = 10, sigma = 0, so B = 10 and a typical coordinate C/sqrt(d) = 0.01), at q = 12:

| nodes n | k  | bytes vs float32 | scale /unit | sum: bound n/scale | mean: bound 1/scale | mean: std 1/(2 scale sqrt(n)) |
|---------|----|------------------|-------------|--------------------|---------------------|-------------------------------|
| 10      | 24 | 0.750x           | 83 886      | 1.2e-4             | 1.2e-5              | 1.9e-6                        |
| 100     | 26 | 0.812x           | 33 554      | 3.0e-3             | 3.0e-5              | 1.5e-6                        |
| 200     | 26 | 0.812x           | 16 777      | 1.2e-2             | 6.0e-5              | 2.1e-6                        |

The default q = 16 gives k = 28 / 30 / 30, 0.875-0.94x, errors 16x smaller: the precision
is relative to C, and with C far above the real update norms (run-config `clip-norm` 1000
"never binds", update norms of 7-50 in the shipped runs) the error relative to the real
update grows by C / ||x||, up to about 3% RMS of a coordinate at q = 12 and 0.2% at 16.
Past 32 bits (large n, or large B / C) the width stays at 32 and the scale shrinks as
2^31 / (n B): precision degrades but the sum never wraps. A `scale` that would need more
than 32 bits is refused (`EncodingParams.modulus_bits` raises ValueError): there is no
uint64 fallback; pick the scale with `default_scale` / `EncodingParams.fitted`.

Mechanism gap, stated plainly: steps 3-5 make the released sum a clamped, discretised
Gaussian sum rather than the continuous Gaussian the accountant assumes. Kairouz, Liu and
Steinke (ICML 2021, "The Distributed Discrete Gaussian Mechanism") give the exact analysis;
with the grid step far below the per-client noise std (with `default_scale` below 32 bits, step / std <=
sqrt(n * n_min) / (2^(q-1) * sigma * sqrt(d)): 1.5e-4 at d = 10^6, n = 1000, n_min = 1,
sigma = 0.1) and the 8-sigma clamp the difference is far below the accountant's own slack,
but it is not zero and is not yet accounted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from privacy.secret_randomness import SecretRandom

from .ring import MAX_RING_BITS, RING_DTYPE, no_wrap_bits, ring_scale, to_ring, to_signed

PRECISION_BITS = 16  # default q of `default_scale`: mean's quantisation error std <= 2^-q * C / sqrt(d)


@dataclass(frozen=True)
class EncodingParams:
    """Parameters every client and the server agree on for one round.

    clip_norm C (L2, model units); noise_multiplier sigma (0 = no client-level DP noise);
    min_clients n_min (noise is split so that any n_min honest clients carry sigma*C); scale: grid
    points per model unit; max_clients: the most clients whose sum must not wrap; weight_cap W
    (records; 0 = equal weights): each update is weighted by `weight(n)`.
    Raises ValueError for a weight cap that is negative or not finite.
    """

    clip_norm: float
    noise_multiplier: float
    min_clients: int
    scale: float
    max_clients: int
    weight_cap: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.weight_cap) and self.weight_cap >= 0):
            raise ValueError(f"weight-cap must be a finite number >= 0 (0: equal weights), got {self.weight_cap}")

    def weight(self, num_examples: float) -> float:
        """A node's weight in the secure mean, min(1, n / W), in [0, 1]; 1 (equal weights) when
        W = 0 or under client-level noise, whose calibration gives every node the same share.

        num_examples: the node's training records n, as it reports them (`num-examples`).
        Raises ValueError for n < 1 while weights are on (an update weighted 0 would vanish).
        """
        if self.weight_cap == 0 or self.noise_multiplier > 0:
            return 1.0
        if not num_examples >= 1:
            raise ValueError(f"a weighted secure mean needs the node's num-examples >= 1, got {num_examples}")
        return min(1.0, float(num_examples) / self.weight_cap)

    @property
    def noise_std(self) -> float:
        """Per-client noise std per coordinate: sigma * C / sqrt(n_min)."""
        return self.noise_multiplier * self.clip_norm / math.sqrt(self.min_clients)

    @property
    def clamp(self) -> float:
        """B: each coordinate is clamped to [-B, B] before quantisation."""
        return self.clip_norm + 8.0 * self.noise_std

    @property
    def max_abs_value(self) -> int:
        """Z = ceil(B * scale): the largest |z| one client's encoding can hold (grid points)."""
        return math.ceil(self.clamp * self.scale)

    @property
    def modulus_bits(self) -> int:
        """k: the smallest ring width in which the sum of max_clients values in [-Z, Z] never wraps.

        k = bit_length(max_clients * Z) + 1, so max_clients * Z <= 2^(k-1) - 1. Raises
        ValueError if that exceeds 32 (the ring is uint32; lower the scale, e.g. with
        `default_scale` / `EncodingParams.fitted`, which always fit).
        """
        k = no_wrap_bits(self.max_clients * self.max_abs_value)
        if k > MAX_RING_BITS:
            raise ValueError(
                f"scale {self.scale:g} needs a {k}-bit ring for {self.max_clients} clients clamped at {self.clamp:g} "
                f"(> {MAX_RING_BITS} bits): lower the scale to at most "
                f"{ring_scale(self.clamp, self.max_clients, MAX_RING_BITS):g} (default_scale picks one that fits)")
        return k

    @property
    def sum_error_bound(self) -> float:
        """max_clients / scale: the decoded sum of up to max_clients encodings is within this of
        the sum of their clamped values, per coordinate (model units; strict inequality)."""
        return self.max_clients / self.scale

    @classmethod
    def fitted(cls, clip_norm: float, noise_multiplier: float, min_clients: int, max_clients: int, dimension: int,
               precision_bits: int = PRECISION_BITS) -> EncodingParams:
        """Parameters with the scale `default_scale` picks for this clamp, max_clients and d."""
        draft = cls(clip_norm=clip_norm, noise_multiplier=noise_multiplier, min_clients=min_clients, scale=1.0,
                    max_clients=max_clients)
        return replace(draft, scale=default_scale(clip_norm, dimension, max_clients, draft.clamp, precision_bits))


def default_scale(clip_norm: float, dimension: int, max_clients: int = 1, clamp: float | None = None,
                  precision_bits: int = PRECISION_BITS) -> float:
    """Grid points per model unit for a round of up to `max_clients` clients (float > 0).

    clip_norm C and clamp B (default C: no client-level noise) in model units; dimension d:
    the number of summed coordinates. Returns the largest scale that fits the smallest ring
    width k <= 32 in which the standard deviation of the mean's quantisation error per
    coordinate, 1 / (2 scale sqrt(n)), is at most 2^-precision_bits * C / sqrt(d) (see the
    module docstring for the figures); if even k = 32 cannot give that precision, the largest
    scale that fits 32 bits. The sum of any max_clients encodings never wraps
    (Bonawitz et al., CCS 2017: inputs in Z_R with R large enough for the sum).
    Raises ValueError for a non-positive C or B, or max_clients < 1.
    """
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be a positive finite number, got {clip_norm}")
    if max_clients < 1:
        raise ValueError(f"max_clients must be >= 1, got {max_clients}")
    clamp = clip_norm if clamp is None else clamp
    target = 2.0 ** (precision_bits - 1) * math.sqrt(max(int(dimension), 1)) / (clip_norm * math.sqrt(max_clients))
    k = min(MAX_RING_BITS, no_wrap_bits(max_clients * math.ceil(clamp * target)))
    return ring_scale(clamp, max_clients, k)


def clip_l2(x: np.ndarray, clip_norm: float) -> np.ndarray:
    """x scaled down (never up) to L2 norm <= clip_norm."""
    norm = float(np.linalg.norm(x))
    return x * min(1.0, clip_norm / norm) if norm > 0 else x.copy()


def encode(x: np.ndarray, params: EncodingParams, randomness: SecretRandom, num_examples: float = 0.0) -> np.ndarray:
    """Steps 1-5 of the module docstring: float (d,) delta -> (d,) uint32 in Z_(2^k), k = params.modulus_bits.

    randomness: the node's secret source of the noise (step 2) and the rounding (step 4);
    a server that knows the run's seed and the node's name cannot regenerate either.
    num_examples: the node's training records n (step 1b; needed when params.weight_cap > 0).
    Raises ValueError for a non-finite delta (it would poison the sum), a scale whose
    ring would need more than 32 bits, or a missing n while weights are on.
    """
    k = params.modulus_bits  # raises before any work if the scale does not fit
    x = np.asarray(x, dtype=np.float64).ravel()
    if not np.isfinite(x).all():
        raise ValueError("model delta has NaN/Inf values; refusing to encode it")
    x = clip_l2(x, params.clip_norm)  # a new array: the steps below work in place, never on the caller's delta
    x *= params.weight(num_examples)  # after clipping: the weight, not the clip, sets the node's share
    if params.noise_multiplier > 0:
        x += randomness.gaussian(x.size, params.noise_std)
    np.clip(x, -params.clamp, params.clamp, out=x)
    x *= params.scale
    z = np.floor(x)
    x -= z  # the fractional part, in [0, 1)
    z += randomness.uniform(x.size) < x  # unbiased stochastic rounding: up with probability = the fraction
    return to_ring(z, k)


def decode_sum(total: np.ndarray, params: EncodingParams) -> np.ndarray:
    """Modular sum ((d,) uint32 in Z_(2^k); other unsigned dtypes are read mod 2^32) -> (d,) float64
    sum of the clients' clamped, noised deltas, in model units.

    Residues >= 2^(k-1) are the negative sums (`ring.to_signed`); then divided by the scale.
    Raises ValueError if the params' ring would need more than 32 bits.
    """
    k = params.modulus_bits
    total = np.asarray(total)
    if total.dtype != RING_DTYPE:
        total = total.astype(RING_DTYPE)  # the ring is mod 2^k, k <= 32: the low 32 bits carry it
    return to_signed(total, k).astype(np.float64) / params.scale


def summed_keys(state: Mapping) -> list[str]:
    """The keys of a model state whose values SecAgg+ sums: the floating-point tensors, in order.

    state: name -> torch.Tensor, numpy array or Flower Array (anything with a `dtype`): the
    GLOBAL model's, so that the server and every node decide alike. Integer (and bool) state, e.g. BatchNorm's num_batches_tracked,
    is left out: it keeps the global value. Such a counter depends on the size of the node's
    local data, so sending it, even masked, would spend the float weights' clip budget on it,
    and releasing it or its sum would leak data sizes outside any DP guarantee; its average
    has no meaning either.
    """
    return [key for key, value in state.items() if _is_float(value)]


def _is_float(value) -> bool:
    is_floating_point = getattr(value, "is_floating_point", None)  # torch.Tensor
    if callable(is_floating_point):
        return bool(is_floating_point())
    dtype = getattr(value, "dtype", None)  # numpy array, or Flower's Array (dtype as a string)
    return bool(np.issubdtype(np.dtype(dtype if dtype is not None else np.asarray(value).dtype), np.floating))
