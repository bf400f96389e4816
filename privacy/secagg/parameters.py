"""SecAgg+ neighbourhood size k and threshold t from the round's n, a corrupt and a dropout
fraction (Bell et al., CCS 2020, sec. 3.3 and 4; Bonawitz et al., CCS 2017, sec. 4 and 6).

Adversary: a server that deviates from the protocol (swaps keys, lies about who dropped,
shows nodes different survivor sets) together with up to c = floor(corrupt_fraction * n)
nodes; up to D = floor(dropout_fraction * n) honest nodes drop, at any stage, chosen by the
adversary. With the graph below, a round's parameters must give:

1. Privacy against colluders: at most t - 2 corrupt members in any honest node's
   neighbourhood N(u): t - 1 would rebuild u's secrets, and a node that sees t survivors in
   N(u) (itself included, the check each node makes) then knows one of them is honest.
2. No isolation: the honest survivors stay connected in the graph (an honest survivor whose
   neighbours are all corrupt or dropped carries no mask the server cannot remove; a split
   graph reveals the sum of each part).
3. Consistency (the malicious variant): 2t > k + c_N, where c_N bounds the corrupt members of
   a neighbourhood, so two different survivor sets shown to honest nodes cannot each gather t
   signatures; with honest nodes revealing one share kind per owner, the server never holds
   t shares of both kinds for one owner.
4. Liveness: at least t members of every survivor's neighbourhood survive (k - D >= t in
   the worst case), else the round aborts; an abort is safe, not a breach.

The complete graph (k = n) meets 1-3 deterministically when t >= c + 2 and 2t > n + c; fedpriv
uses it whenever a sparse graph does not need fewer than n members, which at the corrupt
fractions a hospital federation assumes (0.1-0.33) is every n up to several hundred
(cross-silo). A sparse graph is the ring (Harary graph H(k-1, n)) over a seeded
permutation: its members' corrupt count is hypergeometric, bounded by the binomial tail
(Hoeffding 1963); the ring is (k-1)-connected, so condition 2 fails only if two arcs of
(k-1)/2 consecutive members are all corrupt or dropped. Each bound is a union bound held
below 2^-security_bits (conditions 1-3) and 2^-correctness_bits (condition 4), Bell et
al.'s sigma = 40 and eta = 20.

Assumption stated for the sparse graph only: the permutation is random with respect to the
corrupt set; a server that grinds graph seeds could bias it. Rounds on the complete graph
carry no such assumption.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

SECURITY_BITS = 40
CORRECTNESS_BITS = 20
DEFAULT_CORRUPT_FRACTION = 0.2
DEFAULT_DROPOUT_FRACTION = 0.2


class SecAggParameterError(ValueError):
    """No (k, t) meets the bounds, or given (k, t) fall below them (the message says which)."""


@dataclass(frozen=True)
class SecAggParameters:
    """One round's graph and threshold, and the adversary they were sized for.

    num_shares k: neighbourhood size, self included (k = n: the complete graph).
    threshold t: shares that rebuild a secret. corrupt c / dropouts D: node counts assumed.
    """

    nodes: int
    num_shares: int
    threshold: int
    corrupt: int
    dropouts: int

    @property
    def complete(self) -> bool:
        """True when every node shares with every other node."""
        return self.num_shares >= self.nodes


def _binomial_tail(n: int, p: float, at_least: int) -> float:
    """P[Binomial(n, p) >= at_least], summed in log space (no overflow for large n)."""
    if at_least <= 0:
        return 1.0
    if at_least > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    return math.fsum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q)
                     for i in range(at_least, n + 1))


def complete_threshold(n: int, c: int) -> int:
    """The least t for the complete graph of n nodes, c of them corrupt.

    t >= c + 2: a node that sees t survivors (itself included) knows one other is honest,
    so its update is summed with at least one it cannot remove (conditions 1, 2);
    2t > n + c: condition 3.
    """
    return max(c + 2, (n + c) // 2 + 1)


def _complete(n: int, c: int, d: int) -> SecAggParameters | None:
    t = complete_threshold(n, c)
    return SecAggParameters(n, n, t, c, d) if t <= n - d else None


def _sparse(n: int, k: int, c: int, d: int, security_bits: int, correctness_bits: int) -> SecAggParameters | None:
    """The smallest t for which the ring of neighbourhood size k (odd) meets conditions 1-4.

    Dropouts count as the adversary's choice for privacy (a lying server can call any honest
    node dropped) and as random for liveness (an adversary can always abort a round).
    """
    p = (k - 1) / (n - 1)
    fail = 2.0 ** -security_bits / 2  # two union bounds share the budget
    # c_N: a node has more corrupt neighbours with probability <= fail / n
    c_n = next((x for x in range(k) if n * _binomial_tail(c, p, x + 1) <= fail), None)
    if c_n is None:
        return None
    t = complete_threshold(k, c_n)  # the complete graph's rule, within one neighbourhood
    if t > k:
        return None
    if n * _binomial_tail(d, p, k - t + 1) > 2.0 ** -correctness_bits:
        return None
    # isolation: the ring (h = (k-1)/2 a side) splits only where two arcs of h consecutive
    # members are all corrupt or dropped; the adversary drops up to d, so an arc pair needs
    # 2h - d corrupt members (a hypergeometric count, bounded by the binomial tail)
    h = (k - 1) // 2
    if 2 * h <= d or n * n * _binomial_tail(2 * h, c / n, 2 * h - d) > fail:
        return None
    return SecAggParameters(n, k, t, c, d)


@lru_cache(maxsize=256)
def choose_parameters(nodes: int, corrupt_fraction: float = DEFAULT_CORRUPT_FRACTION,
                      dropout_fraction: float = DEFAULT_DROPOUT_FRACTION, security_bits: int = SECURITY_BITS,
                      correctness_bits: int = CORRECTNESS_BITS) -> SecAggParameters:
    """The sparsest graph (smallest k, then smallest t) that meets the module's conditions.

    nodes: the round's n (>= 2). Fractions in [0, 1). Returns the complete graph whenever no
    sparse k < n qualifies. Raises SecAggParameterError when even the complete graph cannot
    be both secure and live (n - D < max(c + 1, floor((n + c) / 2) + 1)).
    """
    if nodes < 2:
        raise SecAggParameterError(f"secure aggregation needs at least 2 nodes, got {nodes}")
    for name, value in (("corrupt fraction", corrupt_fraction), ("dropout fraction", dropout_fraction)):
        if not 0.0 <= value < 1.0:
            raise SecAggParameterError(f"{name} must be in [0, 1), got {value}")
    c, d = math.floor(corrupt_fraction * nodes), math.floor(dropout_fraction * nodes)
    for k in range(3, nodes, 2):  # odd sizes: the ring takes (k - 1) / 2 neighbours a side
        found = _sparse(nodes, k, c, d, security_bits, correctness_bits)
        if found is not None:
            return found
    found = _complete(nodes, c, d)
    if found is None:
        t = complete_threshold(nodes, c)
        raise SecAggParameterError(
            f"{nodes} nodes with up to {c} corrupt (corrupt fraction {corrupt_fraction:g}) and {d} dropping "
            f"(dropout fraction {dropout_fraction:g}): a secure threshold is t >= {t}, but only {nodes - d} nodes "
            "are sure to survive; lower the corrupt or dropout fraction, or add nodes")
    return found


def check_parameters(nodes: int, num_shares: int, threshold: int, corrupt_fraction: float = DEFAULT_CORRUPT_FRACTION,
                     dropout_fraction: float = DEFAULT_DROPOUT_FRACTION) -> SecAggParameters:
    """Given (k, t) for n nodes, the parameters if they meet the bounds; else SecAggParameterError.

    A k of n or more means the complete graph. Explicit settings are held to the same
    conditions as chosen ones: settings below the bound are refused, never used.
    """
    c, d = math.floor(corrupt_fraction * nodes), math.floor(dropout_fraction * nodes)
    k = min(num_shares, nodes)
    if k < nodes and k % 2 == 0:
        raise SecAggParameterError(f"a sparse neighbourhood size must be odd (the ring takes (k-1)/2 a side), got {k}")
    if k >= nodes:
        need = complete_threshold(nodes, c)
        ok = need <= threshold <= nodes
        reason = f"the complete graph of {nodes} nodes with up to {c} corrupt needs t in [{need}, {nodes}]"
        if ok and nodes - d < threshold:
            ok, reason = False, f"t = {threshold} is not live when {d} of {nodes} nodes drop"
    else:
        best = _sparse(nodes, k, c, d, SECURITY_BITS, CORRECTNESS_BITS)
        ok = best is not None and best.threshold <= threshold <= k and \
            nodes * _binomial_tail(d, (k - 1) / (nodes - 1), k - threshold + 1) <= 2.0 ** -CORRECTNESS_BITS
        reason = (f"neighbourhood size {k} of {nodes} nodes does not meet Bell et al.'s bounds at corrupt fraction "
                  f"{corrupt_fraction:g} and dropout fraction {dropout_fraction:g}" if best is None else
                  f"neighbourhood size {k} of {nodes} nodes needs a threshold of at least {best.threshold} "
                  "that stays live under the dropouts")
    if not ok:
        raise SecAggParameterError(f"SecAgg+ k = {num_shares}, t = {threshold} refused: {reason}")
    return SecAggParameters(nodes, k, threshold, c, d)


def parameters_for(nodes: int, num_shares: int = 0, threshold: int = 0,
                   corrupt_fraction: float = DEFAULT_CORRUPT_FRACTION,
                   dropout_fraction: float = DEFAULT_DROPOUT_FRACTION) -> SecAggParameters:
    """A round's (k, t): chosen from the bounds where a setting is 0, checked where it is set.

    num_shares 0: the sparsest graph that qualifies (`choose_parameters`); threshold 0: the
    least t that qualifies for the graph. Raises SecAggParameterError as the two functions do.
    """
    if not num_shares and not threshold:
        return choose_parameters(nodes, corrupt_fraction, dropout_fraction)
    if not num_shares:
        return check_parameters(nodes, nodes, threshold, corrupt_fraction, dropout_fraction)
    k = min(num_shares, nodes)
    if not threshold:
        c, d = math.floor(corrupt_fraction * nodes), math.floor(dropout_fraction * nodes)
        least = _complete(nodes, c, d) if k >= nodes else _sparse(nodes, k, c, d, SECURITY_BITS, CORRECTNESS_BITS)
        threshold = least.threshold if least else k + 1  # k + 1: refused below, with the reason
    return check_parameters(nodes, num_shares, threshold, corrupt_fraction, dropout_fraction)
