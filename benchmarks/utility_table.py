"""Benchmark: test accuracy (and AUC for binary tasks) of centralized, federated and private training.

Per dataset (FSDD: speech, 6 speaker nodes; PneumoniaMNIST: vision, 5 nodes Dirichlet 0.5;
SMS Spam: text, 5 nodes Dirichlet 0.5), with one model and one budget of local training
per dataset (`rounds` x `local_epochs` passes over each node's share):

(a) `central`: the same model and the same local training code
    (`privacy.dp_sgd.LocalTrainingSession`, no DP) on the pooled training shares of all
    nodes (each node's share less its 10% validation split, as the federated nodes train
    on), for rounds x local_epochs epochs, seed 0;
(b) `fed`: `fedpriv simulate --no-dp --no-secagg`;
(c) `fed-dp`: `fedpriv simulate --no-secagg --epsilon E` for E in 1, 3, 8 (delta 1e-5):
    sample-level DP-SGD per node (Abadi et al. 2016), noise calibrated so that all rounds
    spend E;
(d) `fed-dp-secagg-cdp`: (c) plus SecAgg+ and distributed client-level DP
    (`--client-noise-multiplier s --clip-norm C`). C is set from a probe: the L2 norm of node
    0's first-round DP update from the initial model (same code, same noise), so clipping
    rarely binds; s is small (per dataset below) because with 5-6 nodes any useful
    client-level noise destroys accuracy. The client-level epsilon it gives is reported
    from summary.json `client_level` as it is (it is large: no meaningful guarantee).

Then tuning rows (`tune-*`), the DP literature's levers (De et al. 2022; Tramer & Boneh
2021): larger batches (learning rate kept or scaled along), more rounds. GroupNorm and tanh
are already the models' defaults. The best DP accuracy per (dataset, epsilon, secagg) over
the base and tuning rows is marked `best_for_epsilon`; note that this selection looks at
the test split, so it is optimistic, and private hyper-parameter search would itself cost
privacy (Papernot & Steinke, ICLR 2022).

Rows run in priority order until `--budget-min` minutes are spent (the rest are recorded
as skipped); results are written after every row, so an interrupted run still leaves JSON.
Each federated row records the exact `fedpriv simulate` command it ran.

Since issue 12 every node draws its DP noise from secret OS entropy, so a DP row is a random
draw: `--repeats R` runs each federated row R times (fresh state folders, fresh noise) and
records every run, their mean (`test_accuracy`, `test_auc`) and standard deviation
(`test_accuracy_std`, `test_auc_std`). Rows measured before issue 12 carry no `noise` field:
their noise came from the run's seed (one draw each).

    python benchmarks/utility_table.py [--quick] [--datasets sms_spam pneumoniamnist fsdd] [--budget-min 60]
    python benchmarks/utility_table.py --merge A.json B.json [--out FILE]   # rows of runs made in parallel

`--quick`: SMS Spam only, 2 rounds, rows (a), (b), (c) at epsilon 8, (d) at epsilon 8 (a dry
run, ~3 minutes). Prints JSON and writes benchmarks/results/utility_table[_quick].json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EPSILONS = (1.0, 3.0, 8.0)
DELTA = 1e-5
SEED = 0

# Per dataset: the federation and the local-training budget shared by all its rows. PneumoniaMNIST
# and FSDD use the lengths at which DP-SGD first trained them usefully here (15 x 2 and 30 x 2;
# with 5 x 1 every DP row stayed at the majority class / chance); a CNN DP-SGD round of 5 nodes
# takes about half a minute on the 2 cores these were measured on.
DATASETS = {
    "sms_spam": {"clients": 5, "partition": "dirichlet", "alpha": 0.5, "model": "ngram-linear", "rounds": 15,
                 "local_epochs": 2, "batch": 128, "lr": 8.0, "client_sigma": 0.01},
    "pneumoniamnist": {"clients": 5, "partition": "dirichlet", "alpha": 0.5, "model": "cnn", "rounds": 15,
                       "local_epochs": 2, "batch": 128, "lr": 0.5, "client_sigma": 0.003},
    "fsdd": {"clients": 6, "partition": "natural", "alpha": 0.5, "model": "conv", "rounds": 30,
             "local_epochs": 2, "batch": 32, "lr": 0.5, "client_sigma": 0.003},
}

# Tuning variants for the DP rows: (name, batch factor, lr factor, rounds factor).
TUNING = (("tune-batch2x-lr2x", 2, 2.0, 1), ("tune-rounds2x", 1, 1.0, 2), ("tune-batch4x-lr4x", 4, 4.0, 1),
          ("tune-batch4x", 4, 1.0, 1))

PUBLISHED = {
    "pneumoniamnist": "MedMNIST v2 (28x28): ResNet-18 ACC 0.854 / AUC 0.944; ResNet-50 ACC 0.854 / AUC 0.948; "
                      "auto-sklearn ACC 0.855 / AUC 0.942",
    "sms_spam": "Almeida et al. 2011: SVM accuracy 0.9764",
    "fsdd": "none given in ../shared/data/README.md",
}


def plan_rows(datasets: list[str], quick: bool) -> list[dict]:
    """Row specs in the order they run (cheap and most informative first)."""
    rows = []

    def add(priority, dataset, kind, epsilon=None, variant="base", **cfg_over):
        cfg = {**DATASETS[dataset], **cfg_over}
        if quick:
            cfg["rounds"] = 2
        rows.append({"id": f"{dataset}/{kind}/{variant}/{epsilon}", "priority": priority, "dataset": dataset,
                     "kind": kind, "epsilon": epsilon, "variant": variant, "config": cfg})

    for ds in datasets:
        base = 1 if ds == "sms_spam" else 2
        add(base, ds, "central")
        add(base, ds, "fed")
        for eps in EPSILONS if not quick else (8.0,):
            add(base if eps == 8.0 or ds == "sms_spam" else 3, ds, "fed-dp", eps)
            add(base if eps == 8.0 else 4, ds, "fed-dp-secagg-cdp", eps)
        if not quick:
            cfg = DATASETS[ds]
            if cfg["model"] != "ngram-linear":
                # The default SGD rates are tuned for clipped DP gradients (norm <= 1); with raw
                # non-private gradients the CNNs diverged at them here (majority class / chance),
                # so (a) and (b) also get a 10x smaller rate.
                add(base, ds, "central", None, "tune-lr0.1x", lr=cfg["lr"] * 0.1)
                add(base, ds, "fed", None, "tune-lr0.1x", lr=cfg["lr"] * 0.1)
            for name, bf, lf, rf in TUNING:
                for eps in EPSILONS:
                    add(5 if ds == "sms_spam" else 6, ds, "fed-dp", eps, name, batch=cfg["batch"] * bf,
                        lr=cfg["lr"] * lf, rounds=cfg["rounds"] * rf)
    return sorted(rows, key=lambda r: r["priority"])  # stable: keeps the order within a priority


def pooled_training_shares(dataset: str, cfg: dict):
    """All nodes' training shares concatenated (each node's share less its validation split)."""
    import numpy as np

    from shared_models.records import LabeledArrays
    from client.node_training import split_validation
    from shared_models.datasets.named import load_dataset
    from shared_models.datasets.partitioning import partition_indices

    splits = load_dataset(dataset)
    train = splits["train"]
    parts = partition_indices(train.y, cfg["clients"], cfg["partition"], alpha=cfg["alpha"], groups=train.groups,
                              seed=SEED)
    shares = [split_validation(train.subset(p), 0.1)[0] for pid, p in enumerate(parts)]
    pooled = LabeledArrays(task=train.task, x=np.concatenate([s.x for s in shares]),
                           y=np.concatenate([s.y for s in shares]), classes=train.classes,
                           record_ids=[r for s in shares for r in s.record_ids], source=train.source)
    return pooled, shares, splits["test"]


def run_central(dataset: str, cfg: dict) -> dict:
    """Row (a): non-private training on the pooled shares with the nodes' own training code."""
    import torch

    from shared_models.records import LabeledArrays  # noqa: F401 - imported for the type in pooled_training_shares
    from privacy.dp_sgd import LocalTrainingSession, evaluate
    from shared_models import build_model

    torch.set_num_threads(1)
    pooled, _, test = pooled_training_shares(dataset, cfg)
    torch.manual_seed(SEED)
    model = build_model(pooled.task, cfg["model"], pooled.input_shape, pooled.num_classes)
    session = LocalTrainingSession(model, pooled, batch_size=cfg["batch"], lr=cfg["lr"], optimizer="sgd",
                                   noise_multiplier=None, max_grad_norm=1.0, device=torch.device("cpu"))
    result = session.train_epochs(cfg["rounds"] * cfg["local_epochs"])
    metrics = evaluate(session.module, test, torch.device("cpu"))
    return {"test_accuracy": metrics["accuracy"], "test_auc": metrics.get("auc"), "train_records": len(pooled),
            "epochs": cfg["rounds"] * cfg["local_epochs"], "steps": result.steps}


