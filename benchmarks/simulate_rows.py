"""What the row-per-run benchmarks share (`patient_level.py`, `speech_scattering.py`): run one
`fedpriv simulate` per named row, and write every row to JSON as it finishes.

Imported by those scripts as a sibling module (`python benchmarks/<script>.py` puts this folder
first on sys.path).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def simulate_row(name: str, options: list[str], work: Path, secagg: bool = False) -> tuple[dict, dict | None]:
    """Run `fedpriv simulate <options> --no-secagg` (or with SecAgg+, the default, if `secagg`) into
    `work/<name>` (ledgers in `work/state-<name>`).

    Both folders are emptied first: a row's figures come from this run only, and its nodes start
    with fresh ledgers (an earlier run's would decline rounds, or leave its summary.json behind).
    Returns the row's start {"row", "command", "seconds" (wall time, s), "returncode"}, with
    "error" (the run's last output) when it failed or wrote no summary.json, and that summary or None.
    """
    out, state = work / name, work / f"state-{name}"
    for folder in (out, state):
        shutil.rmtree(folder, ignore_errors=True)
    cmd = [sys.executable, "-m", "simulations.cli", "simulate", *options, *([] if secagg else ["--no-secagg"]),
           "--out", str(out), "--state-dir", str(state)]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    row = {"row": name, "command": shlex.join(["fedpriv", *cmd[3:]]), "seconds": round(time.time() - start, 1),
           "returncode": proc.returncode}
    if proc.returncode != 0 or not (out / "summary.json").exists():
        row["error"] = proc.stdout[-2000:] + proc.stderr[-2000:]
    if not (out / "summary.json").exists():
        return row, None
    return row, json.loads((out / "summary.json").read_text())


NODE_FIELDS = ("epsilon", "num_examples", "sample_rate", "noise_multiplier", "steps")


def node_figures(summary: dict, fields: tuple[str, ...] = NODE_FIELDS) -> dict:
    """{node: {field: value}} from summary.json's `clients` (None where a node has no such field)."""
    return {n: {k: c.get(k) for k in fields} for n, c in summary["clients"].items()}


def classification_figures(row: dict, summary: dict | None) -> dict:
    """`row` (from `simulate_row`, with the load after it) plus the run's test accuracy, AUC,
    balanced accuracy, majority-class rate, rounds, largest node epsilon (None without DP) and
    `node_figures`; the row alone when the run wrote no summary."""
    row["load_after"] = round(os.getloadavg()[0], 2)
    if summary is None:
        return row
    final = summary["final"]
    row.update({
        "test_accuracy": final["test_accuracy"],
        "test_auc": final.get("test_auc"),
        "test_balanced_accuracy": final.get("test_balanced_accuracy"),
        "majority_class_rate": summary["majority_class_rate"],
        "rounds_completed": summary["rounds_completed"],
        "max_node_epsilon": max((c["epsilon"] for c in summary["clients"].values() if c["epsilon"] is not None),
                                default=None),  # None without DP
        "nodes": node_figures(summary),
    })
    return row


def run_rows(benchmark: str, description: str, rows: list[str], run_row: Callable[[str, Path], dict],
             argv: list[str] | None, fields: dict, printed: Callable[[dict], dict] = lambda row: row) -> int:
    """The command line of a row-per-run benchmark: `--rows`, `--merge`, `--work-dir`, `--out`.

    Runs `run_row(name, work_dir)` for each chosen row and rewrites the JSON after every row (an
    interrupted run keeps what it measured); `fields` are the JSON's fixed top-level keys;
    `printed(row)` is what is printed of each row. Returns the exit code (0).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rows", nargs="+", choices=rows, default=rows)
    parser.add_argument("--merge", type=Path, default=None, help="keep the rows of this earlier JSON not run now")
    parser.add_argument("--work-dir", type=Path, default=Path(f"/tmp/fedpriv-{benchmark.replace('_', '-')}"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / f"{benchmark}.json")
    args = parser.parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": benchmark, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                  "load_before": os.getloadavg()[0]}, **fields, "rows": []}
    if args.merge:
        result["rows"] = [r for r in json.loads(args.merge.read_text())["rows"] if r["row"] not in args.rows]
    for name in args.rows:
        result["rows"].append(run_row(name, args.work_dir))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(printed(result["rows"][-1])), flush=True)
    return 0
