"""fedpriv's ClientApp: Flower entry points that read top to bottom.

`train`: receive the global model, train one round with DP-SGD on local data (or decline
when the node's privacy budget would be exceeded). Without secure aggregation the reply
carries the new weights; with it the node keeps its encoded update and the reply carries
only metrics (epsilon spent so far, declined or not). `query.secagg_*`: the SecAgg+ stages.
`evaluate`: the global model on the node's validation share.
The work is in `client.node_training` and `client.secure_aggregation`.
"""

from __future__ import annotations

import zlib

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import faults
from client import secure_aggregation as secagg
from client.config import TrainingPlan, node_identity
from client.node_training import device, load_node_data, train_round
from privacy.dp_sgd import evaluate as evaluate_model
from shared_models import build_model

app = ClientApp()


def _setup(context: Context):
    plan = TrainingPlan.from_run_config(dict(context.run_config))
    node = node_identity(context, plan)
    return plan, node, load_node_data(node, plan)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training; any error becomes a named failure reply, never a crash."""
    plan = TrainingPlan.from_run_config(dict(context.run_config))
    node = node_identity(context, plan)
    try:
        return _train(msg, context, plan, node)
    except Exception as err:  # noqa: BLE001 - one node's failure must not take others down
        # Only the exception's type and message leave the node (no traceback, no data).
        return Message(content=RecordDict({
            "metrics": MetricRecord({"failed": 1}),
            "node": ConfigRecord({"name": node.name, "error": f"{type(err).__name__}: {err}"}),
        }), reply_to=msg)


def _train(msg: Message, context: Context, plan: TrainingPlan, node) -> Message:
    data = load_node_data(node, plan)
    config = msg.content["config"]
    server_round = int(config["server-round"])
    global_state = msg.content["arrays"].to_torch_state_dict()
    run_cfg = context.run_config
    if float(run_cfg.get("fault-rate", 0.0)) > 0:  # simulation only: fail on purpose
        faults.inject(plan.seed, server_round, node.name, float(run_cfg["fault-rate"]),
                      hang_seconds=float(run_cfg.get("round-timeout", 3600.0)) + 5.0)
    outcome = train_round(node, plan, data, global_state, server_round, str(config["run-id"]))
    metrics = {**outcome.metrics, "declined": int(outcome.declined)}
    secure = bool(config.get("secagg", False))
    if outcome.state is not None and secure:
        # Keep the encoded update here; only its masked form will leave the node.
        # Seeded by the node's name, not Flower's per-run node id, so a resumed run repeats it.
        seed = plan.seed * 1_000_003 + server_round * 7919 + zlib.crc32(node.name.encode())
        delta = secagg.flatten_delta(outcome.state, global_state)
        # The norm before clipping helps choose --clip-norm; one number, released like the
        # other metrics (not covered by client-level DP).
        metrics["update-norm"] = float(np.linalg.norm(delta))
        secagg.store_encoded_update(context, delta, config, seed, spool_dir=node.state_dir / "secagg-spool")
        secagg.plan_dropout(context, float(config.get("dropout-rate", 0.0)), seed + 1)
    content = RecordDict({
        "metrics": MetricRecord(metrics),
        "node": ConfigRecord({"name": outcome.node, "reason": outcome.reason}),
    })
    if outcome.state is not None and not secure:
        content["arrays"] = ArrayRecord(outcome.state)
    return Message(content=content, reply_to=msg)


def _secagg_stage(stage: str):
    def handler(msg: Message, context: Context) -> Message:
        plan = TrainingPlan.from_run_config(dict(context.run_config))
        node = node_identity(context, plan)
        reply = secagg.handle_stage(stage, msg.content, context, cid=str(context.node_id), node=node.name)
        return Message(content=reply, reply_to=msg)

    handler.__name__ = stage
    return handler


for _stage in secagg.STAGES:
    app.query(_stage)(_secagg_stage(_stage))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    plan, node, data = _setup(context)
    model = build_model(plan.task, plan.model or None, data.train.input_shape, data.train.num_classes,
                        plan.activation)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    dev = device()
    result = evaluate_model(model.to(dev), data.val, dev) if len(data.val) else {}
    metrics = {f"val-{k}": v for k, v in result.items()}
    metrics["num-val-examples"] = float(len(data.val))
    return Message(
        content=RecordDict({"metrics": MetricRecord(metrics), "node": ConfigRecord({"name": node.name})}),
        reply_to=msg,
    )
