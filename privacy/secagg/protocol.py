"""SecAgg+ (Bell et al., CCS 2020), semi-honest variant, on Bonawitz et al. (CCS 2017).

Parties: clients (ids are strings, totally ordered) and an honest-but-curious server that
routes every message. Each client u shares its secrets only with its neighbourhood N(u): a
seeded ring (Harary) graph of `num_shares` members, u included, so the graph is symmetric.
Threshold t: any t members of N(u) can rebuild u's secrets; fewer learn nothing.

Stages and what each message carries (the server sees all of it):
0. setup       server -> all: participants, num_shares, t, encoding params, graph seed
1. advertise   u -> server: c_pk_u (share transport), s_pk_u (pairwise masks), X25519 publics
               server -> u: public keys of N(u) ∩ U1 (U1 = clients that advertised)
2. share keys  u draws a self-mask seed b_u, Shamir-splits b_u and s_sk_u (t-of-|N(u)|),
               and sends each v in N(u) its pair of shares AES-GCM-encrypted under
               HKDF(X25519(c_sk_u, c_pk_v)), with (round, u, v) as associated data
               u -> server: {v: ciphertext};  server -> v: {u: ciphertext}, and U2
3. masked input  u -> server: y_u = x_u + PRG(b_u) + sum_{v in N(u)∩U2, v != u} ±PRG(s_uv)
               mod 2^k, s_uv = HKDF(X25519(s_sk_u, s_pk_v)); + if u < v, - if u > v
4. unmask      server -> survivors: U3 (sent y_u); each v reveals, for each u in N(v)∩U2,
               the share of b_u if u in U3, else the share of s_sk_u — never both for one u
               server: rebuilds b_u (u in U3) and s_sk_u (u in U2 \\ U3), removes the masks,
               and obtains sum_{u in U3} x_u mod 2^k.

Threat model (DESIGN 3): the server follows the protocol but reads everything it sees; it
learns only the sum over U3 as long as at most t-1 clients collude with it. Any stage below
t live clients fails the round with `SecAggAbort` and nothing is revealed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np

from .encoding import EncodingParams
from .primitives import SecAggCryptoError, agree, decrypt, encrypt, new_keypair, prg_mask
from .ring import RING_DTYPE, as_ring_vector, reduce_
from .sharing import ReconstructionError, combine_shares, split_secret


class SecAggAbort(RuntimeError):
    """The round cannot complete securely (too few live clients, inconsistent sets)."""


@dataclass(frozen=True)
class RoundSetup:
    """Stage 0: what every party agrees on for one round.

    num_shares: neighbourhood size, self included; below the number of participants the
    ring takes num_shares // 2 neighbours on each side (an even value acts as the next odd).
    Raises ValueError for duplicate ids or a threshold outside [2, min(num_shares, n)].
    """

    round_id: bytes
    participants: tuple[str, ...]
    num_shares: int
    threshold: int
    params: EncodingParams
    graph_seed: bytes

    def __post_init__(self) -> None:
        n = len(self.participants)
        if len(set(self.participants)) != n:
            raise ValueError("participant ids must be distinct")
        if not 2 <= self.threshold <= min(self.num_shares, n):
            raise ValueError(f"threshold must be in [2, min(num_shares, clients)] = [2, {min(self.num_shares, n)}], got {self.threshold}")
        if self.params.min_clients > self.threshold:
            raise ValueError("noise is split over min_clients, which must be <= threshold (the fewest clients a sum can have)")

    def to_config(self) -> dict:
        """Flat dict of bytes/str/int/float/list[str] (fits Flower's ConfigRecord)."""
        return {
            "round-id": self.round_id, "participants": list(self.participants), "num-shares": self.num_shares,
            "threshold": self.threshold, "graph-seed": self.graph_seed, **encoding_to_config(self.params),
        }

    @classmethod
    def from_config(cls, cfg) -> RoundSetup:
        """Inverse of `to_config` (accepts a Flower ConfigRecord); raises ValueError like the constructor."""
        return cls(
            round_id=bytes(cfg["round-id"]), participants=tuple(str(p) for p in cfg["participants"]),
            num_shares=int(cfg["num-shares"]), threshold=int(cfg["threshold"]), graph_seed=bytes(cfg["graph-seed"]),
            params=encoding_from_config(cfg),
        )

    def neighbourhoods(self) -> dict[str, tuple[str, ...]]:
        """N(u) for every u: a ring over a seeded permutation, u included, symmetric."""
        ids = sorted(self.participants)
        n = len(ids)
        if self.num_shares >= n:
            return {u: tuple(ids) for u in ids}
        order = sorted(ids, key=lambda u: hashlib.sha256(self.graph_seed + u.encode()).digest())
        half = self.num_shares // 2
        out = {}
        for pos, u in enumerate(order):
            members = {order[(pos + j) % n] for j in range(-half, half + 1)}
            out[u] = tuple(sorted(members))
        return out


def encoding_to_config(params: EncodingParams) -> dict:
    """EncodingParams as run/round config keys (clip-norm, client-noise-multiplier, min-clients, scale, max-clients)."""
    return {"clip-norm": params.clip_norm, "client-noise-multiplier": params.noise_multiplier,
            "min-clients": params.min_clients, "scale": params.scale, "max-clients": params.max_clients}


def encoding_from_config(cfg) -> EncodingParams:
    """Inverse of `encoding_to_config`; raises KeyError naming a missing key."""
    return EncodingParams(
        clip_norm=float(cfg["clip-norm"]), noise_multiplier=float(cfg["client-noise-multiplier"]),
        min_clients=int(cfg["min-clients"]), scale=float(cfg["scale"]), max_clients=int(cfg["max-clients"]),
    )


def _aad(round_id: bytes, sender: str, receiver: str) -> bytes:
    return b"share|" + round_id + b"|" + sender.encode() + b"|" + receiver.encode()


@dataclass
class SecAggClient:
    """One client's side of a round. Keeps its secrets in memory only for this round."""

    cid: str
    setup: RoundSetup
    _c_sk: bytes = b""
    _s_sk: bytes = b""
    _b: bytes = b""
    _neighbour_keys: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)
    _held: dict[str, tuple[int, bytes, bytes]] = field(default_factory=dict)  # owner -> (index, b share, sk share)
    _u2: frozenset[str] = frozenset()
    _revealed: bool = False

    def to_bytes(self) -> bytes:
        """This client's round state (secrets included) for the node's own storage between stages."""
        state = {
            "cid": self.cid, "c_sk": self._c_sk.hex(), "s_sk": self._s_sk.hex(), "b": self._b.hex(),
            "neighbour_keys": {v: [c.hex(), s.hex()] for v, (c, s) in self._neighbour_keys.items()},
            "held": {u: [i, b.hex(), k.hex()] for u, (i, b, k) in self._held.items()},
            "u2": sorted(self._u2), "revealed": self._revealed,
        }
        return json.dumps(state).encode()

    @classmethod
    def from_bytes(cls, blob: bytes, setup: RoundSetup) -> SecAggClient:
        """Inverse of `to_bytes` for the same round's `setup`."""
        state = json.loads(blob)
        return cls(
            cid=state["cid"], setup=setup, _c_sk=bytes.fromhex(state["c_sk"]), _s_sk=bytes.fromhex(state["s_sk"]),
            _b=bytes.fromhex(state["b"]),
            _neighbour_keys={v: (bytes.fromhex(c), bytes.fromhex(s)) for v, (c, s) in state["neighbour_keys"].items()},
            _held={u: (int(i), bytes.fromhex(b), bytes.fromhex(k)) for u, (i, b, k) in state["held"].items()},
            _u2=frozenset(state["u2"]), _revealed=bool(state["revealed"]),
        )

    @property
    def neighbours(self) -> tuple[str, ...]:
        """N(self): the sorted ids this client shares secrets with, itself included."""
        return self.setup.neighbourhoods()[self.cid]

    def advertise_keys(self) -> tuple[bytes, bytes]:
        """Stage 1: (c_pk, s_pk), fresh X25519 public keys for this round."""
        self._c_sk, c_pk = new_keypair()
        self._s_sk, s_pk = new_keypair()
        return c_pk, s_pk

    def share_keys(self, neighbour_keys: dict[str, tuple[bytes, bytes]]) -> dict[str, bytes]:
        """Stage 2: encrypted shares of b_u and s_sk_u for each live neighbour (self kept locally)."""
        live = {v: k for v, k in neighbour_keys.items() if v in self.neighbours}
        if len(live) < self.setup.threshold:
            raise SecAggAbort(f"{self.cid}: {len(live)} live neighbours < threshold {self.setup.threshold}")
        self._neighbour_keys = live
        self._b = os.urandom(32)
        members = self.neighbours
        b_shares = split_secret(self._b, self.setup.threshold, len(members))
        sk_shares = split_secret(self._s_sk, self.setup.threshold, len(members))
        out = {}
        for v, (idx, b_share), (_, sk_share) in zip(members, b_shares, sk_shares):
            if v == self.cid:
                self._held[self.cid] = (idx, b_share, sk_share)
            elif v in live:
                key = agree(self._c_sk, live[v][0], b"share-transport", self.setup.round_id)
                plaintext = idx.to_bytes(2, "big") + b_share + sk_share
                out[v] = encrypt(key, plaintext, _aad(self.setup.round_id, self.cid, v))
        return out

    def masked_input(self, ciphertexts: dict[str, bytes], u2: list[str], vector: np.ndarray) -> np.ndarray:
        """Stage 3: decrypt received shares, return y_u ((d,) uint32 in Z_(2^k)) for `vector` in Z_(2^k).

        Raises SecAggCryptoError naming the sender of a tampered share.
        """
        k = self.setup.params.modulus_bits
        self._u2 = frozenset(u2)
        if len(self._u2) < self.setup.threshold:
            raise SecAggAbort(f"{self.cid}: only {len(self._u2)} clients completed key sharing")
        for sender, blob in ciphertexts.items():
            if sender not in self._neighbour_keys:
                raise SecAggCryptoError(f"{self.cid}: share from {sender}, who is not a live neighbour")
            key = agree(self._c_sk, self._neighbour_keys[sender][0], b"share-transport", self.setup.round_id)
            plain = decrypt(key, blob, _aad(self.setup.round_id, sender, self.cid), sender)
            self._held[sender] = (int.from_bytes(plain[:2], "big"), plain[2:34], plain[34:66])
        y = np.array(vector, dtype=RING_DTYPE)  # a copy; uint32 adds wrap mod 2^32, reduced mod 2^k once at the end
        d = y.shape[0]
        mask = np.empty(d, dtype=RING_DTYPE)  # one buffer for every mask expansion
        y += prg_mask(self._b, d, k, out=mask)
        for v in sorted(self._u2 & set(self._neighbour_keys)):
            if v == self.cid:
                continue
            seed = agree(self._s_sk, self._neighbour_keys[v][1], b"pairwise-mask", self.setup.round_id)
            if self.cid < v:
                y += prg_mask(seed, d, k, out=mask)
            else:
                y -= prg_mask(seed, d, k, out=mask)  # + the ring's negation of PRG(s_uv)
        return reduce_(y, k)

    def unmask(self, u3: list[str]) -> dict[str, tuple[str, int, bytes]]:
        """Stage 4: for each owner u in N(self)∩U2: ("b", index, share) if u in U3, else ("sk", ...)."""
        if self._revealed:
            raise SecAggAbort(f"{self.cid}: unmask asked twice")
        survivors = frozenset(u3)
        if not survivors <= self._u2:
            raise SecAggAbort(f"{self.cid}: U3 is not a subset of U2")
        if len(survivors) < self.setup.threshold:
            raise SecAggAbort(f"{self.cid}: {len(survivors)} masked inputs < threshold; revealing nothing")
        self._revealed = True
        out = {}
        for owner, (idx, b_share, sk_share) in self._held.items():
            if owner not in self._u2:
                continue
            out[owner] = ("b", idx, b_share) if owner in survivors else ("sk", idx, sk_share)
        return out


