"""The `fedpriv` command line.

    fedpriv simulate [options]   a whole federation on this machine (Flower simulation engine)

Other commands live beside the concept they drive and register themselves here (see
`_COMMAND_MODULES`): each module has `register(subparsers)`, which adds its parser and sets
`handler(args, console) -> exit code`. `fedpriv COMMAND --help` lists the options. Flag names
are a promise to users: add, never rename.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import signal
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from shared_models import TASKS
from simulations.datasets import DATASET_TASKS
from simulations.partitioning import PARTITIONS


# Without client-level DP, clipping the update serves only to bound SecAgg+'s encoding range:
# a bound far above the update norms seen here (8-50) keeps the update intact, and the
# quantisation step stays below 1e-4 of a typical coordinate.
UNCLIPPED_NORM = 1000.0

# Modules that add a `fedpriv` command: each has `register(subparsers)`.
_COMMAND_MODULES: tuple[str, ...] = (
    "privacy.provisioning",
    "server.superlink",
    "client.supernode",
    "server.deployed_run",
    "simulations.report",
    "privacy.audit.command",
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, except for options without a default (their help says what None means)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpriv", description="Privacy-preserving federated learning on Flower + Opacus.")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a federation of simulated nodes on this machine",
                         formatter_class=HelpFormatter)
    sim.add_argument("--clients", type=_positive_int, default=5, help="number of simulated nodes (SuperNodes)")
    sim.add_argument("--partition", choices=PARTITIONS, default="iid", help="how the training set is split across nodes")
    sim.add_argument("--alpha", type=_positive_float, default=0.5, help="Dirichlet concentration (with --partition dirichlet)")
    sim.add_argument("--state-dir", type=Path, default=None,
                     help="where simulated nodes keep their privacy ledgers (default: a per-user folder)")
    add_training_options(sim, dataset_help=f"a named dataset ({', '.join(DATASET_TASKS)}) or a local path "
                                           "(folder, .csv, .npz)")
    sim.add_argument("--dropout-rate", type=float, default=0.0,
                     help="chance a simulated node vanishes at one SecAgg+ stage in a round")
    sim.add_argument("--fault-rate", type=float, default=0.0,
                     help="simulation: chance that a node raises or hangs past --round-timeout in a round")
    sim.add_argument("--canaries", type=int, default=0,
                     help="audit aid: build N canaries (out-of-distribution records, random labels) and insert half "
                          "into the nodes' training data, for `fedpriv audit` to score (privacy.audit.canaries)")
    sim.add_argument("--reproducible-noise", action="store_true",
                     help="simulation only: derive each node's DP and SecAgg+ noise from --seed, so two runs can be "
                          "compared draw for draw (no privacy against whoever knows the seed; deployed nodes refuse it)")
    sim.add_argument("--cpus-per-client", type=_positive_int, default=1, help="CPU cores reserved per simulated node")
    sim.add_argument("--gpus-per-client", type=float, default=0.0, help="GPU share per simulated node (e.g. 0.25)")
    sim.set_defaults(handler=lambda args, console: resume(args, console) if args.resume else simulate(args, console))
    for module in _COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def add_training_options(parser: argparse.ArgumentParser, dataset_help: str) -> None:
    """The training plan's options, shared by `fedpriv simulate` and `fedpriv run` (same names, same defaults)."""
    parser.add_argument("--task", choices=TASKS, help="model family; inferred for named datasets")
    parser.add_argument("--dataset", default="digits", help=dataset_help)
    parser.add_argument("--rounds", type=_positive_int, default=10, help="federated rounds")
    parser.add_argument("--epsilon", type=_positive_float, default=8.0,
                        help="epsilon each node may spend in this run (sets the DP-SGD noise multiplier)")
    parser.add_argument("--max-epsilon", type=_positive_float, default=None,
                        help="each node's lifetime budget on its data; rounds that would exceed it are declined "
                             "(default: --epsilon; a deployed node's own --max-epsilon always wins)")
    parser.add_argument("--delta", type=_positive_float, default=1e-5, help="DP delta; must be < 1/(records per node)")
    parser.add_argument("--no-dp", action="store_true", help="train without differential privacy (for comparison)")
    parser.add_argument("--max-grad-norm", type=_positive_float, default=1.0, help="DP-SGD per-sample clipping norm C")
    parser.add_argument("--local-epochs", type=_positive_int, default=1, help="passes over local data per round")
    parser.add_argument("--batch-size", type=_positive_int, default=64, help="(expected, under Poisson sampling) batch size")
    parser.add_argument("--lr", type=_positive_float, default=None,
                        help="learning rate (default: per model for sgd, e.g. 0.5 cnn/conv under DP, 0.05 without, "
                             "8 ngram-linear; 0.002 for adam)")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--momentum", type=float, default=0.0,
                        help="SGD momentum (0 by default: under DP-SGD momentum amplified the clipping bias here)")
    parser.add_argument("--activation", choices=("tanh", "relu"), default="tanh",
                        help="hidden activation (tanh suits DP-SGD: Papernot et al. 2021)")
    parser.add_argument("--model", default="",
                        help="model name (vision: cnn; speech: conv, conv-lstm, conv-gru; text: ngram-linear, conv, lstm, gru)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="share of each simulated node's records kept for validation (chosen by record content); "
                             "a deployed node keeps the share its owner set with `fedpriv node --val-fraction`")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<dataset>-<time>)")
    parser.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                        help="continue an interrupted run from its last complete round (other options are taken "
                             "from RUN_DIR/config.json)")
    parser.add_argument("--round-timeout", type=_positive_float, default=3600.0,
                        help="seconds the server waits for a round's replies (a node later than that counts as failed)")
    sec = parser.add_argument_group("secure aggregation (SecAgg+) and client-level DP")
    sec.add_argument("--secagg", action=argparse.BooleanOptionalAction, default=True,
                     help="aggregate with SecAgg+: the server sees only the sum of the nodes' updates")
    sec.add_argument("--num-shares", type=_positive_int, default=5,
                     help="SecAgg+ neighbourhood size, self included (>= clients: everyone shares with everyone)")
    sec.add_argument("--threshold", type=int, default=0,
                     help="SecAgg+ reconstruction threshold t (0: max(2, 2/3 of a round's participants))")
    sec.add_argument("--clip-norm", type=_positive_float, default=None,
                     help="L2 clip C of each node's model update; required with --client-noise-multiplier > 0 "
                          f"(see update_norms in metrics.jsonl of a run without client-level noise). Without client-level noise the default {UNCLIPPED_NORM:g} "
                          "never binds and only bounds the SecAgg+ encoding")
    sec.add_argument("--client-noise-multiplier", type=float, default=0.0,
                     help="sigma of the distributed client-level Gaussian: the sum carries noise std >= sigma*C "
                          "(useful with hundreds of nodes; with 5 nodes sigma=0.03 already destroyed accuracy here)")
    sec.add_argument("--client-delta", type=_positive_float, default=1e-5, help="client-level DP delta")
    sec.add_argument("--colluding-nodes", type=int, default=-1,
                     help="surviving nodes that may collude with the server against client-level DP: each node's "
                          "share of the client-level noise is sized so that the others alone carry sigma*C "
                          "(-1, and any value above: threshold - 1, the most SecAgg+ tolerates)")


