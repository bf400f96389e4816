"""End-to-end deployment on loopback: provision, `fedpriv server`, three `fedpriv node`s on
their own partitions of the SMS Spam Collection, `fedpriv run` with DP-SGD and SecAgg+,
the security checks of issue 4, and a node killed mid-run then restarted.

Needs nginx (the Fleet-only gateway; `.ci/run` installs it) and ../shared/data.
"""

from __future__ import annotations

import csv
import json
import os
import ssl
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from sklearn.model_selection import train_test_split

from privacy.provisioning import provision
from server.superlink import start_coordinator
from simulations.runner import console_script, free_port, stop_process_tree

NODES = ("site-a", "site-b", "site-c")


def _write_partitions(sms_file: Path, folder: Path) -> dict[str, Path]:
    """Each node's CSV (`text,label`): a third of the SMS training split (the same stratified
    80/20 split, seed 0, as the coordinator's test set), so no test record is trained on."""
    lines = [line for line in sms_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    labels = [line.split("\t", 1)[0] for line in lines]
    train, _ = train_test_split(np.arange(len(lines)), test_size=0.2, stratify=labels, random_state=0)
    files = {}
    for k, node in enumerate(NODES):
        files[node] = folder / f"{node}.csv"
        with open(files[node], "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            for i in np.sort(train)[k::len(NODES)]:
                label, text = lines[i].split("\t", 1)
                writer.writerow([text, label])
    return files


def _fedpriv(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "simulations.cli", *args], **popen)


class Federation:
    def __init__(self, root: Path, data: Path):
        self.root, self.port, self.control_port = root, free_port(), free_port()
        self.kits = provision(root / "kits", ["127.0.0.1"], list(NODES), port=self.port)
        self.data = _write_partitions(data / "sms_spam" / "SMSSpamCollection", root)
        self.coordinator = self.start_coordinator()
        self.nodes: dict[str, subprocess.Popen] = {}
        for node in NODES:
            self.start_node(node)

    def start_coordinator(self):
        return start_coordinator(self.kits.server_kit, port=self.port, host="127.0.0.1",
                                 state_dir=self.root / "server-state", control_port=self.control_port)

    def crash_coordinator(self) -> None:
        """SIGKILL the SuperLink, the ServerApp under it and the gateway, as a machine crash would."""
        for process in self.coordinator.processes:
            parent = psutil.Process(process.pid)
            for proc in [*parent.children(recursive=True), parent]:
                proc.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        self.coordinator.processes.clear()

    def start_node(self, node: str) -> None:
        log = open(self.root / f"{node}.log", "ab")
        self.nodes[node] = _fedpriv("node", "--kit", str(self.kits.node_kits[node]), "--data", str(self.data[node]),
                                    "--task", "text", "--max-epsilon", "30", "--state-dir", str(self.root / f"{node}-ledger"),
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill_node(self, node: str) -> None:
        """SIGKILL the node's whole process tree (SuperNode and its ClientApp), as a crash would."""
        parent = psutil.Process(self.nodes[node].pid)
        for proc in [*parent.children(recursive=True), parent]:
            proc.send_signal(signal.SIGKILL)
        self.nodes[node].wait(timeout=30)

    def run(self, out: Path, *extra: str) -> subprocess.Popen:
        return _fedpriv("run", "--kit", str(self.kits.server_kit), "--state-dir", str(self.root / "server-state"),
                        "--dataset", "sms_spam", "--min-nodes", "3", "--node-wait-timeout", "300",
                        "--round-timeout", "240", "--out", str(out), *extra,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def stop(self) -> None:
        for process in self.nodes.values():
            stop_process_tree(process)
        self.coordinator.stop()


@pytest.fixture(scope="module")
def federation(tmp_path_factory, shared_data):
    fed = Federation(tmp_path_factory.mktemp("deployment"), shared_data)
    yield fed
    fed.stop()
    # Every process we started, and everything under them, is gone.
    for process in [*fed.nodes.values(), *fed.coordinator.processes]:
        assert process.poll() is not None
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if str(fed.root) in " ".join(p.info["cmdline"] or [])]
    assert leftovers == []


def _supernode(fed: Federation, name: str, *args: str) -> str:
    """A bare `flower-supernode` attempt with one connection try; returns its output once it gave up.

    Output goes to a file, not a pipe: the SuperNode's SuperExec child would hold a pipe open.
    """
    log = fed.root / f"attempt-{name.replace(' ', '-')}.log"
    with open(log, "wb") as handle:
        process = subprocess.Popen([console_script("flower-supernode"), "--superlink", f"127.0.0.1:{fed.port}",
                                    "--node-config", 'data-path="/nonexistent"', "--port", str(free_port()),
                                    "--max-retries", "1", "--max-wait-time", "20", *args],
                                   stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = process.wait(timeout=300)
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # its SuperExec, if still there
            except ProcessLookupError:
                pass
    assert returncode != 0, f"{name}: the SuperNode did not fail"
    return log.read_text(errors="replace")


def test_only_registered_nodes_with_the_ca_over_tls_reach_the_fleet_api(federation):
    fed = federation
    url = f"127.0.0.1:{fed.port}"
    ca = ssl.create_default_context(cafile=str(fed.kits.server_kit / "ca.crt"))
    # Plaintext HTTP to the node-facing port is refused by the TLS listener.
    plain = httpx.post(f"http://{url}/v1/fleet/pull-messages", timeout=10)
    assert plain.status_code == 400 and "plain HTTP request was sent to HTTPS port" in plain.text
    # Without the federation's CA the server certificate does not verify.
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.post(f"https://{url}/v1/fleet/pull-messages", timeout=10)
    # From the node-facing address the Control API (start a run, register a node) and the
    # Runtime API are refused; the same request on the SuperLink's loopback port reaches Flower.
    for path in ("/v1/control/start-run", "/v1/control/register-node", "/v1/runtime/get-nodes"):
        refused = httpx.post(f"https://{url}{path}", content=b"\x00", verify=ca, timeout=10,
                             headers={"content-type": "application/protobuf"})
        assert refused.status_code == 403 and "only the Fleet API" in refused.text, path
    inside = httpx.post(f"https://127.0.0.1:{fed.control_port}/v1/control/start-run", content=b"\x00", verify=ca,
                        timeout=10, headers={"content-type": "application/protobuf"})
    assert inside.status_code != 403
    # Real SuperNodes: a key the coordinator never registered, a node without the CA, and a
    # node speaking plaintext all fail to join (tried concurrently: each waits on retries).
    fresh = provision(fed.root / "kits", ["127.0.0.1"], ["intruder"], port=fed.port).node_kits["intruder"]
    attempts = {
        "unregistered key": ["--root-certificates", str(fresh / "ca.crt"), "--auth-supernode-private-key",
                             str(fresh / "intruder.key")],
        "no CA": ["--auth-supernode-private-key", str(fed.kits.node_kits["site-a"] / "site-a.key")],
        "plaintext": ["--insecure", "--auth-supernode-private-key", str(fed.kits.node_kits["site-a"] / "site-a.key")],
    }
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(attempts)) as pool:
        results = dict(zip(attempts, pool.map(lambda item: _supernode(fed, item[0], *item[1]), attempts.items())))
    for name, output in results.items():
        assert "SuperNode ID" not in output, name
    assert "Failed to activate SuperNode" in results["unregistered key"]
    access_log = (fed.root / "server-state" / "gateway" / "gateway-access.log").read_text()
    assert '"POST /v1/fleet/activate-node HTTP/1.1" 412' in access_log  # the SuperLink refused the unknown key


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_dp_secagg_training_survives_a_node_killed_mid_run_and_the_restarted_node_keeps_its_ledger(federation, tmp_path):
    fed = federation
    out = tmp_path / "run"
    runner = fed.run(out, "--rounds", "3", "--epsilon", "8", "--local-epochs", "2", "--batch-size", "64")
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 1200
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert runner.poll() is None and time.monotonic() < deadline, runner.stdout.read() if runner.poll() else "timeout"
        time.sleep(1)
    fed.kill_node("site-c")  # after round 1, before or during round 2
    stdout, _ = runner.communicate(timeout=1500)
    assert runner.returncode == 0, stdout[-3000:]
    summary = _summary(out)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert summary["rounds_completed"] == 3 and summary["secure_aggregation"] is True and summary["dp"] is True
    assert sorted(rows[0]["trained"]) == list(NODES) and rows[0]["aggregated"] is True
    # Rounds 2-3 go on without site-c: SecAgg+ (threshold 2 of 3) sums the two live nodes' updates.
    for row in rows[1:]:
        assert "site-c" not in row["trained"]
        assert row["aggregated"] is True and sorted(row["trained"]) == ["site-a", "site-b"]
    assert any(f["node"] == "site-c" for f in summary["failures"])
    # Above chance (0.5) with real signal; the majority class is 0.866 on SMS Spam.
    assert summary["final"]["test_accuracy"] > 0.5 and summary["final"]["test_auc"] > 0.9
    for node in ("site-a", "site-b"):
        assert 0 < summary["clients"][node]["epsilon"] <= 8.0
    epsilon_before = summary["clients"]["site-c"]["epsilon"]
    assert epsilon_before > 0

    # The node comes back on the same machine: its ledger on disk still holds what it spent.
    fed.start_node("site-c")
    again = tmp_path / "again"
    runner = fed.run(again, "--rounds", "1", "--epsilon", "1")
    stdout, _ = runner.communicate(timeout=1500)
    assert runner.returncode == 0, stdout[-3000:]
    second = _summary(again)
    assert "site-c" in second["clients"] and second["clients"]["site-c"]["rounds_trained"] == [1]
    # One round at epsilon 1 alone would be <= 1: the total continues from the first run.
    assert second["clients"]["site-c"]["epsilon"] > max(epsilon_before, 1.0)


def _wait_for_rounds(out: Path, rounds: int, runner: subprocess.Popen, timeout: float = 1200) -> None:
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and metrics.read_text().count("\n") >= rounds):
        assert runner.poll() is None and time.monotonic() < deadline, runner.stdout.read() if runner.poll() else "timeout"
        time.sleep(1)


def test_a_deployed_run_resumes_after_the_coordinator_crashes(federation, tmp_path):
    fed = federation
    for node in NODES:  # the previous test may have left site-c down
        if fed.nodes[node].poll() is not None:
            fed.start_node(node)
    out = tmp_path / "run"
    runner = fed.run(out, "--rounds", "2", "--epsilon", "2", "--no-secagg")
    _wait_for_rounds(out, 1, runner)
    fed.crash_coordinator()
    runner.wait(timeout=120)  # `flwr run --stream` loses its SuperLink
    assert not (out / "summary.json").exists()
    checkpoint_round = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["round"]
    assert checkpoint_round == 1
    # Same database, same keys: the nodes (still running, retrying) come back by themselves.
    fed.coordinator = fed.start_coordinator()
    assert all(fed.coordinator.registered[node] == "already registered" for node in NODES)
    resumed = _fedpriv("run", "--kit", str(fed.kits.server_kit), "--state-dir", str(fed.root / "server-state"),
                       "--resume", str(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stdout, _ = resumed.communicate(timeout=1500)
    assert resumed.returncode == 0, stdout[-3000:]
    summary = _summary(out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["resumed_after_round"] == 1 and [r["round"] for r in rows] == [1, 2]
    assert summary["rounds_completed"] == 2 and rows[1]["aggregated"] is True
    # Node ledgers are the source of truth: round 2's totals include round 1 (and any round
    # trained before the crash but never aggregated), so they only grow.
    for node in NODES:
        assert summary["clients"][node]["epsilon"] >= rows[0]["epsilon"][node] > 0
