"""Run a whole federation on one machine on Flower's simulation engine.

`run_simulation_job` starts a private SuperLink in simulation mode (Ray backend) on a free
loopback port, submits this project as a Flower App with `flwr run` (run-config from a TOML
file, federation-config with the number of SuperNodes and their resources), shows a
per-round progress bar (one plain line per round when the output is not a terminal) by
following the run folder's `metrics.jsonl`, and stops the
SuperLink when the run ends. Nothing here trains or aggregates: the ServerApp and
ClientApps do, inside Flower. With `ray_address` the ClientApps run on an existing Ray cluster
instead of a Ray instance of the simulation's own (`simulations.ray_cluster`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import tomli_w
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from privacy.secagg.identity import write_identities
from shared_models.app_bundle import stage_app, staged_fab_sha256
from shared_models.flower_processes import (
    attempt_header,
    console_script,
    flwr_env,
    free_port,
    last_error,
    start_flower,
    stop_process_tree,
)
from simulations.ray_cluster import RayClusterError, probe_ray_cluster

SUPERLINK_START_TIMEOUT_S = 60.0
SIMULATION_CONNECTION = "fedpriv-sim"  # the FLWR_HOME connection name of a simulation's private SuperLink


class SimulationError(RuntimeError):
    """The simulation could not be started or did not finish; the message says where to look."""


def _wait_healthy(port: int, process: subprocess.Popen, log_file: Path, output_file: Path | None = None) -> None:
    deadline = time.monotonic() + SUPERLINK_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SimulationError(f"flower-superlink exited with code {process.returncode}"
                                  f"{last_error(log_file, output_file)}; see {output_file or log_file}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SimulationError(f"flower-superlink did not become healthy within {SUPERLINK_START_TIMEOUT_S:.0f} s; see {log_file}")


def _rounds_done(metrics_file: Path) -> list[dict]:
    if not metrics_file.exists():
        return []
    rows = []
    for line in metrics_file.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line being written
    return rows


def run_simulation_job(
    run_config: dict,
    num_supernodes: int,
    out_dir: Path,
    *,
    cpus_per_client: int = 1,
    gpus_per_client: float = 0.0,
    console: Console | None = None,
    resume: bool = False,
    ray_address: str | None = None,
) -> dict:
    """Run the federation described by `run_config`; returns the parsed summary.json.

    run_config: the app's run-config keys (see pyproject's [tool.flwr.app.config]); its
    `out-dir` is set to `out_dir`, its `ray-address` to where the ClientApps run. resume:
    continue from `out_dir/checkpoint.pt`. cpus_per_client, gpus_per_client: Ray resources each
    simulated node's actor reserves (whole CPUs; a GPU share). ray_address: an existing Ray
    cluster (`HOST:PORT`, `ray://HOST:PORT` or `auto`) to run them on, probed before Flower
    starts; None: a Ray instance of the simulation's own on this machine, as before. Raises
    SimulationError when the cluster is unreachable or too small, when Flower fails, or when
    the run ends without writing summary.json (the message names the log to read).
    """
    console = console or Console(stderr=True)
    cluster = None
    if ray_address:
        try:
            cluster = probe_ray_cluster(ray_address, cpus_per_client, gpus_per_client)
        except (ValueError, RayClusterError) as err:
            raise SimulationError(str(err) if isinstance(err, RayClusterError) else f"--ray-address: {err}") from err
        console.print(f"Ray cluster at {cluster.address}: {len(cluster.nodes)} nodes, {cluster.cpus:g} CPUs, "
                      f"{cluster.gpus:g} GPUs; each simulated node reserves {cpus_per_client} CPU(s) and "
                      f"{gpus_per_client:g} GPU(s): {cluster.actors} run at a time")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").unlink(missing_ok=True)
    if not resume:
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    run_config = {**run_config, "out-dir": str(out_dir), "resume": resume,
                  "ray-address": cluster.address if cluster else ""}
    if run_config.get("secagg"):
        # Simulated nodes sign their SecAgg+ keys like deployed ones: one key each, one keyring
        # (kept across a resume: keys are never overwritten).
        identities = out_dir / "secagg-identities"
        write_identities(identities, [f"node-{pid}" for pid in range(num_supernodes)])
        run_config["secagg-identities"] = str(identities)
    flwr_home = Path(tempfile.mkdtemp(prefix="fedpriv-flwr-"))
    port = free_port()
    (flwr_home / "config.toml").write_text(
        tomli_w.dumps({"superlink": {"default": SIMULATION_CONNECTION, SIMULATION_CONNECTION: {"address": f"127.0.0.1:{port}", "insecure": True}}})
    )
    env = {
        **flwr_env(flwr_home),
        # Ray's dashboard/usage reporting are of no use offline and slow its start.
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
    }
    if cluster is not None:
        # Flower's RayBackend calls ray.init() without an address: Ray then joins RAY_ADDRESS's
        # cluster. The simulation process inherits it from the SuperLink.
        env["RAY_ADDRESS"] = cluster.address
    else:
        # A Ray instance of this run's own: without it, ray.init() would join a cluster that
        # `ray start` left on this machine (or an inherited RAY_ADDRESS), sharing its workers.
        env["RAY_ADDRESS"] = "local"
    superlink_log = out_dir / "superlink.log"
    superlink_output = out_dir / "superlink.stderr"  # its stdout and stderr: uvicorn and tracebacks land here
    superlink = None
    try:
        with open(superlink_output, "ab") as output:  # appended: an interrupted attempt's output is kept
            output.write(attempt_header())
            output.flush()
            superlink = start_flower(
                [console_script("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
                 "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation",
                 "--log-file", str(superlink_log)],
                env=env, stdout=output, stderr=subprocess.STDOUT,
            )
        _wait_healthy(port, superlink, superlink_log, superlink_output)
        # Flower wants whole CPUs (an integer); GPUs may be a fraction.
        federation = (f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client} "
                      f"client-resources-num-gpus={gpus_per_client}")
        return submit_and_follow(run_config, out_dir, SIMULATION_CONNECTION, env, console,
                                 starting="starting SuperLink and simulated SuperNodes",
                                 extra_args=["--federation-config", federation])
    finally:
        stop_process_tree(superlink)
        shutil.rmtree(flwr_home, ignore_errors=True)


def submit_and_follow(run_config: dict, out_dir: Path, connection: str, env: dict[str, str], console: Console, *,
                      starting: str, extra_args: list[str] = ()) -> dict:
    """`flwr run` this app on the SuperLink `connection` (of env's FLWR_HOME); returns summary.json.

    Shows a per-round progress bar from `out_dir/metrics.jsonl` (the ServerApp writes it; one
    plain line per round when the console is not a terminal, see `_follow`) and
    raises SimulationError, naming `out_dir/flower.log`, when `flwr run` fails or no summary
    is written. `run_config["out-dir"]` must be `out_dir`.
    """
    run_toml = out_dir / "run-config.toml"
    run_toml.write_text(tomli_w.dumps(run_config))
    flwr_log = out_dir / "flower.log"
    app = stage_app(Path(tempfile.mkdtemp(prefix="fedpriv-app-")) / "app")
    if connection != SIMULATION_CONNECTION:  # deployed: sites run a bundle only if they approved its hash
        console.print(f"app bundle (FAB) SHA-256 {staged_fab_sha256(app)}: a site runs it only if it is the app of "
                      f"the site's own fedpriv or one the site approved (fedpriv node --approve)",
                      markup=False, soft_wrap=True)
    try:
        with open(flwr_log, "ab") as log_handle:  # appended: each attempt (e.g. before --resume) is kept
            log_handle.write(attempt_header())
            log_handle.flush()
            runner = start_flower(
                [console_script("flwr"), "run", str(app), connection, "--run-config", str(run_toml), *extra_args,
                 "--stream"],
                env=env, stdout=log_handle, stderr=subprocess.STDOUT, cwd=str(app), new_session=False,
            )
            try:
                _follow(runner, out_dir, int(run_config["num-server-rounds"]), console, starting,
                        every_node_sampled=float(run_config.get("fraction-train", 1.0)) >= 1.0)
            finally:
                if runner.poll() is None:  # interrupted: stop `flwr run` too
                    runner.terminate()
                    runner.wait(timeout=10)
    finally:
        shutil.rmtree(app.parent, ignore_errors=True)
    if runner.returncode != 0:
        raise SimulationError(f"`flwr run` exited with code {runner.returncode}{last_error(flwr_log)}; "
                              f"see {flwr_log}")
    summary_file = out_dir / "summary.json"
    if not summary_file.exists():
        raise SimulationError(f"the run ended without writing {summary_file}{last_error(flwr_log)}; "
                              f"see {flwr_log}")
    return json.loads(summary_file.read_text())


class RoundEvents:
    """What the coordinator is told as rounds land in metrics.jsonl (the ServerApp writes one row per round).

    `new_lines(rows)` returns the lines for rows not seen yet: each site's policy refusal
    once; a site joining (its first reply, with the DP-SGD plan it reported: sampling rate and
    noise multiplier, its own calibration to its budget), leaving (it answered before, and now failed or,
    when every connected node is sampled, sent nothing) and coming back, by the name it
    reports (reply `node.name`); and, with `plain=True`, one line per round
    ("round k/N: test accuracy A, max node epsilon E (trained ..)"). Rows only hold replies:
    a SuperNode that connects is seen at its first reply, not when it connects.
    """

    def __init__(self, rounds: int, every_node_sampled: bool = True) -> None:
        self.rounds = rounds
        self.every_node_sampled = every_node_sampled  # fraction-train 1: a connected node is asked every round
        self.last_round = 0
        self.refusals: set[tuple[str, str]] = set()
        self.present: set[str] = set()  # sites whose last round ended with a reply
        self.seen: set[str] = set()

    def new_lines(self, rows: list[dict], plain: bool) -> list[str]:
        """Lines for the rows whose round is past the last one seen (rows as in metrics.jsonl)."""
        lines = []
        if rows and int(rows[-1].get("round", 0)) < self.last_round:  # rewritten by a resume: follow it again
            self.last_round = int(rows[-1]["round"])
        for row in rows:
            if int(row.get("round", 0)) <= self.last_round:
                continue
            self.last_round = int(row["round"])
            lines += self._membership(row)
            for node, reason in (row.get("refused") or {}).items():  # a site's policy refusing: said once
                if (node, reason) not in self.refusals:
                    self.refusals.add((node, reason))
                    lines.append(f"{node} refused: {reason}")
            if plain:
                lines.append(self.round_line(row))
        return lines

    def _membership(self, row: dict) -> list[str]:
        k = row["round"]
        answered = set(row.get("trained") or []) | set(row.get("declined") or []) | set(row.get("refused") or {})
        answered = {n for n in answered if not n.startswith("node-id-")}
        failed = set(row.get("failed") or [])
        lines = []
        plans = row.get("dp_plan") or {}
        for node in sorted(answered - self.present):
            lines.append(f"{node} joined (first reply in round {k}){_plan_text(plans.get(node))}"
                         if node not in self.seen else f"{node} is back (replied in round {k})")
        gone = {n for n in self.present - answered if n in failed or self.every_node_sampled}
        lines += [f"{node} left or failed (no usable reply in round {k})" for node in sorted(gone)]
        self.seen |= answered
        self.present = (self.present | answered) - gone
        return lines

    def round_line(self, row: dict) -> str:
        """One plain line for a metrics.jsonl row: round k/N, test accuracy, max node epsilon, who did what."""
        acc = (row.get("test") or {}).get("accuracy")
        eps = [e for e in (row.get("epsilon") or {}).values() if e is not None]
        return (f"round {row['round']}/{self.rounds}: test accuracy {'-' if acc is None else f'{acc:.4f}'}, "
                f"max node epsilon {'-' if not eps else f'{max(eps):.2f}'} "
                f"(trained {len(row.get('trained') or [])}, declined {len(row.get('declined') or [])}, "
                f"refused {len(row.get('refused') or {})}, failed {len(row.get('failed') or [])})")


def _plan_text(plan: dict | None) -> str:
    """": DP-SGD at sampling rate q (full batch), noise multiplier sigma" for a node's reported plan, or ""."""
    if not plan or plan.get("noise_multiplier") is None or plan.get("sample_rate") is None:
        return ""
    q, sigma = float(plan["sample_rate"]), float(plan["noise_multiplier"])
    return f": DP-SGD at sampling rate {q:.3g}{' (full batch)' if q >= 1.0 else ''}, noise multiplier {sigma:.4g}"


def _follow(runner: subprocess.Popen, out_dir: Path, rounds: int, console: Console, starting: str,
            every_node_sampled: bool = True) -> None:
    """Follow `flwr run --stream` until it exits: a progress bar on a terminal, else one plain line per round.

    Either way, refusals, and sites joining and leaving (`RoundEvents`), are printed as lines.
    """
    metrics_file = out_dir / "metrics.jsonl"
    events = RoundEvents(rounds, every_node_sampled)
    if not console.is_terminal:  # a file, a pipe, a service's journal: no live bar, just lines
        console.print(f"{starting} ({rounds} rounds)", markup=False, highlight=False)
        while True:
            finished = runner.poll() is not None
            for line in events.new_lines(_rounds_done(metrics_file), plain=True):
                console.print(line, markup=False, highlight=False)
            if finished:
                return
            time.sleep(0.5)
    with Progress(
        TextColumn("[bold]round {task.completed}/{task.total}"), BarColumn(), TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(), console=console, transient=False,
    ) as progress:
        task = progress.add_task("rounds", total=rounds, status=starting)
        while runner.poll() is None:
            done = _rounds_done(metrics_file)
            for line in events.new_lines(done, plain=False):
                progress.console.print(f"[yellow]{escape(line)}[/yellow]" if " refused: " in line else escape(line))
            if done:
                last = done[-1]
                acc = (last.get("test") or {}).get("accuracy")
                eps = [e for e in (last.get("epsilon") or {}).values() if e is not None]
                status = f"test acc {acc:.3f}" if acc is not None else ""
                if eps:
                    status += f" | max node epsilon {max(eps):.2f}"
                progress.update(task, completed=len(done), status=status)
            time.sleep(0.5)
        progress.update(task, completed=len(_rounds_done(metrics_file)))
