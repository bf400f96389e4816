"""Tracking: what each tracker writes, read back with that tool's own reader (TensorBoard, MLflow)."""

import json
import os

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from server import tracking
from server.tracking import TrackingUnavailable, check_tracker, make_tracker


def test_rounds_config_and_epsilons_read_back_by_tensorboard(tmp_path):
    tracker = make_tracker("tensorboard", tmp_path, {"epsilon": 8.0, "dataset": "digits"})
    tracker.log_round(1, {"accuracy": 0.5, "loss": 1.5}, {"site-a": 1.25, "site-b": None}, None,
                      {"trained": 1, "declined": 0, "refused": 0, "failed": 1}, 2.0)
    tracker.log_round(2, {"accuracy": 0.75, "balanced_accuracy": 0.625, "loss": 0.9, "auc": 0.8},
                      {"site-a": 2.5, "site-b": 2.0}, 0.7, {"trained": 2, "declined": 0, "refused": 0, "failed": 0}, 1.5)
    tracker.close()
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert scalars["test/accuracy"] == [(1, 0.5), (2, 0.75)]
    assert scalars["test/auc"] == [(2, pytest.approx(0.8))]
    assert scalars["test/balanced_accuracy"] == [(2, 0.625)]
    assert scalars["epsilon/site-a"] == [(1, 1.25), (2, 2.5)]
    assert scalars["epsilon/site-b"] == [(2, 2.0)]  # nothing logged before the node reported
    assert scalars["client_level/epsilon"] == [(2, pytest.approx(0.7))]
    assert scalars["nodes/failed"] == [(1, 1.0), (2, 0.0)]
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '| epsilon | 8.0 |' in text and '| dataset | "digits" |' in text


def _rounds(tracker):
    tracker.log_round(1, {"accuracy": 0.5, "loss": 1.5}, {"site-a": 1.25, "site-b": None}, None,
                      {"trained": 1, "declined": 0, "refused": 0, "failed": 1}, 2.0)
    tracker.log_round(2, {"accuracy": 0.75, "loss": 0.9, "auc": 0.8}, {"site-a": 2.5, "site-b": 2.0}, 0.7,
                      {"trained": 2, "declined": 0, "refused": 0, "failed": 0}, 1.5)


def test_rounds_config_and_epsilons_read_back_by_mlflow(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    env_before = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW")}
    run_dir = tmp_path / "digits-20261205-1200"
    long_value = "x" * 7000  # over MLflow's 6000-character param limit
    config = {"epsilon": 8.0, "dataset": "digits", "secagg": True, "long": long_value}
    tracker = make_tracker("mlflow", run_dir, config)
    _rounds(tracker)
    tracker.close()

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name("fedpriv")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "digits-20261205-1200" and run.info.status == "FINISHED"

    def history(key):
        points = client.get_metric_history(run.info.run_id, key)
        return [(m.step, m.value) for m in sorted(points, key=lambda m: m.step)]

    assert history("test/accuracy") == [(1, 0.5), (2, 0.75)]
    assert history("test/loss") == [(1, 1.5), (2, 0.9)]
    assert history("test/auc") == [(2, 0.8)]
    assert history("epsilon/site-a") == [(1, 1.25), (2, 2.5)]
    assert history("epsilon/site-b") == [(2, 2.0)]  # nothing logged before the node reported
    assert history("client_level/epsilon") == [(2, 0.7)]
    assert history("nodes/trained") == [(1, 1.0), (2, 2.0)]
    assert history("nodes/failed") == [(1, 1.0), (2, 0.0)]
    assert history("round/seconds") == [(1, 2.0), (2, 1.5)]
    assert set(run.data.metrics) == {"test/accuracy", "test/loss", "test/auc", "epsilon/site-a", "epsilon/site-b",
                                     "client_level/epsilon", "nodes/trained", "nodes/declined", "nodes/refused",
                                     "nodes/failed", "round/seconds"}
    params = run.data.params
    assert params["epsilon"] == "8.0" and params["dataset"] == "digits" and params["secagg"] == "true"
    assert params["long"] == "(7000 characters: see the artifact config.json, key 'long')"
    artifact = client.download_artifacts(run.info.run_id, "config.json", str(tmp_path))
    assert json.loads(open(artifact).read()) == config  # the full config, long value included
    # Everything stays in the run folder; the user's MLflow settings are untouched.
    assert sorted(p.name for p in run_dir.iterdir()) == ["mlflow-artifacts", "mlflow.db"]
    assert list(elsewhere.iterdir()) == []
    assert {k: v for k, v in os.environ.items() if k.startswith("MLFLOW")} == env_before

    # A resumed fedpriv run continues the same MLflow run; params keep their first values.
    resumed = make_tracker("mlflow", run_dir, {**config, "epsilon": 9.0, "resumed-after-round": 2})
    resumed.log_round(3, {"accuracy": 0.8}, {"site-a": 3.0}, None, {"trained": 1}, 1.0)
    resumed.close(failed=True)
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED" and run.data.params["epsilon"] == "8.0"
    assert run.data.params["resumed-after-round"] == "2"
    assert history("epsilon/site-a") == [(1, 1.25), (2, 2.5), (3, 3.0)]


def test_no_tracking_and_unknown_kinds():
    assert make_tracker("", None, {}) is None
    with pytest.raises(ValueError, match="tracking must be one of"):
        check_tracker("wandb")


def test_missing_mlflow_names_what_to_install(monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "mlflow" else real(name))
    needs = r"needs the mlflow-skinny package.*fedpriv\[track\].*missing: mlflow$"
    with pytest.raises(TrackingUnavailable, match=needs):
        make_tracker("mlflow", None, {})
