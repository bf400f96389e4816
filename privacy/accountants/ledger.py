"""A node's persistent sample-level privacy ledger (DESIGN 4.1).

The budget belongs to the data, not to a run: one ledger per (node, dataset fingerprint),
kept on the node's disk under its state folder and composed across rounds, runs and
process restarts. The ledger is charged *before* training (write-ahead): a crash during
training over-counts rather than under-counts what was spent.

File: `<state_dir>/ledgers/<node>--<fingerprint[:16]>.json`, written atomically (temp file
then rename), guarded by an advisory lock so two processes never interleave a charge.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .sample_level import HistoryEntry, PrivacyBudgetError, compose_history, epsilon_for_history

# Float tolerance on the budget check: Opacus's noise search lands within 0.01 below target.
_BUDGET_SLACK = 1e-9


def dataset_fingerprint(record_ids: Iterable[str]) -> str:
    """SHA-256 hex digest identifying a set of training records (order-independent).

    record_ids: stable identities of the records (e.g. "fsdd/0_george_5.wav"), not their
    derived features, so changing preprocessing does not reset the budget.
    """
    digest = hashlib.sha256()
    for rid in sorted(record_ids):
        digest.update(rid.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


@dataclass
class LedgerEntry:
    """One charge (or decline) recorded in a node's ledger."""

    time: float
    run: str
    round: int
    steps: int
    noise_multiplier: float
    sample_rate: float
    epsilon_after: float
    declined: bool = False
    reason: str = ""


@dataclass
class _LedgerState:
    node: str
    fingerprint: str
    delta: float
    history: list[list[float]] = field(default_factory=list)  # Opacus RDPAccountant.history
    events: list[dict] = field(default_factory=list)


class NodePrivacyLedger:
    """The persisted RDP accountant of one (node, dataset fingerprint).

    `delta` is fixed when the ledger is created: epsilon is always reported at that delta.
    Raises PrivacyBudgetError when reopened with a different delta (silently switching
    delta would change every epsilon already reported).
    """

    @staticmethod
    def path_for(state_dir: str | os.PathLike, node: str, fingerprint: str) -> Path:
        """Where the ledger of (node, fingerprint) lives under `state_dir` (it may not exist yet)."""
        return Path(state_dir) / "ledgers" / f"{node}--{fingerprint[:16]}.json"

    def __init__(self, state_dir: str | os.PathLike, node: str, fingerprint: str, delta: float) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", node):
            raise ValueError(f"node name must use letters, digits, '_', '.', '-' only, got {node!r}")
        if not 0.0 < delta < 1.0:
            raise PrivacyBudgetError(f"delta must be in (0, 1), got {delta}")
        self.node = node
        self.fingerprint = fingerprint
        self.delta = float(delta)
        self.path = self.path_for(state_dir, node, fingerprint)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            state = self._read()
            if state is None:
                self._write(_LedgerState(node=node, fingerprint=fingerprint, delta=self.delta))
            elif not math.isclose(state.delta, self.delta, rel_tol=1e-12):
                raise PrivacyBudgetError(
                    f"ledger {self.path} was opened with delta={state.delta}; node-config asks "
                    f"delta={self.delta}. A ledger's delta cannot change; use the original delta."
                )

    # -- queries -----------------------------------------------------------------------
    @property
    def history(self) -> list[HistoryEntry]:
        """Composed (noise_multiplier, sample_rate, steps) entries so far."""
        state = self._read()
        return [tuple(h) for h in state.history] if state else []  # type: ignore[misc]

    @property
    def events(self) -> list[LedgerEntry]:
        """Every charge and decline recorded, oldest first."""
        state = self._read()
        return [LedgerEntry(**e) for e in state.events] if state else []

    def epsilon(self) -> float:
        """Epsilon spent so far at this ledger's delta (0.0 for a fresh ledger)."""
        return epsilon_for_history(self.history, self.delta)

    def steps(self) -> int:
        """Total DP-SGD steps charged so far."""
        return int(sum(h[2] for h in self.history))

    def epsilon_if_charged(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon this ledger would show after `steps` more steps (nothing is written)."""
        return epsilon_for_history(compose_history(self.history, noise_multiplier, sample_rate, steps), self.delta)

    # -- updates -----------------------------------------------------------------------
    def charge(
        self,
        *,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        max_epsilon: float,
        run: str,
        round: int,
    ) -> LedgerEntry:
        """Charge `steps` DP-SGD steps if the result stays within `max_epsilon`.

        Returns the entry written. If the charge would exceed `max_epsilon`, nothing is
        charged and a `declined=True` entry is recorded and returned instead.
        """
        if steps < 1 or noise_multiplier <= 0 or not 0 < sample_rate <= 1:
            raise PrivacyBudgetError(
                f"invalid charge: steps={steps}, noise_multiplier={noise_multiplier}, sample_rate={sample_rate}"
            )
        with self._locked():
            state = self._read()
            assert state is not None
            spent = epsilon_for_history(state.history, self.delta)
            composed = compose_history(state.history, noise_multiplier, sample_rate, steps)
            after = epsilon_for_history(composed, self.delta)
            declined = after > max_epsilon + _BUDGET_SLACK
            entry = LedgerEntry(
                time=time.time(),
                run=run,
                round=round,
                steps=0 if declined else steps,
                noise_multiplier=noise_multiplier,
                sample_rate=sample_rate,
                epsilon_after=spent if declined else after,
                declined=declined,
                reason=(
                    f"training would reach epsilon={after:.3f} > max-epsilon={max_epsilon:g} "
                    f"(spent so far {spent:.3f}, delta={self.delta:g})"
                    if declined
                    else ""
                ),
            )
            if not declined:
                state.history = [list(h) for h in composed]
            state.events.append(asdict(entry))
            self._write(state)
            return entry

    # -- storage -----------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.path.with_suffix(".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> _LedgerState | None:
        if not self.path.exists():
            return None
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            return _LedgerState(**raw)
        except (json.JSONDecodeError, TypeError) as err:
            # Never silently reset a budget: a damaged ledger stops the node.
            raise PrivacyBudgetError(f"privacy ledger {self.path} is unreadable ({err}); refusing to train") from err

    def _write(self, state: _LedgerState) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".ledger-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(asdict(state), handle, indent=1)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
