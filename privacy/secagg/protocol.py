"""SecAgg+ (Bell et al., CCS 2020) with the malicious-server checks of Bonawitz et al.
(CCS 2017, sec. 6: signed keys, a signed consistency round).

Parties: clients (ids are node names, totally ordered) and a server that routes every
message. Each client u shares its secrets only with its neighbourhood N(u): a seeded ring
(Harary) graph of `num_shares` members, u included, so the graph is symmetric (the
complete graph when num_shares >= n). Threshold t: any t members of N(u) can rebuild u's
secrets; fewer learn nothing. k and t come from `parameters` (Bell et al.'s bounds).

Stages and what each message carries (the server sees all of it):
0. setup       server -> all: participants, num_shares, t, encoding params, graph seed.
               Each client checks 2t > |N(u)| and that every participant is in its keyring.
1. advertise   u -> server: c_pk_u (share transport), s_pk_u (pairwise masks), X25519 publics,
               and sig_u(setup digest, u, c_pk_u, s_pk_u) with u's provisioned Ed25519 key
               server -> u: keys and signatures of N(u) ∩ U1 (U1 = clients that advertised);
               u verifies each against its keyring (a swapped key fails) and needs t of them
2. share keys  u draws a self-mask seed b_u, Shamir-splits b_u and s_sk_u (t-of-|N(u)|),
               and sends each v in N(u) its pair of shares AES-GCM-encrypted under
               HKDF(X25519(c_sk_u, c_pk_v)), with (round, u, v) as associated data
               u -> server: {v: ciphertext};  server -> v: {u: ciphertext}, and U2
3. masked input  u needs |N(u) ∩ U2| >= t; u -> server: y_u = x_u + PRG(b_u)
               + sum_{v in N(u)∩U2, v != u} ±PRG(s_uv) mod 2^k, s_uv = HKDF(X25519(s_sk_u, s_pk_v));
               + if u < v, - if u > v
4. consistency server -> survivors: U3 (sent y_u); u needs U3 ⊆ U2, u in U3, |N(u) ∩ U3| >= t,
               and signs (setup digest, U3)
5. unmask      server -> survivors: the signatures over U3; u reveals only if t members of
               N(u) ∩ U3 signed the very U3 it signed and no signature fails; then, for each
               owner in N(u)∩U2, the share of b_owner if owner in U3, else of s_sk_owner, never
               both, and only once. The server rebuilds b_u (u in U3) and s_sk_u (u in U2 \\ U3),
               removes the masks, and obtains sum_{u in U3} x_u mod 2^k.

Threat model (DESIGN 3): a server that deviates (swaps keys, shows nodes different survivor
sets or setups, calls honest nodes dropped) together with up to c nodes, with t and k
chosen for c (`parameters`): it learns only sums over honest survivors, and a deviation is
caught by a check, which aborts the round (`SecAggAbort` names the check). Assumption: the
kits' signing keys were not made by the coordinator (`identity`). Any stage below t live
clients fails the round and nothing is revealed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

from collections.abc import Mapping
from functools import lru_cache
from types import MappingProxyType

import numpy as np

from .encoding import EncodingParams
from .identity import SigningIdentity
from .primitives import PROTOCOL_LABEL, SecAggCryptoError, agree, decrypt, encrypt, new_keypair, prg_mask
from .ring import RING_DTYPE, as_ring_vector, reduce_
from .sharing import SHARE_BYTES, ReconstructionError, combine_shares, split_secret


class SecAggAbort(RuntimeError):
    """The round cannot complete securely (too few live clients, a failed check); says which."""


@dataclass(frozen=True)
class RoundSetup:
    """Stage 0: what every party agrees on for one round.

    num_shares: neighbourhood size, self included; below the number of participants the
    ring takes num_shares // 2 neighbours on each side (an even value acts as the next odd).
    Raises ValueError for duplicate ids or a threshold outside [2, min(num_shares, n)], or
    one of at most half the neighbourhood (2t > k: two survivor sets could then each gather
    t signatures).
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
        largest = max(len(members) for members in self.neighbourhoods().values())
        if 2 * self.threshold <= largest:
            raise ValueError(f"threshold {self.threshold} is at most half the neighbourhood size {largest}: "
                             "two survivor sets could each gather t signatures")
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

    def digest(self) -> bytes:
        """SHA-256 of the setup's canonical form: signed by every node, so no two honest nodes
        can be shown different setups (graph, threshold, parameters) and both carry on."""
        canonical = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in self.to_config().items()}
        return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).digest()

    def neighbourhoods(self) -> Mapping[str, tuple[str, ...]]:
        """N(u) for every u: a ring over a seeded permutation, u included, symmetric.

        Read-only and computed once per (participants, num_shares, graph_seed): every check
        of every stage asks for it.
        """
        return _ring_neighbourhoods(self.participants, self.num_shares, self.graph_seed)


