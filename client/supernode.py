"""`fedpriv node --kit DIR --data PATH --task T`: a hospital's SuperNode (DESIGN 1, 6).

Checks the local data first (a malformed file is named here, before anything connects),
then runs `flower-supernode` in the foreground with the kit's CA (`--root-certificates`:
the node talks only to the real SuperLink, over TLS), its EC P-384 key
(`--auth-supernode-private-key`: the SuperLink only accepts registered keys) and a
node-config that points the ClientApp at the local data and carries the owner's policy:
the privacy budget, whether DP-SGD and secure aggregation are required (by default both
are; a run that breaks the policy is refused, whatever its run-config says), and the
validation share whose metrics may be released (none by default). The ledger of epsilon
spent on this data stays in `--state-dir` on this machine, beside the audit log of every
reply the node sent (`client.audit_log`, `fedpriv log`). The SuperNode runs only the app
bundle its owner approved: the unchanged app of the fedpriv installed here, or a hash given
with `--approve` (`client.app_approval`).
"""

from __future__ import annotations

import argparse
import math
import shlex
import signal
import socket
import ssl
import sys
import time
from pathlib import Path

from client import audit_log
from client.app_approval import APPROVED_ENV, ApprovalError, approved_hashes
from client.config import DEFAULT_DELTA, DEFAULT_MAX_EPSILON, PRIVACY_UNITS, privacy_unit, resolved_state_dir
from privacy.provisioning import ProvisioningError, load_kit
from privacy.secagg.identity import IdentityError, load_identity
from shared_models import TASKS
from shared_models.datasets import LabeledArrays, LocalDataOptions, load_local, summary_lines
from shared_models.datasets.local import add_local_data_options, local_data_options
from shared_models.flower_processes import console_script, free_port, process_env, start_flower, stop_process_tree
from shared_models.records import DataFormatError

DEFAULT_CONNECT_TIMEOUT_S = 300.0  # `--connect-timeout`: how long a starting node retries reaching the SuperLink


class NodeConfigError(ValueError):
    """A `fedpriv node` option does not fit the node's data (message names the option)."""


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\t", "\\t") + '"'


def node_config(*, node: str, data: Path, task: str, max_epsilon: float, delta: float, state_dir: Path,
                require_dp: bool = True, require_secagg: bool = True, val_fraction: float = 0.0,
                secagg_identity: Path | None = None, data_options: LocalDataOptions | None = None,
                privacy_unit: str = "auto") -> str:
    """Flower's `--node-config` text (space-separated TOML key=value pairs) for `client.config.node_identity`.

    secagg_identity: the kit folder holding `secagg.key` and `federation-keys.json`
    (`client.config.signing_identity`). data_options: how the ClientApp reads the local files
    (`image-size`, `max-text-bytes`, `csv-delimiter`, `group-column`, `group-manifest`; the defaults when None).
    """
    options = data_options or LocalDataOptions()
    return " ".join([
        *([f"secagg-identity={_toml_string(str(secagg_identity))}"] if secagg_identity else []),
        f"node-name={_toml_string(node)}", f"data-path={_toml_string(str(data))}", f"task={_toml_string(task)}",
        f"max-epsilon={max_epsilon!r}", f"delta={delta!r}", f"state-dir={_toml_string(str(state_dir))}",
        f"require-dp={str(require_dp).lower()}", f"require-secagg={str(require_secagg).lower()}",
        f"val-fraction={val_fraction!r}",
        f"image-size={options.image_size or 0}", f"max-text-bytes={options.max_text_bytes}",
        f"csv-delimiter={_toml_string(options.csv_delimiter or '')}",
        f"privacy-unit={_toml_string(privacy_unit)}",
        f"group-column={_toml_string(options.group_column or '')}",
        f"group-manifest={_toml_string(options.group_manifest or '')}",
    ])


def check_local_data(data: Path, task: str, delta: float, options: LocalDataOptions | None = None) -> int:
    """Read the node's data as the ClientApp will; returns its record count.

    Raises DataFormatError naming the file, or NodeConfigError when `delta` >= 1/records
    (DP's delta must be well below the chance of picking one record).
    """
    return len(read_local_data(data, task, delta, options))


def read_local_data(data: Path, task: str, delta: float, options: LocalDataOptions | None = None) -> LabeledArrays:
    """The node's data read as the ClientApp will (same options), for its summary and checks.

    Raises DataFormatError naming the file, or NodeConfigError when `delta` >= 1/records.
    """
    local = load_local(data, task, options)
    records = len(local)
    if delta >= 1.0 / records:
        raise NodeConfigError(f"--delta {delta:g} must be < 1/records = {1.0 / records:.3g} for {data} "
                              f"({records} records)")
    return local


