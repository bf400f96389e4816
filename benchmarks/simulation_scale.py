"""Benchmark: wall time per round and peak memory of whole simulations with 10, 100, 1,000 nodes.

Each size is one real fedpriv federation (`simulations.runner.run_simulation_job`: a private
SuperLink in simulation mode, Ray backend, `flwr run` of this app) on the `digits` dataset
(scikit-learn's 8x8 digits, 1,437 training records, IID partition), vision `cnn`, batch 32,
1 local epoch, `--rounds` rounds, 10% of the nodes sampled per round (run-config
`fraction-train` 0.1, `min-nodes` 1, so `server.federation.sample_nodes` takes
round(0.1 * n) nodes). DP-SGD is on (epsilon 8, delta 1e-5 per node); SecAgg+ is off unless
`--secagg` (SecAgg+ round cost at scale is `secagg_round.py`'s subject).

With 1,000 nodes each node holds 1-2 digits records: delta 1e-5 < 1/n holds for any n <= 2,
and the preflight of `fedpriv simulate` (`simulations.cli.preflight`) is run first and
timed, so a size it refuses is recorded with its error.

Measured per size:
- round seconds: `seconds` of each round in the run's metrics.jsonl (server side, from
  sampling to the end of the round's central evaluation). Round 1 also pays the simulated
  nodes' first start (imports, data loading), so the mean is over rounds 2.. as well;
- startup seconds: total wall time less the rounds' seconds (SuperLink, Ray, final
  evaluation on every node, shutdown);
- peak memory: the largest sum over this process and all its descendants (SuperLink,
  simulation process, Ray's daemons and workers), sampled every `--sample-s` s with psutil:
  sum of RSS (counts shared pages once per process, so an upper bound) and sum of PSS
  (shared pages split between processes).

A size that takes longer than `--timeout-min` (preflight and simulation together) is
stopped (SIGALRM; the runner's `finally` stops the SuperLink and Ray) and recorded with the
stage it was in and the innermost project function on the stack.

    python benchmarks/simulation_scale.py [--clients 10 100 1000] [--rounds 3] [--secagg] [--timeout-min 20]
    python benchmarks/simulation_scale.py --clients 1000 --resume   # keep the other sizes' rows

Prints JSON and writes benchmarks/results/simulation_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class TreeMemorySampler:
    """Peak of the summed RSS and PSS (MiB) of this process and its descendants, sampled in a thread."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.peak_rss_mib = 0.0
        self.peak_pss_mib = 0.0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        rss = pss = 0
        procs = [me, *me.children(recursive=True)]
        for proc in procs:
            try:
                info = proc.memory_full_info()
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        self.peak_rss_mib = max(self.peak_rss_mib, rss / 2**20)
        self.peak_pss_mib = max(self.peak_pss_mib, pss / 2**20)
        self.peak_processes = max(self.peak_processes, len(procs))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> TreeMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_config_for(clients: int, rounds: int, secagg: bool, out: Path, state_dir: Path) -> dict:
    """The run-config `fedpriv simulate --dataset digits` would build, plus 10% sampling."""
    from simulations.cli_options import UNCLIPPED_NORM
    from shared_models.datasets.named import data_dir

    return {
        "task": "vision", "dataset": "digits", "model": "cnn", "num-server-rounds": rounds, "local-epochs": 1,
        "batch-size": 32, "lr": 0.5, "optimizer": "sgd", "momentum": 0.0, "activation": "tanh", "dp": True,
        "epsilon": 8.0, "max-epsilon": 8.0, "delta": 1e-5, "max-grad-norm": 1.0, "val-fraction": 0.1,
        "partition": "iid", "alpha": 0.5, "seed": 0, "run-name": out.name, "state-dir": str(state_dir),
        "data-dir": str(data_dir().resolve()), "num-supernodes": clients, "round-timeout": 3600.0,
        "fault-rate": 0.0, "secagg": secagg, "num-shares": 5, "threshold": 0, "clip-norm": UNCLIPPED_NORM,
        "client-noise-multiplier": 0.0, "client-delta": 1e-5, "dropout-rate": 0.0,
        "fraction-train": 0.1, "min-nodes": 1,
    }


class SizeTimeout(Exception):
    """A size ran past --timeout-min."""


def _where(err: BaseException) -> str:
    """The three innermost frames of the traceback that lie in this project, innermost first."""
    import traceback

    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if f.filename.startswith(str(ROOT)) and "site-packages" not in f.filename and f.name != "_alarm"]
    return " < ".join(f"{Path(f.filename).relative_to(ROOT)}:{f.name}" for f in reversed(frames[-3:])) or "?"


def _alarm(signum, frame):
    raise SizeTimeout()


