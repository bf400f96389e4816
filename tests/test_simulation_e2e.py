"""End-to-end: `fedpriv simulate` on Flower's simulation engine (SuperLink + Ray)."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def _simulate(*args, cwd, codes=(0,)):
    """Run `fedpriv simulate ARGS`; its exit code must be one of `codes` (3: the run trained nothing)."""
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "simulate", *args],
        capture_output=True, text=True, timeout=900, cwd=cwd,
    )
    assert proc.returncode in codes, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _summary(out):
    return json.loads((out / "summary.json").read_text())


def test_real_data_dp_run_beats_majority_class_within_budget(shared_data, tmp_path):
    out = tmp_path / "pneumonia"
    _simulate("--dataset", "pneumoniamnist", "--clients", "3", "--partition", "dirichlet", "--alpha", "0.5",
              "--rounds", "6", "--local-epochs", "2", "--epsilon", "8", "--batch-size", "128",
              "--out", str(out), "--state-dir", str(tmp_path / "state"), cwd=tmp_path)
    summary = _summary(out)
    assert summary["rounds_completed"] == 6 and summary["dp"] is True
    assert summary["final"]["test_accuracy"] > summary["majority_class_rate"] + 0.05  # 0.625 on the official test split
    assert summary["final"]["test_auc"] > 0.8
    # The final model was also evaluated on every node's validation share (the evaluate handler).
    assert summary["final"]["val_nodes"] == 3 and 0.5 < summary["final"]["val_accuracy"] <= 1.0
    assert set(summary["clients"]) == {"node-0", "node-1", "node-2"}
    for node in summary["clients"].values():
        assert 0 < node["epsilon"] <= 8.0 and node["delta"] == 1e-5 and node["declined_rounds"] == []
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert (out / "final_model.pt").exists() and (out / "ledger.json").exists() and (out / "report.md").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == "pneumoniamnist" and config["epsilon"] == 8.0


def test_second_run_continues_each_nodes_epsilon_and_declines_past_the_budget(tmp_path):
    state = tmp_path / "state"
    common = ["--dataset", "digits", "--clients", "2", "--rounds", "2", "--epsilon", "2", "--max-epsilon", "2.5",
              "--state-dir", str(state)]
    _simulate(*common, "--out", str(tmp_path / "first"), cwd=tmp_path)
    _simulate(*common, "--out", str(tmp_path / "second"), cwd=tmp_path)
    first, second = _summary(tmp_path / "first"), _summary(tmp_path / "second")
    assert first["rounds_completed"] == second["rounds_completed"] == 2
    for name in ("node-0", "node-1"):
        a, b = first["clients"][name], second["clients"][name]
        assert a["epsilon"] <= 2.0 and a["declined_rounds"] == []
        # Round 1 of the second run starts from the first run's total, not from zero.
        assert b["epsilon"] > a["epsilon"] and b["epsilon"] <= 2.5
        assert b["declined_rounds"] == [2] and b["rounds_trained"] == [1]
    # The run still ended and reported; a round nobody trained keeps the model.
    rows = [json.loads(line) for line in (tmp_path / "second" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["aggregated"] is False and rows[1]["test"]["accuracy"] == rows[0]["test"]["accuracy"]


def test_patient_level_run_reports_the_patient_unit_and_its_epsilon_end_to_end(tmp_path):
    """Issue 19 on the real path: Flower's engine, SecAgg+, the node's ledger, summary and report."""
    import numpy as np

    from client.config import NodeIdentity
    from client.node_training import load_node_data
    from shared_models.run_config import TrainingPlan

    out, state = tmp_path / "patients", tmp_path / "state"
    _simulate("--dataset", "digits", "--synthetic-patients", "--privacy-unit", "patient", "--clients", "2",
              "--rounds", "2", "--epsilon", "3", "--batch-size", "16", "--out", str(out), "--state-dir", str(state),
              cwd=tmp_path)
    summary = _summary(out)
    assert summary["privacy_unit"] == "patient" and summary["rounds_aggregated"] == 2
    plan = TrainingPlan.from_run_config(json.loads((out / "config.json").read_text()))
    for pid, name in enumerate(("node-0", "node-1")):
        node = summary["clients"][name]
        data = load_node_data(NodeIdentity(name=name, state_dir=state, max_epsilon=3, delta=1e-5, data_path=None,
                                           partition_id=pid, num_partitions=2, val_fraction=plan.val_fraction,
                                           privacy_unit="patient"), plan)
        patients = len(np.unique(data.train.groups))  # counted here, from the node's own data
        assert node["privacy_unit"] == "patient" and node["num_groups"] == patients < node["num_examples"]
        assert node["sample_rate"] == 1.0 / -(-patients // 16) and 0 < node["epsilon"] <= 3.0
        assert not set(data.train.groups) & set(data.val.groups)  # validation holds whole patients
    events = [json.loads(line) for line in (state / "ledgers" / "events.jsonl").read_text().splitlines()]
    assert len(events) == 4 and {(e["unit"], e["declined"]) for e in events} == {("patient", False)}
    assert "| node-0 |" in (out / "report.md").read_text() and "| patient |" in (out / "report.md").read_text()


def test_cli_rejects_bad_arguments_before_starting_flower(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "simulations.cli", "simulate", "--dataset", "fsdd", "--task", "text"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "is a speech dataset" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "simulations.cli", "simulate", "--epsilon", "-1"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "must be > 0" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "simulations.cli", "simulate", "--clients", "4", "--threshold", "5"],
                          capture_output=True, text=True, cwd=tmp_path)
    # 4 nodes, up to 20% corrupt (0): t >= max(0 + 2, (4 + 0) // 2 + 1) = 3
    assert proc.returncode == 2 and "t = 5 refused: the complete graph of 4 nodes with up to 0 corrupt needs t in [3, 4]" \
        in " ".join(proc.stdout.split())


def test_secure_and_plain_aggregation_reach_the_same_accuracy(tmp_path):
    # Clip far above the update norms so client-level clipping is inactive, and draw the same
    # DP noise in both runs (a simulation-only switch): the only difference left is SecAgg+'s
    # quantisation (error < clients / scale per coordinate).
    common = ["--dataset", "digits", "--clients", "3", "--rounds", "2", "--clip-norm", "100", "--reproducible-noise"]
    _simulate(*common, "--secagg", "--out", str(tmp_path / "secure"), "--state-dir", str(tmp_path / "s1"), cwd=tmp_path)
    _simulate(*common, "--no-secagg", "--track", "tensorboard", "--out", str(tmp_path / "plain"),
              "--state-dir", str(tmp_path / "s2"), cwd=tmp_path)
    secure, plain = _summary(tmp_path / "secure"), _summary(tmp_path / "plain")
    assert secure["secure_aggregation"] is True and plain["secure_aggregation"] is False
    assert secure["final"]["test_accuracy"] > 3 * secure["majority_class_rate"]
    assert abs(secure["final"]["test_accuracy"] - plain["final"]["test_accuracy"]) <= 0.01
    rows = [json.loads(line) for line in (tmp_path / "secure" / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["secure_aggregation"]["survivors"]) == 3 for r in rows)
    assert secure["client_level"]["rounds"] == 2
    # The tracked run, read back by TensorBoard's own reader: the same figures as metrics.jsonl and the ledger.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "plain" / "tensorboard")).Reload()
    plain_rows = [json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    accuracy = [(e.step, e.value) for e in events.Scalars("test/accuracy")]
    assert accuracy == [(r["round"], pytest.approx(r["test"]["accuracy"], abs=1e-6)) for r in plain_rows]
    for node, rec in plain["clients"].items():
        assert events.Scalars(f"epsilon/{node}")[-1].value == pytest.approx(rec["epsilon"], rel=1e-6)
    assert [e.value for e in events.Scalars("nodes/trained")] == [3.0, 3.0]
    assert "config/text_summary" in events.Tags()["tensors"]


def test_dropouts_mid_protocol_never_stop_the_run_and_are_all_recorded(tmp_path):
    out = tmp_path / "drops"
    # 6 nodes, 1 corrupt: the least secure t is max(1 + 2, (6 + 1) // 2 + 1) = 4
    proc = _simulate("--dataset", "digits", "--clients", "6", "--rounds", "3", "--threshold", "4",
                     "--dropout-rate", "0.5", "--client-noise-multiplier", "0.05", "--clip-norm", "10", "--seed", "1",
                     "--out", str(out), "--state-dir", str(tmp_path / "state"), cwd=tmp_path, codes=(0, 3))
    summary = _summary(out)
    assert summary["rounds_completed"] == 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    dropped_total = 0
    for row in rows:
        secure = row["secure_aggregation"]
        dropped = sum(len(v) for v in secure.get("dropped", {}).values())
        dropped_total += dropped
        if row["aggregated"]:
            assert len(secure["survivors"]) >= 4 and "error" not in secure
        else:
            # Too few nodes at a stage, or too few shares to unmask: either way a clean failure.
            assert "threshold" in secure["error"] or "needed" in secure["error"]
            before = rows[row["round"] - 2]["test"]["accuracy"] if row["round"] > 1 else summary["initial"]["test_accuracy"]
            assert row["test"]["accuracy"] == before  # the global model was kept
        # Every node that vanished is in the round's failures and in the ledger.
        for names in secure.get("dropped", {}).values():
            for name in names:
                assert row["round"] in summary["clients"][name]["failed_rounds"]
    assert dropped_total > 0  # with rate 0.5 over 18 node-rounds, some dropped
    aggregated = sum(r["aggregated"] for r in rows)
    assert summary["client_level"] is None or summary["client_level"]["rounds"] == aggregated
    # The run always finishes; it exits 3, saying why, only when no round changed the model.
    assert proc.returncode == (0 if aggregated else 3)
    if not aggregated:
        failed = ",".join(str(r["round"]) for r in rows)
        assert "no round changed the model" in proc.stdout and f"SecAgg+ failed in rounds {failed}" in proc.stdout


def _charges(state) -> dict[str, list[dict]]:
    """Every charge in a state folder's ledger event log, per node, read as plain JSON lines."""
    out: dict[str, list[dict]] = {}
    events = state / "ledgers" / "events.jsonl"
    for event in map(json.loads, events.read_text().splitlines() if events.exists() else []):
        if not event["declined"]:
            out.setdefault(event["node"], []).append(event)
    return out