class SuperLinkUnreachable(ConnectionError):
    """The SuperLink could not be reached within the connect timeout (message: address and cause)."""


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of "HOST:PORT" or "[IPv6]:PORT"; raises ProvisioningError naming the address."""
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ProvisioningError(f"SuperLink address {address!r} is not HOST:PORT")
    return host, int(port)


def connection_cause(err: BaseException, host: str, port: int) -> tuple[str, bool]:
    """(what went wrong, in words; whether retrying may help) for an error of `probe_once`."""
    if isinstance(err, ssl.SSLCertVerificationError):
        return (f"TLS: the SuperLink's certificate does not verify against the kit's ca.crt "
                f"({err.verify_message}); is this the federation's SuperLink, and the kit the current one?", False)
    if isinstance(err, ssl.SSLError):
        return f"TLS handshake failed ({err.reason or err})", True
    if isinstance(err, socket.gaierror):
        return f"name resolution failed for {host!r} ({err.strerror})", True
    if isinstance(err, ConnectionRefusedError):
        return f"connection refused: nothing listens on port {port} of {host} (is `fedpriv server` running?)", True
    if isinstance(err, (TimeoutError, socket.timeout)):
        return f"no answer from {host}:{port} (timed out: a firewall, or the wrong address?)", True
    if isinstance(err, ConnectionError):
        return f"connection failed ({err.strerror or err})", True
    return f"{type(err).__name__}: {err}", True


def probe_once(address: str, ca: Path, timeout: float = 10.0) -> None:
    """Open a TCP connection to the SuperLink's node-facing `address` and complete a TLS handshake,
    verified against the kit's CA (`ca`) for that host name; raises OSError / ssl.SSLError."""
    host, port = split_address(address)
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection((host, port), timeout=timeout) as raw:
        with context.wrap_socket(raw, server_hostname=host):
            pass


def wait_for_superlink(address: str, ca: Path, timeout: float, report=print, sleep=time.sleep) -> int:
    """Probe the SuperLink until it answers or `timeout` seconds pass (backoff 1, 2, 4 ... 30 s).

    Returns the number of attempts. Raises SuperLinkUnreachable naming the address and the
    last cause (refused, TLS, name resolution, timeout) when the time is up, or at once for
    a certificate that does not verify (retrying cannot fix it). `report(text)` hears about
    each failed attempt.
    """
    host, port = split_address(address)
    deadline = time.monotonic() + max(timeout, 0.0)
    delay, attempts = 1.0, 0
    while True:
        attempts += 1
        try:
            probe_once(address, ca, timeout=min(10.0, max(1.0, deadline - time.monotonic())))
            return attempts
        except (OSError, ssl.SSLError) as err:
            cause, transient = connection_cause(err, host, port)
        left = deadline - time.monotonic()
        if not transient or left <= 0:
            raise SuperLinkUnreachable(
                f"cannot reach the SuperLink at {address}: {cause} ({attempts} attempt{'s' * (attempts > 1)} "
                f"in {timeout:g} s; --connect-timeout sets how long to retry)")
        wait = min(delay, left)
        report(f"SuperLink at {address}: {cause}; retrying in {wait:.0f} s")
        sleep(wait)
        delay = min(delay * 2, 30.0)


def supernode_command(kit: dict, node_cfg: str, clientappio_port: int) -> list[str]:
    """The `flower-supernode` command line for a node kit (see the module docstring).

    `--isolation process`: the SuperNode starts no ClientApp itself; `superexec_command`'s
    process does, behind the app approval gate (`client.app_approval`).
    """
    return [console_script("flower-supernode"), "--superlink", kit["superlink"], "--root-certificates", str(kit["ca"]),
            "--auth-supernode-private-key", str(kit["private_key"]), "--node-config", node_cfg,
            "--isolation", "process", "--host", "127.0.0.1", "--port", str(clientappio_port)]


def superexec_command(clientappio_port: int, supernode_pid: int) -> list[str]:
    """Flower's SuperExec for this node, started from fedpriv's own code (`client.app_approval`):
    it runs each ClientApp task as `fedpriv-clientapp`, which runs only approved app bundles."""
    return [sys.executable, "-m", "client.app_approval", "--runtime-api-address", f"127.0.0.1:{clientappio_port}",
            "--insecure", "--parent-pid", str(supernode_pid)]


