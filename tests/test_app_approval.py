"""App approval and the node's audit log (issue 15), played as a lying coordinator.

The hooks are exercised on Flower 1.42's own `run_clientapp` module names; the deployed
path (a real SuperNode refusing a changed app) is in tests/test_deployment_e2e.py.
"""

from __future__ import annotations

import hashlib
import json
import stat
import subprocess
import types
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supernode.runtime import run_clientapp as flower_run_clientapp

from client import app_approval, audit_log
from shared_models.app_bundle import fab_sha256, stage_app
from shared_models.flower_processes import console_script
from tests.secagg_grid import serverapp_identity, wire_copy

NODE_CONFIG = {"node-name": "site-a", "data-path": "/data/site-a"}


def test_the_approved_hash_is_the_hash_of_the_bundle_flower_builds_from_the_same_app(tmp_path):
    staged = stage_app(tmp_path / "app")
    subprocess.run([console_script("flwr"), "build", "--app", str(staged)], cwd=tmp_path, check=True,
                   capture_output=True)
    (fab,) = tmp_path.glob("*.fab")
    assert fab_sha256() == hashlib.sha256(fab.read_bytes()).hexdigest()
    assert fab.name.split(".")[-2] == fab_sha256()[:8]  # Flower names the file after the hash it computed


def _train_message(server_round: int = 1) -> Message:
    with serverapp_identity(run_id=7):
        return wire_copy(Message(RecordDict({"config": ConfigRecord({"server-round": server_round, "run-id": "r-7"})}),
                                 dst_node_id=5, message_type=MessageType.TRAIN))


def _context(state_dir: Path) -> Context:
    return Context(run_id=7, node_id=5, node_config={**NODE_CONFIG, "state-dir": str(state_dir)},
                   state=RecordDict(), run_config={})


def _fake_flower(calls: list):
    """Stand-ins for run_clientapp's `install_from_fab` and `get_load_client_app_fn` that record calls."""
    submitted = object()

    def install_from_fab(content, skip_prompt=False):
        calls.append(("install", hashlib.sha256(content).hexdigest()))

    def get_load_client_app_fn(**kwargs):
        return lambda fab_id, fab_version, fab_hash: calls.append(("load", fab_hash)) or submitted

    return types.SimpleNamespace(install_from_fab=install_from_fab, get_load_client_app_fn=get_load_client_app_fn), \
        submitted


def _refusal_of(app, tmp_path) -> str:
    with serverapp_identity(run_id=7):
        reply = app(_train_message(), _context(tmp_path / "state"))
    assert reply.content["metrics"]["refused"] == 1 and "arrays" not in reply.content
    return str(reply.content["node"]["reason"])


def test_an_approved_bundle_is_installed_and_loaded(tmp_path):
    calls = []
    module, submitted = _fake_flower(calls)
    bundle = b"approved bundle bytes"
    digest = hashlib.sha256(bundle).hexdigest()
    app_approval.install_hooks(module, [digest])
    module.install_from_fab(bundle, skip_prompt=True)
    assert module.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)("id", "1", digest) \
        is submitted
    assert calls == [("install", digest), ("load", digest)]


def test_a_changed_bundle_is_never_installed_or_loaded_and_the_reply_names_both_hashes(tmp_path):
    calls = []
    module, _ = _fake_flower(calls)
    approved = hashlib.sha256(b"fedpriv").hexdigest()
    tampered = b"fedpriv without the ledger charge"
    app_approval.install_hooks(module, [approved])
    module.install_from_fab(tampered, skip_prompt=True)
    app = module.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
        "id", "1", hashlib.sha256(tampered).hexdigest())
    assert calls == []  # nothing written, nothing imported
    reason = _refusal_of(app, tmp_path)
    assert hashlib.sha256(tampered).hexdigest() in reason and approved in reason


def test_an_announced_hash_that_is_not_the_bundles_own_is_refused(tmp_path):
    """A lying SuperLink announces the approved hash with other bytes, or other bytes' hash after
    approved bytes: the node loads nothing it did not hash itself."""
    approved_bytes = b"fedpriv"
    approved = hashlib.sha256(approved_bytes).hexdigest()
    calls = []
    module, _ = _fake_flower(calls)
    app_approval.install_hooks(module, [approved])
    module.install_from_fab(b"other code", skip_prompt=True)
    app = module.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)("id", "1", approved)
    assert calls == [] and "not approved" in _refusal_of(app, tmp_path)

    calls.clear()
    module, _ = _fake_flower(calls)
    app_approval.install_hooks(module, [approved])
    module.install_from_fab(approved_bytes, skip_prompt=True)
    other = hashlib.sha256(b"installed earlier").hexdigest()
    app = module.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)("id", "1", other)
    assert calls == [("install", approved)] and f"announced as {other}" in _refusal_of(app, tmp_path)


