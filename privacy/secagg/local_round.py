"""Run one SecAgg+ round in memory: the same client/server code, no network.

For tests and benchmarks: `dropouts` names the clients that vanish after a stage
("advertise", "share", "masked", "consistency", i.e. they never answer the *next* stage).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .identity import SigningIdentity, new_identities
from .protocol import RoundSetup, SecAggClient, SecAggServer

STAGES = ("advertise", "share", "masked", "consistency")


def run_local_round(
    setup: RoundSetup,
    inputs: Mapping[str, np.ndarray],
    dropouts: Mapping[str, set[str]] | None = None,
    tamper=None,
    identities: Mapping[str, SigningIdentity] | None = None,
) -> tuple[np.ndarray, list[str], dict]:
    """(sum over U3 in Z_(2^k), U3, transcript of everything the server received).

    inputs: client id -> (d,) uint32 vector in Z_(2^k). tamper: optional callable applied to
    the routed ciphertexts (dict receiver -> {sender: bytes}) to simulate an attacker.
    identities: the clients' signing identities (default: fresh ones, one keyring).
    Raises SecAggAbort when fewer than t clients remain at a stage or a check fails.
    """
    dropouts = {stage: set(dropouts.get(stage, ())) for stage in STAGES} if dropouts else {s: set() for s in STAGES}
    d = len(next(iter(inputs.values())))
    identities = identities or new_identities(list(setup.participants))
    clients = {u: SecAggClient(u, setup, identities[u]) for u in setup.participants}
    server = SecAggServer(setup, dimension=d)
    transcript: dict = {}

    alive = set(clients)
    transcript["advertise"] = {u: clients[u].advertise_keys() for u in sorted(alive)}
    key_views = server.collect_keys(transcript["advertise"])
    alive -= dropouts["advertise"]

    transcript["share"] = {u: clients[u].share_keys(key_views[u]) for u in sorted(alive)}
    routed = server.route_shares(transcript["share"])
    if tamper:
        tamper(routed)
    alive -= dropouts["share"]

    transcript["masked"] = {u: clients[u].masked_input(routed[u], server.u2, inputs[u]) for u in sorted(alive & set(server.u2))}
    u3 = server.collect_masked(transcript["masked"])
    alive -= dropouts["masked"]

    transcript["consistency"] = {u: clients[u].sign_survivors(u3) for u in sorted(alive & set(u3))}
    signatures = server.collect_signatures(transcript["consistency"])
    alive -= dropouts["consistency"]

    transcript["unmask"] = {u: clients[u].unmask(signatures) for u in sorted(alive & set(u3))}
    total = server.unmask(transcript["unmask"])
    return total, u3, transcript
