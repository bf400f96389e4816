"""Running `fedpriv simulate` on an existing Ray cluster (`--ray-address`).

Flower 1.42's Ray backend (`flwr.server.superlink.fleet.vce.backend.raybackend.RayBackend.init_ray`)
calls `ray.init(runtime_env=..., **init_args)` without an address, and its federation config
carries only the init-args `num-cpus`, `num-gpus`, `logging-level` and `log-to-driver`. With no
address, `ray.init` connects to the cluster named by the `RAY_ADDRESS` environment variable,
and the simulation process (`flwr-simulation`) inherits the SuperLink's environment: so the
runner sets `RAY_ADDRESS` for the SuperLink it starts, and passes no init-args CPUs/GPUs (Ray
refuses them when it joins an existing cluster). The ClientApp actors then run on whichever
cluster nodes have the client resources free (`--cpus-per-client`, `--gpus-per-client`).
Their workers import fedpriv's packages by name: Flower sets the job's `PYTHONPATH` to the
simulation process's `sys.path`, so each Ray node needs fedpriv installed (or at the same
paths), and the data, state folder and run folder at the same paths (README).

`ray.init` given an address nobody answers waits minutes, so `probe_ray_cluster` first opens a
TCP connection to it (a few seconds), then joins the cluster from a short-lived process, as
the simulation will, and reads its alive nodes and resources.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass

EXPECTED = ("HOST:PORT (the head node's GCS address, e.g. 10.0.0.5:6379, as `ray start --head` prints it), "
            "ray://HOST:PORT (Ray Client, e.g. ray://10.0.0.5:10001) or auto (the cluster `ray start` "
            "started on this machine)")
_ADDRESS = re.compile(r"^(?P<scheme>ray://)?(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)"
                      r":(?P<port>[0-9]{1,5})$")
TCP_TIMEOUT_S = 5.0
PROBE_TIMEOUT_S = 60.0

# Joins the cluster the way Flower's RayBackend will (RAY_ADDRESS, no address argument).
_PROBE_SOURCE = r"""
import json, ray
ray.init(logging_level="ERROR", log_to_driver=False)
client = ray.util.client.ray.is_connected()
print(json.dumps({
    "gcs_address": None if client else ray.get_runtime_context().gcs_address,
    "nodes": [[node["Resources"].get("CPU", 0.0), node["Resources"].get("GPU", 0.0)]
              for node in ray.nodes() if node["Alive"]],
}))
"""


class RayClusterError(RuntimeError):
    """The Ray cluster named by --ray-address cannot be reached or cannot host a simulated node."""


@dataclass(frozen=True)
class RayCluster:
    """What the probe saw. address: what `RAY_ADDRESS` is set to (`auto` resolved to the GCS
    address host:port); nodes: (logical CPUs, GPUs) of each alive Ray node; actors: how many
    simulated nodes run at once, counted per Ray node as Flower's actor pool counts them
    (`flwr.simulation.ray_transport.ray_actor.pool_size_from_resources`)."""

    address: str
    nodes: tuple[tuple[float, float], ...]
    actors: int

    @property
    def cpus(self) -> float:
        """The cluster's logical CPUs, all nodes together."""
        return sum(cpus for cpus, _ in self.nodes)

    @property
    def gpus(self) -> float:
        """The cluster's GPUs, all nodes together."""
        return sum(gpus for _, gpus in self.nodes)


def parse_ray_address(text: str) -> str:
    """`text` stripped if it is `HOST:PORT`, `ray://HOST:PORT` or `auto` (port 1-65535; an IPv6
    host in brackets); raises ValueError saying what was expected otherwise."""
    address = text.strip()
    if address == "auto":
        return address
    match = _ADDRESS.match(address)
    if match is None or not 1 <= int(match["port"]) <= 65535:
        raise ValueError(f"expected {EXPECTED}, got {text!r}")
    return address


def _host_port(address: str) -> tuple[str, int]:
    match = _ADDRESS.match(address)
    return match["host"].strip("[]"), int(match["port"])


def _actors_on(cpus: float, gpus: float, cpus_per_client: int, gpus_per_client: float) -> int:
    """Simulated nodes one Ray node of `cpus` CPUs and `gpus` GPUs hosts at once (Flower's count)."""
    actors = int(cpus / cpus_per_client)
    return min(actors, int(gpus / gpus_per_client)) if gpus_per_client > 0 else actors


def probe_ray_cluster(address: str, cpus_per_client: int, gpus_per_client: float, *,
                      timeout_s: float = PROBE_TIMEOUT_S) -> RayCluster:
    """Check that the Ray cluster at `address` (see `parse_ray_address`) answers and can host one
    simulated node of `cpus_per_client` CPUs and `gpus_per_client` GPUs; returns what it saw.

    Raises ValueError for a malformed address, RayClusterError (naming --ray-address) when
    nothing listens at HOST:PORT within `TCP_TIMEOUT_S` seconds, when joining the cluster fails
    or takes over `timeout_s` seconds, or when no Ray node has the CPUs and GPUs of one
    simulated node.
    """
    address = parse_ray_address(address)
    if address != "auto":
        host, port = _host_port(address)
        try:
            socket.create_connection((host, port), timeout=TCP_TIMEOUT_S).close()
        except OSError as err:
            raise RayClusterError(f"--ray-address {address}: nothing answers at {host}:{port} ({err}); start the "
                                  "cluster with `ray start --head` (it prints the address), or check host and "
                                  "port") from None
    env = {**os.environ, "RAY_ADDRESS": address, "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE_SOURCE], env=env, capture_output=True, text=True,
                              timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RayClusterError(f"--ray-address {address}: joining the Ray cluster took over {timeout_s:.0f} s; is "
                              "it a Ray head node, and is this machine one of the cluster's nodes (else use "
                              "ray://HOST:10001)?") from None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        errors = [line for line in proc.stderr.splitlines() if re.match(r"^[\w.]*(Error|Exception): ", line)]
        cause = errors[-1] if errors else (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RayClusterError(f"--ray-address {address}: could not join the Ray cluster: {cause}")
    seen = json.loads(lines[-1])
    nodes = tuple((float(cpus), float(gpus)) for cpus, gpus in seen["nodes"])
    actors = sum(_actors_on(cpus, gpus, cpus_per_client, gpus_per_client) for cpus, gpus in nodes)
    cluster = RayCluster(address=seen["gcs_address"] if address == "auto" else address, nodes=nodes, actors=actors)
    if cluster.actors < 1:
        raise RayClusterError(f"--ray-address {address}: no node of the cluster ({len(nodes)} nodes, "
                              f"{cluster.cpus:g} CPUs, {cluster.gpus:g} GPUs in all) has the resources of one "
                              f"simulated node (--cpus-per-client {cpus_per_client}, --gpus-per-client "
                              f"{gpus_per_client:g})")
    return cluster
