"""Fault injection for simulations (`fedpriv simulate --fault-rate P`).

Each round every simulated node draws, from a hash of (seed, round, node name), whether it
fails this round and how: raise an exception (the reply is an error) or hang past the
server's round timeout (no reply in time). The draw is deterministic, so a test can list
the faults it expects and check that the run's summary records every one.
"""

from __future__ import annotations

import hashlib
import time


class InjectedFault(RuntimeError):
    """Raised by a node chosen to fail this round (simulation only)."""


def planned_fault(seed: int, server_round: int, node: str, rate: float) -> str | None:
    """"raise", "hang" or None for this node and round (probability `rate` of a fault)."""
    if rate <= 0:
        return None
    digest = hashlib.sha256(f"{seed}/{server_round}/{node}".encode()).digest()
    draw = int.from_bytes(digest[:8], "big") / 2**64
    if draw >= rate:
        return None
    return "raise" if digest[8] % 2 == 0 else "hang"


def inject(seed: int, server_round: int, node: str, rate: float, hang_seconds: float) -> None:
    """Raise InjectedFault, or sleep `hang_seconds`, when this node is chosen this round."""
    fault = planned_fault(seed, server_round, node, rate)
    if fault == "raise":
        raise InjectedFault(f"{node}: injected fault in round {server_round} (simulation)")
    if fault == "hang":
        time.sleep(hang_seconds)