def test_server_killed_mid_round_resumes_to_the_same_model_and_counts_every_charge(shared_data, tmp_path):
    import time

    import psutil
    import torch
    from opacus.accountants import RDPAccountant

    from privacy.accountants.sample_level import RDP_ORDERS

    common = ["--dataset", "sms_spam", "--clients", "2", "--partition", "dirichlet", "--rounds", "4",
              "--epsilon", "4", "--max-epsilon", "20", "--reproducible-noise"]
    _simulate(*common, "--out", str(tmp_path / "whole"), "--state-dir", str(tmp_path / "s-whole"), cwd=tmp_path)

    out, state = tmp_path / "crashed", tmp_path / "s-crash"
    cli = subprocess.Popen([sys.executable, "-m", "simulations.cli", "simulate", *common, "--out", str(out),
                            "--state-dir", str(state)], cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    # Kill the ServerApp while round 3 is in flight: both nodes have charged it (write-ahead).
    while not all(any(e["round"] == 3 for e in events) for events in _charges(state).values()) \
            or len(_charges(state)) < 2:
        assert time.monotonic() < deadline and cli.poll() is None, "round 3 was never charged"
        time.sleep(0.05)
    server = [p for p in psutil.Process(cli.pid).children(recursive=True) if "flwr-simulation" in " ".join(p.cmdline())]
    assert server, "no ServerApp process found"
    for proc in server:
        proc.kill()  # SIGKILL
    charged_before = {node: len(events) for node, events in _charges(state).items()}
    assert cli.wait(timeout=300) != 0  # the interrupted run reports failure
    done = len((out / "metrics.jsonl").read_text().splitlines())
    assert done == 2 and charged_before == {"node-0": 3, "node-1": 3} and not (out / "summary.json").exists()

    proc = subprocess.run([sys.executable, "-m", "simulations.cli", "simulate", "--resume", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    whole, resumed = _summary(tmp_path / "whole"), _summary(out)
    assert resumed["rounds_completed"] == 4 and resumed["resumed_after_round"] == 2
    # Same noise (--reproducible-noise) and the checkpoint's state: the same model as the uninterrupted run.
    a = torch.load(tmp_path / "whole" / "final_model.pt")
    b = torch.load(out / "final_model.pt")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert resumed["final"]["test_accuracy"] == pytest.approx(whole["final"]["test_accuracy"], abs=1e-9)
    # Privacy: rounds 1-3 charged before the kill and rounds 3-4 after it, none lost: the
    # epsilon each node reports is exactly Opacus's accountant over those 5 charges, above the
    # uninterrupted run's 4.
    for name, events in _charges(state).items():
        assert [e["round"] for e in events] == [1, 2, 3, 3, 4]
        accountant = RDPAccountant()
        accountant.history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in events]
        expected = accountant.get_epsilon(delta=1e-5, alphas=RDP_ORDERS)
        assert resumed["clients"][name]["epsilon"] == pytest.approx(expected, rel=1e-9)
        assert resumed["clients"][name]["epsilon"] > whole["clients"][name]["epsilon"]
        batch = json.loads((out / "config.json").read_text())["batch-size"]  # the recipe's (0: full batch)
        steps = 1 if batch == 0 else -(-resumed["clients"][name]["num_examples"] // batch)
        assert all(e["steps"] == steps and e["sample_rate"] == 1 / steps for e in events)


def test_injected_faults_never_stop_the_run_and_every_one_is_in_the_summary(tmp_path):
    from client.faults import planned_fault

    out = tmp_path / "faults"
    _simulate("--dataset", "digits", "--clients", "5", "--rounds", "5", "--fault-rate", "0.2", "--seed", "1",
              "--round-timeout", "40", "--out", str(out), "--state-dir", str(tmp_path / "state"), cwd=tmp_path)
    planned = {(r, f"node-{i}"): planned_fault(1, r, f"node-{i}", 0.2) for r in range(1, 6) for i in range(5)}
    planned = {k: v for k, v in planned.items() if v}
    # Seed 1 plans 4 faults, both kinds, at most one hang per round (2 CPU workers).
    assert sorted(planned.values()) == ["hang", "hang", "hang", "raise"]
    summary = _summary(out)
    assert summary["rounds_completed"] == 5
    recorded = {(f["round"], f["node"]) for f in summary["failures"]}
    assert recorded == set(planned)
    for (rnd, node), kind in planned.items():
        error = next(f["error"] for f in summary["failures"] if (f["round"], f["node"]) == (rnd, node))
        assert ("InjectedFault" in error) if kind == "raise" else ("no reply within 40 s" in error)
        assert rnd in summary["clients"][node]["failed_rounds"]
    # SecAgg+ threshold with 5 nodes is 4: a round with two faults (round 4) fails cleanly.
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        faults = sum(1 for (rnd, _) in planned if rnd == row["round"])
        assert row["aggregated"] is (5 - faults >= 4)
        if not row["aggregated"]:
            assert row["secure_aggregation"]["error"] == "3 nodes trained, threshold is 4"
    assert summary["rounds_aggregated"] == 4


def test_label_count_release_adjusts_the_released_model_within_each_nodes_budget(tmp_path):
    import numpy as np
    import torch

    from privacy.accountants import PrivacyLedger
    from shared_models import build_model
    from shared_models.datasets.named import load_dataset
    from shared_models.run_config import TrainingPlan

    out, state = tmp_path / "run", tmp_path / "state"
    proc = _simulate("--dataset", "digits", "--clients", "3", "--rounds", "3", "--epsilon", "4", "--val-fraction",
                     "0", "--label-count-share", "0.2", "--out", str(out), "--state-dir", str(state), cwd=tmp_path)
    summary, ledger = _summary(out), json.loads((out / "ledger.json").read_text())["nodes"]
    assert all(0 < node["epsilon"] <= 4.0 for node in summary["clients"].values())
    adjustment = summary["logit_adjustment"]
    assert adjustment["nodes"] == 3 and adjustment["tau"] == 1.0
    # The nodes' noisy counts add up to the training split's counts, within the noise they state.
    plan = TrainingPlan.from_run_config(json.loads((out / "config.json").read_text()))
    splits = load_dataset("digits", options=plan.data_options())  # the run's scattering maps
    truth = np.bincount(splits["train"].y, minlength=10)
    noise = np.sqrt(sum(rec["label_count_noise"] ** 2 for rec in ledger.values()))
    assert np.abs(np.asarray(adjustment["label_counts"]) - truth).max() < 6 * noise
    assert sum(adjustment["class_prior"]) == pytest.approx(1.0)
    # Each node charged one release to its ledger, besides its 3 rounds of DP-SGD.
    for node in ("node-0", "node-1", "node-2"):
        kinds = [e.mechanism for e in PrivacyLedger(state).events(node) if not e.declined]
        assert sorted(kinds) == ["dp-sgd"] * 3 + ["label-counts"]
        # Its DP-SGD plan, as its own ledger charged it, is printed once as it joins (full batch: the recipe's).
        sigma = [e.noise_multiplier for e in PrivacyLedger(state).events(node) if e.mechanism == "dp-sgd"][0]
        assert (f"{node} joined (first reply in round 1): DP-SGD at sampling rate 1 (full batch), "
                f"noise multiplier {sigma:.4g}") in proc.stdout.splitlines()
    # The exported model is the trained weights' logits minus log(prior).
    test = splits["test"]
    model = build_model("vision", summary["model"], test.input_shape, 10)
    model.load_state_dict(torch.load(out / "final_model.pt", weights_only=True))
    exported = torch.export.load(str(out / "final_model.pt2")).module()
    x = torch.from_numpy(np.ascontiguousarray(test.x[:8]))
    with torch.no_grad():
        expected = model.eval()(x).numpy() - np.log(adjustment["class_prior"])
        assert exported(x).numpy() == pytest.approx(expected, abs=1e-4)
