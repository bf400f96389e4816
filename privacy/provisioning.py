"""Provision a federation: a certificate authority, the SuperLink's TLS certificate and one
authentication key pair per SuperNode, written as one kit per party (DESIGN 6).

Layout written under `out`:

    ca/ca.key, ca/ca.crt           the federation's CA (EC P-384). ca.key signs nothing else
                                   later: keep it offline once the kits are made.
    server/                        the coordinator's kit
        kit.json                   role, host names, ports, node names
        ca.crt, server.crt         CA and the node-facing certificate (SANs: every --server-host;
                                   localhost and 127.0.0.1 only with `--loopback-sans`)
        server.key                 its TLS key (0600)
        loopback.crt, loopback.key the SuperLink's own certificate and key (0600) for its port on
                                   127.0.0.1 (SANs localhost, 127.0.0.1): the gateway, `fedpriv
                                   run` and `flwr` reach it there; never served to nodes
        node-keys/<node>.pub       each SuperNode's public key (OpenSSH), for
                                   `flwr supernode register`
        flwr/config.toml           Flower CLI connection settings (FLWR_HOME=server/flwr
                                   flwr ls): the SuperLink on 127.0.0.1:9093 over TLS
        README.md
    nodes/<node>/                  one kit per hospital / firm (folder mode 0700)
        kit.json                   role, node name, SuperLink address
        ca.crt                     to verify the SuperLink (`--root-certificates`)
        <node>.key                 the node's EC P-384 private key, OpenSSH format (0600), as
                                   `flower-supernode --auth-supernode-private-key` reads it
        <node>.pub
        secagg.key                 the node's Ed25519 SecAgg+ signing key (0600)
        federation-keys.json       every node's SecAgg+ public key, by name: the node checks
                                   its peers' signed round keys against it (re-running
                                   provision adds new nodes to every kit's copy)
        README.md

Keys are never overwritten: re-running with the same `out` keeps every existing key and
certificate and adds the missing ones (so a node can be added later); a server certificate
whose host names differ from the ones asked for is refused (ProvisioningError), not replaced.

Primitives (`cryptography`): EC P-384 (SECP384R1) keys, ECDSA-SHA384 certificate signatures,
X.509 v3 with BasicConstraints, KeyUsage, ExtendedKeyUsage(serverAuth), SubjectAltName,
Subject/AuthorityKeyIdentifier (RFC 5280).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from privacy.secagg.identity import KEY_FILE as SECAGG_KEY_FILE, KEYRING_FILE, write_keyring, write_private_key
from shared_models.flower_processes import APP_DIR

CURVE = ec.SECP384R1()
SIGNATURE_HASH = hashes.SHA384()
CA_VALIDITY = dt.timedelta(days=3 * 365)
SERVER_VALIDITY = dt.timedelta(days=825)  # the CA/Browser Forum's historical maximum
DEFAULT_FLEET_PORT = 9092  # the port SuperNodes reach (TLS, Fleet API only)
DEFAULT_INTERNAL_PORT = 9093  # the SuperLink itself, on loopback only (Fleet + Control + Runtime APIs)
FLWR_CONNECTION = "fedpriv"  # the connection name in the Flower CLI's config
_LOCAL_NAMES = ("localhost", "127.0.0.1")
LOOPBACK_CERTIFICATE, LOOPBACK_KEY = "loopback.crt", "loopback.key"
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


# The keys each role's kit.json must hold, and what each one is (for the error that names a missing one).
KIT_KEYS = {
    "node": {"node": "this node's name", "superlink": "the SuperLink's node-facing address, HOST:PORT",
             "ca": "the CA certificate's file name", "private_key": "the node key's file name"},
    "server": {"fleet_port": "the node-facing TLS port", "internal_port": "the SuperLink's loopback port",
               "ca": "the CA certificate's file name", "certificate": "the server certificate's file name",
               "private_key": "the server key's file name", "nodes": "the list of node names"},
}


class ProvisioningError(ValueError):
    """Bad provisioning input, or an existing kit that does not match the request (message says which)."""


@dataclass(frozen=True)
class Federation:
    """What `provision` wrote: paths of the coordinator's kit and of each node's kit."""

    out: Path
    server_kit: Path
    node_kits: dict[str, Path]


def _write_secret(path: Path, data: bytes) -> None:
    """Create `path` with mode 0600 (from the start, not chmod afterwards); refuse to replace it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _write_public(path: Path, data: bytes) -> None:
    if path.exists():
        if path.read_bytes() != data:
            raise ProvisioningError(f"{path} exists with different content; move it away to re-provision")
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _load_or_create_key(path: Path, fmt: serialization.PrivateFormat) -> tuple[ec.EllipticCurvePrivateKey, bool]:
    """(key, created): the EC P-384 key at `path`, or a new one written there with mode 0600."""
    if path.exists():
        data = path.read_bytes()
        try:
            key = (serialization.load_ssh_private_key(data, password=None) if fmt is serialization.PrivateFormat.OpenSSH
                   else serialization.load_pem_private_key(data, password=None))
        except ValueError as err:
            raise ProvisioningError(f"{path}: existing key is unreadable ({err}); it is never overwritten") from err
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != CURVE.name:
            raise ProvisioningError(f"{path}: existing key is not an EC {CURVE.name} key")
        if path.stat().st_mode & 0o077:
            raise ProvisioningError(f"{path}: private key is readable by others (mode {path.stat().st_mode & 0o777:o}); "
                                    "chmod 600 it")
        return key, False
    key = ec.generate_private_key(CURVE)
    _write_secret(path, key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()))
    return key, True


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedpriv federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _ca_certificate(key: ec.EllipticCurvePrivateKey, now: dt.datetime) -> x509.Certificate:
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(_name("fedpriv federation CA")).issuer_name(_name("fedpriv federation CA"))
        .public_key(public).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, SIGNATURE_HASH)
    )


