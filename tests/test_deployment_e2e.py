"""End-to-end deployment on loopback: provision, `fedpriv server`, three `fedpriv node`s on
their own partitions of the SMS Spam Collection, `fedpriv run` with DP-SGD and SecAgg+,
the security checks of issue 4, a node killed mid-run then restarted, a coordinator crash
mid-round with exact privacy accounting, and (issue 12) two sites whose policy and budget
hold against the coordinator's runs.

Needs nginx (the Fleet-only gateway; `.ci/run` installs it) and ../shared/data.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import ssl
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from sklearn.model_selection import train_test_split

from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from client.audit_log import log_path as audit_log_path
from client.audit_log import read_entries
from flwr.cli.build import build_fab_from_disk
from privacy.accountants.sample_level import RDP_ORDERS
from privacy.provisioning import provision
from server.superlink import start_coordinator
from shared_models.app_bundle import fab_sha256, stage_app
from shared_models.flower_processes import console_script, free_port, stop_process_tree
from simulations import runner
from simulations.cli import main as cli_main

pytestmark = pytest.mark.e2e

NODES = ("site-a", "site-b", "site-c")


def _write_partitions(sms_file: Path, folder: Path, nodes=NODES, extra: dict[str, int] | None = None) -> dict[str, Path]:
    """Each node's CSV (`text,label`): its share of the SMS training split (the same stratified
    80/20 split, seed 0, as the coordinator's test set), so no test record is trained on;
    `extra[node]` more records of that split (of the last 50, which no node holds) appended."""
    lines = [line for line in sms_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    labels = [line.split("\t", 1)[0] for line in lines]
    train, _ = train_test_split(np.arange(len(lines)), test_size=0.2, stratify=labels, random_state=0)
    train = np.sort(train)
    files = {}
    for k, node in enumerate(nodes):
        files[node] = folder / f"{node}.csv"
        rows = list(train[k:len(train) - 50:len(nodes)]) + list(train[len(train) - 50:][:(extra or {}).get(node, 0)])
        with open(files[node], "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            for i in rows:
                label, text = lines[i].split("\t", 1)
                writer.writerow([text, label])
    return files


def _fedpriv(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "simulations.cli", *args], **popen)


class Federation:
    def __init__(self, root: Path, data: Path, names=NODES, max_epsilon: float = 30.0):
        self.root, self.port, self.control_port = root, free_port(), free_port()
        self.names, self.max_epsilon = tuple(names), max_epsilon
        self.kits = provision(root / "kits", ["127.0.0.1"], list(names), port=self.port)
        self.sms = data / "sms_spam" / "SMSSpamCollection"
        self.data = _write_partitions(self.sms, root, names)
        self.coordinator = self.start_coordinator()
        self.nodes: dict[str, subprocess.Popen] = {}
        for node in names:
            self.start_node(node)

    def start_coordinator(self):
        return start_coordinator(self.kits.server_kit, port=self.port, host="127.0.0.1",
                                 state_dir=self.root / "server-state", control_port=self.control_port)

    def crash_coordinator(self) -> None:
        """SIGKILL the SuperLink, the ServerApp under it and the gateway, as a machine crash would."""
        for process in self.coordinator.processes:
            parent = psutil.Process(process.pid)
            # The parent first: an nginx master outliving one of its killed workers respawns it,
            # and that new worker would hold the node-facing port after the "crash".
            procs = [parent, *parent.children(recursive=True)]
            for proc in procs:
                proc.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
            psutil.wait_procs(procs, timeout=30)
        self.coordinator.processes.clear()

    def start_node(self, node: str) -> None:
        log = open(self.root / f"{node}.log", "ab")
        self.nodes[node] = _fedpriv("node", "--kit", str(self.kits.node_kits[node]), "--data", str(self.data[node]),
                                    "--task", "text", "--max-epsilon", str(self.max_epsilon),
                                    "--state-dir", str(self.ledger_dir(node)),
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def restart_node(self, node: str, timeout: float = 300.0) -> None:
        """Kill the node and start it again, retrying while the SuperLink still holds the killed
        instance as online (Flower refuses to activate a node key twice until its heartbeat lapses)."""
        self.kill_node(node)
        log = self.root / f"{node}.log"
        deadline = time.monotonic() + timeout
        while True:
            offset = log.stat().st_size if log.exists() else 0
            self.start_node(node)
            while self.nodes[node].poll() is None and "SuperNode ID:" not in log.read_bytes()[offset:].decode(errors="replace"):
                assert time.monotonic() < deadline, f"{node} did not reconnect within {timeout:.0f} s"
                time.sleep(1.0)
            if self.nodes[node].poll() is None:
                return
            assert time.monotonic() < deadline, f"{node} did not reconnect within {timeout:.0f} s"
            time.sleep(5.0)

    def ledger_dir(self, node: str) -> Path:
        return self.root / f"{node}-ledger"

    def charged_rounds(self, node: str) -> list[tuple[str, int]]:
        """(run, round) of every charge in the node's ledger events, read as plain JSON lines."""
        events = self.ledger_dir(node) / "ledgers" / "events.jsonl"
        lines = events.read_text().splitlines() if events.exists() else []
        return [(e["run"], e["round"]) for e in map(json.loads, lines) if not e["declined"]]

    def kill_node(self, node: str) -> None:
        """SIGKILL the node's whole process tree (SuperNode and its ClientApp), as a crash would."""
        parent = psutil.Process(self.nodes[node].pid)
        for proc in [*parent.children(recursive=True), parent]:
            proc.send_signal(signal.SIGKILL)
        self.nodes[node].wait(timeout=30)

    def run(self, out: Path, *extra: str) -> subprocess.Popen:
        return _fedpriv("run", "--kit", str(self.kits.server_kit), "--state-dir", str(self.root / "server-state"),
                        "--dataset", "sms_spam", "--min-nodes", str(len(self.names)), "--node-wait-timeout", "300",
                        "--round-timeout", "240", "--out", str(out), *extra,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def stop(self) -> None:
        for process in self.nodes.values():
            stop_process_tree(process)
        self.coordinator.stop()


@pytest.fixture(scope="module")
def federation(tmp_path_factory, shared_data, nginx):
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


def _expected_epsilon(fed: Federation, node: str) -> float:
    """The node's epsilon recomputed independently: Opacus's RDP accountant over every charge in
    its ledger's event log (every record of a deployed node trains in every charge)."""
    events = fed.ledger_dir(node) / "ledgers" / "events.jsonl"
    accountant = RDPAccountant()
    for event in map(json.loads, events.read_text().splitlines()):
        if not event["declined"]:
            accountant.history.append((event["noise_multiplier"], event["sample_rate"], event["steps"]))
    return accountant.get_epsilon(delta=1e-5, alphas=RDP_ORDERS)


def test_a_deployed_run_resumes_after_the_coordinator_crashes_mid_round_and_counts_every_charge(federation, tmp_path):
    fed = federation
    for node in NODES:  # the previous test may have left site-c down
        if fed.nodes[node].poll() is not None:
            fed.start_node(node)
    before = {node: len(fed.charged_rounds(node)) for node in NODES}
    out = tmp_path / "run"
    runner = fed.run(out, "--rounds", "3", "--epsilon", "2")
    _wait_for_rounds(out, 1, runner)
    # Crash while round 2 is in flight: every node has charged it (write-ahead) but the
    # coordinator has not finished it.
    deadline = time.monotonic() + 600
    while not all(any(rnd == 2 for _, rnd in fed.charged_rounds(n)[before[n]:]) for n in NODES):
        assert runner.poll() is None and time.monotonic() < deadline, "round 2 was never charged"
        time.sleep(0.05)
    fed.crash_coordinator()
    charged_before_crash = {node: len(fed.charged_rounds(node)) - before[node] for node in NODES}
    runner.wait(timeout=120)  # `flwr run --stream` loses its SuperLink
    assert not (out / "summary.json").exists()
    done = len((out / "metrics.jsonl").read_text().splitlines())
    assert done == 1 and all(count == 2 for count in charged_before_crash.values())
    # Same database, same keys: the nodes (still running, retrying) come back by themselves.
    fed.coordinator = fed.start_coordinator()
    assert all(fed.coordinator.registered[node] == "already registered" for node in NODES)
    resumed = _fedpriv("run", "--kit", str(fed.kits.server_kit), "--state-dir", str(fed.root / "server-state"),
                       "--resume", str(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stdout, _ = resumed.communicate(timeout=1500)
    assert resumed.returncode == 0, stdout[-3000:]
    summary = _summary(out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["resumed_after_round"] == 1 and [r["round"] for r in rows] == [1, 2, 3]
    assert summary["rounds_completed"] == 3 and all(r["aggregated"] for r in rows)
    for node in NODES:
        c = summary["clients"][node]
        # Charged: rounds 1 and 2 before the crash, rounds 2 and 3 again after it; none lost.
        assert len(fed.charged_rounds(node)) - before[node] == 4
        batch = json.loads((out / "config.json").read_text())["batch-size"]  # the text recipe's: 0, full batch
        steps = 1 if batch == 0 else -(-c["num_examples"] // batch)
        sigma = get_noise_multiplier(target_epsilon=2.0, target_delta=1e-5, sample_rate=1 / steps, steps=3 * steps,
                                     accountant="rdp", alphas=RDP_ORDERS)
        assert c["noise_multiplier"] == pytest.approx(sigma, rel=1e-12)
        assert c["epsilon"] == pytest.approx(_expected_epsilon(fed, node), rel=1e-9)


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory, shared_data, nginx):
    """Two sites with the default policy (DP-SGD and SecAgg+ required) and a budget of epsilon 2."""
    fed = Federation(tmp_path_factory.mktemp("two-sites"), shared_data, names=("site-x", "site-y"), max_epsilon=2.0)
    yield fed
    fed.stop()


def test_two_sites_keep_their_budget_and_policy_against_the_coordinators_runs(two_sites, tmp_path):
    fed, sites = two_sites, ("site-x", "site-y")

    def run(name, *options, exit_code=0):
        # Batch 64 (sampling rate 1/ceil(N/64)): the compositions below (1.88, 2.14) are of
        # subsampled steps; the text default's full batch composes faster.
        runner = fed.run(tmp_path / name, "--batch-size", "64", *options)
        stdout, _ = runner.communicate(timeout=1500)
        assert runner.returncode == exit_code, stdout[-3000:]
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return _summary(tmp_path / name), rows, stdout

    first, rows, _ = run("first", "--rounds", "2", "--epsilon", "1.5")
    assert all(r["aggregated"] for r in rows)
    for site in sites:
        assert first["clients"][site]["rounds_trained"] == [1, 2] and first["clients"][site]["epsilon"] <= 1.5

    # Another seed and validation share continue the same ledger: a second run of epsilon 1.5
    # composes (RDP) with the first to about 1.88, within the budget of 2, and is reported so.
    second, rows, _ = run("second", "--rounds", "2", "--epsilon", "1.5", "--seed", "9", "--val-fraction", "0.3")
    assert all(r["aggregated"] for r in rows)
    for site in sites:
        c = second["clients"][site]
        assert c["rounds_trained"] == [1, 2] and c["epsilon"] == pytest.approx(_expected_epsilon(fed, site), rel=1e-9)
        assert first["clients"][site]["epsilon"] < c["epsilon"] <= 2.0
    # A third run, with yet another seed, would take every record to about 2.14: both decline.
    # A run in which no site trained exits non-zero, naming each site's reason and advice for
    # the coordinator (who cannot raise a site's budget), not the simulation's --state-dir.
    third, rows, stdout = run("third", "--rounds", "1", "--epsilon", "1.5", "--seed", "4", "--val-fraction", "0",
                              exit_code=3)
    assert not rows[0]["aggregated"]
    assert "no node trained in this run" in stdout and "--state-dir" not in stdout
    assert "you cannot raise or reset them" in stdout
    for site in sites:
        assert third["clients"][site]["declined_rounds"] == [1]
        assert third["clients"][site]["declines"][0]["reason"].startswith("training would reach epsilon=")
        assert f"{site}: declined round 1: training would reach epsilon=" in stdout
        assert third["clients"][site]["epsilon"] == pytest.approx(second["clients"][site]["epsilon"], rel=1e-12)

    # A run without DP and without SecAgg+ is refused by both sites' policy; nothing is aggregated.
    plain, rows, stdout = run("plain", "--rounds", "1", "--no-dp", "--no-secagg", exit_code=3)
    assert not rows[0]["aggregated"] and plain["rounds_aggregated"] == 0
    assert plain["final"]["test_accuracy"] == plain["initial"]["test_accuracy"]
    for site in sites:
        assert plain["clients"][site]["refused_rounds"] == [1] and plain["clients"][site]["epsilon"] is None
        assert f"{site} refused: DP is required by the site; secure aggregation is required by the site" in stdout
        assert f"{site}: refused round 1: DP is required by the site" in stdout
    assert {r["node"] for r in plain["refusals"]} == set(sites)

    # site-x restarts on its file plus one record: the records it shares carry their spend.
    _write_partitions(fed.sms, fed.root, sites, extra={"site-x": 1})
    fed.restart_node("site-x")
    restarted, rows, _ = run("restarted", "--rounds", "1", "--epsilon", "1.5", exit_code=3)
    assert all(restarted["clients"][site]["declined_rounds"] == [1] for site in sites)
    assert restarted["clients"]["site-x"]["num_examples"] == first["clients"]["site-x"]["num_examples"] + 1
    for site in sites:  # recomputed from every charge: never past the budget of 2
        assert _expected_epsilon(fed, site) <= 2.0


def _tampered_stage_app(dest: Path, *args, **kwargs) -> Path:
    """fedpriv's app bundle with the ledger charge removed from the ClientApp's training code."""
    staged = stage_app(dest, *args, **kwargs)
    training = staged / "client" / "node_training.py"
    source = training.read_text()
    assert "entry = ledger.charge(" in source
    training.write_text(source.replace(
        "entry = ledger.charge(", "entry = (lambda *a, **k: type('Uncharged', (), {'declined': False, 'reason': ''}))("))
    return staged


def test_every_site_refuses_an_app_with_the_ledger_charge_removed_and_logs_what_it_sent(
        two_sites, tmp_path, monkeypatch, capsys):
    """The lying coordinator submits a changed ClientApp: no node installs or runs it, each says
    why (the hash it got and the one it expects), nothing is charged, and each node's audit log
    lists every message it answered, the refusal included."""
    fed, sites = two_sites, ("site-x", "site-y")
    charged_before = {site: fed.charged_rounds(site) for site in sites}
    monkeypatch.setattr(runner, "stage_app", _tampered_stage_app)
    out = tmp_path / "tampered"
    code = cli_main(["run", "--kit", str(fed.kits.server_kit), "--state-dir", str(fed.root / "server-state"),
                     "--dataset", "sms_spam", "--min-nodes", "2", "--node-wait-timeout", "300",
                     "--round-timeout", "240", "--rounds", "1", "--epsilon", "1", "--out", str(out)])
    stdout = capsys.readouterr().out
    summary = _summary(out)
    assert summary["rounds_aggregated"] == 0 and code == 3, stdout[-3000:]  # 3: the run trained nothing
    expected = fab_sha256()
    with tempfile.TemporaryDirectory() as tmp:  # the tampered bundle's hash, built by Flower's own builder
        tampered = hashlib.sha256(build_fab_from_disk(_tampered_stage_app(Path(tmp) / "app"))).hexdigest()
    assert tampered != expected and f"app bundle (FAB) SHA-256 {tampered}" in stdout  # what the coordinator sent
    for site in sites:
        assert summary["clients"][site]["refused_rounds"] == [1]
        reason = next(r["reason"] for r in summary["refusals"] if r["node"] == site)
        assert tampered in reason and expected in reason and "not approved" in reason
        assert fed.charged_rounds(site) == charged_before[site]  # nothing trained, nothing charged
        entries = read_entries(fed.ledger_dir(site))
        assert oct(audit_log_path(fed.ledger_dir(site)).stat().st_mode & 0o777) == "0o600"
        refused = [e for e in entries if e["refused"] and e["message_type"] == "train"]
        assert refused[-1]["round"] == 1 and refused[-1]["run"].startswith("tampered-") and tampered in refused[-1]["reason"]
        # every charge in the ledger has its train reply in the audit log, with the epsilon sent
        answered = {(str(e["run"]), e["round"]) for e in entries if e["message_type"] == "train" and not e["refused"]}
        assert {(str(run), rnd) for run, rnd in fed.charged_rounds(site)} <= answered
        assert all(e["epsilon"] is not None for e in entries if e["message_type"] == "train" and not e["refused"])