def probe_update_norm(dataset: str, cfg: dict, epsilon: float) -> float:
    """L2 norm of node 0's first-round DP-SGD update from the initial model (sets row (d)'s clip-norm)."""
    import torch

    from privacy.accountants import calibrate_noise_multiplier
    from privacy.dp_sgd import LocalTrainingSession, poisson_sample_rate, steps_per_epoch
    from shared_models import build_model

    torch.set_num_threads(1)
    _, shares, _ = pooled_training_shares(dataset, cfg)
    share = shares[0]
    q = poisson_sample_rate(len(share), cfg["batch"])
    steps = cfg["local_epochs"] * steps_per_epoch(len(share), cfg["batch"])
    sigma = calibrate_noise_multiplier(epsilon, DELTA, q, cfg["rounds"] * steps)
    torch.manual_seed(SEED)
    model = build_model(share.task, cfg["model"], share.input_shape, share.num_classes)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    session = LocalTrainingSession(model, share, batch_size=cfg["batch"], lr=cfg["lr"], optimizer="sgd",
                                   noise_multiplier=sigma, max_grad_norm=1.0, device=torch.device("cpu"))
    state = session.train_epochs(cfg["local_epochs"]).state
    return float(sum(((state[k] - start[k]) ** 2).sum() for k in start) ** 0.5)


