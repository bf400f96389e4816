"""The node's audit log: one JSON line per message a deployed node answered (issue 15).

What a site's privacy officer needs to say what left the building: for each reply, the
time (UTC), run, round, message type, every field sent with its size in bytes, the epsilon
after the round, and whether the round was declined or refused, and why. The entry is built
from the reply itself (`entry_for`), so it holds nothing the node did not already send: a
metric's value, the reason text the reply carried, otherwise only a field's size.

File: `STATE_DIR/audit/audit.jsonl` (folder 0700, file 0600, appended, never rewritten);
past `MAX_BYTES` it is rotated to `audit.jsonl.1` ... `.BACKUPS` (oldest dropped).
`fedpriv log --state-dir DIR` prints it as a table. Written by the node's own code (the
approved ClientApp, or `client.app_approval`'s refusal app), never by a submitted app.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.config import add_state_view_options, resolved_state_dir

MAX_BYTES = 5 * 1024 * 1024  # rotate past this size (bytes)
BACKUPS = 5  # rotated files kept
LOG_NAME = "audit.jsonl"


def log_path(state_dir: Path) -> Path:
    """Where the audit log of the node whose ledger lives in `state_dir` is written."""
    return Path(state_dir) / "audit" / LOG_NAME


def _value_size(value) -> int:
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, (list, tuple)):
        return sum(_value_size(v) for v in value)
    return 8  # int, float, bool: 8 bytes on the wire


def entry_for(reply: Message, request: Message, node: str) -> dict:
    """The audit entry for `reply`, the node's answer to `request`.

    Keys: `time` (UTC ISO 8601), `node`, `run` (the run id the train message names, as the
    ledger records it; else Flower's), `flower_run` (Flower's run id), `round` (the train message's
    `server-round`, else null), `message_type`, `fields` ({"record.key": bytes sent}),
    `bytes` (their sum), `metrics` (as sent), `epsilon` (after the round, or null),
    `declined`, `refused` (bools), `reason` (text the reply gave, or null), `error` (Flower
    error reply, or null), `privacy_unit` (what `epsilon` is about: "record", "patient",
    "user"; null when the reply did not say).
    """
    config = request.content.config_records.get("config") if request.has_content() else None
    server_round = config.get("server-round") if config is not None else None
    run = config.get("run-id") if config is not None else None
    entry = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "node": node, "run": str(run) if run is not None else str(request.metadata.run_id),
        "flower_run": int(request.metadata.run_id),
        "round": int(server_round) if server_round is not None else None,
        "message_type": request.metadata.message_type,
        "fields": {}, "metrics": {}, "epsilon": None, "declined": False, "refused": False, "reason": None,
        "error": None, "privacy_unit": None,
    }
    if reply.has_error():
        entry["error"] = f"{reply.error.code}: {reply.error.reason}"
        return entry
    for record_name, record in reply.content.items():
        if isinstance(record, ArrayRecord):
            for key, array in record.items():
                # the array's payload: elements x bytes per element
                entry["fields"][f"{record_name}.{key}"] = int(np.prod(array.shape, dtype=np.int64)) * \
                    np.dtype(array.dtype).itemsize
        elif isinstance(record, MetricRecord):
            for key, value in record.items():
                entry["metrics"][key] = value
                entry["fields"][f"{record_name}.{key}"] = _value_size(value)
        elif isinstance(record, ConfigRecord):
            for key, value in record.items():
                entry["fields"][f"{record_name}.{key}"] = _value_size(value)
                if key == "reason" and isinstance(value, str) and value:
                    entry["reason"] = value  # the node's own words, as sent
                if key == "privacy-unit":
                    entry["privacy_unit"] = str(value)
    metrics = entry["metrics"]
    entry["epsilon"] = metrics.get("epsilon")
    entry["declined"] = bool(metrics.get("declined", 0))
    entry["refused"] = bool(metrics.get("refused", 0))
    entry["bytes"] = sum(entry["fields"].values())
    return entry


def _rotate(path: Path, backups: int) -> None:
    oldest = path.with_name(f"{path.name}.{backups}")
    oldest.unlink(missing_ok=True)
    for k in range(backups - 1, 0, -1):
        older = path.with_name(f"{path.name}.{k}")
        if older.exists():
            older.rename(path.with_name(f"{path.name}.{k + 1}"))
    path.rename(path.with_name(f"{path.name}.1"))


def append(state_dir: Path, entry: dict, *, max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> Path:
    """Append `entry` as one JSON line to the node's audit log (created 0600 in a 0700 folder),
    rotating first when the line would take the file past `max_bytes`; returns the log's path.

    Raises OSError when the state folder cannot be written (the caller decides what that means).
    """
    path = log_path(state_dir)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    line = (json.dumps(entry, sort_keys=True, default=str) + "\n").encode()
    if path.exists() and path.stat().st_size > 0 and path.stat().st_size + len(line) > max_bytes:
        _rotate(path, backups)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return path


def record_reply(state_dir: Path, reply: Message, request: Message, node: str) -> None:
    """`append(state_dir, entry_for(reply, request, node))`."""
    append(state_dir, entry_for(reply, request, node))


def audit_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower ClientApp mod: on a deployed node (node-config `state-dir` and `node-name`), write the
    reply's entry to the audit log before the reply leaves.

    Fail closed: when the entry cannot be written (OSError), the reply is replaced by a failure
    reply that carries no field of the original, so nothing leaves the node unrecorded.
    """
    reply = call_next(msg, context)
    if "state-dir" not in context.node_config or "data-path" not in context.node_config:
        return reply  # a simulated node: the coordinator's own machine, no site to account to
    name = str(context.node_config.get("node-name", "node"))
    try:
        record_reply(Path(str(context.node_config["state-dir"])), reply, msg, name)
    except OSError as err:
        logging.getLogger("fedpriv.client").error("%s: audit log not writable (%s); the reply is withheld", name, err)
        return Message(content=RecordDict({
            "metrics": MetricRecord({"failed": 1}),
            "node": ConfigRecord({"name": name, "error": "the node's audit log is not writable; nothing was sent"}),
        }), reply_to=msg)
    return reply


