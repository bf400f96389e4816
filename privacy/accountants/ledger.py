"""A data owner's persistent per-record privacy ledger (DESIGN 4.1).

The budget belongs to the data, not to a run or to the subset a run trains on. Records are
known by ids derived from their content (`shared_models.records.content_record_ids`), so a
renamed file, a re-ordered export, another seed or validation share, or a dataset with
records added or removed still finds what was spent on every record it holds. For each
record the ledger keeps the RDP history (Opacus `RDPAccountant.history` entries
(noise_multiplier, sample_rate, steps)) of every DP-SGD charge it took part in; a record's
epsilon is that history's (Mironov et al. 2019, composed across rounds, runs, process
restarts and nodes sharing the state folder). A dataset's epsilon is the largest over its
records; a charge that would take any trained record past `max-epsilon` is declined whole.

Records that share a history are stored together as one cohort: `charge` splits a cohort
when only part of it trains, and merges cohorts whose histories become equal, so a node that
trains the same records run after run keeps one cohort.

Charged *before* training (write-ahead): a crash during training over-counts rather than
under-counts what was spent.

Files under `<state_dir>/ledgers/`, guarded by an advisory lock (`records.lock`) so two
processes (simulated nodes in Ray workers, a node and its restart) never interleave a charge:
- `records.json`: the cohorts, rewritten atomically (temp file, fsync, rename);
- `events.jsonl`: one line per charge or decline, appended.

Migration: ledgers of the earlier layout (`<node>--<fingerprint>.json`, one per node and
training subset, without record ids) are adopted, never dropped: their histories stay under
the node's name and are charged to every record that node opens, now or later
(`adopt_legacy`); the old files move to `ledgers/migrated/`.

Patient-level (user-level) units: when a node trains with user-level DP-SGD
(`privacy.user_level`), the unit is a group of records (a patient). Each group is kept
under its own id (`group_unit_id`, a hash of the group key) with the group-level history,
and the ledger remembers each record's group (`records.json` "groups"). A record's
epsilon composes its own (record-level) history with its group's, since a guarantee about
the whole group holds for each of its records: record-level queries stay complete. A
group-level charge is declined when a record of the group has record-level spend or was
charged in another group: that group's patient-level epsilon would need group privacy,
which this ledger does not convert, so it never reports a figure it cannot prove.

What a decline reveals: that some record of the training share has spent its budget. The
set of records and their overlap with earlier runs is treated as public metadata, like the
record count the node reports.
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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .sample_level import HistoryEntry, PrivacyBudgetError, compose_history, epsilon_for_history

# Float tolerance on the budget check: Opacus's noise search lands within 0.01 below target.
_BUDGET_SLACK = 1e-9
_NODE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_LEGACY_FILE = re.compile(r"^(?P<node>[A-Za-z0-9_.-]+)--(?P<fp>[0-9a-f]{16})\.json$")


@dataclass
class LedgerEntry:
    """One charge (or decline) recorded in the ledger; epsilon_after is the trained records' largest."""

    time: float
    node: str
    run: str
    round: int
    steps: int
    noise_multiplier: float
    sample_rate: float
    records: int
    epsilon_after: float
    declined: bool = False
    reason: str = ""
    unit: str = "record"  # the privacy unit epsilon_after is about: "record", or a group unit ("patient", "user")
    groups: int = 0  # groups charged (user-level DP); 0 for record-level charges
    # What was charged: "dp-sgd" (training steps) or "label-counts" (`privacy.label_counts`: one
    # Gaussian release, steps 1 at sampling rate 1). Events written before it say nothing: DP-SGD.
    mechanism: str = "dp-sgd"


@dataclass
class _Cohort:
    """Records that share one RDP history, at one delta."""

    delta: float
    history: list[HistoryEntry]
    records: set[str]


@dataclass
class _State:
    cohorts: list[_Cohort] = field(default_factory=list)
    # node -> earlier-layout ledgers: {"file", "delta", "history", "charged": records charged so far}
    legacy: dict[str, list[dict]] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)  # record id -> the group id it was charged in

    def cohort_of(self) -> dict[str, int]:
        return {r: i for i, c in enumerate(self.cohorts) for r in c.records}