def simulate_command(row: dict, work: Path, clip_norm: float | None) -> list[str]:
    """The `fedpriv simulate` arguments of a federated row."""
    cfg, ds = row["config"], row["dataset"]
    tag = row["id"].replace("/", "_")
    args = ["simulate", "--dataset", ds, "--clients", str(cfg["clients"]), "--partition", cfg["partition"],
            "--alpha", str(cfg["alpha"]), "--model", cfg["model"], "--rounds", str(cfg["rounds"]),
            "--local-epochs", str(cfg["local_epochs"]), "--batch-size", str(cfg["batch"]), "--lr", str(cfg["lr"]),
            "--seed", str(SEED), "--out", str(work / tag / "run"), "--state-dir", str(work / tag / "state")]
    if row["kind"] == "fed":
        args += ["--no-dp", "--no-secagg"]
    elif row["kind"] == "fed-dp":
        args += ["--epsilon", str(row["epsilon"]), "--delta", str(DELTA), "--no-secagg"]
    else:
        args += ["--epsilon", str(row["epsilon"]), "--delta", str(DELTA), "--secagg",
                 "--num-shares", str(cfg["clients"]), "--client-noise-multiplier", str(cfg["client_sigma"]),
                 "--clip-norm", f"{clip_norm:.4g}"]
    return args


def run_federated_repeats(row: dict, work: Path, timeout_s: float, repeats: int) -> dict:
    """`run_federated` `repeats` times, each in its own work folder (fresh ledgers, fresh secret noise).

    Returns the first run's fields, with `test_accuracy`/`test_auc` replaced by the mean over
    the runs, their sample standard deviation in `*_std`, and every run in `repeats`.
    """
    import numpy as np

    runs = [run_federated(row, work / f"rep{i}" if repeats > 1 else work, timeout_s) for i in range(repeats)]
    out = {**runs[0], "noise": "secret (issue 12)"}
    if repeats > 1:
        out["repeats"] = runs
        for key in ("test_accuracy", "test_auc"):
            values = [r[key] for r in runs if r.get(key) is not None]
            if len(values) == repeats:
                out[key], out[f"{key}_std"] = float(np.mean(values)), float(np.std(values, ddof=1))
    return out