@dataclass
class SecAggServer:
    """The server's side of a round: routes messages and unmasks the sum, never one input."""

    setup: RoundSetup
    dimension: int
    keys: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)
    u2: list[str] = field(default_factory=list)
    u3: list[str] = field(default_factory=list)
    _masked_sum: np.ndarray | None = None

    def _need(self, alive: int, stage: str) -> None:
        if alive < self.setup.threshold:
            raise SecAggAbort(f"{stage}: {alive} clients left, threshold is {self.setup.threshold}")

    def collect_keys(self, replies: dict[str, tuple[bytes, bytes]]) -> dict[str, dict[str, tuple[bytes, bytes]]]:
        """Stage 1 -> 2: for each live client, the public keys of its live neighbours."""
        self.keys = {u: k for u, k in replies.items() if u in self.setup.participants}
        self._need(len(self.keys), "advertise keys")
        hoods = self.setup.neighbourhoods()
        return {u: {v: self.keys[v] for v in hoods[u] if v in self.keys} for u in self.keys}

    def route_shares(self, replies: dict[str, dict[str, bytes]]) -> dict[str, dict[str, bytes]]:
        """Stage 2 -> 3: ciphertexts regrouped by recipient; U2 = clients that shared."""
        self.u2 = sorted(u for u in replies if u in self.keys)
        self._need(len(self.u2), "share keys")
        routed: dict[str, dict[str, bytes]] = {u: {} for u in self.u2}
        for sender in self.u2:
            for receiver, blob in replies[sender].items():
                if receiver in routed:
                    routed[receiver][sender] = blob
        return routed

    def collect_masked(self, replies: dict[str, np.ndarray]) -> list[str]:
        """Stage 3 -> 4: sum the masked inputs of U3 (mod 2^k); returns U3.

        replies: client -> its masked input, packed (`ring.pack_ring` bytes, or those bytes
        as a uint8 array) or as (d,) unsigned ring values. Raises SecAggAbort naming a client
        whose input has the wrong size.
        """
        k = self.setup.params.modulus_bits
        total = np.zeros(self.dimension, dtype=RING_DTYPE)
        u3 = []
        for u in self.u2:
            if u in replies:
                try:
                    total += as_ring_vector(replies[u], k, self.dimension)
                except ValueError as err:
                    raise SecAggAbort(f"masked input of {u}: {err}") from err
                u3.append(u)
        self._need(len(u3), "masked input")
        self.u3, self._masked_sum = u3, reduce_(total, k)
        return u3

    def unmask(self, replies: dict[str, dict[str, tuple[str, int, bytes]]]) -> np.ndarray:
        """Stage 4: the exact sum over U3 of the clients' inputs, (d,) uint32 in Z_(2^k)."""
        assert self._masked_sum is not None, "collect_masked must run first"
        self._need(len(replies), "unmask")
        k, d = self.setup.params.modulus_bits, self.dimension
        b_shares: dict[str, list] = {}
        sk_shares: dict[str, list] = {}
        for revealed in replies.values():
            for owner, (kind, idx, share) in revealed.items():
                (b_shares if kind == "b" else sk_shares).setdefault(owner, []).append((idx, share))
        total = self._masked_sum.copy()  # uint32: subtracts wrap mod 2^32, reduced mod 2^k once at the end
        mask = np.empty(d, dtype=RING_DTYPE)  # one buffer for every mask expansion
        survivors, dropped = set(self.u3), set(self.u2) - set(self.u3)
        hoods = self.setup.neighbourhoods()
        try:
            for u in sorted(survivors):
                b_u = combine_shares(b_shares.get(u, []), self.setup.threshold)
                total -= prg_mask(b_u, d, k, out=mask)
            for u in sorted(dropped):
                s_sk_u = combine_shares(sk_shares.get(u, []), self.setup.threshold)
                for v in hoods[u]:
                    if v in survivors and v != u:
                        seed = agree(s_sk_u, self.keys[v][1], b"pairwise-mask", self.setup.round_id)
                        if v < u:  # v added +PRG(s_uv): take it out
                            total -= prg_mask(seed, d, k, out=mask)
                        else:  # v added -PRG(s_uv)
                            total += prg_mask(seed, d, k, out=mask)
        except ReconstructionError as err:
            raise SecAggAbort(f"unmask: {err}") from err
        return reduce_(total, k)
