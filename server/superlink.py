"""`fedpriv server --kit DIR`: the coordinator's SuperLink, secured (DESIGN 3, 6).

What runs:
- `flower-superlink` with the kit's loopback TLS certificate (`loopback.crt`: localhost,
  127.0.0.1; nodes never see it), SuperNode authentication
  (`--enable-supernode-auth`), a persistent `--database`, bound to 127.0.0.1 only: its one
  HTTP port also carries the Control and Runtime APIs;
- the Fleet-only TLS front door (`server.fleet_gateway`, nginx) on the node-facing address;
- `flwr supernode register` for every public key in the kit's `node-keys/` (a key already
  registered, e.g. after a restart on the same database, is left as it is).

The `flwr` CLI on this machine reaches the SuperLink through a Flower config folder
(`FLWR_HOME`) written into the state folder: loopback address, the kit's CA.
"""

from __future__ import annotations

import fcntl
import json
import socket
import ssl
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import tomli_w

from privacy.provisioning import FLWR_CONNECTION, flwr_connection, load_kit
from server.fleet_gateway import GatewayError, nginx_config, start_gateway
from shared_models.flower_processes import (
    attempt_header,
    console_script,
    flwr_env,
    last_error,
    start_flower,
    stop_process_tree,
)

COORDINATOR_FILE = "coordinator.json"  # in the state folder: where the running SuperLink listens
LOCK_FILE = "server.lock"  # in the state folder: held (fcntl.lockf) by the `fedpriv server` that runs on it
_held_locks: dict[Path, object] = {}  # lock file -> open handle, per process (POSIX locks are per process)
START_TIMEOUT_S = 60.0


class CoordinatorError(RuntimeError):
    """The SuperLink, its front door or node registration failed (the message names the log)."""


def state_folder(kit: dict, state_dir: Path | None) -> Path:
    """Where the SuperLink keeps its database, logs and Flower config: `state_dir` or KIT/state."""
    folder = Path(state_dir) if state_dir else kit["path"] / "state"
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    return folder


def write_flwr_home(kit: dict, state: Path, control_port: int) -> Path:
    """A Flower config folder whose default connection is this SuperLink on loopback, over TLS."""
    home = state / "flwr"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(tomli_w.dumps(flwr_connection(kit["ca"], control_port)))
    return home


def running_control_port(kit: dict, state: Path) -> int:
    """The control port of the SuperLink `fedpriv server` started with this state folder (else the kit's)."""
    record = state / COORDINATOR_FILE
    if record.exists():
        return int(json.loads(record.read_text())["control_port"])
    return int(kit["internal_port"])