def resume(args: argparse.Namespace, console: Console) -> int:
    """`fedpriv simulate --resume RUN_DIR`: same run-config, continue after the last checkpoint."""
    from simulations.runner import SimulationError, run_simulation_job

    run_dir = args.resume.resolve()
    config_file, checkpoint = run_dir / "config.json", run_dir / "checkpoint.pt"
    if not config_file.exists() or not checkpoint.exists():
        console.print(f"[red]error:[/red] {run_dir} has no config.json and checkpoint.pt to resume from")
        return 2
    import json

    run_config = {k: v for k, v in json.loads(config_file.read_text()).items()
                  if k not in ("out-dir", "resume", "resumed-after-round")}
    clients = int(run_config.get("num-supernodes", 0))
    if clients < 1:
        console.print(f"[red]error:[/red] {config_file} does not record 'num-supernodes'")
        return 2
    console.print(f"fedpriv: resuming {run_dir} ({clients} nodes, {run_config['num-server-rounds']} rounds)")
    try:
        summary = run_simulation_job(run_config, clients, run_dir, cpus_per_client=args.cpus_per_client,
                                     gpus_per_client=args.gpus_per_client, console=console, resume=True)
    except SimulationError as err:
        console.print(f"[red]error:[/red] {err}")
        return 1
    print_summary(summary, run_dir, console)
    return 0