def _server_certificate(key: ec.EllipticCurvePrivateKey, hosts: list[str], ca_key: ec.EllipticCurvePrivateKey,
                        ca_cert: x509.Certificate, now: dt.datetime) -> x509.Certificate:
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
        .public_key(public).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + SERVER_VALIDITY)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, SIGNATURE_HASH)
    )


def _san_hosts(cert: x509.Certificate) -> list[str]:
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(n.value) for n in names]


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def flwr_connection(ca: Path, control_port: int) -> dict:
    """Flower CLI settings (`FLWR_HOME/config.toml`) that reach the SuperLink's Control API on
    this machine's loopback over TLS, verified against the federation's CA."""
    return {"superlink": {"default": FLWR_CONNECTION, FLWR_CONNECTION: {
        "address": f"127.0.0.1:{control_port}", "root-certificates": str(Path(ca).resolve()), "insecure": False}}}


def check_names(server_hosts: list[str], nodes: list[str]) -> None:
    """Raise ProvisioningError unless hosts and node names are usable (non-empty, unique, safe as file names)."""
    if not server_hosts or any(not h.strip() for h in server_hosts):
        raise ProvisioningError("--server-host needs at least one host name or IP address, e.g. fl.hospital.org")
    for host in server_hosts:
        if not re.fullmatch(r"[A-Za-z0-9.:-]+", host):
            raise ProvisioningError(f"--server-host {host!r} is not a host name or IP address")
    if not nodes:
        raise ProvisioningError("--nodes needs at least one node name, e.g. hospital-a,hospital-b")
    for node in nodes:
        if not _NAME.fullmatch(node):
            raise ProvisioningError(f"--nodes: {node!r} must use letters, digits, '_', '.', '-' only")
    if len(set(nodes)) != len(nodes):
        raise ProvisioningError(f"--nodes has duplicates: {sorted({n for n in nodes if nodes.count(n) > 1})}")