def lock_state(state: Path) -> None:
    """Hold STATE/server.lock for this process (released when it ends, however it ends).

    Raises CoordinatorError naming the process that holds it: a second `fedpriv server` on a
    state folder in use is refused before it starts anything or touches coordinator.json.
    """
    lock_file = (state / LOCK_FILE).resolve()
    if lock_file in _held_locks:
        return
    handle = open(lock_file, "a+")
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        text = handle.read()
        handle.close()
        try:
            holder = json.loads(text)
            who = f"process {holder['pid']} ({holder.get('command', '?')}, since {holder.get('since', '?')})"
        except (json.JSONDecodeError, KeyError, TypeError):
            who = "another process"
        raise CoordinatorError(f"{state} is in use: {lock_file} is held by {who}; a SuperLink is already running on "
                               f"this kit's state. Stop it first, or give this one its own --state-dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "command": " ".join(["fedpriv", *sys.argv[1:]])[:300],
                             "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
    handle.flush()
    _held_locks[lock_file] = handle


def release_state(state: Path) -> None:
    """Release STATE/server.lock if this process holds it."""
    handle = _held_locks.pop((state / LOCK_FILE).resolve(), None)
    if handle is not None:
        handle.close()


def node_facing_address(kit: dict, port: int) -> str:
    """HOST:PORT that SuperNodes should use: the kit's first server host (written into the node kits)."""
    host = kit["server_hosts"][0] if kit.get("server_hosts") else "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def default_bind_host(kit: dict) -> str:
    """The address the node-facing port binds when `--host` is not given: what the kit's first
    server host resolves to, if that address belongs to this machine; else 0.0.0.0 (every
    interface, e.g. behind NAT, where the name resolves to an address of the router)."""
    host = kit["server_hosts"][0] if kit.get("server_hosts") else "127.0.0.1"
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return "0.0.0.0"
    for family, _, _, _, sockaddr in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((sockaddr[0], 0))
            return sockaddr[0]
        except OSError:
            continue
    return "0.0.0.0"


def wait_for_superlink(port: int, ca: Path, process: subprocess.Popen, log_file: Path,
                       timeout: float = START_TIMEOUT_S, output_file: Path | None = None) -> None:
    """Block until the SuperLink answers /health over TLS on 127.0.0.1:`port`; raises CoordinatorError
    quoting the exception line of Flower's log (`log_file`, `output_file`) when it exits first."""
    deadline = time.monotonic() + timeout
    tls = ssl.create_default_context(cafile=str(ca))
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise CoordinatorError(f"flower-superlink exited with code {process.returncode}"
                                   f"{last_error(log_file, output_file)}; see {output_file or log_file}")
        try:
            if httpx.get(f"https://127.0.0.1:{port}/health", verify=tls, timeout=1.0).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise CoordinatorError(f"flower-superlink did not answer within {timeout:.0f} s; see {log_file}")


def register_node_keys(kit: dict, env: dict[str, str]) -> dict[str, str]:
    """Register every `node-keys/*.pub` of the kit with the SuperLink; returns {node: outcome}.

    Raises CoordinatorError quoting Flower when a key is refused for any reason other than
    being registered already.
    """
    outcomes = {}
    for key_file in sorted((kit["path"] / "node-keys").glob("*.pub")):
        node = key_file.stem
        done = subprocess.run([console_script("flwr"), "supernode", "register", str(key_file), FLWR_CONNECTION,
                               "--name", node, "--format", "json"], env=env, capture_output=True, text=True)
        # `flwr --format json` exits 0 even on failure: the JSON's "success" says what happened.
        try:
            reply = json.loads(done.stdout)
        except json.JSONDecodeError:
            reply = {"success": False, "error-message": (done.stdout + done.stderr).strip()[-500:]}
        message = str(reply.get("error-message", ""))
        if reply.get("success"):
            outcomes[node] = "registered"
        elif "already in use" in message:
            outcomes[node] = "already registered"
        else:
            raise CoordinatorError(f"registering {key_file} failed: {message}")
    return outcomes


@dataclass
class Coordinator:
    """The running SuperLink and its front door; `stop()` ends both (and the ServerApps under them)."""

    kit: dict
    state: Path
    fleet_port: int
    control_port: int
    host: str
    flwr_home: Path
    processes: list[subprocess.Popen] = field(default_factory=list)
    registered: dict[str, str] = field(default_factory=dict)

    def stop(self) -> None:
        """Stop every process (front door first) and release the state folder's lock."""
        for process in reversed(self.processes):
            stop_process_tree(process)
        self.processes.clear()
        release_state(self.state)


def start_coordinator(kit_dir: Path, *, port: int | None = None, host: str | None = None,
                      state_dir: Path | None = None, control_port: int | None = None) -> Coordinator:
    """Start the SuperLink (loopback, TLS, node auth, persistent DB) and its Fleet-only front door.

    port: the node-facing TLS port (default: the kit's `fleet_port`); host: the address it
    binds (0.0.0.0 = every interface; default: `default_bind_host`); control_port: the SuperLink's own port on 127.0.0.1
    (Control, Runtime and Fleet APIs; default: the kit's `internal_port`), recorded in
    STATE/coordinator.json for `fedpriv run`. Raises ProvisioningError for a bad kit, GatewayError
    when nginx is missing, CoordinatorError when Flower fails to start or register keys.
    """
    kit = load_kit(kit_dir, "server")
    port = int(port or kit["fleet_port"])
    host = host or default_bind_host(kit)
    control_port = int(control_port or kit["internal_port"])
    state = state_folder(kit, state_dir)
    lock_state(state)  # before anything starts or is written
    coordinator = Coordinator(kit=kit, state=state, fleet_port=port, control_port=control_port, host=host,
                              flwr_home=state / "flwr")
    # The SuperLink's own port (127.0.0.1) has its own certificate; the node-facing one is nginx's.
    # Kits from before loopback.crt existed: server.crt, which then names localhost and 127.0.0.1.
    loopback_certificate = kit.get("loopback_certificate", kit["certificate"])
    loopback_key = kit.get("loopback_private_key", kit["private_key"])
    try:
        home = write_flwr_home(kit, state, control_port)
        env = flwr_env(home)
        log_file, output_file = state / "superlink.log", state / "superlink.stderr"
        with open(output_file, "ab") as output:  # stdout too: uvicorn's startup errors land there
            output.write(attempt_header())
            output.flush()
            superlink = start_flower(
                [console_script("flower-superlink"), "--ssl-ca-certfile", str(kit["ca"]), "--ssl-certfile",
                 str(loopback_certificate), "--ssl-keyfile", str(loopback_key), "--enable-supernode-auth",
                 "--database", str(state / "superlink.db"), "--host", "127.0.0.1", "--port", str(control_port),
                 "--isolation", "subprocess", "--disable-runtime-dependency-installation", "--log-file", str(log_file)],
                env=env, stdout=output, stderr=subprocess.STDOUT,
            )
        coordinator.processes.append(superlink)
        wait_for_superlink(control_port, kit["ca"], superlink, log_file, output_file=output_file)
        gateway_dir = state / "gateway"
        coordinator.processes.append(start_gateway(
            nginx_config(listen_host=host, listen_port=port, upstream_port=control_port,
                         certificate=kit["certificate"], private_key=kit["private_key"], ca_certificate=kit["ca"],
                         workdir=gateway_dir),
            gateway_dir, state / "gateway.stderr", listen_port=port))
        coordinator.registered = register_node_keys(kit, env)
    except BaseException:
        coordinator.stop()
        raise
    (state / COORDINATOR_FILE).write_text(json.dumps(
        {"pid": os.getpid(), "fleet_port": port, "host": host, "control_port": control_port}, indent=2))
    return coordinator


def register(subparsers) -> None:
    """Add `fedpriv server` to the CLI."""
    parser = subparsers.add_parser(
        "server", help="coordinator: start the SuperLink (TLS, node authentication) for a provisioned federation")
    parser.add_argument("--kit", type=Path, required=True, help="the coordinator's kit (DIR/server from `fedpriv provision`)")
    parser.add_argument("--port", type=int, default=None, help="node-facing TLS port (default: the kit's, 9092)")
    parser.add_argument("--host", default=None,
                        help="address the node-facing port binds (default: what the kit's first --server-host resolves "
                             "to, if it is an address of this machine, else 0.0.0.0 = every interface)")
    parser.add_argument("--control-port", type=int, default=None,
                        help="the SuperLink's own port, on 127.0.0.1 only (Control API for `fedpriv run`; default: "
                             "the kit's, 9093)")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="SuperLink database, logs and Flower config (default: KIT/state)")
    parser.set_defaults(handler=_serve)


def _serve(args, console) -> int:
    from privacy.provisioning import ProvisioningError

    try:
        coordinator = start_coordinator(args.kit, port=args.port, host=args.host, state_dir=args.state_dir,
                                        control_port=args.control_port)
    except (ProvisioningError, GatewayError, CoordinatorError) as err:
        console.print(f"[red]error:[/red] {err}")
        return 2
    try:
        for node, outcome in coordinator.registered.items():
            console.print(f"node key {node}: {outcome}")
        console.print(f"SuperLink ready: SuperNodes connect to {node_facing_address(coordinator.kit, coordinator.fleet_port)} "
                      f"(TLS, Fleet API only; listening on {coordinator.host}:{coordinator.fleet_port}); Control API on 127.0.0.1:{coordinator.control_port}. "
                      f"State and logs: {coordinator.state}. Ctrl-C stops.")
        while all(p.poll() is None for p in coordinator.processes):
            time.sleep(1.0)
        dead = [p.args[0] for p in coordinator.processes if p.poll() is not None]
        console.print(f"[red]error:[/red] {', '.join(map(str, dead))} stopped; see {coordinator.state}")
        return 1
    finally:
        coordinator.stop()