def preflight(run_config: dict, clients: int) -> list[str]:
    """Check the run before any Flower process starts; returns the nodes that will decline.

    Loads and splits the data (a bad path, a malformed file or an impossible partition is
    reported at once), checks delta < 1/n per node, and asks the state folder's per-record
    ledger what each node's first round would reach: raises ValueError when *every* node
    would decline, since the run could then only decline every round. (A node's records
    may have been spent under another seed, partition or node name: the ledger knows
    records by content.)
    """
    from client.config import NodeIdentity, TrainingPlan
    from client.node_training import load_node_data, plan_noise
    from privacy.accountants import PrivacyLedger

    plan = TrainingPlan.from_run_config(run_config)
    state_dir = Path(run_config["state-dir"])
    ledger = PrivacyLedger(state_dir) if plan.dp else None
    exhausted = []
    for pid in range(clients):
        node = NodeIdentity(name=f"node-{pid}", state_dir=state_dir, max_epsilon=float(run_config["max-epsilon"]),
                            delta=plan.delta, data_path=None, partition_id=pid, num_partitions=clients,
                            val_fraction=plan.val_fraction)
        data = load_node_data(node, plan)
        if ledger is None:
            continue
        if plan.delta >= 1.0 / len(data.train):
            raise ValueError(f"--delta {plan.delta:g} must be < 1/n = {1 / len(data.train):.3g} for {node.name}'s "
                             f"{len(data.train)} training records")
        sigma, q, steps = plan_noise(plan, len(data.train), plan.delta)
        if ledger.epsilon_if_charged(data.train.record_ids, plan.delta, sigma, q, steps) > node.max_epsilon:
            spent = ledger.epsilon(data.train.record_ids, plan.delta)
            exhausted.append(f"{node.name} (its records have spent up to {spent:.2f} of {node.max_epsilon:g})")
    if exhausted and len(exhausted) == clients:
        raise ValueError(
            f"every node has already spent its privacy budget on this data (ledgers in {state_dir}): "
            + ", ".join(exhausted) + ". The budget belongs to the data and persists across runs; "
            "use a fresh --state-dir to simulate new data owners, or raise --max-epsilon."
        )
    return exhausted


