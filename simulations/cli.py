"""The `fedpriv` command line.

    fedpriv simulate [options]   a whole federation on this machine (Flower simulation engine)

Other commands live beside the concept they drive and register themselves here (see
`COMMAND_MODULES`): each module has `register(subparsers)`, which adds its parser and sets
`handler(args, console) -> exit code`; every sub-parser gets this CLI's help formatter
(`FedprivParser`), so no command module imports the CLI. `fedpriv COMMAND --help` lists
the options. Flag names are a promise to users: add, never rename.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from client import audit_log, ledger_view, supernode
from client.config import PRIVACY_UNITS, NodeIdentity, default_state_dir, privacy_unit
from client.node_training import load_node_data, plan_noise, training_units
from privacy import provisioning
from privacy.accountants import PrivacyLedger
from server import report, superlink
from shared_models.datasets import summary_lines
from shared_models.datasets.named import DATASET_TASKS, load_dataset
from shared_models.datasets.partitioning import PARTITIONS
from shared_models.run_config import TrainingPlan
from simulations.cli_options import (
    HelpFormatter,
    add_training_options,
    check_training_args,
    positive_float,
    positive_int,
    print_summary,
    ray_address,
    run_folder_for,
    training_run_config,
)
from simulations import deployed_run, predict
from simulations.audit import command as audit_command
from simulations.run_outcome import EXIT_NOTHING_TRAINED, untrained_run_message
from simulations.runner import SimulationError, run_simulation_job

# Modules that add a `fedpriv` command: each has `register(subparsers)`.
COMMAND_MODULES = (provisioning, superlink, supernode, audit_log, ledger_view, deployed_run, report, audit_command, predict)


class FedprivParser(argparse.ArgumentParser):
    """argparse's parser with this CLI's `HelpFormatter` unless told otherwise (sub-parsers inherit it)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The `fedpriv` parser with every command's sub-parser."""
    parser = FedprivParser(prog="fedpriv", description="Privacy-preserving federated learning on Flower + Opacus.")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a federation of simulated nodes on this machine")
    sim.add_argument("--clients", type=positive_int, default=5, help="number of simulated nodes (SuperNodes)")
    sim.add_argument("--partition", choices=PARTITIONS, default="iid", help="how the training set is split across nodes")
    sim.add_argument("--alpha", type=positive_float, default=0.5, help="Dirichlet concentration (with --partition dirichlet)")
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
    sim.add_argument("--privacy-unit", choices=PRIVACY_UNITS, default="record",
                     help="what each simulated node's epsilon protects: 'record' (sample-level DP-SGD) or "
                          "'patient'/'user': all the records of one group key (user-level DP-SGD, Levy et al. 2021; "
                          "groups are kept whole on one node and in one validation share); 'auto': a group unit when "
                          "the data has group keys (fsdd: the speaker)")
    sim.add_argument("--synthetic-patients", action="store_true",
                     help="give a named dataset without group keys (pneumoniamnist, sms_spam, digits) seeded "
                          "pseudo-patients of 1-8 records each, to simulate patient-level DP (synthetic, say so)")
    sim.add_argument("--reproducible-noise", action="store_true",
                     help="simulation only: derive each node's DP and SecAgg+ noise from --seed, so two runs can be "
                          "compared draw for draw (no privacy against whoever knows the seed; deployed nodes refuse it)")
    sim.add_argument("--cpus-per-client", type=positive_int, default=1, help="CPU cores reserved per simulated node")
    sim.add_argument("--gpus-per-client", type=float, default=0.0, help="GPU share per simulated node (e.g. 0.25)")
    sim.add_argument("--ray-address", type=ray_address, default=None,
                     help="run the simulated nodes on an existing Ray cluster: HOST:PORT of its head node (as `ray "
                          "start --head` prints it), ray://HOST:PORT (Ray Client) or auto (the cluster started on "
                          "this machine); every Ray node needs fedpriv installed and the data, --state-dir and run "
                          "folder at the same paths (default: a Ray instance of the run's own on this machine)")
    sim.set_defaults(handler=lambda args, console: resume(args, console) if args.resume else simulate(args, console))
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def resume(args: argparse.Namespace, console: Console) -> int:
    """`fedpriv simulate --resume RUN_DIR`: same run-config, continue after the last checkpoint."""

    run_dir = args.resume.resolve()
    config_file, checkpoint = run_dir / "config.json", run_dir / "checkpoint.pt"
    if not config_file.exists() or not checkpoint.exists():
        console.print(f"[red]error:[/red] {run_dir} has no config.json and checkpoint.pt to resume from")
        return 2
    import json

    run_config = {k: v for k, v in json.loads(config_file.read_text()).items()
                  if k not in ("out-dir", "resume", "resumed-after-round", "ray-address")}
    clients = int(run_config.get("num-supernodes", 0))
    if clients < 1:
        console.print(f"[red]error:[/red] {config_file} does not record 'num-supernodes'")
        return 2
    console.print(f"fedpriv: resuming {run_dir} ({clients} nodes, {run_config['num-server-rounds']} rounds)")
    try:
        summary = run_simulation_job(run_config, clients, run_dir, cpus_per_client=args.cpus_per_client,
                                     gpus_per_client=args.gpus_per_client, console=console, resume=True,
                                     ray_address=args.ray_address)
    except SimulationError as err:
        console.print(f"[red]error:[/red] {err}")
        return 1
    print_summary(summary, run_dir, console)
    return _exit_code(summary, run_dir, console)