def run_size(clients: int, rounds: int, secagg: bool, work: Path, sample_s: float, timeout_min: float = 1e9) -> dict:
    """One federation of `clients` nodes; returns the row (with "error" when it failed or timed out)."""
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(max(1, int(timeout_min * 60)))
    try:
        return _run_size(clients, rounds, secagg, work, sample_s, timeout_min)
    finally:
        signal.alarm(0)


def _run_size(clients: int, rounds: int, secagg: bool, work: Path, sample_s: float, timeout_min: float) -> dict:
    from rich.console import Console

    from simulations.cli import preflight
    from simulations.runner import run_simulation_job

    out, state = work / f"run-{clients}", work / f"state-{clients}"
    cfg = run_config_for(clients, rounds, secagg, out, state)
    row: dict = {"clients": clients, "rounds": rounds, "fraction_train": 0.1, "secagg": secagg, "dp": True,
                 "load_average_1m_at_start": os.getloadavg()[0]}
    started = time.perf_counter()
    try:
        preflight(cfg, clients)
    except ValueError as err:
        row.update(error=f"preflight: {err}", preflight_seconds=time.perf_counter() - started)
        return row
    except SizeTimeout as err:
        row.update(error=f"timeout: preflight (`fedpriv simulate`'s checks) did not finish within {timeout_min:g} min; "
                         f"it was in {_where(err)}", preflight_seconds=time.perf_counter() - started)
        return row
    row["preflight_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    with TreeMemorySampler(sample_s) as sampler:
        try:
            summary = run_simulation_job(cfg, clients, out, console=Console(stderr=True, quiet=True))
        except SizeTimeout as err:
            summary, row["error"] = None, (f"timeout: the simulation did not finish within {timeout_min:g} min "
                                           f"(preflight included); stopped in {_where(err)}")
        except Exception as err:  # noqa: BLE001 - any failure is the measurement
            summary, row["error"] = None, f"{type(err).__name__}: {err}"[:800]
    row["wall_seconds"] = time.perf_counter() - started
    row.update(peak_rss_mib=sampler.peak_rss_mib, peak_pss_mib=sampler.peak_pss_mib,
               peak_processes=sampler.peak_processes)
    metrics_file = out / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    row["round_seconds"] = [m["seconds"] for m in metrics]
    row["nodes_trained_per_round"] = [len(m["trained"]) for m in metrics]
    row["nodes_failed_per_round"] = [len(m["failed"]) for m in metrics]
    if metrics:
        later = row["round_seconds"][1:] or row["round_seconds"]
        row["mean_round_seconds_after_first"] = sum(later) / len(later)
        row["startup_and_shutdown_seconds"] = row["wall_seconds"] - sum(row["round_seconds"])
    if summary:
        row["final_test_accuracy"] = summary["final"]["test_accuracy"]
        row["max_node_epsilon"] = summary["max_client_epsilon"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--secagg", action="store_true", help="aggregate with SecAgg+ (default: plain FedAvg)")
    parser.add_argument("--sample-s", type=float, default=1.0, help="memory sampling interval (seconds)")
    parser.add_argument("--timeout-min", type=float, default=20.0, help="stop one size after this many minutes")
    parser.add_argument("--resume", action="store_true", help="keep the rows of other sizes already in --out")
    parser.add_argument("--work-dir", type=Path, default=None, help="run folders and ledgers (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "simulation_scale.json")
    args = parser.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fedpriv-scale-"))
    load_before = os.getloadavg()
    rows, commands = [], []
    if args.resume and args.out.exists():
        previous = json.loads(args.out.read_text())
        rows = [r for r in previous["rows"] if r["clients"] not in args.clients]
        commands = previous.get("commands", [previous["command"]])
    commands.append("python benchmarks/simulation_scale.py " + " ".join(sys.argv[1:]))
    args.commands = commands
    for n in args.clients:
        rows.append(run_size(n, args.rounds, args.secagg, work, args.sample_s, args.timeout_min))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        # Partial results survive a later size that runs out of time or memory.
        _write(args, rows, load_before)
    print(json.dumps(_write(args, rows, load_before), indent=2))


def _write(args, rows: list[dict], load_before) -> dict:
    result = {
        "benchmark": "simulation_scale",
        "dataset": "digits", "model": "cnn", "partition": "iid", "dp": "DP-SGD epsilon 8, delta 1e-5 per node",
        "secagg": args.secagg,
        "machine": {"cpus": os.cpu_count(), "memory_gib": psutil.virtual_memory().total / 2**30,
                    "python": platform.python_version(), "platform": platform.platform()},
        "load_average_1m_before_and_after": [load_before[0], os.getloadavg()[0]],
        "command": args.commands[-1],
        "commands": args.commands,
        "rows": sorted(rows, key=lambda r: r["clients"]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