def check_out_folder(out: Path, app_dir: Path | None = None, force: bool = False) -> None:
    """Raise ProvisioningError when `out` lies inside the fedpriv app folder (a source checkout:
    `app_dir` holds pyproject.toml) and `force` is not set: keys there sit one `git add -A`
    away from a commit, next to the app code."""
    app_dir = Path(app_dir or APP_DIR)
    if force or not (app_dir / "pyproject.toml").exists():
        return
    resolved, app = Path(out).expanduser().resolve(), Path(app_dir).resolve()
    if resolved == app or app in resolved.parents:
        raise ProvisioningError(
            f"--out {out} is inside the fedpriv app folder {app}: kits hold private keys and do not belong next to "
            f"the app's code. Write them elsewhere (e.g. --out ~/fedpriv-kits), or pass --force")


def provision(out: Path, server_hosts: list[str], nodes: list[str], port: int = DEFAULT_FLEET_PORT, *,
              force: bool = False, loopback_sans: bool = False) -> Federation:
    """Write (or complete) the kits of a federation under `out`; see the module docstring.

    server_hosts: names/IPs SuperNodes use to reach the coordinator; the first is written into
    the node kits' SuperLink address; they are the node-facing certificate's only SANs unless
    loopback_sans adds localhost and 127.0.0.1 (a federation tried out on one machine). The
    SuperLink's own loopback port gets its own certificate (`loopback.crt`) either way.
    port: the TLS Fleet port SuperNodes connect to.
    force: allow `out` inside the fedpriv app folder (`check_out_folder`). `out` gets a
    `.gitignore` of `*`, so no key in it is ever listed by `git status`, wherever it lies.
    Raises ProvisioningError on bad names, or when an existing kit disagrees with the request.
    """
    check_names(server_hosts, nodes)
    if not 1 <= port <= 65535:
        raise ProvisioningError(f"--port must be in [1, 65535], got {port}")
    check_out_folder(out, force=force)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / ".gitignore").exists():
        (out / ".gitignore").write_text("# fedpriv kits hold private keys: never commit them\n*\n")
    hosts = list(dict.fromkeys([*server_hosts, *(_LOCAL_NAMES if loopback_sans else ())]))
    now = dt.datetime.now(dt.timezone.utc)
    ca_dir, server_dir, nodes_dir = out / "ca", out / "server", out / "nodes"
    for folder in (ca_dir, server_dir, server_dir / "node-keys", nodes_dir):
        folder.mkdir(parents=True, exist_ok=True)
    ca_dir.chmod(0o700)

    ca_key, ca_created = _load_or_create_key(ca_dir / "ca.key", serialization.PrivateFormat.PKCS8)
    if ca_created or not (ca_dir / "ca.crt").exists():
        if not ca_created:
            raise ProvisioningError(f"{ca_dir / 'ca.key'} exists but {ca_dir / 'ca.crt'} is missing; restore it")
        _write_public(ca_dir / "ca.crt", _pem(_ca_certificate(ca_key, now)))
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    if ca_cert.public_key().public_numbers() != ca_key.public_key().public_numbers():
        raise ProvisioningError(f"{ca_dir / 'ca.crt'} does not belong to {ca_dir / 'ca.key'}")
    ca_pem = _pem(ca_cert)

    server_key, _ = _load_or_create_key(server_dir / "server.key", serialization.PrivateFormat.PKCS8)
    cert_file = server_dir / "server.crt"
    if cert_file.exists():
        existing = x509.load_pem_x509_certificate(cert_file.read_bytes())
        # A kit written before loopback.crt existed has the loopback names in server.crt: kept as it is.
        older = sorted(dict.fromkeys([*server_hosts, *_LOCAL_NAMES]))
        if sorted(_san_hosts(existing)) != sorted(hosts) and (loopback_sans or sorted(_san_hosts(existing)) != older):
            raise ProvisioningError(f"{cert_file} is for {_san_hosts(existing)}, not {hosts}; move the server kit away "
                                    "to issue a new certificate")
    else:
        _write_public(cert_file, _pem(_server_certificate(server_key, hosts, ca_key, ca_cert, now)))
    _write_public(server_dir / "ca.crt", ca_pem)
    loopback_key, _ = _load_or_create_key(server_dir / LOOPBACK_KEY, serialization.PrivateFormat.PKCS8)
    if not (server_dir / LOOPBACK_CERTIFICATE).exists():
        _write_public(server_dir / LOOPBACK_CERTIFICATE,
                      _pem(_server_certificate(loopback_key, list(_LOCAL_NAMES), ca_key, ca_cert, now)))

    superlink = f"{server_hosts[0]}:{port}"
    node_kits = {}
    for node in nodes:
        kit = nodes_dir / node
        kit.mkdir(exist_ok=True)
        kit.chmod(0o700)  # the site's private keys: its service account only
        key, _ = _load_or_create_key(kit / f"{node}.key", serialization.PrivateFormat.OpenSSH)
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        public += f" {node}\n".encode()
        _write_public(kit / f"{node}.pub", public)
        _write_public(server_dir / "node-keys" / f"{node}.pub", public)
        _write_public(kit / "ca.crt", ca_pem)
        _write_json(kit / "kit.json", {"role": "node", "node": node, "superlink": superlink,
                                       "ca": "ca.crt", "private_key": f"{node}.key", "public_key": f"{node}.pub"})
        (kit / "README.md").write_text(_node_readme(node, superlink, kit.resolve()))
        node_kits[node] = kit

    all_nodes = sorted(p.stem for p in (server_dir / "node-keys").glob("*.pub"))
    keyring = {name: write_private_key(nodes_dir / name / SECAGG_KEY_FILE) for name in all_nodes
               if (nodes_dir / name).is_dir()}
    for name in keyring:
        write_keyring(nodes_dir / name / KEYRING_FILE, keyring)
    write_keyring(server_dir / KEYRING_FILE, keyring)
    _write_json(server_dir / "kit.json", {
        "role": "server", "server_hosts": hosts, "fleet_port": port, "internal_port": DEFAULT_INTERNAL_PORT,
        "ca": "ca.crt", "certificate": "server.crt", "private_key": "server.key", "nodes": all_nodes,
        "loopback_certificate": LOOPBACK_CERTIFICATE, "loopback_private_key": LOOPBACK_KEY,
    })
    (server_dir / "flwr").mkdir(exist_ok=True)
    (server_dir / "flwr" / "config.toml").write_text(
        tomli_w.dumps(flwr_connection(server_dir / "ca.crt", DEFAULT_INTERNAL_PORT)))
    (server_dir / "README.md").write_text(_server_readme(superlink, all_nodes, server_dir.resolve()))
    return Federation(out=out, server_kit=server_dir, node_kits=node_kits)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def load_kit(kit: Path, role: str) -> dict:
    """kit.json of a `role` ("server" or "node") kit, with its file paths made absolute.

    Raises ProvisioningError naming the file when the kit is missing, of the other role,
    or a private key in it is readable by others.
    """
    kit = Path(kit)
    meta_file = kit / "kit.json"
    if not meta_file.exists():
        raise ProvisioningError(f"{meta_file} not found: --kit must be a folder written by `fedpriv provision`")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ProvisioningError(f"{meta_file}: not valid JSON ({err}); re-run `fedpriv provision` with the same "
                                "--out to rewrite it") from err
    if not isinstance(meta, dict):
        raise ProvisioningError(f"{meta_file}: expected a JSON object, found {type(meta).__name__}")
    if meta.get("role") != role:
        raise ProvisioningError(f"{kit} is a {meta.get('role')!r} kit, this command needs the {role!r} kit")
    for key, expected in KIT_KEYS[role].items():
        if key not in meta:
            raise ProvisioningError(f"{meta_file}: missing key {key!r} (expected {expected}); re-run `fedpriv "
                                    "provision` with the same --out to rewrite the kit")
    # loopback_*: a server kit's certificate for the SuperLink's own 127.0.0.1 port (kits written
    # before it existed have none: their server.crt carries the loopback names).
    for key in ("ca", "private_key", "certificate", "public_key", "loopback_certificate", "loopback_private_key"):
        if key in meta:
            path = kit / meta[key]
            if not path.exists():
                raise ProvisioningError(f"{path} is missing from the kit")
            if key.endswith("private_key") and path.stat().st_mode & 0o077:
                raise ProvisioningError(f"{path}: private key is readable by others; chmod 600 it")
            meta[key] = path.resolve()
    meta["path"] = kit.resolve()
    return meta


