"""The node's side of SecAgg+ over Flower messages (`query.secagg_*`).

After local training the node turns its model delta into a vector in Z_(2^k) (clip, add
its share of the client-level DP noise, stochastic rounding: `privacy.secagg.encoding`) and
spools it to a 0600 file on its own disk (under its state folder) until the masked-input
stage; only the masked vector ever leaves the node. The file, not `context.state`, holds it
because Flower copies the context with every message: an 8 MB vector carried through three
stages cost more than the whole protocol (measured in benchmarks/secagg_round.py). The
protocol state (keys, shares, secrets: a few KB) lives in `context.state`, this node's
memory across messages, since Flower may run each message in a different worker process.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from privacy.secagg import RoundSetup, SecAggClient
from privacy.secagg.encoding import encode, summed_keys
from privacy.secagg.identity import SigningIdentity
from privacy.secagg.protocol import encoding_from_config
from privacy.secagg.ring import pack_ring
from privacy.secret_randomness import SecretRandom

STATE = "secagg-state"  # ConfigRecord: setup + serialized client
INPUT = "secagg-input"  # ConfigRecord: path of the spooled encoded (unmasked) vector, never sent
STAGES = ("secagg_advertise", "secagg_share", "secagg_masked", "secagg_consistency", "secagg_unmask")


class SimulatedDropout(RuntimeError):
    """Raised by a simulated node that 'vanishes' at a stage (`--dropout-rate`)."""


def flatten_delta(local: dict[str, torch.Tensor], global_state: dict[str, torch.Tensor]) -> np.ndarray:
    """(d,) float64 local - global over the floating-point tensors only, in the global state's key order.

    Which tensors: `privacy.secagg.encoding.summed_keys(global_state)`, decided by the global
    model's dtypes as the server decides; integer state (a counter such as BatchNorm's
    num_batches_tracked) is never clipped, quantised or sent, and keeps the global value.
    """
    keys = summed_keys(global_state)
    if not keys:
        return np.zeros(0)
    return np.concatenate([(local[k].double() - global_state[k].double()).reshape(-1).numpy() for k in keys])


def store_encoded_update(context: Context, delta: np.ndarray, config, randomness: SecretRandom,
                         spool_dir: Path, num_examples: float = 0.0) -> Path:
    """Encode the delta with the round's parameters (from the train config) and spool it locally.

    randomness: the node's secret source of the client-level noise and stochastic rounding.
    num_examples: the training records the node reports (`num-examples`), its weight in the
    secure mean when the round's `weight-cap` is on (`privacy.secagg.encoding`, step 1b).
    Writes `<spool_dir>/<run>-<node>.npy` (mode 0600, atomically); returns its path.
    """
    params = encoding_from_config(config)
    encoded = encode(delta, params, randomness, num_examples)
    spool_dir.mkdir(parents=True, exist_ok=True)
    path = spool_dir / f"{context.run_id}-{context.node_id}.npy"
    fd, tmp = tempfile.mkstemp(dir=spool_dir, suffix=".tmp")  # created 0600
    with os.fdopen(fd, "wb") as handle:
        np.save(handle, encoded)
    os.replace(tmp, path)
    context.state[INPUT] = ConfigRecord({"path": str(path)})
    if STATE in context.state:
        del context.state[STATE]
    return path


def plan_dropout(context: Context, rate: float, seed) -> None:
    """Simulation only: with probability `rate` this node will vanish at one random stage.

    seed: anything `np.random.default_rng` takes (the run's seed, round and partition).
    """
    rng = np.random.default_rng(seed)
    stage = STAGES[int(rng.integers(len(STAGES)))] if rng.random() < rate else ""
    context.state["secagg-dropout"] = ConfigRecord({"stage": stage})


def _maybe_drop(context: Context, stage: str, node: str) -> None:
    plan = context.state.get("secagg-dropout")
    if plan is not None and plan["stage"] == stage:
        raise SimulatedDropout(f"{node} vanished before {stage} (simulated dropout)")


def _load(context: Context, identity: SigningIdentity) -> tuple[RoundSetup, SecAggClient]:
    cfg = context.state[STATE]
    setup = RoundSetup.from_config(cfg)
    return setup, SecAggClient.from_bytes(bytes(cfg["client"]), setup, identity)


def _save(context: Context, setup: RoundSetup, client: SecAggClient) -> None:
    context.state[STATE] = ConfigRecord({**setup.to_config(), "client": client.to_bytes()})


def handle_stage(stage: str, content: RecordDict, context: Context, identity: SigningIdentity) -> RecordDict:
    """Answer one SecAgg+ stage as `identity.name` (the node's id in the protocol).

    Returns the reply content; raises SecAggAbort naming a failed check (the round stops).
    """
    node = identity.name
    _maybe_drop(context, stage, node)
    payload = content["secagg"]
    if stage == "secagg_advertise":
        if INPUT not in context.state:
            raise RuntimeError(f"{node}: asked to aggregate but holds no trained update for this round")
        setup = RoundSetup.from_config(payload)
        client = SecAggClient(node, setup, identity)
        c_pk, s_pk, signature = client.advertise_keys()
        _save(context, setup, client)
        return RecordDict({"secagg": ConfigRecord({"c-pk": c_pk, "s-pk": s_pk, "signature": signature})})
    setup, client = _load(context, identity)
    if stage == "secagg_share":
        keys = {v: (bytes(c), bytes(s), bytes(g)) for v, c, s, g in
                zip(payload["neighbours"], payload["c-pks"], payload["s-pks"], payload["signatures"])}
        out = client.share_keys(keys)
        _save(context, setup, client)
        return RecordDict({"secagg": ConfigRecord({"recipients": list(out), "ciphertexts": list(out.values())})})
    if stage == "secagg_masked":
        ciphertexts = {str(u): bytes(c) for u, c in zip(payload["senders"], payload["ciphertexts"])}
        spooled = Path(str(context.state[INPUT]["path"]))
        vector = np.load(spooled)
        y = client.masked_input(ciphertexts, [str(u) for u in payload["u2"]], vector)
        spooled.unlink(missing_ok=True)  # the plain encoding is no longer needed
        del context.state[INPUT]
        _save(context, setup, client)
        packed = pack_ring(y, setup.params.modulus_bits)  # k bits per coordinate (ring.pack_ring)
        return RecordDict({"masked": ArrayRecord({"y": Array(np.frombuffer(packed, dtype=np.uint8))})})
    if stage == "secagg_consistency":
        signature = client.sign_survivors([str(u) for u in payload["u3"]])
        _save(context, setup, client)
        return RecordDict({"secagg": ConfigRecord({"signature": signature})})
    if stage == "secagg_unmask":
        signatures = {str(v): bytes(g) for v, g in zip(payload["signers"], payload["signatures"])}
        revealed = client.unmask(signatures)
        del context.state[STATE]  # round over: drop this round's secrets
        owners = sorted(revealed)
        return RecordDict({"secagg": ConfigRecord({
            "owners": owners,
            "kinds": [revealed[o][0] for o in owners],
            "indices": [revealed[o][1] for o in owners],
            "shares": [revealed[o][2] for o in owners],
        })})
    raise ValueError(f"unknown SecAgg+ stage {stage!r}")
