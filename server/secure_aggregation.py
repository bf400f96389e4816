"""The coordinator's side of SecAgg+ over Flower's Grid: five `query.secagg_*` exchanges.

The server routes keys and encrypted shares, sums the masked vectors and unmasks the sum
(`privacy.secagg.protocol.SecAggServer`); it never holds one node's update in the clear.
A node that errs, times out or drops at any stage is left out of the next; with fewer
than `threshold` nodes left the round fails with `SecAggAbort` and nothing is revealed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from privacy.secagg import RoundSetup, SecAggAbort, SecAggServer, decode_sum
from server.messaging import exchange

log = logging.getLogger("fedpriv.server")


@dataclass
class SecureSum:
    """Outcome of one secure aggregation: the float sum over `survivors` and who dropped where."""

    total: np.ndarray  # (d,) float64 sum of the survivors' encoded (clipped, noised) deltas
    survivors: list[int]
    dropped: dict[str, list[int]] = field(default_factory=dict)  # stage -> node ids
    errors: dict[int, str] = field(default_factory=dict)  # node id -> what it said


def _exchange(grid: Grid, stage: str, payloads: dict[int, RecordDict], timeout: float,
              outcome: SecureSum) -> dict[int, RecordDict]:
    """Send each node its payload as `query.<stage>`; return the content of good replies."""
    messages = [Message(content, dst_node_id=nid, message_type=f"query.{stage}") for nid, content in payloads.items()]
    replies = {}
    for nid, reply in exchange(grid, messages, timeout).items():
        if reply.has_error():
            outcome.errors[nid] = f"{stage}: {reply.error.reason}"
        else:
            replies[nid] = reply.content
    outcome.dropped[stage] = sorted(set(payloads) - set(replies))
    for nid in outcome.dropped[stage]:
        outcome.errors.setdefault(nid, f"{stage}: no reply within {timeout:.0f} s")
    return replies


def secure_sum(grid: Grid, names: dict[int, str], setup: RoundSetup, dimension: int, timeout: float) -> SecureSum:
    """Run SecAgg+ stages 1-5 with the nodes `names` (node id -> node name, the protocol id;
    `setup.participants` are those names).

    Raises SecAggAbort (with the partial outcome in `.outcome`) when too few nodes remain.
    """
    server = SecAggServer(setup, dimension=dimension)
    outcome = SecureSum(total=np.zeros(0), survivors=[])
    node_ids = sorted(names)
    cid = dict(names)
    nid_of = {c: n for n, c in cid.items()}
    try:
        config = ConfigRecord(setup.to_config())
        replies = _exchange(grid, "secagg_advertise", {n: RecordDict({"secagg": config}) for n in node_ids}, timeout, outcome)
        views = server.collect_keys({cid[n]: (bytes(r["secagg"]["c-pk"]), bytes(r["secagg"]["s-pk"]),
                                              bytes(r["secagg"]["signature"])) for n, r in replies.items()})

        payloads = {}
        for u, keys in views.items():
            order = sorted(keys)
            payloads[nid_of[u]] = RecordDict({"secagg": ConfigRecord({
                "neighbours": order, "c-pks": [keys[v][0] for v in order], "s-pks": [keys[v][1] for v in order],
                "signatures": [keys[v][2] for v in order],
            })})
        replies = _exchange(grid, "secagg_share", payloads, timeout, outcome)
        routed = server.route_shares({
            cid[n]: dict(zip(r["secagg"]["recipients"], (bytes(c) for c in r["secagg"]["ciphertexts"])))
            for n, r in replies.items()
        })

        payloads = {
            nid_of[u]: RecordDict({"secagg": ConfigRecord({
                "senders": sorted(inbox), "ciphertexts": [inbox[s] for s in sorted(inbox)], "u2": server.u2,
            })})
            for u, inbox in routed.items()
        }
        replies = _exchange(grid, "secagg_masked", payloads, timeout, outcome)
        u3 = server.collect_masked({cid[n]: r["masked"]["y"].numpy() for n, r in replies.items()})
        for u, why in server.rejected.items():  # a malformed masked input: that node counts as dropped
            outcome.errors[nid_of[u]] = f"secagg_masked: {why}"
            outcome.dropped["secagg_masked"] = sorted({*outcome.dropped["secagg_masked"], nid_of[u]})

        live = [nid_of[u] for u in u3]
        payloads = {n: RecordDict({"secagg": ConfigRecord({"u3": u3})}) for n in live}
        replies = _exchange(grid, "secagg_consistency", payloads, timeout, outcome)
        signatures = server.collect_signatures({cid[n]: bytes(r["secagg"]["signature"]) for n, r in replies.items()})

        signers = sorted(signatures)
        payloads = {nid_of[u]: RecordDict({"secagg": ConfigRecord({
            "signers": signers, "signatures": [signatures[v] for v in signers]})}) for u in signers}
        replies = _exchange(grid, "secagg_unmask", payloads, timeout, outcome)
        revealed = {
            cid[n]: {o: (k, int(i), bytes(s)) for o, k, i, s in zip(c["owners"], c["kinds"], c["indices"], c["shares"])}
            for n, r in replies.items()
            for c in [r["secagg"]]
        }
        total = server.unmask(revealed)
    except SecAggAbort as err:
        err.outcome = outcome  # type: ignore[attr-defined]
        raise
    outcome.total = decode_sum(total, setup.params)
    outcome.survivors = sorted(nid_of[u] for u in u3)
    return outcome