def read_entries(state_dir: Path) -> list[dict]:
    """Every entry of the node's audit log, oldest first (rotated files included).

    Raises ValueError naming the file and line for a line that is not a JSON object.
    """
    path = log_path(state_dir)
    files = sorted(path.parent.glob(f"{LOG_NAME}.*"), key=lambda p: -int(p.suffix[1:])
                   if p.suffix[1:].isdigit() else 0) + ([path] if path.exists() else [])
    entries = []
    for file in files:
        for number, line in enumerate(file.read_text().splitlines(), 1):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{file}:{number}: not a JSON line ({err.msg})") from None
            if not isinstance(entry, dict):
                raise ValueError(f"{file}:{number}: expected a JSON object")
            entries.append(entry)
    return entries


def register(subparsers) -> None:
    """Add `fedpriv log` (a site's audit log as a table) to the CLI."""
    parser = subparsers.add_parser("log", help="data owner: what this node sent, one row per message it answered")
    add_state_view_options(parser, "entries")
    parser.set_defaults(handler=_show)


def _show(args: argparse.Namespace, console) -> int:
    from rich.table import Table

    state = resolved_state_dir(args.state_dir)
    try:
        entries = read_entries(state)
    except (OSError, ValueError) as err:
        console.print(f"[red]error:[/red] {err}")
        return 2
    if not entries:
        console.print(f"no audit log in {log_path(state)} (this node has answered no message yet)")
        return 0
    if args.json:
        for entry in entries:
            print(json.dumps(entry, sort_keys=True))
        return 0
    table = Table(title=f"audit log {log_path(state)}")
    for column in ("time", "node", "run", "round", "message", "fields sent", "bytes", "epsilon", "outcome"):
        table.add_column(column, overflow="fold")  # folded, never cut: the log is evidence
    for e in entries:
        outcome = "error: " + e["error"] if e.get("error") else "refused: " + str(e.get("reason")) if e.get("refused") \
            else "declined: " + str(e.get("reason")) if e.get("declined") else "answered"
        table.add_row(e["time"], e["node"], str(e["run"]), "" if e.get("round") is None else str(e["round"]),
                      e["message_type"], ", ".join(sorted({k.split(".", 1)[0] for k in e.get("fields", {})})),
                      str(e.get("bytes", 0)), "" if e.get("epsilon") is None else
                      f"{e['epsilon']:.3f}" + (f" per {e['privacy_unit']}" if e.get("privacy_unit") else ""), outcome)
    console.print(table)
    return 0
