"""`fedpriv ledger --state-dir DIR`: a site's privacy spend, read from its own ledger (issue 15).

The ledger (`privacy.accountants.ledger`, files under `STATE_DIR/ledgers/`: `records.json`
and `events.jsonl`) is charged before each round trains; this command only reads it. One
row per node name (a kit's node, i.e. one dataset) and run: rounds charged, rounds declined,
and the largest epsilon after the run's last charge (at the node's delta), per the run's
privacy unit: a record, or a patient/user under user-level DP-SGD (issue 19). The node's
current spend per unit is the largest over its rows, since an epsilon only grows.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from client.config import add_state_view_options, resolved_state_dir
from privacy.accountants import PrivacyLedger
from privacy.accountants.sample_level import PrivacyBudgetError


def spend_by_run(state_dir: Path) -> list[dict]:
    """Rows {"node", "run", "unit", "rounds_charged", "rounds_declined", "epsilon", "last"} from the
    ledger's events, oldest run first; `epsilon` is the largest `epsilon_after` of the run (None
    when it only declined), about one `unit` ("record", "patient", "user"); `last` the time
    (Unix seconds) of its last event.

    Raises PrivacyBudgetError (or TypeError/ValueError) for a damaged events file.
    """
    rows: dict[tuple[str, str, str], dict] = {}
    for event in PrivacyLedger(state_dir).events():
        row = rows.setdefault((event.node, event.run, event.unit), {
            "node": event.node, "run": event.run, "unit": event.unit, "rounds_charged": 0, "rounds_declined": 0,
            "epsilon": None, "last": event.time})
        row["last"] = max(row["last"], event.time)
        if event.declined:
            row["rounds_declined"] += event.mechanism == "dp-sgd"
        else:
            row["rounds_charged"] += event.mechanism == "dp-sgd"  # a label-count release is no round
            row["epsilon"] = max(row["epsilon"] or 0.0, event.epsilon_after)
    return sorted(rows.values(), key=lambda r: r["last"])


def spend_by_node(rows: list[dict]) -> dict[tuple[str, str], float]:
    """(node name, unit) -> the largest epsilon per that unit it has spent so far (over its runs' rows)."""
    spent: dict[tuple[str, str], float] = defaultdict(float)
    for row in rows:
        key = (row["node"], row.get("unit", "record"))
        spent[key] = max(spent[key], row["epsilon"] or 0.0)
    return dict(spent)


def register(subparsers) -> None:
    """Add `fedpriv ledger` to the CLI."""
    parser = subparsers.add_parser("ledger", help="data owner: this node's privacy spend per dataset and run")
    add_state_view_options(parser, "rows")
    parser.set_defaults(handler=_show)


def _show(args: argparse.Namespace, console) -> int:
    from datetime import datetime, timezone

    from rich.table import Table

    state = resolved_state_dir(args.state_dir)
    if not (state / "ledgers").is_dir():
        console.print(f"no ledger in {state / 'ledgers'} (this node has trained nothing yet)")
        return 0
    try:
        rows = spend_by_run(state)
    except (PrivacyBudgetError, TypeError, ValueError) as err:
        console.print(f"[red]error:[/red] ledger in {state / 'ledgers'} is damaged: {err}")
        return 2
    if args.json:
        for row in rows:
            print(json.dumps(row, sort_keys=True))
        return 0
    table = Table(title=f"privacy ledger {state / 'ledgers'}")
    for column in ("node (dataset)", "run", "rounds charged", "declined", "epsilon after", "per", "last"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["node"], row["run"], str(row["rounds_charged"]), str(row["rounds_declined"]),
                      "" if row["epsilon"] is None else f"{row['epsilon']:.3f}", row["unit"],
                      datetime.fromtimestamp(row["last"], timezone.utc).isoformat(timespec="seconds"))
    console.print(table)
    for (node, unit), epsilon in spend_by_node(rows).items():
        console.print(f"{node}: epsilon spent so far {epsilon:.3f} per {unit} (largest over its {unit}s)")
    return 0
