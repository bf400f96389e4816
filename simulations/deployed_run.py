"""`fedpriv run --kit DIR [run options]`: submit a training run to the coordinator's SuperLink.

Runs on the coordinator's machine, next to `fedpriv server`: it reaches the SuperLink's
Control API on 127.0.0.1 (over TLS, checked against the kit's CA), submits this Flower App
with the run-config built from the same options as `fedpriv simulate`, and streams the
rounds. The ServerApp writes the run folder on this machine. `--resume RUN_DIR` continues
an interrupted run after its last complete round (the checkpoint is the ServerApp's; each
node's ledger already holds every step it took, so nothing is spent twice).
"""

from __future__ import annotations

import argparse
import json
import ssl
from pathlib import Path

import httpx
from rich.markup import escape

from privacy.provisioning import ProvisioningError, load_kit
from server.superlink import FLWR_CONNECTION, running_control_port, state_folder, write_flwr_home
from shared_models.flower_processes import flwr_env
from simulations.cli_options import (
    add_training_options,
    check_training_args,
    print_summary,
    run_folder_for,
    training_run_config,
)
from simulations.run_outcome import EXIT_NOTHING_TRAINED, untrained_run_message
from simulations.runner import SimulationError, submit_and_follow


def deployed_run_config(args: argparse.Namespace, task: str, out: Path, kit_nodes: int) -> dict:
    """Run-config for a deployed run: the shared training plan plus the node-sampling settings.

    Deployed nodes keep their ledgers where their owners put them (`state-dir` is empty) and
    read their own data (`data-path` in node-config); the run's `dataset` is only the
    coordinator's central test set.
    """
    return {
        **training_run_config(args, task, out),
        "state-dir": "",
        "min-nodes": args.min_nodes or kit_nodes,
        "fraction-train": args.fraction_train,
        "node-wait-timeout": args.node_wait_timeout,
        "num-supernodes": 0,
    }


def register(subparsers) -> None:
    """Add `fedpriv run` to the CLI."""
    parser = subparsers.add_parser("run", help="coordinator: train on the provisioned federation's SuperNodes")
    parser.add_argument("--kit", type=Path, required=True, help="the coordinator's kit (as given to `fedpriv server`)")
    parser.add_argument("--state-dir", type=Path, default=None, help="the `fedpriv server` state folder (default: KIT/state)")
    parser.add_argument("--min-nodes", type=int, default=0,
                        help="nodes that must be connected before a round starts (0: every node in the kit)")
    parser.add_argument("--fraction-train", type=float, default=1.0, help="share of connected nodes sampled per round")
    parser.add_argument("--node-wait-timeout", type=float, default=300.0,
                        help="seconds the first round waits for --min-nodes to connect (later rounds: for at least one "
                             "node); past it the whole run ends with an error")
    add_training_options(parser, dataset_help="named dataset whose test split the coordinator evaluates on "
                                              "(the nodes train on their own --data)")
    parser.set_defaults(handler=_run)


def _run(args, console) -> int:
    try:
        kit = load_kit(args.kit, "server")
        state = state_folder(kit, args.state_dir)
        control_port = running_control_port(kit, state)
        if args.resume:
            out = args.resume.resolve()
            config_file = out / "config.json"
            if not config_file.exists() or not (out / "checkpoint.pt").exists():
                raise ValueError(f"{out} has no config.json and checkpoint.pt to resume from")
            run_config = {k: v for k, v in json.loads(config_file.read_text()).items()
                          if k not in ("out-dir", "resume", "resumed-after-round")}
        else:
            nodes = len(kit["nodes"])
            task = check_training_args(args, args.min_nodes or nodes, nodes_label="the kit's nodes")
            if not 0 < args.fraction_train <= 1:
                raise ValueError(f"--fraction-train must be in (0, 1], got {args.fraction_train}")
            out = run_folder_for(args)
            run_config = deployed_run_config(args, task, out, nodes)
    except (ProvisioningError, ValueError) as err:
        console.print(f"[red]error:[/red] {err}")
        return 2
    try:
        httpx.get(f"https://127.0.0.1:{control_port}/health", timeout=3.0,
                  verify=ssl.create_default_context(cafile=str(kit["ca"])))
    except httpx.HTTPError as err:
        console.print(f"[red]error:[/red] no SuperLink on 127.0.0.1:{control_port} ({err}); "
                      f"start it first with `fedpriv server --kit {kit['path']}`")
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)
    run_config = {**run_config, "out-dir": str(out), "resume": bool(args.resume)}
    env = flwr_env(write_flwr_home(kit, state, control_port))
    console.print(f"fedpriv: {'resuming' if args.resume else 'submitting'} {run_config['num-server-rounds']} rounds of "
                  f"{run_config['task']} training to the SuperLink (nodes: {', '.join(kit['nodes'])}) -> {out}")
    try:
        summary = submit_and_follow(run_config, out, FLWR_CONNECTION, env, console,
                                    starting=f"waiting for {run_config.get('min-nodes', 1)} SuperNode(s)")
    except SimulationError as err:
        console.print(f"[red]error:[/red] {err}")
        return 1
    print_summary(summary, out, console, role="coordinator")
    message = untrained_run_message(summary, "coordinator", expected_nodes=kit["nodes"], out_dir=str(out))
    if message:  # every site declined, refused, failed or stayed away: the model is the untrained one
        console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
        return EXIT_NOTHING_TRAINED
    return 0