@lru_cache(maxsize=32)
def _ring_neighbourhoods(participants: tuple[str, ...], num_shares: int, graph_seed: bytes) -> Mapping[str, tuple[str, ...]]:
    ids = sorted(participants)
    n = len(ids)
    if num_shares >= n:
        return MappingProxyType({u: tuple(ids) for u in ids})
    order = sorted(ids, key=lambda u: hashlib.sha256(graph_seed + u.encode()).digest())
    half = num_shares // 2
    out = {}
    for pos, u in enumerate(order):
        members = {order[(pos + j) % n] for j in range(-half, half + 1)}
        out[u] = tuple(sorted(members))
    return MappingProxyType(out)


def encoding_to_config(params: EncodingParams) -> dict:
    """EncodingParams as run/round config keys (clip-norm, client-noise-multiplier, min-clients, scale,
    max-clients, weight-cap)."""
    return {"clip-norm": params.clip_norm, "client-noise-multiplier": params.noise_multiplier,
            "min-clients": params.min_clients, "scale": params.scale, "max-clients": params.max_clients,
            "weight-cap": params.weight_cap}


def encoding_from_config(cfg) -> EncodingParams:
    """Inverse of `encoding_to_config`; raises KeyError naming a missing key, ValueError for a bad
    weight cap. A config without `weight-cap` means equal weights (what it meant before the key)."""
    return EncodingParams(
        clip_norm=float(cfg["clip-norm"]), noise_multiplier=float(cfg["client-noise-multiplier"]),
        min_clients=int(cfg["min-clients"]), scale=float(cfg["scale"]), max_clients=int(cfg["max-clients"]),
        weight_cap=float(cfg["weight-cap"]) if "weight-cap" in cfg else 0.0,
    )


def advertise_message(setup: RoundSetup, cid: str, c_pk: bytes, s_pk: bytes) -> bytes:
    """What a node signs at stage 1: its round keys bound to the setup and its name."""
    return b"|".join((PROTOCOL_LABEL, b"advertise", setup.digest(), cid.encode(), c_pk, s_pk))


def consistency_message(setup: RoundSetup, u3: list[str]) -> bytes:
    """What a node signs at stage 4: the survivor set U3 it was shown, bound to the setup."""
    return b"|".join((PROTOCOL_LABEL, b"consistency", setup.digest(), json.dumps(sorted(u3)).encode()))


def _aad(round_id: bytes, sender: str, receiver: str) -> bytes:
    return b"share|" + round_id + b"|" + sender.encode() + b"|" + receiver.encode()