def test_the_hooks_wrap_flowers_own_names_and_refuse_any_other_flower(monkeypatch):
    """The names the hooks replace exist in flwr 1.42's run_clientapp, which calls them."""
    source = Path(flower_run_clientapp.__file__).read_text()
    assert "install_from_fab(fab.content" in source and "get_load_client_app_fn(" in source
    module = types.SimpleNamespace(install_from_fab=flower_run_clientapp.install_from_fab,
                                   get_load_client_app_fn=flower_run_clientapp.get_load_client_app_fn)
    app_approval.install_hooks(module, [fab_sha256()])
    assert module.install_from_fab is not flower_run_clientapp.install_from_fab
    monkeypatch.setattr(app_approval.flwr, "__version__", "1.43.0")
    with pytest.raises(app_approval.ApprovalError, match="pinned to flwr 1.42.0"):
        app_approval.install_hooks(types.SimpleNamespace(), [fab_sha256()])


def test_approved_hashes_start_with_this_fedpriv_and_reject_malformed_ones(monkeypatch):
    extra = "ab" * 32
    monkeypatch.setenv(app_approval.APPROVED_ENV, f"{extra.upper()},")
    assert app_approval.approved_hashes() == [fab_sha256(), extra]
    with pytest.raises(app_approval.ApprovalError, match="--approve 'abc'"):
        app_approval.approved_hashes(["abc"])


def test_the_superexec_starts_the_gated_clientapp_script():
    from client.supernode import superexec_command, supernode_command

    assert superexec_command(9094, 42)[1:3] == ["-m", "client.app_approval"]
    kit = {"superlink": "h:1", "ca": "ca.crt", "private_key": "k"}
    command = supernode_command(kit, "", 9094)
    assert command[command.index("--isolation") + 1] == "process"  # the SuperNode starts no ClientApp itself
    assert Path(console_script(app_approval.CLIENTAPP_SCRIPT)).is_file()


# --- the audit log -------------------------------------------------------------------------


def _reply(request: Message, **records) -> Message:
    with serverapp_identity(run_id=7):
        return Message(content=RecordDict(records), reply_to=request)


def test_an_entry_lists_each_field_sent_with_its_size_and_the_epsilon_after():
    request = _train_message(server_round=4)
    weights = {"conv.weight": np.zeros((8, 3, 3, 3), np.float32), "fc.bias": np.zeros(10, np.float64)}
    reply = _reply(request, arrays=ArrayRecord({k: Array(v) for k, v in weights.items()}),
                   metrics=MetricRecord({"epsilon": 1.25, "declined": 0, "num-examples": 500.0}),
                   node=ConfigRecord({"name": "site-a", "reason": ""}))
    entry = audit_log.entry_for(reply, request, "site-a")
    assert entry["fields"]["arrays.conv.weight"] == 8 * 3 * 3 * 3 * 4 and entry["fields"]["arrays.fc.bias"] == 80
    assert entry["fields"]["node.name"] == len("site-a")
    assert entry["bytes"] == 864 + 80 + 3 * 8 + 6 + 0
    assert (entry["round"], entry["run"], entry["flower_run"], entry["message_type"]) == (4, "r-7", 7, "train")
    assert entry["epsilon"] == 1.25 and not entry["declined"] and not entry["refused"]
    assert entry["privacy_unit"] is None  # the reply did not say
    patient = _reply(request, metrics=MetricRecord({"epsilon": 2.0, "num-groups": 40.0}),
                     node=ConfigRecord({"name": "site-a", "reason": "", "privacy-unit": "patient"}))
    assert audit_log.entry_for(patient, request, "site-a")["privacy_unit"] == "patient"