def run_federated(row: dict, work: Path, timeout_s: float) -> dict:
    """Rows (b)-(d): one `fedpriv simulate` run in a subprocess; metrics from its summary.json."""
    out: dict = {}
    clip = None
    if row["kind"] == "fed-dp-secagg-cdp":
        clip = probe_update_norm(row["dataset"], row["config"], row["epsilon"])
        out["clip_norm_probe"] = clip
    args = simulate_command(row, work, clip)
    out["command"] = "fedpriv " + shlex.join(args)
    proc = subprocess.run([sys.executable, "-m", "simulations.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout_s, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    summary_file = Path(args[args.index("--out") + 1]) / "summary.json"
    if proc.returncode != 0 or not summary_file.exists():
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
        out["error"] = f"exit {proc.returncode}: " + " | ".join(lines[-3:])[-600:]
        return out
    summary = json.loads(summary_file.read_text())
    out.update(test_accuracy=summary["final"]["test_accuracy"], test_auc=summary["final"].get("test_auc"),
               rounds_completed=summary["rounds_completed"], max_node_epsilon=summary["max_client_epsilon"],
               majority_class_rate=summary["majority_class_rate"], run_seconds=summary["seconds"])
    nodes = summary["clients"].values()
    sigmas = [c["noise_multiplier"] for c in nodes if c.get("noise_multiplier") is not None]
    if sigmas:
        out["noise_multiplier_range"] = [min(sigmas), max(sigmas)]
    if summary.get("client_level") and summary["client_level"].get("enabled"):
        out["client_level"] = summary["client_level"]
    return out


def mark_best(rows: list[dict]) -> None:
    """Flag the best DP accuracy per (dataset, epsilon, kind) among finished rows."""
    best: dict[tuple, dict] = {}
    for r in rows:
        r.pop("best_for_epsilon", None)
        if r["kind"].startswith("fed-dp") and r.get("test_accuracy") is not None:
            key = (r["dataset"], r["epsilon"], r["kind"])
            if key not in best or r["test_accuracy"] > best[key]["test_accuracy"]:
                best[key] = r
    for r in best.values():
        r["best_for_epsilon"] = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--datasets", nargs="+", default=None, choices=list(DATASETS))
    parser.add_argument("--budget-min", type=float, default=60.0, help="stop starting rows after this many minutes")
    parser.add_argument("--only", nargs="+", default=None, help="run only rows whose id starts with one of these")
    parser.add_argument("--resume", action="store_true", help="keep finished rows of an existing --out file")
    parser.add_argument("--work-dir", type=Path, default=None, help="run folders and ledgers (default: a temp dir)")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="combine the rows and commands of these result files into --out and exit")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per federated row (fresh secret noise each); mean and spread are recorded")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.out or ROOT / "benchmarks" / "results" / "utility_table.json")
        return
    datasets = args.datasets or (["sms_spam"] if args.quick else list(DATASETS))
    out = args.out or ROOT / "benchmarks" / "results" / f"utility_table{'_quick' if args.quick else ''}.json"
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fedpriv-utility-"))
    planned = plan_rows(datasets, args.quick)
    if args.only:
        planned = [r for r in planned if any(r["id"].startswith(p) for p in args.only)]
    done: dict[str, dict] = {}
    commands: list[str] = []
    if args.resume and out.exists():
        previous = json.loads(out.read_text())
        done = {r["id"]: r for r in previous["rows"] if "test_accuracy" in r}
        commands = previous.get("commands", [])
    commands.append("python benchmarks/utility_table.py " + " ".join(sys.argv[1:]))
    started = time.monotonic()
    rows: list[dict] = list(done.values())
    for spec in planned:
        if spec["id"] in done:
            continue
        row = {k: spec[k] for k in ("id", "dataset", "kind", "epsilon", "variant", "config")}
        spent_min = (time.monotonic() - started) / 60.0
        if spent_min > args.budget_min:
            row["skipped"] = f"wall-time budget of {args.budget_min:g} min spent"
        else:
            t0 = time.monotonic()
            try:
                timeout_s = max(60.0, (args.budget_min - spent_min) * 60 + 600)
                row.update(run_central(spec["dataset"], spec["config"]) if spec["kind"] == "central"
                           else run_federated_repeats(spec, work, timeout_s, args.repeats))
            except Exception as err:  # noqa: BLE001 - a failed row is recorded, the others still run
                row["error"] = f"{type(err).__name__}: {err}"[:600]
            row["wall_seconds"] = time.monotonic() - t0
        rows = [r for r in rows if r["id"] != row["id"]] + [row]
        mark_best(rows)
        print(json.dumps({k: v for k, v in row.items() if k != "config"}), file=sys.stderr, flush=True)
        _write(out, rows, datasets, commands, args.quick)
    print(json.dumps(_write(out, rows, datasets, commands, args.quick), indent=2))


def merge(paths: list[Path], out: Path) -> None:
    """Write one result from several (e.g. datasets run in parallel); later files win on a repeated row id.

    Raises SystemExit naming a file that is missing or is not a utility_table result.
    """
    rows: dict[str, dict] = {}
    commands: list[str] = []
    datasets: list[str] = []
    quick = False
    for path in paths:
        try:
            part = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise SystemExit(f"{path}: cannot read a utility_table result ({err})") from err
        if part.get("benchmark") != "utility_table":
            raise SystemExit(f"{path}: field 'benchmark' is {part.get('benchmark')!r}, expected 'utility_table'")
        rows.update({r["id"]: r for r in part["rows"]})
        commands += [c for c in part.get("commands", [part.get("command", "")]) if c not in commands]
        datasets += [d for d in part["datasets"] if d not in datasets]
        quick = quick or part["quick"]
    merged = list(rows.values())
    mark_best(merged)
    commands.append("python benchmarks/utility_table.py --merge " + " ".join(str(p) for p in paths))
    print(json.dumps(_write(out, merged, datasets, commands, quick), indent=2))


def _write(out: Path, rows: list[dict], datasets: list[str], commands: list[str], quick: bool) -> dict:
    result = {
        "benchmark": "utility_table",
        "quick": quick,
        "seed": SEED,
        "delta": DELTA,
        "datasets": {ds: {**DATASETS[ds], "published_centralized_baseline": PUBLISHED[ds]} for ds in datasets},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "command": commands[-1],
        "commands": commands,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