@dataclass
class SecAggClient:
    """One client's side of a round. Keeps its secrets in memory only for this round.

    identity: this node's signing key and the federation keyring (`identity.load_identity`);
    its name must be `cid`. Every stage raises SecAggAbort naming the failed check.
    """

    cid: str
    setup: RoundSetup
    identity: SigningIdentity
    _c_sk: bytes = b""
    _s_sk: bytes = b""
    _b: bytes = b""
    _neighbour_keys: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)
    _held: dict[str, tuple[int, bytes, bytes]] = field(default_factory=dict)  # owner -> (index, b share, sk share)
    _u2: frozenset[str] = frozenset()
    _u3: tuple[str, ...] = ()
    _revealed: bool = False

    def to_bytes(self) -> bytes:
        """This client's round state (secrets included) for the node's own storage between stages."""
        state = {
            "cid": self.cid, "c_sk": self._c_sk.hex(), "s_sk": self._s_sk.hex(), "b": self._b.hex(),
            "neighbour_keys": {v: [c.hex(), s.hex()] for v, (c, s) in self._neighbour_keys.items()},
            "held": {u: [i, b.hex(), k.hex()] for u, (i, b, k) in self._held.items()},
            "u2": sorted(self._u2), "u3": list(self._u3), "revealed": self._revealed,
        }
        return json.dumps(state).encode()

    @classmethod
    def from_bytes(cls, blob: bytes, setup: RoundSetup, identity: SigningIdentity) -> SecAggClient:
        """Inverse of `to_bytes` for the same round's `setup` (the identity is the node's own)."""
        state = json.loads(blob)
        return cls(
            cid=state["cid"], setup=setup, identity=identity, _c_sk=bytes.fromhex(state["c_sk"]),
            _s_sk=bytes.fromhex(state["s_sk"]),
            _b=bytes.fromhex(state["b"]),
            _neighbour_keys={v: (bytes.fromhex(c), bytes.fromhex(s)) for v, (c, s) in state["neighbour_keys"].items()},
            _held={u: (int(i), bytes.fromhex(b), bytes.fromhex(k)) for u, (i, b, k) in state["held"].items()},
            _u2=frozenset(state["u2"]), _u3=tuple(state["u3"]), _revealed=bool(state["revealed"]),
        )

    @property
    def neighbours(self) -> tuple[str, ...]:
        """N(self): the sorted ids this client shares secrets with, itself included."""
        return self.setup.neighbourhoods()[self.cid]

    def advertise_keys(self) -> tuple[bytes, bytes, bytes]:
        """Stage 1: (c_pk, s_pk, signature): fresh X25519 public keys for this round, signed.

        Checks the setup first: this node is a participant under its own name and every
        participant is in its keyring (2t > |N(u)| holds for every RoundSetup: its constructor
        refuses less).
        """
        if self.identity.name != self.cid or self.cid not in self.setup.participants:
            raise SecAggAbort(f"{self.cid}: the setup does not list this node ({self.identity.name}) as a participant")
        unknown = sorted(set(self.setup.participants) - set(self.identity.keyring))
        if unknown:
            raise SecAggAbort(f"{self.cid}: participants {unknown} are not in the federation's keyring")
        self._c_sk, c_pk = new_keypair()
        self._s_sk, s_pk = new_keypair()
        return c_pk, s_pk, self.identity.sign(advertise_message(self.setup, self.cid, c_pk, s_pk))

    def share_keys(self, neighbour_keys: dict[str, tuple[bytes, bytes, bytes]]) -> dict[str, bytes]:
        """Stage 2: encrypted shares of b_u and s_sk_u for each live neighbour (self kept locally).

        neighbour_keys: v -> (c_pk, s_pk, signature) for v in N(u) ∩ U1. Aborts when a
        signature does not verify against the keyring (a swapped or forged key) or fewer
        than t neighbours are live.
        """
        live = {}
        for v, (c_pk, s_pk, signature) in neighbour_keys.items():
            if v not in self.neighbours:
                continue
            if not self.identity.verifies(v, advertise_message(self.setup, v, c_pk, s_pk), signature):
                raise SecAggAbort(f"{self.cid}: the round keys of {v} are not signed by {v}'s provisioned key "
                                  "(swapped or forged keys, or another setup)")
            live[v] = (c_pk, s_pk)
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
        live = self._u2 & set(self.neighbours)
        if self.cid not in self._u2 or not self._u2 <= set(self.setup.participants):
            raise SecAggAbort(f"{self.cid}: U2 must hold this node and participants only")
        if len(live) < self.setup.threshold:
            raise SecAggAbort(f"{self.cid}: only {len(live)} of its neighbours completed key sharing "
                              f"(|N(u) ∩ U2| < t = {self.setup.threshold})")
        for sender, blob in ciphertexts.items():
            if sender not in self._neighbour_keys:
                raise SecAggCryptoError(f"{self.cid}: share from {sender}, who is not a live neighbour")
            key = agree(self._c_sk, self._neighbour_keys[sender][0], b"share-transport", self.setup.round_id)
            plain = decrypt(key, blob, _aad(self.setup.round_id, sender, self.cid), sender)
            if len(plain) != 2 + 2 * SHARE_BYTES:
                raise SecAggCryptoError(f"{self.cid}: share from {sender} has {len(plain)} bytes, "
                                        f"expected {2 + 2 * SHARE_BYTES}")
            self._held[sender] = (int.from_bytes(plain[:2], "big"), plain[2:2 + SHARE_BYTES], plain[2 + SHARE_BYTES:])
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

    def sign_survivors(self, u3: list[str]) -> bytes:
        """Stage 4: sign the survivor set U3 the server showed this node (once per round).

        Aborts unless U3 ⊆ U2, this node is in U3 and |N(u) ∩ U3| >= t.
        """
        if self._u3:
            raise SecAggAbort(f"{self.cid}: asked to sign a survivor set twice")
        survivors = frozenset(u3)
        if not survivors <= self._u2 or self.cid not in survivors:
            raise SecAggAbort(f"{self.cid}: U3 must be a subset of U2 that holds this node")
        live = survivors & set(self.neighbours)
        if len(live) < self.setup.threshold:
            raise SecAggAbort(f"{self.cid}: {len(live)} of its neighbours sent masked inputs "
                              f"(|N(u) ∩ U3| < t = {self.setup.threshold}); revealing nothing")
        self._u3 = tuple(sorted(survivors))
        return self.identity.sign(consistency_message(self.setup, list(self._u3)))

    def unmask(self, signatures: dict[str, bytes]) -> dict[str, tuple[str, int, bytes]]:
        """Stage 5: for each owner u in N(self)∩U2: ("b", index, share) if u in U3, else ("sk", ...).

        signatures: v -> v's stage-4 signature. Reveals only if every signature verifies over
        the U3 this node signed and at least t come from N(self) ∩ U3; aborts otherwise (the
        server showed nodes different survivor sets, or forged one).
        """
        if self._revealed:
            raise SecAggAbort(f"{self.cid}: unmask asked twice")
        if not self._u3:
            raise SecAggAbort(f"{self.cid}: unmask before signing a survivor set")
        message = consistency_message(self.setup, list(self._u3))
        for v, signature in signatures.items():
            if v not in self._u3 or not self.identity.verifies(v, message, signature):
                raise SecAggAbort(f"{self.cid}: consistency check failed: {v}'s signature is not over the survivor set "
                                  "this node was shown")
        signed = set(signatures) & set(self.neighbours)
        if len(signed) < self.setup.threshold:
            raise SecAggAbort(f"{self.cid}: consistency check failed: {len(signed)} neighbours signed its survivor "
                              f"set, t = {self.setup.threshold} needed")
        survivors = frozenset(self._u3)
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
    signed_keys: dict[str, tuple[bytes, bytes, bytes]] = field(default_factory=dict)  # u -> (c_pk, s_pk, signature)
    u2: list[str] = field(default_factory=list)
    u3: list[str] = field(default_factory=list)
    signatures: dict[str, bytes] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)  # u -> why its masked input was left out
    _masked_sum: np.ndarray | None = None

    @property
    def keys(self) -> dict[str, tuple[bytes, bytes]]:
        """u -> (c_pk, s_pk) of the clients that advertised (U1)."""
        return {u: (c_pk, s_pk) for u, (c_pk, s_pk, _) in self.signed_keys.items()}

    def _need(self, alive: int, stage: str) -> None:
        if alive < self.setup.threshold:
            raise SecAggAbort(f"{stage}: {alive} clients left, threshold is {self.setup.threshold}")

    def collect_keys(self, replies: dict[str, tuple[bytes, bytes, bytes]]) -> dict[str, dict[str, tuple[bytes, bytes, bytes]]]:
        """Stage 1 -> 2: for each live client, the signed public keys of its live neighbours."""
        self.signed_keys = {u: k for u, k in replies.items() if u in self.setup.participants}
        self._need(len(self.signed_keys), "advertise keys")
        hoods = self.setup.neighbourhoods()
        return {u: {v: self.signed_keys[v] for v in hoods[u] if v in self.signed_keys} for u in self.signed_keys}

    def route_shares(self, replies: dict[str, dict[str, bytes]]) -> dict[str, dict[str, bytes]]:
        """Stage 2 -> 3: ciphertexts regrouped by recipient; U2 = clients that shared."""
        self.u2 = sorted(u for u in replies if u in self.signed_keys)
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
        as a uint8 array) or as (d,) unsigned ring values. An input of the wrong size is left
        out, its sender treated as dropped after sharing (in U2 \\ U3, so its pairwise masks
        are removed from the others' sum) and named in `rejected`: one node's bad reply
        costs its own contribution, not the round. Raises SecAggAbort when fewer than t remain.
        """
        k = self.setup.params.modulus_bits
        total = np.zeros(self.dimension, dtype=RING_DTYPE)
        u3 = []
        for u in self.u2:
            if u in replies:
                try:
                    total += as_ring_vector(replies[u], k, self.dimension)
                except ValueError as err:
                    self.rejected[u] = f"masked input of {u}: {err}"
                    continue
                u3.append(u)
        self._need(len(u3), "masked input")
        self.u3, self._masked_sum = u3, reduce_(total, k)
        return u3

    def collect_signatures(self, replies: dict[str, bytes]) -> dict[str, bytes]:
        """Stage 4 -> 5: the survivors' signatures over U3, sent to every survivor."""
        self.signatures = {u: bytes(s) for u, s in replies.items() if u in self.u3}
        self._need(len(self.signatures), "consistency")
        return self.signatures

    def unmask(self, replies: dict[str, dict[str, tuple[str, int, bytes]]]) -> np.ndarray:
        """Stage 5: the exact sum over U3 of the clients' inputs, (d,) uint32 in Z_(2^k)."""
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
                        seed = agree(s_sk_u, self.signed_keys[v][1], b"pairwise-mask", self.setup.round_id)
                        if v < u:  # v added +PRG(s_uv): take it out
                            total -= prg_mask(seed, d, k, out=mask)
                        else:  # v added -PRG(s_uv)
                            total += prg_mask(seed, d, k, out=mask)
        except ReconstructionError as err:
            raise SecAggAbort(f"unmask: {err}") from err
        return reduce_(total, k)