def register(subparsers) -> None:
    """Add `fedpriv node` to the CLI."""
    parser = subparsers.add_parser("node", help="data owner: run this site's SuperNode on local data")
    parser.add_argument("--kit", type=Path, required=True, help="this node's kit (from `fedpriv provision`)")
    parser.add_argument("--data", type=Path, required=True,
                        help="local data: image/audio folders (one subfolder per class), .npz, or text .csv/.tsv")
    parser.add_argument("--task", choices=TASKS, required=True, help="what the data is")
    parser.add_argument("--max-epsilon", type=float, default=DEFAULT_MAX_EPSILON,
                        help="lifetime privacy budget of this data (sample-level epsilon); rounds past it are declined")
    parser.add_argument("--delta", type=float, default=DEFAULT_DELTA, help="DP delta; must be < 1/records")
    parser.add_argument("--require-dp", action=argparse.BooleanOptionalAction, default=True,
                        help="refuse runs that train without DP-SGD (whatever the coordinator's run-config says)")
    parser.add_argument("--require-secagg", action=argparse.BooleanOptionalAction, default=True,
                        help="refuse rounds that would send this node's update without SecAgg+ secure aggregation")
    parser.add_argument("--val-fraction", type=float, default=0.0,
                        help="share of the records kept out of training to report validation metrics of the global "
                             "model (an extra release, not covered by DP); 0 releases none")
    parser.add_argument("--privacy-unit", choices=PRIVACY_UNITS, default="auto",
                        help="what this site's epsilon protects: 'record' (sample-level DP-SGD), or 'patient'/'user': "
                             "all the records of one group key (user-level DP-SGD; the node refuses to train on data "
                             "without group keys); 'auto': 'user' when the data has group keys, else 'record'")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="where the privacy ledger lives (default: a per-user folder on this machine)")
    parser.add_argument("--superlink", default=None, metavar="HOST:PORT",
                        help="the SuperLink's node-facing address (default: the one written in the kit)")
    add_local_data_options(parser.add_argument_group("how the local data is read"))
    parser.add_argument("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT_S, metavar="SECONDS",
                        help="how long to retry (with backoff) reaching the SuperLink before starting; past it the "
                             "node exits with code 3, naming the address and the cause (refused, TLS, name "
                             "resolution). Once connected, Flower itself reconnects after a SuperLink restart")
    parser.add_argument("--approve", action="append", default=[], metavar="SHA256",
                        help="also run the app bundle (FAB) with this SHA-256 hash (repeatable); by default the node "
                             "runs only the unchanged app of the fedpriv installed here, whose hash it prints")
    parser.add_argument("--port", type=int, default=0,
                        help="local port for Flower's ClientApp channel (0: a free one; each SuperNode on a host needs its own)")
    parser.set_defaults(handler=_run_node)


def _run_node(args, console) -> int:
    try:
        kit = load_kit(args.kit, "node")
        kit["superlink"] = args.superlink or kit["superlink"]
        split_address(kit["superlink"])
        if not args.max_epsilon > 0 or not math.isfinite(args.max_epsilon):
            raise NodeConfigError(f"--max-epsilon must be a positive number, got {args.max_epsilon}")
        if not 0 < args.delta < 1:
            raise NodeConfigError(f"--delta must be in (0, 1), got {args.delta}")
        if not 0 <= args.val_fraction < 0.5:
            raise NodeConfigError(f"--val-fraction must be in [0, 0.5), got {args.val_fraction}")
        data = args.data.expanduser().resolve()
        options = local_data_options(args)
        local = read_local_data(data, args.task, args.delta, options)
        records = len(local)
        try:
            unit = privacy_unit(args.privacy_unit, local)
        except ValueError as err:
            raise NodeConfigError(f"{data}: {err}") from None
        load_identity(kit["path"], kit["node"])  # SecAgg+ signing key and the federation's keyring
        approved = approved_hashes(args.approve)
    except (ProvisioningError, DataFormatError, NodeConfigError, IdentityError, ApprovalError) as err:
        console.print(f"[red]error:[/red] {err}")
        return 2
    state = resolved_state_dir(args.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    cfg = node_config(node=kit["node"], data=data, task=args.task, max_epsilon=args.max_epsilon, delta=args.delta,
                      state_dir=state, require_dp=args.require_dp, require_secagg=args.require_secagg,
                      val_fraction=args.val_fraction, secagg_identity=kit["path"], data_options=options,
                      privacy_unit=args.privacy_unit)
    clientappio_port = args.port or free_port()
    command = supernode_command(kit, cfg, clientappio_port)
    required = [name for name, on in (("DP-SGD", args.require_dp), ("SecAgg+", args.require_secagg)) if on]
    console.print(f"{kit['node']}: {records} {args.task} records in {data}; budget epsilon {args.max_epsilon:g} at "
                  f"delta {args.delta:g} per {unit}; requires {' and '.join(required) or 'nothing'}; validation metrics "
                  f"{'on %g of the records' % args.val_fraction if args.val_fraction else 'not released'}; "
                  f"ledger in {state}; connecting to {kit['superlink']} (TLS)")
    for line in summary_lines(local):
        console.print(f"  data: {line}", markup=False)
    console.print(f"  runs only the app bundle with SHA-256 {approved[0]} (this fedpriv)"
                  + "".join(f" or {h}" for h in approved[1:]) + f"; audit log in {audit_log.log_path(state)}",
                  markup=False)
    console.print(f"  {shlex.join(command)}", markup=False)
    try:
        wait_for_superlink(kit["superlink"], kit["ca"], args.connect_timeout,
                           report=lambda text: console.print(f"[yellow]{text}[/yellow]"))
    except SuperLinkUnreachable as err:
        console.print(f"[red]error:[/red] {err}")
        return 3
    except KeyboardInterrupt:
        return 130
    process = start_flower(command, new_session=False)
    executor = start_flower(superexec_command(clientappio_port, process.pid), new_session=False,
                            env=process_env({APPROVED_ENV: ",".join(approved)}))
    # Pass Ctrl-C / SIGTERM on to Flower so the SuperNode deregisters cleanly.
    signal.signal(signal.SIGTERM, lambda signum, frame: process.terminate())
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        return process.wait()
    finally:
        stop_process_tree(executor)
