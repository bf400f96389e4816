"""Experiment tracking in a tool researchers already use (`fedpriv simulate/run --track tensorboard|mlflow`).

A run with tracking on also logs, inside its own run folder, the resolved run-config and per
round (the step is the round number) these scalars:
    test/accuracy, test/balanced_accuracy, test/loss, test/auc   the global model on the coordinator's test split
    epsilon/<node>                             each node's sample-level epsilon as it reported it
    client_level/epsilon                       client-level epsilon of the released aggregates
    nodes/trained, nodes/declined, nodes/refused, nodes/failed   how many nodes did what
    round/seconds                              the round's wall time (s)
A value not known yet (a node that has not reported, no client-level DP, no AUC) is not logged.

`--track tensorboard`: TensorBoard event files under `<run folder>/tensorboard/` (torch's
`SummaryWriter`; `tensorboard --logdir runs/` shows every run side by side); the config is a
text table at step 0.

`--track mlflow`: a local MLflow store in the run folder, `<run folder>/mlflow.db` (SQLite;
MLflow 3's file store `./mlruns` is in maintenance mode and refuses to open without an opt-out
environment variable) with artifacts under `<run folder>/mlflow-artifacts/`: experiment
`fedpriv`, one MLflow run named after the run folder (a resumed run continues it). The config
is the run's params (string values; non-strings as JSON; a value over MLflow's 6000-character
limit is replaced by a pointer) and, in full, the artifact `config.json`. The tracking URI is
given to an `MlflowClient` only: the process-wide MLflow settings (`MLFLOW_TRACKING_URI`,
`mlflow.set_tracking_uri`) are left as they are, and MLflow's usage telemetry is switched off
while fedpriv imports MLflow. Browse with `mlflow ui --backend-store-uri sqlite:///<run folder>/mlflow.db`
(the UI needs the full `mlflow` package).

Everything logged is already in metrics.jsonl and ledger.json: tracking adds no release.
Both need their tool's package (`pip install 'fedpriv[track]'`: tensorboard, mlflow-skinny);
MLflow's SQLite store also uses sqlalchemy and alembic, which flwr already installs.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path

TRACKERS = ("tensorboard", "mlflow")
TRACKING_DIR = "tensorboard"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlflow-artifacts"
MLFLOW_EXPERIMENT = "fedpriv"
MLFLOW_CONFIG_ARTIFACT = "config.json"
MLFLOW_MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value (characters)

# The import that has to succeed for each kind, and what to install when it does not.
_NEEDS = {
    "tensorboard": (("tensorboard",), "the tensorboard package: pip install 'fedpriv[track]' (or tensorboard)"),
    "mlflow": (("mlflow", "sqlalchemy", "alembic"),
               "the mlflow-skinny package (its SQLite store also uses sqlalchemy and alembic): "
               "pip install 'fedpriv[track]' (or mlflow-skinny)"),
}


class TrackingUnavailable(RuntimeError):
    """The tracking tool asked for is not installed (the message says what to install)."""


def check_tracker(kind: str) -> None:
    """Raise ValueError for an unknown kind, TrackingUnavailable when its package is missing."""
    if kind not in TRACKERS:
        raise ValueError(f"tracking must be one of {TRACKERS}, got {kind!r}")
    modules, install = _NEEDS[kind]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise TrackingUnavailable(f"--track {kind} needs {install}; missing: {', '.join(missing)}")


class TensorBoardTracker:
    """Writes one run's config and per-round metrics as TensorBoard event files in `run_dir/tensorboard`.

    Raises TrackingUnavailable when tensorboard is not installed.
    """

    def __init__(self, run_dir: Path, config: dict) -> None:
        check_tracker("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(run_dir) / TRACKING_DIR
        self.writer = SummaryWriter(log_dir=str(self.path))
        rows = "\n".join(f"| {key} | {json.dumps(value)} |" for key, value in sorted(config.items()))
        self.writer.add_text("config", "| key | value |\n|---|---|\n" + rows, global_step=0)

    def log_round(self, server_round: int, test: dict, epsilons: dict[str, float | None], client_epsilon: float | None,
                  counts: dict[str, int], seconds: float) -> None:
        """One round's scalars at step `server_round` (names in the module docstring)."""
        for name, value in round_scalars(test, epsilons, client_epsilon, counts, seconds).items():
            self.writer.add_scalar(name, value, server_round)
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        """Flush and close the event files (`failed` is not recorded: TensorBoard has no run status)."""
        self.writer.close()


def round_scalars(test: dict, epsilons: dict[str, float | None], client_epsilon: float | None,
                  counts: dict[str, int], seconds: float) -> dict[str, float]:
    """One round's scalars by name (module docstring); values not known yet are left out.

    `test`: accuracy and balanced_accuracy (fractions), loss, auc; `epsilons`: node name -> sample-level epsilon or None;
    `counts`: trained/declined/refused/failed -> number of nodes; `seconds`: the round's wall time.
    """
    scalars: dict[str, float] = {}
    for key in ("accuracy", "balanced_accuracy", "loss", "auc"):
        if test.get(key) is not None:
            scalars[f"test/{key}"] = float(test[key])
    for node, epsilon in sorted(epsilons.items()):
        if epsilon is not None:
            scalars[f"epsilon/{node}"] = float(epsilon)
    if client_epsilon is not None:
        scalars["client_level/epsilon"] = float(client_epsilon)
    for key, count in counts.items():
        scalars[f"nodes/{key}"] = float(count)
    scalars["round/seconds"] = float(seconds)
    return scalars


