"""fedpriv's ServerApp: FedAvg over DP-trained client updates, with a privacy ledger.

Reads the run-config, builds the global model from the shared model family, runs the round
loop (`server.federation`), evaluates centrally on the dataset's test split (reporting
only), and writes the run folder (`server.run_folder`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from privacy.dp_sgd import evaluate
from privacy.secagg.parameters import DEFAULT_CORRUPT_FRACTION, DEFAULT_DROPOUT_FRACTION
from server.class_report import class_report, predict_proba
from server.federation import FederationSettings, evaluate_on_nodes, run_federation
from server.ledger import CoordinatorLedger
from server.logit_adjustment import adjusted
from server.model_export import EXPORT_FILE, export_model
from server.report import write_run_report
from server.run_folder import RunFolder
from server.server_optimizer import optimizer_config
from server.summary import build_summary, write_report
from server.tracking import make_tracker
from shared_models import build_model
from shared_models.datasets.named import load_dataset
from shared_models.run_config import TrainingPlan

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = dict(context.run_config)
    plan = TrainingPlan.from_run_config(cfg)
    folder = RunFolder(Path(str(cfg["out-dir"])).expanduser())
    started = time.time()

    test = load_dataset(plan.dataset, plan.task, plan.data_dir, plan.data_options())["test"]
    torch.manual_seed(plan.seed)
    model = build_model(plan.task, plan.model or None, test.input_shape, test.num_classes, plan.activation)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def evaluate_global(arrays: ArrayRecord) -> dict[str, float]:
        # Logit-adjusted once nodes have sent label counts (server.logit_adjustment; else as it is).
        model.load_state_dict(arrays.to_torch_state_dict())
        return evaluate(adjusted(model, ledger, test.num_classes)[0].to(dev), test, dev, balanced_accuracy=True)

    settings = federation_settings(cfg, plan, run_id=f"{plan.run_name}-{context.run_id}")
    arrays, ledger, resume, initial_test = ArrayRecord(model.state_dict()), CoordinatorLedger(), None, None
    checkpoint_file = folder.path / "checkpoint.pt"
    if bool(cfg.get("resume", False)) and checkpoint_file.exists():
        # Continue after the last complete round. Nodes' own ledgers already hold every step
        # they took, including a round trained but never aggregated before the crash.
        saved = torch.load(checkpoint_file, weights_only=False)  # our own file, written below
        arrays = ArrayRecord(saved["arrays"])
        ledger = CoordinatorLedger.from_dict(saved["ledger"], saved["client_level"])
        resume, initial_test = saved["state"], saved["initial_test"]
        folder.rewrite_metrics(folder.read_metrics(up_to_round=saved["state"]["round"]))
        cfg["resumed-after-round"] = saved["state"]["round"]
    else:
        folder.rewrite_metrics([])
        initial_test = evaluate_global(arrays)
    folder.write_json("config.json", cfg)

    tracker = make_tracker(str(cfg.get("track", "")), folder.path, cfg)

    def checkpoint(report, arrays: ArrayRecord, state: dict) -> None:
        if tracker is not None:
            tracker.log_round(report.round, report.test, {n: r.epsilon for n, r in ledger.nodes.items()},
                              report.client_epsilon, {"trained": len(report.trained), "declined": len(report.declined),
                                                      "refused": len(report.refused), "failed": len(report.failed)},
                              report.seconds)
        folder.write_torch("checkpoint.pt", {
            "arrays": arrays.to_torch_state_dict(), "ledger": ledger.to_dict(), "client_level": ledger.client_level,
            "state": state, "initial_test": initial_test,
        })
        folder.write_json("ledger.json", {"nodes": ledger.to_dict(), "client_level": ledger.client_level})

    finished = False
    try:
        final, _ = run_federation(grid, arrays, settings, evaluate_global, folder, ledger, checkpoint, resume=resume)
        finished = True
    finally:
        if tracker is not None:
            tracker.close(failed=not finished)
    # `final` is the released model: the global model's EMA when --ema-decay is on (run_federation).
    folder.write_torch("final_model.pt", final.to_torch_state_dict())
    final_validation = evaluate_on_nodes(grid, final, settings.round_timeout)
    folder.write_json("ledger.json", {"nodes": ledger.to_dict(), "client_level": ledger.client_level})
    summary = build_summary(
        plan, cfg, folder.read_metrics(), ledger, initial_test,
        majority_rate=float(np.bincount(test.y).max() / len(test)), seconds=time.time() - started,
    )
    summary["final"].update(final_validation)
    model.load_state_dict(final.to_torch_state_dict())
    released, adjustment = adjusted(model, ledger, test.num_classes)
    if adjustment is not None:
        summary["logit_adjustment"] = adjustment
    summary["final"].update(class_report(test.y, predict_proba(released.to(dev), test, dev), test.classes))
    try:  # a copy that loads with torch alone; the run's results never depend on it
        export_model(released.cpu(), test.x[:2], folder.path / EXPORT_FILE)
    except Exception as err:
        logging.getLogger("fedpriv.server").warning("%s not written (%s: %s)", EXPORT_FILE, type(err).__name__, err)
    folder.write_json("summary.json", summary)
    write_report(folder, summary)
    try:  # the HTML report is a convenience: failing to draw it must never lose the run
        write_run_report(folder.path)
    except Exception as err:
        logging.getLogger("fedpriv.server").warning("report.html not written (%s: %s)", type(err).__name__, err)


def federation_settings(cfg: dict, plan: TrainingPlan, run_id: str) -> FederationSettings:
    """Round-loop settings from the run-config (keys as in pyproject's [tool.flwr.app.config])."""
    optimizer = optimizer_config(cfg)
    return FederationSettings(
        rounds=plan.rounds,
        fraction_train=float(cfg.get("fraction-train", 1.0)),
        min_nodes=int(cfg.get("min-nodes", 1)),
        node_wait_timeout=float(cfg.get("node-wait-timeout", 120.0)),
        round_timeout=float(cfg.get("round-timeout", 3600.0)),
        seed=plan.seed,
        run_id=run_id,
        secagg=bool(cfg.get("secagg", False)),
        num_shares=int(cfg.get("num-shares", 0)),
        threshold=int(cfg.get("threshold", 0)),
        corrupt_fraction=float(cfg.get("corrupt-fraction", DEFAULT_CORRUPT_FRACTION)),
        dropout_fraction=float(cfg.get("dropout-fraction", DEFAULT_DROPOUT_FRACTION)),
        clip_norm=float(cfg.get("clip-norm", 1000.0)),
        client_noise_multiplier=float(cfg.get("client-noise-multiplier", 0.0)),
        client_delta=float(cfg.get("client-delta", 1e-5)),
        colluding_nodes=int(cfg.get("colluding-nodes", -1)),
        dropout_rate=float(cfg.get("dropout-rate", 0.0)),
        aggregation=str(cfg.get("aggregation", "fedavg")),
        trim_fraction=float(cfg.get("trim-fraction", 0.2)),
        server_optimizer=optimizer["name"],
        server_lr=optimizer["lr"],
        server_momentum=optimizer["momentum"],
        server_beta2=optimizer["beta2"],
        server_tau=optimizer["tau"],
        ema_decay=float(cfg.get("ema-decay", 0.0)),
    )