def check_training_args(args: argparse.Namespace, nodes: int, nodes_label: str = "--clients") -> str:
    """Range-check the shared training options for a federation of `nodes`; returns the task.

    nodes_label: how error messages name the node count (a flag, or the kit's nodes).
    Raises ValueError naming the flag.
    """
    from client.config import MAX_EPSILON_PER_RUN, MAX_GRAD_NORM_RANGE
    from simulations.datasets import dataset_task
    from shared_models import model_names

    task = dataset_task(args.dataset, args.task)
    if args.model and args.model not in model_names(task):
        raise ValueError(f"--model for task {task!r} must be one of {model_names(task)}, got {args.model!r}")
    if args.secagg and args.threshold and not 2 <= args.threshold <= min(args.num_shares, nodes):
        raise ValueError(f"--threshold must be in [2, min(--num-shares, {nodes_label})] = "
                         f"[2, {min(args.num_shares, nodes)}], got {args.threshold}")
    if args.secagg and nodes < 2:
        raise ValueError("secure aggregation needs at least 2 clients (or use --no-secagg)")
    if args.client_noise_multiplier < 0:
        raise ValueError(f"--client-noise-multiplier must be >= 0, got {args.client_noise_multiplier}")
    low, high = MAX_GRAD_NORM_RANGE
    if not low <= args.max_grad_norm <= high:
        raise ValueError(f"--max-grad-norm must be in [{low:g}, {high:g}] (nodes refuse others), got {args.max_grad_norm}")
    if not args.no_dp and args.epsilon > MAX_EPSILON_PER_RUN:
        raise ValueError(f"--epsilon must be at most {MAX_EPSILON_PER_RUN:g} (nodes refuse more), got {args.epsilon}")
    if args.client_noise_multiplier > 0 and args.client_delta >= 1.0 / nodes:
        raise ValueError(f"--client-delta must be < 1/{nodes_label} = {1.0 / nodes:.3g}, got {args.client_delta:g}")
    if args.colluding_nodes < -1:
        raise ValueError(f"--colluding-nodes must be -1 (threshold - 1) or >= 0, got {args.colluding_nodes}")
    if args.client_noise_multiplier > 0 and args.clip_norm is None:
        raise ValueError("--client-noise-multiplier needs an explicit --clip-norm: the noise std is sigma*C, so C "
                         "should sit near the nodes' update norms (update_norms in metrics.jsonl of a run without client-level "
                         "noise)")
    return task