def _server_readme(superlink: str, nodes: list[str], folder: Path) -> str:
    return f"""# Coordinator kit

Start the SuperLink (TLS, SuperNode authentication, persistent state) behind its Fleet-only
TLS front door, and register the node keys in `node-keys/`:

    fedpriv server --kit {folder}

SuperNodes connect to `{superlink}`. Only `/v1/fleet/*` is served there; the Control API (starting
runs, registering nodes) listens on 127.0.0.1 only. Then, on this machine:

    fedpriv run --kit {folder} --dataset ... --rounds ...

Nodes: {', '.join(nodes)}. `server.key` is secret (mode 0600). Keep `../ca/ca.key` offline.
Flower's own CLI works too: `FLWR_HOME={folder}/flwr flwr ls` (uses `flwr/config.toml`).
"""


def _node_readme(node: str, superlink: str, folder: Path) -> str:
    return f"""# SuperNode kit for `{node}`

Your data never leaves this machine; only model updates (masked, with secure aggregation) do.
Start the node from inside this folder (or give `--kit` this folder's path wherever it lies;
it was written as {folder}):

    fedpriv node --kit . --data /path/to/your/data --task vision|speech|text \\
        --max-epsilon 32 --delta 1e-5

`--max-epsilon` is your lifetime budget on this data, across every run; each run spends its
own per-run epsilon (8 by default) out of it. Leave room for the runs you agree to: a budget
equal to one run's epsilon is spent by the first run, and later runs are declined.

- `{node}.key` is this node's secret identity (mode 0600): never send it anywhere.
  The coordinator already has `{node}.pub`.
- `ca.crt` lets the node check it talks to the real SuperLink at `{superlink}`.
- The privacy ledger (epsilon spent on your data) stays on this machine, in
  `--state-dir`: `ledgers/records.json` (each record's spend) and `ledgers/events.jsonl`
  (one line per round charged or declined).
- Stop the node with Ctrl-C or SIGTERM; the ledger stays, and it rejoins when started again.
"""


