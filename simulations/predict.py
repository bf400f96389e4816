"""`fedpriv predict RUN_DIR --data PATH [--out predictions.csv]`: use a run's final model on local data.

Reads the run folder (config.json: task, model, activation, format options; summary.json:
the class names, the privacy the model carries and, when the run had one, its logit adjustment;
final_model.pt: the weights), reads
PATH as a node reads its data (`shared_models.datasets.load_local`: the same formats and
options), and writes one CSV row per record: its position, content id, the label it was
filed under, the predicted class and one probability per class: those of the released model,
so with the run's logit adjustment when summary.json records one (`server.logit_adjustment`:
logits minus log(class prior), as final_model.pt2 and the run's test figures). Labels that are class
names of the model give an accuracy line. Prediction is post-processing of the released
model: it costs no privacy.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from server.class_report import predict_proba
from server.logit_adjustment import LogitAdjusted
from shared_models import build_model
from shared_models.datasets import load_local
from shared_models.datasets.named import load_dataset
from shared_models.records import DataFormatError
from shared_models.run_config import ConfigError, TrainingPlan


class PredictError(ValueError):
    """The run folder or the data cannot be used for prediction (the message names the file)."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise PredictError(f"{path}: missing (expected a finished fedpriv run folder)") from err
    except json.JSONDecodeError as err:
        raise PredictError(f"{path}: not valid JSON ({err})") from err


def model_classes(run_dir: Path, summary: dict, plan: TrainingPlan) -> list[str]:
    """The class names the run's model predicts, in output order (summary.json, else the run's dataset)."""
    per_class = summary.get("final", {}).get("per_class")
    if per_class:
        return list(per_class["classes"])
    try:
        return load_dataset(plan.dataset, plan.task, plan.data_dir)["test"].classes
    except (OSError, DataFormatError) as err:
        raise PredictError(f"{run_dir}: summary.json has no final.per_class and the run's dataset cannot be read "
                           f"for its class names ({err})") from err


def predict(run_dir: str | Path, data_path: str | Path, out: str | Path) -> dict:
    """Predict every record of `data_path` with the final model of `run_dir`; write the CSV `out`.

    Returns {"records", "classes", "accuracy" (None when the data's labels are not the
    model's class names), "out"}. Raises PredictError naming the file when the run folder
    is incomplete or its config.json is not a run-config, DataFormatError when the data
    cannot be read as the run's task.
    """
    run_dir, out = Path(run_dir), Path(out)
    config, summary = _read_json(run_dir / "config.json"), _read_json(run_dir / "summary.json")
    try:
        plan = TrainingPlan.from_run_config(config)  # the run's task, model and format options, as its nodes read them
    except ConfigError as err:
        raise PredictError(f"{run_dir / 'config.json'}: {err}") from err
    weights = run_dir / "final_model.pt"
    if not weights.exists():
        raise PredictError(f"{weights}: missing (the run did not finish)")
    data = load_local(data_path, plan.task, plan.data_options())
    classes = model_classes(run_dir, summary, plan)
    model = build_model(plan.task, plan.model or None, data.input_shape, len(classes), plan.activation)
    try:
        model.load_state_dict(torch.load(weights, weights_only=True))
    except RuntimeError as err:
        raise PredictError(f"{weights}: does not fit the data's input shape {data.input_shape} "
                           f"(was the run trained on other inputs? --image-size / --max-text-bytes) ({err})") from err
    adjustment = summary.get("logit_adjustment")
    if adjustment is not None:  # the released model is the adjusted one (the run's figures, final_model.pt2)
        try:
            prior = np.asarray(adjustment["class_prior"], dtype=np.float64)
            if prior.shape != (len(classes),):
                raise ValueError(f"got {prior.shape[0] if prior.ndim == 1 else prior.shape} values")
            model = LogitAdjusted(model, prior)
        except (KeyError, TypeError, ValueError) as err:
            raise PredictError(f"{run_dir / 'summary.json'}: logit_adjustment.class_prior must be {len(classes)} "
                               f"probabilities summing to 1 ({err})") from err
    probs = predict_proba(model, data, torch.device("cpu"))
    predicted = probs.argmax(1)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["record", "record_id", "label", "predicted", *(f"p_{c}" for c in classes)])
        for i in range(len(data)):
            writer.writerow([i, data.record_ids[i], data.classes[data.y[i]], classes[predicted[i]],
                             *(f"{p:.6f}" for p in probs[i])])
    given = [data.classes[y] for y in data.y]
    accuracy = None
    if set(given) <= set(classes):
        accuracy = float(np.mean([classes[p] == g for p, g in zip(predicted, given)]))
    return {"records": len(data), "classes": classes, "accuracy": accuracy, "out": str(out)}


def register(subparsers) -> None:
    """Add `fedpriv predict`."""
    parser = subparsers.add_parser(
        "predict", help="predict local data with a run's final model",
        description="Predict every record of --data (the formats a node reads) with RUN_DIR's final model; "
                    "writes class and per-class probabilities to --out.")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished run folder")
    parser.add_argument("--data", type=Path, required=True, help="local data: image/audio folder, .csv, .npz")
    parser.add_argument("--out", type=Path, default=Path("predictions.csv"), help="CSV to write")
    parser.set_defaults(handler=predict_command)


def predict_command(args, console) -> int:
    """Run `predict` and print what was written and the privacy the model carries."""
    try:
        result = predict(args.run_dir, args.data, args.out)
    except (PredictError, DataFormatError) as err:
        console.print(f"[red]error:[/red] {err}")
        return 2
    summary = _read_json(Path(args.run_dir) / "summary.json")
    line = f"{result['records']} records predicted -> {result['out']}"
    if result["accuracy"] is not None:
        line += f" (accuracy against the labels they were filed under: {result['accuracy']:.4f})"
    console.print(line)
    if summary.get("dp"):
        console.print(f"the model carries sample-level DP: epsilon <= {summary.get('max_client_epsilon')} at delta "
                      f"{summary.get('delta')} for each node's records (summary.json)")
    else:
        console.print("[yellow]the model was trained without differential privacy[/yellow]")
    return 0