def test_the_log_is_private_append_only_and_rotated(tmp_path):
    for k in range(30):
        audit_log.append(tmp_path, {"k": k, "pad": "x" * 40}, max_bytes=300, backups=2)
    path = audit_log.log_path(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    assert all(p.stat().st_size <= 300 for p in path.parent.iterdir())
    kept = [e["k"] for e in audit_log.read_entries(tmp_path)]
    assert kept == list(range(30 - len(kept), 30))  # the newest, in order; the oldest dropped
    path.write_text(path.read_text() + "not json\n")
    with pytest.raises(ValueError, match="audit.jsonl:"):
        audit_log.read_entries(tmp_path)


def test_a_reply_the_node_cannot_record_is_withheld(tmp_path):
    blocked = tmp_path / "state"
    blocked.write_text("a file where the state folder should be")
    request = _train_message()
    secret = _reply(request, arrays=ArrayRecord({"w": Array(np.ones(3, np.float32))}), metrics=MetricRecord({"epsilon": 1.0}))
    with serverapp_identity(run_id=7):
        out = audit_log.audit_mod(request, _context(blocked), lambda msg, ctx: secret)
    assert out.content["metrics"]["failed"] == 1 and "arrays" not in out.content
    # a simulated node (no data-path) keeps no log and is passed through
    with serverapp_identity(run_id=7):
        sim = Context(run_id=7, node_id=5, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
        assert audit_log.audit_mod(request, sim, lambda msg, ctx: secret) is secret


def test_fedpriv_log_prints_the_entries(tmp_path, capsys):
    from simulations.cli import main

    request = _train_message(server_round=2)
    reason = "DP is required by the site; " + "the reason is logged whole, as sent. " * 10  # 400 characters
    audit_log.record_reply(tmp_path, _reply(request, metrics=MetricRecord({"refused": 1}),
                                            node=ConfigRecord({"name": "site-a", "reason": reason})),
                           request, "site-a")
    assert main(["log", "--state-dir", str(tmp_path), "--json"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["reason"] == reason and json.loads(line)["round"] == 2
    assert main(["log", "--state-dir", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "site-a" in table and "r-7" in table and "train" in table


# --- fedpriv ledger: a site's own spend --------------------------------------------------


def test_fedpriv_ledger_shows_each_datasets_spend_per_run(tmp_path, capsys):
    from opacus.accountants import RDPAccountant

    from client.ledger_view import spend_by_node, spend_by_run
    from privacy.accountants import PrivacyLedger
    from simulations.cli import main

    ledger = PrivacyLedger(tmp_path)
    records = [f"r{i}" for i in range(100)]
    for run, rounds in (("run-a", 2), ("run-b", 1)):
        for rnd in range(1, rounds + 1):
            ledger.charge(records, node="site-a", delta=1e-5, noise_multiplier=2.0, sample_rate=0.1, steps=20,
                          max_epsilon=3.0, run=run, round=rnd)
    ledger.charge(records, node="site-a", delta=1e-5, noise_multiplier=2.0, sample_rate=0.1, steps=1200,
                  max_epsilon=3.0, run="run-c", round=1)  # would pass 3: declined, nothing charged
    accountant = RDPAccountant()  # independent: Opacus composes the 60 steps charged
    accountant.history = [(2.0, 0.1, 60)]
    expected = accountant.get_epsilon(delta=1e-5)
    rows = spend_by_run(tmp_path)
    assert [(r["run"], r["rounds_charged"], r["rounds_declined"]) for r in rows] == \
        [("run-a", 2, 0), ("run-b", 1, 0), ("run-c", 0, 1)]
    assert rows[1]["epsilon"] == pytest.approx(expected, rel=1e-3) and rows[2]["epsilon"] is None
    assert spend_by_node(rows) == {("site-a", "record"): pytest.approx(expected, rel=1e-3)}
    # A patient-level run on other records: its rows and spend say the unit (issue 19).
    from privacy.accountants.ledger import group_unit_id

    ledger.charge(["s1", "s2"], node="site-a", delta=1e-5, noise_multiplier=2.0, sample_rate=0.5, steps=20,
                  max_epsilon=30.0, run="run-d", round=1, groups={group_unit_id("p1"): ["s1", "s2"]}, unit="patient")
    accountant.history = [(2.0, 0.5, 20)]
    per_patient = accountant.get_epsilon(delta=1e-5)
    rows = spend_by_run(tmp_path)
    assert [(r["run"], r["unit"]) for r in rows][-1] == ("run-d", "patient")
    assert spend_by_node(rows)[("site-a", "patient")] == pytest.approx(per_patient, rel=1e-3)
    assert main(["ledger", "--state-dir", str(tmp_path), "--json"]) == 0
    assert [json.loads(line)["run"] for line in capsys.readouterr().out.splitlines()] == \
        ["run-a", "run-b", "run-c", "run-d"]
    assert main(["ledger", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"site-a: epsilon spent so far {expected:.3f} per record" in out
    assert f"site-a: epsilon spent so far {per_patient:.3f} per patient" in out
