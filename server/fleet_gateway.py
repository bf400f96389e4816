"""The SuperLink's node-facing front door: nginx serving only the Fleet API over TLS.

Why: Flower 1.42 serves the Fleet API (SuperNodes), the Control API (`/v1/control/*`: start
runs, register nodes) and the Runtime API (`/v1/runtime/*`: the ServerApp's own channel) on
one HTTP port, and the open-source build has no authentication on Control. So the SuperLink
listens on 127.0.0.1 only, and nginx, a standard reverse proxy, listens where SuperNodes can
reach it, terminates TLS with the federation's server certificate, forwards `/v1/fleet/*`
to the SuperLink over TLS (verifying it against the federation's CA) and answers 403 to
every other path. The SuperNodes' signed authentication headers pass through unchanged:
the SuperLink still checks them.

What passes, exactly: a POST to one of `FLEET_ROUTES` (the twelve routes of Flower 1.42's
Fleet API router, `flwr.superlink.routers.fleet.router`, which is what the SuperNode's
`FleetHttpClient` calls), each an exact-match location that forwards its own canonical path,
never the client's spelling of it. nginx matches locations on the *normalised* path (dot
segments resolved, %XX decoded, slashes merged) but, without a URI on `proxy_pass`, forwards
the *raw* one (`$request_uri`), so `/v1/control/../fleet/pull-messages` would match a Fleet
location and reach the SuperLink as a Control path. Any request whose raw URI holds `..`,
`%2e` or `%2f` (any case) is therefore answered 400 before any location is chosen; other
methods get 403 (`limit_except POST`), other paths 403.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import psutil

from shared_models.flower_processes import start_flower

FLEET_PREFIX = "/v1/fleet/"
# Flower 1.42.0's Fleet API (POST only), as `flwr/superlink/routers/fleet/router.py` declares it and
# `flwr/supernode/fleet_http_client.py` calls it; tests/test_coordinator_ops.py pins the list to flwr.
FLEET_ROUTES = tuple(FLEET_PREFIX + name for name in (
    "register-node", "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat",
    "pull-messages", "push-messages", "get-run", "get-fab", "push-object", "pull-object", "confirm-message-received",
))
# Raw request URIs refused with 400: dot segments and encoded '.' or '/' (nginx would decode and
# resolve them for matching, but forward them as sent). Case-insensitive (~*).
RAW_URI_REFUSED = r"(\.\.|%2e|%2f)"


class GatewayError(RuntimeError):
    """nginx is missing, its configuration is refused, or it did not start (message says which)."""


def nginx_binary() -> str:
    """Path of nginx; raises GatewayError with the install command when it is absent."""
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()),
                                          None)
    if found is None:
        raise GatewayError("nginx is required to keep the Control API off the node-facing port: "
                           "install it (Debian/Ubuntu: `apt-get install nginx`), then start again")
    return found


def _listens(pid: int, port: int) -> bool:
    """Whether process `pid` holds a listening TCP socket on `port`."""
    try:
        return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in psutil.Process(pid).net_connections(kind="tcp"))
    except psutil.Error:
        return False


def nginx_config(*, listen_host: str, listen_port: int, upstream_port: int, certificate: Path, private_key: Path,
                 ca_certificate: Path, workdir: Path) -> str:
    """nginx.conf text for the front door; all runtime files (pid, logs, temp) stay in `workdir`.

    listen_host/listen_port: where SuperNodes connect (TLS). upstream_port: the SuperLink on
    127.0.0.1 (TLS, certificate checked against `ca_certificate` for the name localhost).
    Only POSTs to `FLEET_ROUTES` are forwarded; raw URIs matching `RAW_URI_REFUSED` get 400.
    """
    listen = f"[{listen_host}]:{listen_port}" if ":" in listen_host else f"{listen_host}:{listen_port}"
    # One exact location per Fleet route, forwarding that canonical path (never the raw spelling).
    fleet_locations = "\n".join(
        f"        location = {route} {{\n"
        f"            limit_except POST {{ deny all; }}\n"
        f"            proxy_pass https://127.0.0.1:{upstream_port}{route};\n"
        f"        }}"
        for route in FLEET_ROUTES)
    return f"""# Written by `fedpriv server`; regenerated at every start.
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/gateway-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {workdir}/gateway-access.log;
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    server_tokens off;
    server {{
        listen {listen} ssl;
        ssl_certificate {certificate};
        ssl_certificate_key {private_key};
        ssl_protocols TLSv1.2 TLSv1.3;
        # Model updates are several MB; stream them rather than spool them to disk.
        client_max_body_size 0;
        proxy_request_buffering off;
        proxy_buffering off;

        # The raw request line, before nginx normalises it: refused before any location is chosen.
        if ($request_uri ~* "{RAW_URI_REFUSED}") {{
            return 400 "fedpriv: request URI refused (dot segments or encoded '.' or '/')\\n";
        }}

        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_ssl_verify on;
        proxy_ssl_name localhost;  # the SuperLink's loopback certificate (a DNS SAN: nginx does not match IP SANs here)
        proxy_ssl_trusted_certificate {ca_certificate};
        proxy_read_timeout 600s;
        proxy_send_timeout 600s;
{fleet_locations}
        # Control API, Runtime API, health and everything else: not for SuperNodes.
        location / {{
            return 403 "fedpriv: only the Fleet API is served on this port\\n";
        }}
    }}
}}
"""


def start_gateway(config_text: str, workdir: Path, log_file: Path, listen_port: int | None = None,
                  timeout: float = 10.0) -> subprocess.Popen:
    """Check and start nginx in the foreground with `config_text`; returns its process.

    listen_port: the port the configuration listens on; when given, return only once nginx
    itself holds it (nginx retries a busy port for a few seconds before it gives up).
    Raises GatewayError when nginx is missing, refuses the configuration or exits (its
    message is quoted, e.g. `bind() ... failed (98: Address already in use)`).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "nginx.conf"
    config.write_text(config_text)
    nginx = nginx_binary()
    check = subprocess.run([nginx, "-t", "-q", "-c", str(config), "-p", str(workdir)], capture_output=True, text=True)
    if check.returncode != 0:
        raise GatewayError(f"nginx refused {config}: {check.stderr.strip()}")
    with open(log_file, "ab") as log:
        start = log.tell()
        process = start_flower([nginx, "-c", str(config), "-p", str(workdir), "-g", "daemon off;"],
                               stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + (timeout if listen_port else 0.5)
    while time.monotonic() < deadline and process.poll() is None:
        if listen_port and _listens(process.pid, listen_port):
            return process
        time.sleep(0.1)
    if process.poll() is not None:
        lines = [line.strip() for line in log_file.read_bytes()[start:].decode(errors="replace").splitlines()
                 if line.strip()]
        reasons = [line for line in lines if "failed (" in line] or lines  # "bind() ... failed (98: ...)", not "still ..."
        cause = f": {reasons[-1]}" if reasons else ""
        raise GatewayError(f"nginx exited with code {process.returncode}{cause}; see {log_file} and "
                           f"{workdir / 'gateway-error.log'}")
    if listen_port:
        process.kill()
        process.wait()
        raise GatewayError(f"nginx did not listen on port {listen_port} within {timeout:.0f} s; see {log_file}")
    return process