def _import_mlflow_client():
    """MlflowClient, importing MLflow with its usage telemetry off (the environment is restored after).

    `import mlflow` would otherwise start a thread that fetches a config from, and sends usage
    events to, MLflow's servers; a privacy tool's runs should not. If MLflow was imported
    already (by the user's own code), its telemetry choice stands.
    """
    if "mlflow" not in sys.modules:
        saved = os.environ.get("MLFLOW_DISABLE_TELEMETRY")
        os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
        try:
            importlib.import_module("mlflow")
        finally:
            if saved is None:
                os.environ.pop("MLFLOW_DISABLE_TELEMETRY", None)
            else:
                os.environ["MLFLOW_DISABLE_TELEMETRY"] = saved
    from mlflow.tracking import MlflowClient

    return MlflowClient


def mlflow_tracking_uri(run_dir: Path) -> str:
    """The tracking URI of a run folder's MLflow store: `sqlite:///<absolute run folder>/mlflow.db`."""
    return f"sqlite:///{(Path(run_dir).expanduser().resolve() / MLFLOW_DB).as_posix()}"


def _mlflow_key(name: str) -> str:
    """`name` with characters MLflow refuses in a metric/param key (outside letters, digits, _ - . / space) as `_`."""
    parts = [re.sub(r"[^\w.\- ]", "_", part) for part in name.split("/")]
    return "/".join(part if part.strip(".") else "_" + part for part in parts)


def _param_value(key: str, value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    if len(text) > MLFLOW_MAX_PARAM_CHARS:
        return f"({len(text)} characters: see the artifact {MLFLOW_CONFIG_ARTIFACT}, key {key!r})"
    return text


class MLflowTracker:
    """Logs one run's config and per-round metrics to a local MLflow store in the run folder.

    Store `sqlite:///<run_dir>/mlflow.db`, artifacts in `<run_dir>/mlflow-artifacts/`, experiment
    `fedpriv`, MLflow run named `run_dir`'s name; an MLflow run of that name already there (a
    resumed fedpriv run) is continued, and a param it already holds keeps its first value (MLflow
    params cannot change; `config.json` is rewritten with the current config). Metrics are the
    module docstring's names at step = round number, timestamps in ms.

    Raises TrackingUnavailable when mlflow-skinny (or sqlalchemy/alembic) is not installed, and
    MLflow's MlflowException when the store cannot be written.
    """

    def __init__(self, run_dir: Path, config: dict) -> None:
        check_tracker("mlflow")
        client_class = _import_mlflow_client()
        from mlflow.entities import Param, RunStatus

        self._status = RunStatus
        run_dir = Path(run_dir).expanduser().resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = mlflow_tracking_uri(run_dir)
        self.client = client_class(tracking_uri=self.tracking_uri)
        experiment = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            experiment_id = self.client.create_experiment(
                MLFLOW_EXPERIMENT, artifact_location=(run_dir / MLFLOW_ARTIFACTS).as_uri())
        self.experiment_id = experiment_id
        # Matched here, not in a filter string: a run folder's name may hold quotes.
        earlier = [run for run in self.client.search_runs([experiment_id], order_by=["attributes.start_time DESC"])
                   if run.info.run_name == run_dir.name][:1]
        if earlier:
            self.run_id = earlier[0].info.run_id
            self.client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            held = set(earlier[0].data.params)
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
            held = set()
        params = {}
        for key, value in sorted(config.items()):
            name = _mlflow_key(str(key))
            if name not in held:
                params[name] = Param(name, _param_value(str(key), value))
        values = list(params.values())
        for start in range(0, len(values), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=values[start:start + 100])
        self.client.log_dict(self.run_id, config, MLFLOW_CONFIG_ARTIFACT)

    def log_round(self, server_round: int, test: dict, epsilons: dict[str, float | None], client_epsilon: float | None,
                  counts: dict[str, int], seconds: float) -> None:
        """One round's scalars at step `server_round` (names in the module docstring)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_key(name), value, now, int(server_round))
                   for name, value in round_scalars(test, epsilons, client_epsilon, counts, seconds).items()]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def close(self, failed: bool = False) -> None:
        """Mark the MLflow run FINISHED (FAILED when the round loop raised)."""
        status = self._status.FAILED if failed else self._status.FINISHED
        self.client.set_terminated(self.run_id, status=self._status.to_string(status))


def make_tracker(kind: str, run_dir: Path, config: dict) -> TensorBoardTracker | MLflowTracker | None:
    """The tracker for run-config `track` ("" = none); errors as check_tracker's."""
    if not kind:
        return None
    check_tracker(kind)
    return MLflowTracker(run_dir, config) if kind == "mlflow" else TensorBoardTracker(run_dir, config)