def preflight(run_config: dict, clients: int) -> list[str]:
    """Check the run before any Flower process starts; returns the nodes that will decline.

    Loads and splits the data (a bad path, a malformed file or an impossible partition is
    reported at once), checks delta < 1/n per node, and asks the state folder's per-record
    ledger what each node's first round would reach: raises ValueError when *every* node
    would decline, since the run could then only decline every round. (A node's records
    may have been spent under another seed, partition or node name: the ledger knows
    records by content.)
    """

    plan = TrainingPlan.from_run_config(run_config)
    state_dir = Path(run_config["state-dir"])
    ledger = PrivacyLedger(state_dir) if plan.dp else None
    exhausted = []
    for pid in range(clients):
        node = NodeIdentity(name=f"node-{pid}", state_dir=state_dir, max_epsilon=float(run_config["max-epsilon"]),
                            delta=plan.delta, data_path=None, partition_id=pid, num_partitions=clients,
                            val_fraction=plan.val_fraction, privacy_unit=str(run_config.get("privacy-unit", "record")))
        data = load_node_data(node, plan)
        if ledger is None:
            continue
        units = training_units(privacy_unit(node.privacy_unit, data.train), data)
        kind = "records" if units.groups is None else f"groups ({units.unit}s)"
        if plan.delta >= 1.0 / len(units.trained):
            raise ValueError(f"--delta {plan.delta:g} must be < 1/n = {1 / len(units.trained):.3g} for {node.name}'s "
                             f"{len(units.trained)} training {kind}")
        sigma, q, steps = plan_noise(plan, len(units.trained), plan.delta, units.unit)
        if ledger.epsilon_if_charged(units.trained, plan.delta, sigma, q, steps) > node.max_epsilon:
            spent = ledger.epsilon(units.trained, plan.delta)
            exhausted.append(f"{node.name} (its records have spent up to {spent:.2f} of {node.max_epsilon:g})")
    if exhausted and len(exhausted) == clients:
        raise ValueError(
            f"every node has already spent its privacy budget on this data (ledgers in {state_dir}): "
            + ", ".join(exhausted) + ". The budget belongs to the data and persists across runs; "
            "use a fresh --state-dir to simulate new data owners, or raise --max-epsilon."
        )
    return exhausted


def simulate(args: argparse.Namespace, console: Console) -> int:

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
        "privacy-unit": args.privacy_unit,
        "synthetic-patients": args.synthetic_patients,
    }
    try:
        exhausted = preflight(run_config, args.clients)
    except ValueError as err:  # DataFormatError and ConfigError are ValueErrors too
        console.print(f"[red]error:[/red] {err}")
        return 2
    if args.dataset not in DATASET_TASKS:  # a local path: say how its files were read
        plan = TrainingPlan.from_run_config(run_config)
        splits = load_dataset(plan.dataset, plan.task, plan.data_dir, plan.data_options())
        for split, data in splits.items():
            console.print(f"{args.dataset}: {split} split {summary_lines(data)[0]}", markup=False)
        for line in summary_lines(splits["train"])[1:]:  # conversions and skips cover the whole folder/file
            console.print(f"{args.dataset}: {line}", markup=False)
    if exhausted:
        console.print(f"[yellow]these nodes have too little budget left and will decline: {', '.join(exhausted)}[/yellow]")
    console.print(f"node privacy ledgers: {run_config['state-dir']}")
    console.print(f"fedpriv: {args.clients} nodes, {args.rounds} rounds, {task} on {args.dataset} "
                  f"({'DP-SGD epsilon %g, delta %g per node' % (args.epsilon, args.delta) if not args.no_dp else 'no DP'}) -> {out}")
    try:
        summary = run_simulation_job(run_config, args.clients, out, cpus_per_client=args.cpus_per_client,
                                     gpus_per_client=args.gpus_per_client, console=console,
                                     ray_address=args.ray_address)
    except SimulationError as err:
        console.print(f"[red]error:[/red] {err}")
        return 1
    print_summary(summary, out, console)
    return _exit_code(summary, out, console)


def _exit_code(summary: dict, out: Path, console: Console) -> int:
    """0, or EXIT_NOTHING_TRAINED (printing each node's reason) when no node trained in the run."""
    message = untrained_run_message(summary, "simulation", out_dir=str(out))
    if not message:
        return 0
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    return EXIT_NOTHING_TRAINED


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
