"""Coordinator operations (issue 15): a run that trained nothing exits non-zero naming each
site's reason with advice for its reader; progress in any output; the Fleet gateway's raw-URI
checks and route list; provisioning's loopback SANs and folder modes; the report's config table.

Unit tier: no Flower process starts here; the gateway tests start a real nginx (skipped,
naming the package, without it) against a fake upstream that records what reaches it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from simulations import cli, deployed_run
from simulations.run_outcome import EXIT_NOTHING_TRAINED, nothing_trained, site_reasons, untrained_run_message


# --- 1. a run that trained nothing exits non-zero ----------------------------------------------------

def _client(**fields) -> dict:
    base = {"epsilon": None, "delta": None, "max_epsilon": None, "declined_rounds": [], "declines": [],
            "refused_rounds": [], "refusals": [], "failed_rounds": [], "failures": [], "rounds_trained": [],
            "steps": 0, "noise_multiplier": None, "sample_rate": None, "num_examples": 0}
    return {**base, **fields}


DECLINE = "training would reach epsilon=8.412 > max-epsilon=8 (spent so far 7.950, delta=1e-05)"


def _summary(clients: dict, aggregated: int = 0) -> dict:
    return {"final": {"test_accuracy": 0.327}, "majority_class_rate": 0.327, "rounds_completed": 2,
            "rounds_planned": 2, "rounds_aggregated": aggregated, "secure_rounds_failed": [], "refusals": [],
            "clients": clients}


def _untrained() -> dict:
    return _summary({
        "st-mary": _client(epsilon=7.95, delta=1e-5, max_epsilon=8.0, declined_rounds=[1, 2],
                           declines=[{"round": 1, "reason": DECLINE}, {"round": 2, "reason": DECLINE}]),
        "city-clinic": _client(refused_rounds=[1, 2], refusals=[{"round": 1, "reason": "DP is required by the site"},
                                                                 {"round": 2, "reason": "DP is required by the site"}]),
        "old-run": _client(epsilon=4.0, max_epsilon=4.0, declined_rounds=[1]),  # summary.json before `declines`
        "lab": _client(failed_rounds=[2], failures=[{"round": 2, "error": "ValueError (the message stays in the "
                                                                           "node's log)"}]),
    })


def test_a_run_is_untrained_when_no_node_trained_or_no_round_changed_the_model():
    assert nothing_trained(_untrained())
    trained = _summary({"a": _client(rounds_trained=[1]), "b": _client(declined_rounds=[1])}, aggregated=1)
    assert not nothing_trained(trained) and untrained_run_message(trained, "coordinator") == ""
    # Nodes trained, but SecAgg+ failed every round: the model never changed.
    failed_sum = {**_summary({"a": _client(rounds_trained=[1])}), "secure_rounds_failed": [1]}
    assert nothing_trained(failed_sum)
    assert "SecAgg+ failed in round 1" in untrained_run_message(failed_sum, "simulation", out_dir="/r")
    with pytest.raises(ValueError, match="role must be one of"):
        untrained_run_message(_untrained(), "researcher")


def test_each_sites_reason_comes_from_summary_json_and_absent_kit_nodes_are_named():
    reasons = site_reasons(_untrained(), expected_nodes=["st-mary", "city-clinic", "old-run", "lab", "far-away"])
    assert reasons == {
        "city-clinic": ["refused rounds 1,2: DP is required by the site"],
        "lab": ["failed round 2: ValueError (the message stays in the node's log)"],
        "old-run": ["declined round 1: a round would pass its lifetime budget max-epsilon=4.0 "
                    "(spent so far: epsilon 4.000)"],
        "st-mary": [f"declined rounds 1,2: {DECLINE}"],
        "far-away": ["never answered (not connected, or never sampled)"],
    }


def test_the_coordinators_advice_never_tells_it_to_do_what_only_a_site_can():
    message = untrained_run_message(_untrained(), "coordinator", expected_nodes=["st-mary", "far-away"],
                                    out_dir="/runs/r1")
    assert message.startswith("no node trained in this run: the result is the untrained model (test accuracy 0.327)")
    assert f"  st-mary: declined rounds 1,2: {DECLINE}" in message
    assert "  city-clinic: refused rounds 1,2: DP is required by the site" in message
    assert "  far-away: never answered" in message
    assert "you cannot raise or reset them" in message
    assert "max-epsilon minus spent: old-run 0.00, st-mary 0.05" in message
    assert "ask the site for it, and see /runs/r1/flower.log" in message
    assert "--state-dir" not in message and "raise --max-epsilon" not in message
    simulation = untrained_run_message(_untrained(), "simulation", out_dir="/runs/r1")
    assert "use a fresh --state-dir" in simulation and "raise --max-epsilon" in simulation
    assert "far-away" not in simulation and "you cannot raise" not in simulation


def _declined_everywhere_summary(out: Path) -> dict:
    summary = _summary({"node-0": _client(epsilon=7.9, delta=1e-5, max_epsilon=8.0, declined_rounds=[1],
                                          declines=[{"round": 1, "reason": DECLINE}]),
                        "node-1": _client(epsilon=7.9, delta=1e-5, max_epsilon=8.0, declined_rounds=[1],
                                          declines=[{"round": 1, "reason": DECLINE}])})
    (out / "summary.json").write_text(json.dumps(summary))
    return summary


def test_fedpriv_simulate_exits_non_zero_when_every_node_declined(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "preflight", lambda run_config, clients: [])
    outcome = {}

    def fake_job(run_config, clients, out, **kwargs):
        out.mkdir(parents=True, exist_ok=True)
        return outcome["summary"](out)

    monkeypatch.setattr(cli, "run_simulation_job", fake_job)
    argv = ["simulate", "--clients", "2", "--rounds", "1", "--out", str(tmp_path / "run"),
            "--state-dir", str(tmp_path / "state")]
    outcome["summary"] = _declined_everywhere_summary
    assert cli.main(argv) == EXIT_NOTHING_TRAINED == 3
    out = capsys.readouterr().out
    assert "error: no node trained in this run" in out
    assert f"node-0: declined round 1: {DECLINE}" in out and "use a fresh --state-dir" in out

    def trained(out: Path) -> dict:
        return _summary({"node-0": _client(epsilon=1.0, delta=1e-5, max_epsilon=8.0, rounds_trained=[1])},
                        aggregated=1)

    outcome["summary"] = trained
    assert cli.main(argv) == 0
    assert "no node trained" not in capsys.readouterr().out


def test_fedpriv_run_exits_non_zero_naming_each_kit_site_and_coordinator_advice(monkeypatch, tmp_path):
    kit = {"nodes": ["node-0", "node-1", "site-z"], "ca": tmp_path / "ca.crt", "path": tmp_path / "server"}
    monkeypatch.setattr(deployed_run, "load_kit", lambda path, role: kit)
    monkeypatch.setattr(deployed_run, "state_folder", lambda kit, state: tmp_path / "state")
    monkeypatch.setattr(deployed_run, "running_control_port", lambda kit, state: 9093)
    monkeypatch.setattr(deployed_run.ssl, "create_default_context", lambda **kwargs: None)
    monkeypatch.setattr(deployed_run.httpx, "get", lambda *a, **k: None)  # the SuperLink's /health answers
    monkeypatch.setattr(deployed_run, "write_flwr_home", lambda *a: tmp_path / "flwr")
    monkeypatch.setattr(deployed_run, "submit_and_follow",
                        lambda run_config, out, *a, **k: _declined_everywhere_summary(out))
    args = cli.build_parser().parse_args(["run", "--kit", str(tmp_path / "server"), "--rounds", "1",
                                          "--out", str(tmp_path / "run")])
    buffer = io.StringIO()
    assert deployed_run._run(args, Console(file=buffer, soft_wrap=True)) == EXIT_NOTHING_TRAINED
    out = buffer.getvalue()
    assert f"node-1: declined round 1: {DECLINE}" in out
    assert "site-z: never answered (not connected, or never sampled)" in out
    assert "you cannot raise or reset them" in out and "an --epsilon below what each site has left" in out
    assert "--state-dir" not in out  # neither in the summary's advice nor in the error
    assert "Only a site's owner can raise it" in out


def test_a_declined_reply_keeps_the_nodes_reason_in_the_ledger_and_summary(monkeypatch):
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from server import federation

    for key, value in (("_run_id", 42), ("_node_id", 1), ("_task_id", 3)):  # as in a ServerApp process
        monkeypatch.setattr(TaskIdentity, key, value)
    from server.ledger import CoordinatorLedger

    metrics = {"epsilon": 7.95, "delta": 1e-5, "max-epsilon": 8.0, "noise-multiplier": 1.1, "sample-rate": 0.1,
               "steps-total": 20, "num-examples": 200, "declined": 1}

    def reply(name: str, reason: str) -> Message:
        return Message(RecordDict({"metrics": MetricRecord(metrics), "node": ConfigRecord({"name": name, "reason": reason})}),
                       dst_node_id=1, message_type="train")

    monkeypatch.setattr(federation, "exchange", lambda grid, messages, timeout: {5: reply("st-mary", DECLINE)})
    ledger, report = CoordinatorLedger(), federation.RoundReport(round=3)
    federation._train_stage(None, ArrayRecord(), ConfigRecord({}), [5], federation.FederationSettings(rounds=3),
                            ledger, report, {})
    assert report.declined == ["st-mary"] and report.trained == []
    record = ledger.to_dict()["st-mary"]
    assert record["declined_rounds"] == [3] and record["declines"] == [{"round": 3, "reason": DECLINE}]


# --- 2. progress in any output ------------------------------------------------------------------------

def _row(k: int, trained=(), declined=(), refused=None, failed=(), acc=0.5, eps=None) -> dict:
    return {"round": k, "test": {"accuracy": acc}, "trained": list(trained), "declined": list(declined),
            "refused": refused or {}, "failed": list(failed), "aggregated": bool(trained), "epsilon": eps or {}}


ROWS = [
    {**_row(1, trained=["site-a", "site-b"], refused={"site-c": "DP is required by the site"}, acc=0.61,
            eps={"site-a": 1.234, "site-b": 1.5}),
     "dp_plan": {"site-a": {"sample_rate": 1.0, "noise_multiplier": 25.6173},
                 "site-b": {"sample_rate": 0.25, "noise_multiplier": 1.5}}},
    _row(2, trained=["site-a"], refused={"site-c": "DP is required by the site"}, failed=["site-b"], acc=0.7,
         eps={"site-a": 2.0, "site-b": 1.5}),
    _row(3, trained=["site-a", "site-b"], refused={"site-c": "DP is required by the site"}, acc=0.8125,
         eps={"site-a": 2.5, "site-b": 2.25}),
]


class _FakeFlwrRun:
    """`flwr run --stream` as `_follow` sees it: running while the ServerApp appends one row per poll."""

    def __init__(self, metrics: Path, rows: list[dict]) -> None:
        self.metrics, self.rows, self.returncode = metrics, list(rows), None

    def poll(self):
        if self.rows:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(self.rows.pop(0)) + "\n")
            return None
        self.returncode = 0
        return 0


def test_without_a_terminal_each_round_is_one_plain_line_and_sites_are_named_as_they_join_and_leave(
        monkeypatch, tmp_path):
    from simulations import runner

    monkeypatch.setattr(runner.time, "sleep", lambda s: None)
    buffer = io.StringIO()
    console = Console(file=buffer, soft_wrap=True)
    assert not console.is_terminal
    runner._follow(_FakeFlwrRun(tmp_path / "metrics.jsonl", ROWS), tmp_path, 3, console, "waiting for 3 SuperNode(s)")
    assert buffer.getvalue().splitlines() == [
        "waiting for 3 SuperNode(s) (3 rounds)",
        # Each site's DP-SGD plan as it reported it (its own calibration), shown once as it joins.
        "site-a joined (first reply in round 1): DP-SGD at sampling rate 1 (full batch), noise multiplier 25.62",
        "site-b joined (first reply in round 1): DP-SGD at sampling rate 0.25, noise multiplier 1.5",
        "site-c joined (first reply in round 1)",
        "site-c refused: DP is required by the site",  # once, though every round repeats it
        "round 1/3: test accuracy 0.6100, max node epsilon 1.50 (trained 2, declined 0, refused 1, failed 0)",
        "site-b left or failed (no usable reply in round 2)",
        "round 2/3: test accuracy 0.7000, max node epsilon 2.00 (trained 1, declined 0, refused 1, failed 1)",
        "site-b is back (replied in round 3)",
        "round 3/3: test accuracy 0.8125, max node epsilon 2.50 (trained 2, declined 0, refused 1, failed 0)",
    ]


def test_a_node_not_sampled_is_not_said_to_have_left_and_a_resumed_file_is_followed_again():
    from simulations.runner import RoundEvents

    events = RoundEvents(4, every_node_sampled=False)  # fraction-train < 1: absent may be just not sampled
    assert events.new_lines([_row(1, trained=["a", "b"])], plain=False) == ["a joined (first reply in round 1)",
                                                                             "b joined (first reply in round 1)"]
    assert events.new_lines([_row(1, trained=["a", "b"]), _row(2, trained=["a"])], plain=False) == []
    # A resume rewrites metrics.jsonl up to its checkpoint: the rounds after it are shown again.
    assert events.new_lines([_row(1, trained=["a", "b"])], plain=False) == []
    assert events.new_lines([_row(1, trained=["a", "b"]), _row(2, trained=["b"], failed=["a"])], plain=True) == [
        "a left or failed (no usable reply in round 2)",
        "round 2/4: test accuracy 0.5000, max node epsilon - (trained 1, declined 0, refused 0, failed 1)"]


def test_on_a_terminal_the_bar_is_kept_and_no_plain_round_lines_are_printed(monkeypatch, tmp_path):
    from simulations import runner

    monkeypatch.setattr(runner.time, "sleep", lambda s: None)
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=200)
    runner._follow(_FakeFlwrRun(tmp_path / "metrics.jsonl", ROWS), tmp_path, 3, console, "starting")
    out = buffer.getvalue()
    assert "round 1/3: test accuracy" not in out and "round 3/3" in out  # the bar's own label
    assert out.count("site-c refused: DP is required by the site") == 1 and "site-b is back" in out


# --- 3. the Fleet gateway: raw URIs, exact routes ------------------------------------------------------

def test_the_gateway_lists_exactly_the_fleet_routes_of_flower_1_42():
    import flwr
    from flwr.superlink.routers.fleet.router import router

    from server.fleet_gateway import FLEET_ROUTES

    assert flwr.__version__ == "1.42.0"  # the list below is pinned to this release
    declared = {(method, route.path) for route in router.routes for method in route.methods}
    assert declared == {("POST", path) for path in FLEET_ROUTES}


class _RecordingUpstream:
    """A TLS HTTP server on 127.0.0.1 standing in for the SuperLink: it records each request line it gets."""

    def __init__(self, certificate: Path, key: Path) -> None:
        import http.server
        import ssl
        import threading

        seen = self.seen = []

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self):
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                seen.append((self.command, self.path))
                body = b"upstream"
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = _answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certificate, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _raw_request(port: int, ca: Path, method: str, target: str) -> tuple[int, str]:
    """Send `METHOD target` exactly as written (no client-side normalisation) over TLS; (status, body)."""
    import socket
    import ssl

    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1\r\n"
                    f"Connection: close\r\n\r\nx".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


RAW_FORMS = [
    "/v1/control/../fleet/pull-messages",          # normalises to a Fleet route, raw form is a Control path
    "/v1/fleet/../control/start-run",
    "/v1/fleet/%2e%2e/control/start-run",
    "/v1/fleet/%2E%2E/control/start-run",
    "/v1/fleet%2fpull-messages",
    "/v1/fleet%2Fpull-messages",
    "/v1/fleet/pull-messages%2F..%2F..%2Fcontrol%2Fstart-run",
    "/v1/fleet/.%2e/control/start-run",
    "/v1/fleet/pull-messages?next=%2e%2e",
]


@pytest.fixture
def gateway(tmp_path, nginx):
    from privacy.provisioning import provision
    from server.fleet_gateway import nginx_config, start_gateway
    from shared_models.flower_processes import free_port, stop_process_tree

    kit = provision(tmp_path / "fed", ["127.0.0.1"], ["site-a"]).server_kit
    upstream = _RecordingUpstream(kit / "loopback.crt", kit / "loopback.key")
    port = free_port()
    config = nginx_config(listen_host="127.0.0.1", listen_port=port, upstream_port=upstream.port,
                          certificate=kit / "server.crt", private_key=kit / "server.key",
                          ca_certificate=kit / "ca.crt", workdir=tmp_path / "gateway")
    process = start_gateway(config, tmp_path / "gateway", tmp_path / "gateway.stderr", listen_port=port)
    try:
        yield port, kit / "ca.crt", upstream.seen
    finally:
        stop_process_tree(process)
        upstream.close()


def test_a_picked_listen_port_is_free_and_outside_the_ephemeral_range(monkeypatch):
    # A coordinator restarted after a crash rebinds its port: one in the ephemeral range can be
    # taken meanwhile as the local end of an outgoing connection (CI saw nginx fail on it).
    import socket

    from shared_models import flower_processes

    low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = [flower_processes.free_port() for _ in range(20)]
    assert all(not low <= port <= high for port in ports)
    for port in ports[:3]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # really free
    # When nothing below the range is free, the OS picks one (never an error).
    monkeypatch.setattr(flower_processes, "_LISTEN_PORTS", (low, low + 1))
    assert low <= flower_processes.free_port() <= high


def test_raw_uri_forms_are_refused_by_real_nginx_and_never_reach_the_upstream(gateway):
    from server.fleet_gateway import FLEET_ROUTES

    port, ca, seen = gateway
    for route in FLEET_ROUTES:  # the control: every Fleet route reaches the upstream, by its own path
        assert _raw_request(port, ca, "POST", route) == (200, "upstream"), route
    assert seen == [("POST", route) for route in FLEET_ROUTES]
    seen.clear()
    for target in RAW_FORMS:
        status, body = _raw_request(port, ca, "POST", target)
        assert status == 400 and "request URI refused" in body, (target, status, body)
    for method, target in [("POST", "/v1/control/start-run"), ("POST", "/v1/runtime/get-nodes"), ("POST", "/health"),
                           ("POST", "/v1/fleet/"), ("POST", "/v1/fleet/unknown-route"), ("GET", "/v1/fleet/get-fab"),
                           ("PUT", "/v1/fleet/push-object")]:
        assert _raw_request(port, ca, method, target)[0] == 403, (method, target)
    assert seen == []  # nothing of the above reached the SuperLink's place
    # A harmless other spelling of a Fleet route (merged slashes, an encoded letter) is forwarded
    # by its canonical path, never as the client wrote it.
    for target in ("//v1/fleet/pull-messages", "/v1/fleet/%70ull-messages"):
        assert _raw_request(port, ca, "POST", target)[0] == 200, target
    assert seen == [("POST", "/v1/fleet/pull-messages")] * 2


# --- 4. smaller items ---------------------------------------------------------------------------------

@pytest.mark.parametrize("task, expected", [("vision", "--task vision reads a folder with one subfolder of images"),
                                            ("speech", "--task speech reads a folder of WAV files")])
def test_a_csv_given_to_an_image_or_audio_task_is_named_by_its_columns(tmp_path, task, expected):
    from shared_models.datasets import DataFormatError, load_local

    data = tmp_path / "notes.csv"
    data.write_text("\ufefftext,label\nhello,ham\nwin money,spam\n", encoding="utf-8")
    with pytest.raises(DataFormatError) as caught:
        load_local(data, task)
    message = str(caught.value)
    assert message.startswith(f"{data}: is a CSV file (first line: text,label); CSV files are read by --task text "
                              "only, from their 'text' and 'label' columns.")
    assert expected in message and "subfolder of images per class (at least 2)" not in message
    assert len(load_local(data, "text").y) == 2  # the same file is fine as text


def test_fedpriv_simulate_on_a_csv_with_task_vision_says_so_before_any_flower_process(tmp_path, capsys):
    data = tmp_path / "notes.csv"
    data.write_text("text,label\n" + "".join(f"message {i},{'spam' if i % 2 else 'ham'}\n" for i in range(20)))
    argv = ["simulate", "--dataset", str(data), "--task", "vision", "--clients", "2", "--no-secagg",
            "--state-dir", str(tmp_path / "state"), "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "is a CSV file (first line: text,label)" in out and "subfolder of images per class (at least" not in out


def _config(**overrides) -> dict:
    import tomllib

    from shared_models.flower_processes import APP_DIR

    defaults = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return {**defaults, **overrides}


def test_the_reports_config_table_shows_each_kind_of_run_only_its_own_fields():
    from server.report import config_table, run_kind

    deployed = _config(**{"state-dir": "", "num-supernodes": 0, "min-nodes": 3})  # as `fedpriv run` writes it
    simulated = _config(**{"state-dir": "/home/u/.local/state/fedpriv", "num-supernodes": 5, "fault-rate": 0.1})
    assert run_kind(deployed) == "deployed" and run_kind(simulated) == "simulation"
    older = {k: v for k, v in simulated.items() if k != "num-supernodes"}  # a simulation from before that key
    assert run_kind(older) == "simulation"
    table = config_table(deployed)
    for key in ("fault-rate", "dropout-rate", "partition", "alpha", "num-supernodes", "canaries", "state-dir",
                "max-epsilon", "val-fraction", "reproducible-noise"):
        assert key not in table, key
    assert table["min-nodes"] == 3 and table["epsilon"] == deployed["epsilon"] and "clip-norm" in table
    assert list(table) == [k for k in deployed if k in table]  # file order kept
    sim_table = config_table(simulated)
    assert sim_table["fault-rate"] == 0.1 and sim_table["partition"] == "iid" and sim_table["num-supernodes"] == 5
    assert "min-nodes" not in sim_table and "node-wait-timeout" not in sim_table


def test_the_report_page_renders_the_filtered_config_table(monkeypatch):
    from server import report

    monkeypatch.setattr(report, "TEMPLATE", "{{ run_kind }}:{% for key in config %}{{ key }}={{ config_json[key] }};"
                                            "{% endfor %}")
    monkeypatch.setattr(report, "threat_model", lambda summary: "")
    run = report.RunRecord(path=Path("."), summary={"final": {}, "secure_aggregation": False}, rows=[], ledger={},
                           config=_config(**{"state-dir": "", "num-supernodes": 0, "fault-rate": 0.0}))
    page = report.render_html(run, {})
    assert page.startswith("deployed:") and "fault-rate" not in page and "partition" not in page
    assert "min-nodes=1;" in page


def test_readme_deployment_examples_leave_budget_headroom_and_name_the_ledger_and_stop_and_units(tmp_path):
    import re

    from privacy.accountants import PrivacyLedger
    from privacy.provisioning import provision
    from shared_models.flower_processes import APP_DIR

    readme = (APP_DIR / "README.md").read_text()
    default_epsilon = _config()["epsilon"]
    budgets = [float(m) for m in re.findall(r"fedpriv node [^`\n]*?(?:\\\n[^`\n]*?)?--max-epsilon (\d+(?:\.\d+)?)",
                                            readme)]
    runs = [float(m) for m in re.findall(r"fedpriv run --kit [^`\n]*?--epsilon (\d+(?:\.\d+)?)", readme)]
    assert len(budgets) >= 3 and runs  # the command table, the site's step 3 and the systemd unit
    assert min(budgets) >= 4 * max(runs + [default_epsilon]), (budgets, runs)
    node_readme = (provision(tmp_path / "fed", ["127.0.0.1"], ["a"]).node_kits["a"] / "README.md").read_text()
    assert float(re.search(r"--max-epsilon (\d+)", node_readme).group(1)) >= 4 * default_epsilon
    # The ledger files README names are the ones the ledger writes.
    ledger = PrivacyLedger(tmp_path / "state")
    for name in (ledger.path.name, ledger.events_path.name):
        assert f"STATE_DIR/ledgers/{name}" in readme
    assert "STATE_DIR/ledgers/<node>--<fingerprint>.json" in readme
    # Stop instructions and a systemd unit for each role.
    assert "Stop a node with Ctrl-C or SIGTERM" in readme and "Stop the coordinator with Ctrl-C or SIGTERM" in readme
    assert "ExecStart=/opt/fedpriv/.venv/bin/fedpriv server --kit" in readme
    assert "ExecStart=/opt/fedpriv/.venv/bin/fedpriv node --kit" in readme
    # The newcomer commands are still there.
    assert "\nfedpriv simulate\n" in readme and "\npython -m pytest -q tests\n" in readme