def register(subparsers) -> None:
    """Add `fedpriv provision` to the CLI."""
    parser = subparsers.add_parser("provision", help="coordinator: write the CA, server certificate and node keys "
                                                     "of a federation, one kit per party")
    parser.add_argument("--out", type=Path, required=True, help="folder for the kits (re-running adds, never overwrites)")
    parser.add_argument("--server-host", required=True,
                        help="comma-separated host names / IPs SuperNodes use to reach the coordinator")
    parser.add_argument("--nodes", required=True, help="comma-separated node names, e.g. hospital-a,hospital-b")
    parser.add_argument("--port", type=int, default=DEFAULT_FLEET_PORT, help="node-facing TLS port of the SuperLink")
    parser.add_argument("--force", action="store_true",
                        help="write the kits even inside the fedpriv app folder (refused by default: keys next to code)")
    parser.add_argument("--loopback-sans", action="store_true",
                        help="also name localhost and 127.0.0.1 in the node-facing certificate, for a federation tried "
                             "out on one machine whose nodes connect to localhost (the SuperLink's own loopback port "
                             "has its own certificate either way)")
    parser.set_defaults(handler=_provision_command)


def _provision_command(args, console) -> int:
    split = lambda text: [part.strip() for part in text.split(",") if part.strip()]  # noqa: E731
    try:
        federation = provision(args.out, split(args.server_host), split(args.nodes), port=args.port,
                               force=args.force, loopback_sans=args.loopback_sans)
    except ProvisioningError as err:
        console.print(f"[red]error:[/red] {err}")
        return 2
    console.print(f"coordinator kit: {federation.server_kit} (keep it on the coordinator; "
                  f"keep {federation.out / 'ca' / 'ca.key'} offline)")
    for node, kit in federation.node_kits.items():
        console.print(f"node kit for {node}: {kit} (send it to {node}'s IT over a trusted channel)")
    return 0