def group_unit_id(key: str) -> str:
    """The ledger id of a group (patient) key: "group-" + the first 128 bits of SHA-256, in hex.

    Hashed so the ledger file holds no patient identifier; disjoint from record ids (hex only).
    """
    return "group-" + hashlib.sha256(b"fedpriv-group\0" + str(key).encode()).hexdigest()[:32]


def _check_node(node: str) -> None:
    if not _NODE_NAME.fullmatch(node):
        raise ValueError(f"node name must use letters, digits, '_', '.', '-' only, got {node!r}")


class PrivacyLedger:
    """The per-record RDP ledger of one state folder (see the module docstring).

    Every method takes the records it is about (content ids) and the owner's `delta`, at
    which epsilon is reported. A record's delta is fixed by its first charge: asking about
    it at another delta raises PrivacyBudgetError (switching delta would change every
    epsilon already reported). A damaged ledger file raises PrivacyBudgetError too: a budget
    is never silently reset.
    """

    def __init__(self, state_dir: str | os.PathLike) -> None:
        self.folder = Path(state_dir) / "ledgers"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "records.json"
        self.events_path = self.folder / "events.jsonl"
        with self._locked():
            self._migrate_legacy_files()

    # -- queries -----------------------------------------------------------------------
    def epsilon(self, records: Sequence[str], delta: float) -> float:
        """Largest epsilon spent by any of `records` at `delta` (0.0 when none was charged)."""
        return self.worst(records, delta)[0]

    def worst(self, records: Sequence[str], delta: float) -> tuple[float, list[HistoryEntry]]:
        """(epsilon, history) of the record of `records` that has spent the most."""
        state = self._read()
        return _worst(state, state.cohort_of(), records, delta)

    def epsilon_if_charged(self, records: Sequence[str], delta: float, noise_multiplier: float, sample_rate: float,
                           steps: int) -> float:
        """Largest epsilon any of `records` would reach after `steps` more steps (nothing is written)."""
        state = self._read()
        return _after_charge(state, state.cohort_of(), records, delta, noise_multiplier, sample_rate, steps)

    def events(self, node: str | None = None) -> list[LedgerEntry]:
        """Every charge and decline recorded (of `node`, or of all nodes), oldest first."""
        if not self.events_path.exists():
            return []
        lines = self.events_path.read_text(encoding="utf-8").splitlines()
        entries = [LedgerEntry(**json.loads(line)) for line in lines if line.strip()]
        return [e for e in entries if node is None or e.node == node]

    # -- updates -----------------------------------------------------------------------
    def adopt_legacy(self, node: str, records: Sequence[str], delta: float) -> int:
        """Charge `node`'s earlier-layout ledgers to those of `records` they were not yet charged to.

        Call with every record the node holds, each time it opens its data: an old ledger
        had no record ids, so its spend goes to every record the node ever holds (an
        over-count, never an under-count), and stays attached to the node. Returns how many
        records were newly charged. Raises PrivacyBudgetError when an old ledger used another delta.
        """
        _check_node(node)
        with self._locked():
            state = self._read()
            charged = 0
            for old in state.legacy.get(node, []):
                fresh = set(records) - set(old["charged"])
                if not fresh:
                    continue
                if not math.isclose(old["delta"], delta, rel_tol=1e-12):
                    raise PrivacyBudgetError(
                        f"the earlier ledger {old['file']} of {node} was kept at delta={old['delta']}; node-config "
                        f"asks delta={delta}. A ledger's delta cannot change; use the original delta.")
                for sigma, q, steps in old["history"]:
                    _charge_cohorts(state, fresh, delta, float(sigma), float(q), int(steps))
                old["charged"] = sorted(set(old["charged"]) | fresh)
                charged = max(charged, len(fresh))
            if charged:
                self._write(state)
            return charged

    def charge(self, records: Sequence[str], *, node: str, delta: float, noise_multiplier: float,
               sample_rate: float, steps: int, max_epsilon: float, run: str, round: int,
               groups: Mapping[str, Sequence[str]] | None = None, unit: str = "record",
               mechanism: str = "dp-sgd") -> LedgerEntry:
        """Charge `steps` DP-SGD steps to every one of `records` if none passes `max_epsilon`.

        Record-level (groups None): sample_rate is over records and the budget is checked per
        record. User-level: `groups` maps each trained group's id (`group_unit_id`) to its
        record ids, sample_rate is over groups, every group is charged and its records are
        remembered as its members (their epsilon then includes the group's); `unit` names the
        group unit ("patient", "user"). Returns the entry written
        (epsilon_after: the largest over the groups, else over `records`). If some unit would
        pass `max_epsilon`, or a group's records carry spend the group does not (the module
        docstring), nothing is charged and a `declined=True` entry is recorded and returned;
        in the latter case its unit is "record" and epsilon_after the records' largest.
        mechanism: what is charged, kept in the event ("dp-sgd", or "label-counts" for the
        one Gaussian release of `privacy.label_counts`: steps 1, sample_rate 1).
        Raises PrivacyBudgetError for an invalid charge or delta.
        """
        _check_node(node)
        if steps < 1 or noise_multiplier <= 0 or not 0 < sample_rate <= 1 or not records or groups == {}:
            raise PrivacyBudgetError(f"invalid charge: steps={steps}, noise_multiplier={noise_multiplier}, "
                                     f"sample_rate={sample_rate}, records={len(records)}, "
                                     f"groups={None if groups is None else len(groups)}")
        # The charged units: records, or groups (a record's group-level spend is its group's history).
        units = list(groups) if groups is not None else list(records)
        with self._locked():
            state = self._read()
            index = state.cohort_of()
            spent = _worst(state, index, units, delta)[0]
            after = _after_charge(state, index, units, delta, noise_multiplier, sample_rate, steps)
            mixed = _mixed_group(state, index, groups) if groups is not None else ""
            if mixed:  # no patient-level figure can be proven: state the records' own epsilon instead
                spent = _worst(state, index, records, delta)[0]
            declined = bool(mixed) or after > max_epsilon + _BUDGET_SLACK
            entry = LedgerEntry(
                time=time.time(), node=node, run=run, round=round, steps=0 if declined else steps,
                noise_multiplier=noise_multiplier, sample_rate=sample_rate, records=len(records),
                epsilon_after=spent if declined else after, declined=declined,
                reason=mixed or (f"training would reach epsilon={after:.3f} > max-epsilon={max_epsilon:g} "
                                 f"(spent so far {spent:.3f}, delta={delta:g}, per {unit})" if declined else ""),
                unit=unit if groups is not None and not mixed else "record",
                groups=len(groups) if groups is not None else 0, mechanism=mechanism,
            )
            if not declined:
                _charge_cohorts(state, set(units), delta, noise_multiplier, sample_rate, steps)
                for group, members in (groups or {}).items():
                    state.groups.update(dict.fromkeys(members, group))
                self._write(state)
            with open(self.events_path, "a", encoding="utf-8") as log:
                log.write(json.dumps(asdict(entry)) + "\n")
                log.flush()
                os.fsync(log.fileno())
            return entry

    # -- storage -----------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.folder / "records.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> _State:
        if not self.path.exists():
            return _State()
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            return _State(
                cohorts=[_Cohort(delta=float(c["delta"]), history=[(float(s), float(q), int(n)) for s, q, n in c["history"]],
                                 records=set(c["records"])) for c in raw["cohorts"]],
                legacy={str(k): list(v) for k, v in raw.get("legacy", {}).items()},
                groups={str(k): str(v) for k, v in raw.get("groups", {}).items()},
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise PrivacyBudgetError(f"privacy ledger {self.path} is unreadable ({err}); refusing to train") from err

    def _write(self, state: _State) -> None:
        doc = {
            "version": 2,
            "cohorts": [{"delta": c.delta, "history": [list(h) for h in c.history], "records": sorted(c.records)}
                        for c in state.cohorts],
            "legacy": state.legacy,
            "groups": state.groups,
        }
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".records-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(doc, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _migrate_legacy_files(self) -> None:
        """Move earlier-layout ledgers into `legacy` (under the lock); their spend is kept."""
        old_files = sorted(p for p in self.folder.glob("*.json") if _LEGACY_FILE.match(p.name))
        if not old_files:
            return
        state = self._read()
        (self.folder / "migrated").mkdir(exist_ok=True)
        for path in old_files:
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
                old = {"file": path.name, "delta": float(raw["delta"]),
                       "history": [[float(s), float(q), int(n)] for s, q, n in raw["history"]], "charged": []}
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise PrivacyBudgetError(f"earlier privacy ledger {path} is unreadable ({err}); refusing to train") from err
            if old["history"]:
                state.legacy.setdefault(_LEGACY_FILE.match(path.name)["node"], []).append(old)
            self._write(state)  # recorded before the file moves: a crash in between only repeats the move
            os.replace(path, self.folder / "migrated" / path.name)


def _mixed_group(state: _State, index: dict[str, int], groups: Mapping[str, Sequence[str]]) -> str:
    """Why a user-level charge must be declined because a group's records spent apart from it, or "".

    A record with record-level history of its own, or already charged in another group,
    would give the group a spend its own history does not show (group privacy).
    """
    for group, records in groups.items():
        for r in records:
            if r in index or state.groups.get(r, group) != group:
                return ("records of a group were trained outside its patient-level ledger (at record level, or in "
                        "another group); their group-level epsilon would need group privacy, which the ledger does "
                        "not convert: declining rather than report a figure it cannot prove")
    return ""


def _histories(state: _State, index: dict[str, int], keys: Sequence[str], delta: float) -> list[list[HistoryEntry]]:
    """The distinct full histories of `keys` (records or group ids), each key's own composed with
    its group's for a record charged in a group; [] for a key never charged.

    Raises PrivacyBudgetError when a cohort was kept at another delta.
    """
    pairs = {(index.get(k), index.get(state.groups[k]) if k in state.groups else None) for k in keys}
    out = []
    for own, group in pairs:
        history: list[HistoryEntry] = []
        for i in (own, group):
            if i is None:
                continue
            if not math.isclose(state.cohorts[i].delta, delta, rel_tol=1e-12):
                raise PrivacyBudgetError(
                    f"records of this data were charged at delta={state.cohorts[i].delta}; node-config asks "
                    f"delta={delta}. A ledger's delta cannot change; use the original delta.")
            history += state.cohorts[i].history
        out.append(history)
    return out


def _worst(state: _State, index: dict[str, int], records: Sequence[str], delta: float) -> tuple[float, list]:
    best: tuple[float, list] = (0.0, [])
    for history in _histories(state, index, records, delta):
        eps = epsilon_for_history(history, delta)
        if eps > best[0]:
            best = (eps, history)
    return best


def _after_charge(state: _State, index: dict[str, int], records: Sequence[str], delta: float,
                  noise_multiplier: float, sample_rate: float, steps: int) -> float:
    return max(epsilon_for_history(compose_history(h, noise_multiplier, sample_rate, steps), delta)
               for h in _histories(state, index, records, delta))


def _charge_cohorts(state: _State, records: set[str], delta: float, noise_multiplier: float, sample_rate: float,
                    steps: int) -> None:
    """Add the charge to every record of `records`: split cohorts it covers in part, then merge equal histories."""
    out: list[_Cohort] = []
    fresh = set(records)
    for cohort in state.cohorts:
        inside = cohort.records & records
        fresh -= inside
        if inside:
            out.append(_Cohort(cohort.delta, compose_history(cohort.history, noise_multiplier, sample_rate, steps), inside))
        if len(inside) < len(cohort.records):
            out.append(_Cohort(cohort.delta, cohort.history, cohort.records - inside))
    if fresh:
        out.append(_Cohort(delta, compose_history([], noise_multiplier, sample_rate, steps), fresh))
    merged: dict[tuple, _Cohort] = {}
    for cohort in out:
        key = (cohort.delta, tuple(cohort.history))
        if key in merged:
            merged[key].records |= cohort.records
        else:
            merged[key] = cohort
    state.cohorts = list(merged.values())