def run_folder_for(args: argparse.Namespace) -> Path:
    """--out, or runs/<dataset>-<time> (absolute)."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return (args.out or Path("runs") / f"{Path(args.dataset).name}-{stamp}").resolve()


def training_run_config(args: argparse.Namespace, task: str, out: Path) -> dict:
    """The run-config keys (pyproject's [tool.flwr.app.config]) set by the shared training options."""
    from simulations.datasets import data_dir
    from shared_models import default_lr

    lr = args.lr if args.lr is not None else default_lr(task, args.model or None, args.optimizer, dp=not args.no_dp)
    return {
        "task": task,
        "dataset": args.dataset if args.dataset in DATASET_TASKS else str(Path(args.dataset).resolve()),
        "model": args.model,
        "num-server-rounds": args.rounds,
        "local-epochs": args.local_epochs,
        "batch-size": args.batch_size,
        "lr": lr,
        "optimizer": args.optimizer,
        "momentum": args.momentum,
        "activation": args.activation,
        "dp": not args.no_dp,
        "epsilon": args.epsilon,
        "max-epsilon": args.max_epsilon or args.epsilon,
        "delta": args.delta,
        "max-grad-norm": args.max_grad_norm,
        "val-fraction": args.val_fraction,
        "seed": args.seed,
        "run-name": out.name,
        "data-dir": str(data_dir().resolve()),
        "round-timeout": args.round_timeout,
        "secagg": args.secagg,
        "num-shares": args.num_shares,
        "threshold": args.threshold,
        "clip-norm": args.clip_norm if args.clip_norm is not None else UNCLIPPED_NORM,
        "client-noise-multiplier": args.client_noise_multiplier,
        "client-delta": args.client_delta,
        "colluding-nodes": args.colluding_nodes,
    }


def simulate(args: argparse.Namespace, console: Console) -> int:
    from client.config import default_state_dir
    from simulations.runner import SimulationError, run_simulation_job

    try:
        task = check_training_args(args, args.clients)
        if not 0.0 <= args.fault_rate < 1.0:
            raise ValueError(f"--fault-rate must be in [0, 1), got {args.fault_rate}")
        if not 0.0 <= args.dropout_rate < 1.0:
            raise ValueError(f"--dropout-rate must be in [0, 1), got {args.dropout_rate}")
        if args.canaries < 0:
            raise ValueError(f"--canaries must be >= 0, got {args.canaries}")
    except ValueError as err:
        console.print(f"[red]error:[/red] {err}")
        return 2
    out = run_folder_for(args)
    run_config = {
        **training_run_config(args, task, out),
        "partition": args.partition,
        "alpha": args.alpha,
        "state-dir": str((args.state_dir or default_state_dir()).resolve()),
        "num-supernodes": args.clients,
        "fault-rate": args.fault_rate,
        "dropout-rate": args.dropout_rate,
        "canaries": args.canaries,
        "reproducible-noise": args.reproducible_noise,
    }
    try:
        exhausted = preflight(run_config, args.clients)
    except ValueError as err:  # DataFormatError and ConfigError are ValueErrors too
        console.print(f"[red]error:[/red] {err}")
        return 2
    if exhausted:
        console.print(f"[yellow]these nodes have too little budget left and will decline: {', '.join(exhausted)}[/yellow]")
    console.print(f"node privacy ledgers: {run_config['state-dir']}")
    console.print(f"fedpriv: {args.clients} nodes, {args.rounds} rounds, {task} on {args.dataset} "
                  f"({'DP-SGD epsilon %g, delta %g per node' % (args.epsilon, args.delta) if not args.no_dp else 'no DP'}) -> {out}")
    try:
        summary = run_simulation_job(run_config, args.clients, out, cpus_per_client=args.cpus_per_client,
                                     gpus_per_client=args.gpus_per_client, console=console)
    except SimulationError as err:
        console.print(f"[red]error:[/red] {err}")
        return 1
    print_summary(summary, out, console)
    return 0


def print_summary(summary: dict, out: Path, console: Console) -> None:
    final = summary["final"]
    line = f"final test accuracy {final['test_accuracy']:.4f} (majority class {summary['majority_class_rate']:.4f})"
    if "test_auc" in final:
        line += f", AUC {final['test_auc']:.4f}"
    console.print(f"[bold]{line}[/bold] after {summary['rounds_completed']} rounds")
    table = Table(title="privacy ledger (sample-level DP per node)")
    for col in ("node", "epsilon", "delta", "budget", "rounds trained", "declined", "refused", "failed"):
        table.add_column(col)
    for node, c in summary["clients"].items():
        table.add_row(
            node,
            "-" if c["epsilon"] is None else f"{c['epsilon']:.3f}",
            "-" if c["delta"] is None else f"{c['delta']:g}",
            "-" if c["max_epsilon"] is None else f"{c['max_epsilon']:g}",
            str(len(c["rounds_trained"])),
            ",".join(map(str, c["declined_rounds"])) or "-",
            ",".join(map(str, c.get("refused_rounds", []))) or "-",
            ",".join(map(str, c["failed_rounds"])) or "-",
        )
    console.print(table)
    for node, reason in sorted({(r["node"], r["reason"]) for r in summary.get("refusals", [])}):
        console.print(f"[yellow]{node} refused: {reason}[/yellow]")
    declined = sorted({n for n, c in summary["clients"].items() if c["declined_rounds"]})
    if declined:
        console.print(
            f"[yellow]{len(declined)} node(s) declined rounds: training further would have passed their max-epsilon. "
            "Their ledgers persist across runs (the budget belongs to the data); use a fresh --state-dir "
            "to simulate new data owners, or raise --max-epsilon.[/yellow]"
        )
    written = [name for name in ("summary.json", "metrics.jsonl", "ledger.json", "report.md", "report.html",
                                 "final_model.pt") if (Path(out) / name).exists()]
    console.print(f"run folder: {out} ({', '.join(written)})")


def _exit_on_sigterm(signum, frame):
    # Turn SIGTERM into SystemExit so `finally` blocks stop the SuperLink and Ray.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = build_parser().parse_args(argv)
    console = Console(soft_wrap=True)  # long messages stay on one line (easy to read, grep and test)
    return args.handler(args, console)


if __name__ == "__main__":
    sys.exit(main())
