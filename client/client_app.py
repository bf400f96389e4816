"""fedpriv's ClientApp: Flower entry points that read top to bottom.

`train`: receive the global model, train one round with DP-SGD on local data (or decline
when the node's privacy budget would be exceeded), reply with the new weights and the
epsilon spent so far. `evaluate`: the global model on the node's validation share.
The work is in `client.node_training`, which knows nothing of Flower.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

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
    plan, node, data = _setup(context)
    config = msg.content["config"]
    global_state = msg.content["arrays"].to_torch_state_dict()
    outcome = train_round(node, plan, data, global_state, int(config["server-round"]), str(config["run-id"]))
    content = RecordDict({
        "metrics": MetricRecord({**outcome.metrics, "declined": int(outcome.declined)}),
        "node": ConfigRecord({"name": outcome.node, "reason": outcome.reason}),
    })
    if outcome.state is not None:
        content["arrays"] = ArrayRecord(outcome.state)
    return Message(content=content, reply_to=msg)


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
