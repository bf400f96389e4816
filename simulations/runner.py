"""Run a whole federation on one machine on Flower's simulation engine.

`run_simulation_job` starts a private SuperLink in simulation mode (Ray backend) on a free
loopback port, submits this project as a Flower App with `flwr run` (run-config from a TOML
file, federation-config with the number of SuperNodes and their resources), shows a
per-round progress bar by following the run folder's `metrics.jsonl`, and stops the
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
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from privacy.secagg.identity import write_identities
from shared_models.app_bundle import stage_app
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
        tomli_w.dumps({"superlink": {"default": "fedpriv-sim", "fedpriv-sim": {"address": f"127.0.0.1:{port}", "insecure": True}}})
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
        return submit_and_follow(run_config, out_dir, "fedpriv-sim", env, console,
                                 starting="starting SuperLink and simulated SuperNodes",
                                 extra_args=["--federation-config", federation])
    finally:
        stop_process_tree(superlink)
        shutil.rmtree(flwr_home, ignore_errors=True)


def submit_and_follow(run_config: dict, out_dir: Path, connection: str, env: dict[str, str], console: Console, *,
                      starting: str, extra_args: list[str] = ()) -> dict:
    """`flwr run` this app on the SuperLink `connection` (of env's FLWR_HOME); returns summary.json.

    Shows a per-round progress bar from `out_dir/metrics.jsonl` (the ServerApp writes it) and
    raises SimulationError, naming `out_dir/flower.log`, when `flwr run` fails or no summary
    is written. `run_config["out-dir"]` must be `out_dir`.
    """
    run_toml = out_dir / "run-config.toml"
    run_toml.write_text(tomli_w.dumps(run_config))
    flwr_log = out_dir / "flower.log"
    app = stage_app(Path(tempfile.mkdtemp(prefix="fedpriv-app-")) / "app")
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
                _follow(runner, out_dir, int(run_config["num-server-rounds"]), console, starting)
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


def _follow(runner: subprocess.Popen, out_dir: Path, rounds: int, console: Console, starting: str) -> None:
    """Progress bar over rounds while `flwr run --stream` runs."""
    metrics_file = out_dir / "metrics.jsonl"
    with Progress(
        TextColumn("[bold]round {task.completed}/{task.total}"), BarColumn(), TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(), console=console, transient=False,
    ) as progress:
        task = progress.add_task("rounds", total=rounds, status=starting)
        shown: set[tuple[str, str]] = set()
        while runner.poll() is None:
            done = _rounds_done(metrics_file)
            for row in done:  # a site's policy refusing the run is said once, as soon as it happens
                for node, reason in (row.get("refused") or {}).items():
                    if (node, reason) not in shown:
                        shown.add((node, reason))
                        progress.console.print(f"[yellow]{node} refused: {reason}[/yellow]")
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
