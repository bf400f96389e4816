"""Site operations (issue 15): Flower started from fedpriv's own environment, Flower's error
quoted, no Flower process outliving fedpriv, bounded and explained SuperLink connection
attempts, kit errors, app bundles without keys, one `fedpriv server` per state folder.

The unit tests start no Flower process; the `e2e` ones start SuperLinks and simulations.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import zipfile
import io
from pathlib import Path

import psutil
import pytest

from privacy.provisioning import provision
from server import superlink
from shared_models import app_bundle
from shared_models.flower_processes import APP_DIR, OWNER_VARIABLE, bin_dir, flwr_env, free_port, process_env
from simulations import runner
from simulations.cli import main

VENV_BIN = bin_dir()


def _text_data(folder: Path, records: int = 200) -> Path:
    data = folder / "data.csv"
    rows = ["text,label"] + [f"message number {i} {'win money' if i % 2 else 'see you'},{'spam' if i % 2 else 'ham'}"
                             for i in range(records)]
    data.write_text("\n".join(rows) + "\n")
    return data


def _node(kit: Path, data: Path, *extra: str) -> list[str]:
    return ["node", "--kit", str(kit), "--data", str(data), "--task", "text", "--delta", "0.001",
            "--state-dir", str(data.parent / "ledger"), *extra]


# --- 1. service-friendly launch -------------------------------------------------------------------

def test_flower_processes_get_this_environments_bin_folder_first_on_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    env = flwr_env(tmp_path)
    assert env["PATH"].split(os.pathsep)[0] == str(VENV_BIN)
    assert (Path(env["PATH"].split(os.pathsep)[0]) / "flower-superexec").exists()
    assert env[OWNER_VARIABLE] and process_env()[OWNER_VARIABLE] == env[OWNER_VARIABLE]


def test_a_failed_flwr_run_quotes_flowers_exception_and_every_attempts_log_is_kept(monkeypatch, tmp_path):
    fake, count = tmp_path / "flwr", tmp_path / "count"
    fake.write_text(f"#!/bin/sh\nn=$(cat {count} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {count}\n"
                    "echo \"attempt $n of flwr run\"\n"
                    "[ $n = 1 ] && echo 'RuntimeError: the SuperLink said no'\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(runner, "console_script", lambda name: str(fake))
    out = tmp_path / "run"
    out.mkdir()
    config = {"num-server-rounds": 1, "out-dir": str(out)}
    errors = []
    for _ in range(2):
        with pytest.raises(runner.SimulationError) as caught:
            runner.submit_and_follow(config, out, "x", dict(os.environ), runner.Console(file=io.StringIO()),
                                     starting="")
        errors.append(str(caught.value))
    assert errors[0].startswith("`flwr run` exited with code 1: RuntimeError: the SuperLink said no; see ")
    assert "RuntimeError" not in errors[1]  # the second attempt's own cause (none), not the first one's
    log = (out / "flower.log").read_text()
    assert "attempt 1 of flwr run" in log and "attempt 2 of flwr run" in log
    assert log.count("fedpriv attempt started") == 2


@pytest.mark.e2e
def test_simulate_by_absolute_path_without_an_activated_venv(tmp_path):
    env = {"HOME": os.environ.get("HOME", str(tmp_path)), "PATH": "/usr/bin:/bin",
           "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    assert shutil.which("flower-superexec", path=env["PATH"]) is None
    proc = subprocess.run([str(VENV_BIN / "fedpriv"), "simulate", "--rounds", "1", "--clients", "2", "--out",
                           str(tmp_path / "run"), "--state-dir", str(tmp_path / "state")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["rounds_aggregated"] == 1


@pytest.mark.e2e
def test_a_broken_superlink_start_prints_flowers_own_error(monkeypatch, tmp_path):
    # Flower's environment as it was before issue 15 with no venv on PATH: the SuperLink cannot
    # spawn `flower-superexec` and exits 3; the error must carry Flower's exception line.
    monkeypatch.setattr(runner, "flwr_env", lambda home: {**os.environ, "FLWR_HOME": str(home), "PATH": "/usr/bin:/bin"})
    with pytest.raises(runner.SimulationError) as caught:
        runner.run_simulation_job({"num-server-rounds": 1}, 2, tmp_path / "run",
                                  console=runner.Console(file=io.StringIO()))
    assert "exited with code 3: FileNotFoundError: [Errno 2] No such file or directory: 'flower-superexec'" \
        in str(caught.value)


# --- 2. no Flower process outlives fedpriv ---------------------------------------------------------

def _tree(pid: int) -> dict[int, float]:
    try:
        root = psutil.Process(pid)
        return {p.pid: p.create_time() for p in root.children(recursive=True)}
    except psutil.NoSuchProcess:
        return {}


def _alive(procs: dict[int, float]) -> list[str]:
    left = []
    for pid, created in procs.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{pid} {' '.join(proc.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return left


def _wait_gone(procs: dict[int, float], seconds: float) -> None:
    """Wait up to `seconds` for every process of `procs` (`_tree`) to be gone."""
    deadline = time.monotonic() + seconds
    while _alive(procs) and time.monotonic() < deadline:
        time.sleep(0.2)


_GRANDCHILD = """
import os, subprocess, sys, time
env = {k: v for k, v in os.environ.items() if k != sys.argv[1]}
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env=env)
open(sys.argv[2], "w").write(str(grandchild.pid))
time.sleep(600)
"""
# fedpriv's stand-in: a Flower process (start_flower) whose child no longer shows the marker, as
# Ray's agents' /proc environ may not once they rename themselves (setproctitle)
_OWNER = """
import sys, time
from shared_models.flower_processes import start_flower
start_flower([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]])
time.sleep(600)
"""


def test_the_reaper_stops_a_flower_processs_descendant_that_no_longer_shows_the_marker(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    owner = subprocess.Popen([sys.executable, "-c", _OWNER, _GRANDCHILD, OWNER_VARIABLE, str(pid_file)],
                             cwd=APP_DIR, start_new_session=True)
    grandchild = None
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.2)
        grandchild = psutil.Process(int(pid_file.read_text()))
        assert OWNER_VARIABLE not in grandchild.environ()
        time.sleep(2)  # the reaper looks at fedpriv's Flower processes every 0.5 s
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        gone, _ = psutil.wait_procs([grandchild], timeout=20)
        assert gone, "a Flower process's unmarked descendant outlived fedpriv by 20 s"
    finally:
        if grandchild is not None and grandchild.is_running():
            grandchild.kill()


@pytest.mark.e2e
def test_sigkill_of_simulate_leaves_no_flower_or_ray_process_within_30_s(tmp_path):
    out = tmp_path / "run"
    fedpriv = subprocess.Popen([sys.executable, "-m", "simulations.cli", "simulate", "--rounds", "30", "--clients", "2",
                                "--out", str(out), "--state-dir", str(tmp_path / "state")],
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    seen: dict[int, float] = {}
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline and fedpriv.poll() is None:
            seen.update(_tree(fedpriv.pid))
            names = " ".join(_alive(seen))
            if "flwr-simulation" in names and "ray" in names and (out / "metrics.jsonl").exists():
                break
            time.sleep(0.5)
        assert fedpriv.poll() is None, "the simulation ended before it could be killed"
        seen.update(_tree(fedpriv.pid))
        flower = {p: t for p, t in seen.items() if "psutil" not in " ".join(_alive({p: t}))}  # not the reaper
        assert any("flower-superlink" in line for line in _alive(flower))
        os.kill(fedpriv.pid, signal.SIGKILL)
        fedpriv.wait()
        killed = time.monotonic()
        while _alive(flower) and time.monotonic() - killed < 30:
            time.sleep(0.5)
        gone_after = time.monotonic() - killed
        assert not _alive(flower), f"still running {gone_after:.0f} s after SIGKILL: {_alive(flower)}"
        print(f"every Flower and Ray process gone {gone_after:.1f} s after SIGKILL of fedpriv simulate")
    finally:
        for line in _alive(seen):  # only the processes seen, never a reused pid
            try:
                psutil.Process(int(line.split()[0])).kill()
            except psutil.Error:
                pass


# --- 3. unreachable SuperLink, damaged kits -----------------------------------------------------

@pytest.fixture
def node_kit(tmp_path):
    fed = provision(tmp_path / "fed", ["localhost"], ["site-a"], port=free_port())
    return fed.node_kits["site-a"], _text_data(tmp_path)


def test_node_against_a_closed_port_names_the_cause_and_exits_within_its_retry_limit(node_kit, capsys):
    kit, data = node_kit
    address = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    code = main(_node(kit, data, "--superlink", address, "--connect-timeout", "4"))
    elapsed = time.monotonic() - start
    out = " ".join(capsys.readouterr().out.split())
    assert code == 3 and elapsed < 20
    assert f"cannot reach the SuperLink at {address}: connection refused" in out
    assert "retrying in 1 s" in out and "retrying in 2 s" in out  # backoff


def test_node_names_a_host_that_does_not_resolve(node_kit, capsys):
    kit, data = node_kit
    code = main(_node(kit, data, "--superlink", "no-such-host.invalid:9092", "--connect-timeout", "0"))
    out = " ".join(capsys.readouterr().out.split())
    assert code == 3 and "name resolution failed for 'no-such-host.invalid'" in out


def test_node_refuses_a_superlink_whose_certificate_is_not_the_federations_at_once(node_kit, tmp_path, capsys):
    kit, data = node_kit
    other = provision(tmp_path / "other", ["localhost"], ["x"]).server_kit  # another federation's CA
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(other / "server.crt", other / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        try:
            conn, _ = listener.accept()
            with context.wrap_socket(conn, server_side=True):
                pass
        except (OSError, ssl.SSLError):
            pass

    threading.Thread(target=serve, daemon=True).start()
    start = time.monotonic()
    code = main(_node(kit, data, "--superlink", f"localhost:{port}", "--connect-timeout", "60"))
    listener.close()
    out = " ".join(capsys.readouterr().out.split())
    assert code == 3 and time.monotonic() - start < 30
    assert f"cannot reach the SuperLink at localhost:{port}: TLS: the SuperLink's certificate does not verify" in out


@pytest.mark.parametrize("damage, message", [
    (lambda meta: meta.pop("superlink"), r"kit.json: missing key 'superlink' \(expected the SuperLink's node-facing "
                                         r"address, HOST:PORT\)"),
    ("{not json", r"kit.json: not valid JSON"),
    ("[1, 2]", r"kit.json: expected a JSON object, found list"),
])
def test_a_damaged_node_kit_is_a_one_line_kit_error_naming_file_and_key(node_kit, capsys, damage, message):
    import re

    kit, data = node_kit
    meta_file = kit / "kit.json"
    if callable(damage):
        meta = json.loads(meta_file.read_text())
        damage(meta)
        meta_file.write_text(json.dumps(meta))
    else:
        meta_file.write_text(damage)
    assert main(_node(kit, data)) == 2
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1 and str(meta_file) in out and re.search(message, out), out


# --- 4. keys never in a bundle ----------------------------------------------------------------------

def _fab_names(app: Path) -> list[str]:
    from flwr.cli.build import build_fab_from_disk

    return zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))).namelist()


def test_no_key_kit_or_run_folder_can_enter_an_app_bundle(tmp_path):
    app = tmp_path / "app"
    shutil.copytree(APP_DIR, app, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "runs", "tests",
                                                                 "benchmarks", "docs", "*.egg-info"))
    # What a coordinator may leave in the checkout: kits (at the top and inside a package), a run folder.
    provision(app / "fed", ["127.0.0.1"], ["site-a"], force=True)
    provision(app / "server" / "kits", ["127.0.0.1"], ["site-b"], force=True)
    (app / "fed" / ".gitignore").unlink()  # even without the kit's own .gitignore
    (app / "runs" / "r1").mkdir(parents=True)
    (app / "runs" / "r1" / "summary.json").write_text("{}")
    (app / "server" / "notes.md").write_text("a coordinator's notes")
    for bundle_source in (app_bundle.stage_app(tmp_path / "staged", app), app):  # fedpriv's bundle; `flwr run .` by hand
        names = _fab_names(bundle_source)
        assert "server/server_app.py" in names and "client/client_app.py" in names
        leaked = [n for n in names if not (n.endswith(".py") or n in ("pyproject.toml",) or n.startswith(".info/"))]
        assert not leaked, f"{bundle_source}: {leaked}"
        assert not [n for n in names if "kit" in n or n.endswith(".key") or "federation-keys" in n]


def test_provision_refuses_a_folder_inside_the_app_folder_unless_forced(tmp_path, monkeypatch, capsys):
    import privacy.provisioning as provisioning

    app = tmp_path / "checkout"
    app.mkdir()
    (app / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    monkeypatch.setattr(provisioning, "APP_DIR", app)
    args = ["provision", "--out", str(app / "fed"), "--server-host", "127.0.0.1", "--nodes", "a"]
    assert main(args) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert f"--out {app / 'fed'} is inside the fedpriv app folder {app}" in out and not (app / "fed").exists()
    assert main([*args, "--force"]) == 0 and (app / "fed" / "nodes" / "a" / "a.key").exists()
    assert main(["provision", "--out", str(tmp_path / "elsewhere"), "--server-host", "127.0.0.1", "--nodes", "a"]) == 0


def test_git_status_lists_no_kit_file_wherever_the_kits_are_written(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    provision(tmp_path / "fed", ["127.0.0.1"], ["site-a"])
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=tmp_path,
                            capture_output=True, text=True, check=True).stdout
    assert status == "", status
    # The checkout's own .gitignore, for kits copied in by hand (without their .gitignore) and run folders.
    paths = ["runs/x/summary.json", "fed/server/server.key", "elsewhere/nodes/a/secagg.key", "elsewhere/nodes/a/kit.json",
             "elsewhere/server/node-keys/a.pub", "elsewhere/nodes/a/federation-keys.json", "elsewhere/server/state/x.db"]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=APP_DIR, capture_output=True,
                             text=True).stdout.split()
    assert sorted(ignored) == sorted(paths)


# --- 5. one `fedpriv server` per state folder -------------------------------------------------------

def test_a_second_server_on_a_running_kits_state_is_refused_naming_the_holder(tmp_path):
    fed = provision(tmp_path / "fed", ["127.0.0.1"], ["site-a"], port=free_port())
    state = tmp_path / "state"
    state.mkdir()
    record = state / superlink.COORDINATOR_FILE
    record.write_text('{"pid": 1, "control_port": 1}')
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from server.superlink import lock_state; "
         "lock_state(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)", str(state)],
        stdout=subprocess.PIPE, text=True, cwd=APP_DIR)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        with pytest.raises(superlink.CoordinatorError, match=rf"is held by process {holder.pid} "):
            superlink.start_coordinator(fed.server_kit, state_dir=state, control_port=free_port(), port=free_port(),
                                        host="127.0.0.1")
        assert time.monotonic() - start < 5
        assert record.read_text() == '{"pid": 1, "control_port": 1}'
        assert not (state / "superlink.log").exists()
    finally:
        holder.kill()
        holder.wait()
    superlink.lock_state(state)  # free again once its holder is gone
    superlink.release_state(state)


# --- 6. smaller items ---------------------------------------------------------------------------------

def test_the_node_facing_port_binds_the_kits_host_and_the_banner_names_the_kits_address():
    assert superlink.default_bind_host({"server_hosts": ["127.0.0.1", "localhost"]}) == "127.0.0.1"
    assert superlink.default_bind_host({"server_hosts": ["localhost"]}) in ("127.0.0.1", "::1")
    assert superlink.default_bind_host({"server_hosts": ["fl.hospital.invalid"]}) == "0.0.0.0"  # not resolvable
    assert superlink.default_bind_host({"server_hosts": ["192.0.2.7"]}) == "0.0.0.0"  # not this machine's
    assert superlink.node_facing_address({"server_hosts": ["fl.hospital.org", "localhost"]}, 9092) == "fl.hospital.org:9092"


def test_kit_readmes_name_their_folder(tmp_path):
    fed = provision(tmp_path / "fed", ["127.0.0.1"], ["site-a"])
    server_readme = (fed.server_kit / "README.md").read_text()
    node_readme = (fed.node_kits["site-a"] / "README.md").read_text()
    assert "{this folder}" not in server_readme + node_readme
    assert f"fedpriv server --kit {fed.server_kit.resolve()}" in server_readme
    assert "fedpriv node --kit . " in node_readme and str(fed.node_kits["site-a"].resolve()) in node_readme


@pytest.mark.e2e
def test_server_and_node_by_absolute_path_without_a_venv_second_server_refused_sigterm_stops_them(tmp_path, nginx):
    fed = provision(tmp_path / "fed", ["127.0.0.1"], ["site-a"], port=free_port())
    env = {"HOME": os.environ.get("HOME", str(tmp_path)), "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
           "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    command = [str(VENV_BIN / "fedpriv"), "server", "--kit", str(fed.server_kit), "--control-port", str(free_port())]
    log = tmp_path / "server.log"
    with open(log, "wb") as handle:
        first = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=handle, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "SuperLink ready" not in log.read_text() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "SuperLink ready: SuperNodes connect to 127.0.0.1:" in log.read_text(), log.read_text()[-2000:]
        record = (fed.server_kit / "state" / superlink.COORDINATOR_FILE).read_text()
        second = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and f"is held by process {first.pid} (fedpriv server --kit" in \
            " ".join(second.stdout.split()), second.stdout
        assert (fed.server_kit / "state" / superlink.COORDINATOR_FILE).read_text() == record
        # A site's `fedpriv node`, by absolute path too, joins (its SuperExec started from the venv's python).
        node_log = tmp_path / "node.log"
        with open(node_log, "wb") as handle:
            node = subprocess.Popen([str(VENV_BIN / "fedpriv"), *_node(fed.node_kits["site-a"], _text_data(tmp_path))],
                                    env=env, cwd=tmp_path, stdout=handle, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while "SuperNode ID" not in node_log.read_text() and node.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
            assert "SuperNode ID" in node_log.read_text(), node_log.read_text()[-2000:]
            node_children = _tree(node.pid)  # the SuperNode and its SuperExec behind the app approval gate
            assert any("flower-supernode" in line for line in _alive(node_children))
            assert any("-m client.app_approval" in line for line in _alive(node_children))
            node.send_signal(signal.SIGTERM)
            node.wait(timeout=60)
            _wait_gone(node_children, 10)
            assert not _alive(node_children), _alive(node_children)
        finally:
            if node.poll() is None:
                node.kill()
        children = _tree(first.pid)
        assert any("flower-superexec" in line for line in _alive(children))
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 128 + signal.SIGTERM  # stopped its processes, then exited
        _wait_gone(children, 10)  # the reaper too, once it has checked nothing of the server is left
        assert not _alive(children), _alive(children)
    finally:
        if first.poll() is None:
            first.kill()


def test_a_gateway_that_cannot_bind_quotes_nginx(tmp_path, nginx):
    from server.fleet_gateway import GatewayError, nginx_config, start_gateway

    fed = provision(tmp_path / "fed", ["127.0.0.1"], ["site-a"])
    kit = fed.server_kit
    busy = socket.create_server(("127.0.0.1", 0))
    port = busy.getsockname()[1]
    try:
        config = nginx_config(listen_host="127.0.0.1", listen_port=port, upstream_port=free_port(),
                              certificate=kit / "server.crt", private_key=kit / "server.key", ca_certificate=kit / "ca.crt",
                              workdir=tmp_path / "gateway")
        with pytest.raises(GatewayError, match=rf"nginx exited with code 1: .*bind\(\) to 127.0.0.1:{port} failed "
                                               r"\(98: Address already in use\)"):
            start_gateway(config, tmp_path / "gateway", tmp_path / "gateway.stderr", listen_port=port)
    finally:
        busy.close()


@pytest.mark.e2e
def test_two_simulations_started_together_both_finish(tmp_path):
    runs = [subprocess.Popen([sys.executable, "-m", "simulations.cli", "simulate", "--rounds", "1", "--clients", "2",
                              "--out", str(tmp_path / f"run{k}"), "--state-dir", str(tmp_path / f"state{k}")],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for k in range(2)]
    outputs = [run.communicate(timeout=900)[0] for run in runs]
    for k, (run, output) in enumerate(zip(runs, outputs)):
        assert run.returncode == 0, output[-2000:]
        assert json.loads((tmp_path / f"run{k}" / "summary.json").read_text())["rounds_aggregated"] == 1
