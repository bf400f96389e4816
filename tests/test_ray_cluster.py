"""`fedpriv simulate --ray-address`: Flower's simulation engine on an existing Ray cluster.

The end-to-end test starts a real two-node Ray cluster on loopback (Ray's own
`ray.cluster_utils.Cluster`, one CPU per node) and runs a short simulation with one CPU per
simulated node, so its two ClientApp actors can only fit one on each node; Ray's GCS actor
table then says where they ran. (Ray's public state API, `ray.util.state`, needs the dashboard,
which `flwr[simulation]` does not install: the test reads the GCS actor table the cluster
utility keeps, as Ray's own tests do.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
from rich.console import Console

from shared_models.flower_processes import free_port
from simulations.cli import build_parser
from simulations.cli_options import ray_address
from simulations.ray_cluster import RayCluster, RayClusterError, parse_ray_address, probe_ray_cluster


@pytest.mark.parametrize("text, expected", [
    ("auto", "auto"),
    ("10.0.0.5:6379", "10.0.0.5:6379"),
    (" head-1.example.org:6379 ", "head-1.example.org:6379"),
    ("ray://10.0.0.5:10001", "ray://10.0.0.5:10001"),
    ("[::1]:6379", "[::1]:6379"),
])
def test_ray_address_accepts_host_port_ray_client_and_auto(text, expected):
    assert parse_ray_address(text) == expected


@pytest.mark.parametrize("text", ["", "10.0.0.5", ":6379", "10.0.0.5:", "10.0.0.5:0", "10.0.0.5:65536",
                                  "http://10.0.0.5:6379", "local", "host:port", "-head:6379"])
def test_ray_address_refuses_anything_else_saying_what_was_expected(text, capsys):
    with pytest.raises(ValueError, match=r"expected HOST:PORT .*ray://HOST:PORT .*or auto"):
        parse_ray_address(text)
    with pytest.raises(argparse.ArgumentTypeError):
        ray_address(text)
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["simulate", f"--ray-address={text}"])
    assert exit_info.value.code == 2
    assert "argument --ray-address: expected HOST:PORT" in capsys.readouterr().err


def test_an_unreachable_cluster_is_named_before_flower_starts(tmp_path):
    port = free_port()  # nothing listens there
    with pytest.raises(RayClusterError, match=rf"--ray-address 127\.0\.0\.1:{port}: nothing answers at "
                                              rf"127\.0\.0\.1:{port}"):
        probe_ray_cluster(f"127.0.0.1:{port}", 1, 0.0)
    # Through the CLI: exit code 1, the reason, and no Flower process ever started (no logs).
    out = tmp_path / "run"
    args = build_parser().parse_args(["simulate", "--clients", "2", "--rounds", "1", "--ray-address",
                                      f"127.0.0.1:{port}", "--out", str(out), "--state-dir", str(tmp_path / "state")])
    console = Console(record=True, width=400)
    assert args.handler(args, console) == 1
    assert f"error: --ray-address 127.0.0.1:{port}: nothing answers" in console.export_text()
    assert not (out / "superlink.log").exists() and not (out / "flower.log").exists()


@pytest.fixture
def two_node_cluster(monkeypatch):
    """A Ray cluster of a head node and a second node, one CPU each, on this machine; torn down after.

    RAY_TMPDIR keeps its session files (and the `ray_current_cluster` file, which makes a bare
    `ray.init()` join a cluster) out of the shared /tmp/ray, so no other Ray user on this
    machine joins it by accident; short, since Ray's socket paths must stay under 108 bytes.
    """
    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix="fpray-", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", temp_dir)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    cluster = None
    try:
        node_args = {"num_cpus": 1, "object_store_memory": 100 * 1024 ** 2}
        cluster = Cluster(initialize_head=True, head_node_args={**node_args, "include_dashboard": False})
        cluster.add_node(**node_args)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _alive_nodes(cluster) -> set[str]:
    return {node["NodeID"] for node in cluster.global_state.node_table() if node["Alive"]}


def _client_actors(cluster) -> list[dict]:
    return [actor for actor in cluster.global_state.actor_table(None).values()
            if actor["ActorClassName"] == "ClientAppActor"]


@pytest.mark.e2e
def test_simulation_runs_its_nodes_on_both_nodes_of_an_existing_ray_cluster(two_node_cluster, tmp_path):
    cluster = two_node_cluster
    nodes = _alive_nodes(cluster)
    assert len(nodes) == 2
    # The probe: `auto` resolves to the head's GCS address (through RAY_TMPDIR's ray_current_cluster
    # file); fit is counted per Ray node, so 2 CPUs per simulated node fit nowhere on 1-CPU nodes.
    assert probe_ray_cluster("auto", 1, 0.0) == RayCluster(cluster.address, ((1.0, 0.0), (1.0, 0.0)), actors=2)
    with pytest.raises(RayClusterError, match=r"no node of the cluster \(2 nodes, 2 CPUs, 0 GPUs in all\) has the "
                                              r"resources of one simulated node \(--cpus-per-client 2"):
        probe_ray_cluster(cluster.address, 2, 0.0)
    out = tmp_path / "run"
    # The run must find the cluster through --ray-address alone: without RAY_TMPDIR a bare
    # ray.init() would start a Ray of its own rather than join this one.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_TMPDIR", "RAY_ADDRESS")}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "simulate", "--dataset", "digits", "--clients", "2", "--rounds", "1",
         "--cpus-per-client", "1", "--ray-address", cluster.address, "--out", str(out),
         "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"simulation on the two-node cluster: {time.monotonic() - started:.1f} s")
    assert (f"Ray cluster at {cluster.address}: 2 nodes, 2 CPUs, 0 GPUs; each simulated node reserves 1 CPU(s) "
            "and 0 GPU(s): 2 run at a time") in " ".join(proc.stdout.split())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 1 and set(summary["clients"]) == {"node-0", "node-1"}
    assert all(node["rounds_trained"] == [1] for node in summary["clients"].values())
    assert json.loads((out / "config.json").read_text())["ray-address"] == cluster.address
    # Flower's actor pool: one ClientAppActor per CPU-sized slot, here one on each Ray node.
    actors = _client_actors(cluster)
    assert len(actors) == 2, actors
    assert {actor["Address"]["NodeID"] for actor in actors} == nodes
    assert all(actor["Pid"] > 0 for actor in actors)
    # The cluster outlives the run (fedpriv stops only its own processes), its actors do not.
    deadline = time.monotonic() + 30
    while any(actor["State"] != "DEAD" for actor in _client_actors(cluster)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [actor["State"] for actor in _client_actors(cluster)] == ["DEAD", "DEAD"]
    assert _alive_nodes(cluster) == nodes
