"""fedpriv's ClientApp: Flower entry points that read top to bottom.

`train`: receive the global model; refuse a round that breaks the site's policy (DP or
SecAgg+ required: `client.config.policy_refusal`), decline one that would pass its
privacy budget, else train one round with DP-SGD on local data. Without secure
aggregation the reply carries the new weights; with it the node keeps its encoded update
and the reply carries only metrics. Every field a reply may carry, and what protects it,
is listed in `privacy.releases`; on a deployed node each reply is written to the node's
audit log before it leaves (`client.audit_log.audit_mod`). `query.secagg_*`: the SecAgg+ stages. `evaluate`: the global
model on the node's validation share (empty unless its owner keeps one).
The work is in `client.node_training` and `client.secure_aggregation`.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import audit_log, faults
from client import secure_aggregation as secagg
from client.config import node_identity, policy_refusal, signing_identity
from client.node_training import device, load_node_data, node_randomness, privacy_unit, train_round
from privacy.dp_sgd import evaluate as evaluate_model
from shared_models import build_model
from shared_models.run_config import ConfigError, TrainingPlan, as_bool

app = ClientApp(mods=[audit_log.audit_mod])  # a deployed node records every reply before it leaves
log = logging.getLogger("fedpriv.client")


def _setup(context: Context):
    plan = TrainingPlan.from_run_config(dict(context.run_config))
    node = node_identity(context, plan)
    return plan, node, load_node_data(node, plan)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training; any error becomes a named failure reply, never a crash.

    What a failure reply says: the exception's type and message for a run-config the node
    cannot accept (the coordinator's own input) and in simulations; for any other error a
    deployed node sends the type only and keeps the message in its own log, since a message
    (a file name, a value) may depend on its data, which DP does not cover.
    """
    deployed = "data-path" in context.node_config
    name = str(context.node_config.get("node-name", "node")) if deployed else \
        f"node-{context.node_config.get('partition-id', '?')}"
    try:
        plan = TrainingPlan.from_run_config(dict(context.run_config))
        node = node_identity(context, plan)
        name = node.name
        return _train(msg, context, plan, node)
    except Exception as err:  # noqa: BLE001 - one node's failure must not take others down
        log.error("%s: round failed: %s: %s", name, type(err).__name__, err)
        told = f"{type(err).__name__}: {err}" if not deployed or isinstance(err, ConfigError) else \
            f"{type(err).__name__} (the message stays in the node's log)"
        return Message(content=RecordDict({
            "metrics": MetricRecord({"failed": 1}),
            "node": ConfigRecord({"name": name, "error": told}),
        }), reply_to=msg)


def _refused(msg: Message, name: str, reason: str) -> Message:
    """The reply of a site whose own policy refuses the round: `refused=1` and why; nothing trained or charged."""
    return Message(content=RecordDict({
        "metrics": MetricRecord({"refused": 1}),
        "node": ConfigRecord({"name": name, "reason": reason}),
    }), reply_to=msg)


def _train(msg: Message, context: Context, plan: TrainingPlan, node) -> Message:
    config = msg.content["config"]
    server_round = int(config["server-round"])
    secure = as_bool(config.get("secagg", False), "train message 'secagg'")
    refusal = policy_refusal(node, plan, secure)
    if refusal:  # the site's policy, not the coordinator's plan, decides: nothing is trained or charged
        return _refused(msg, node.name, refusal)
    data = load_node_data(node, plan)
    try:
        privacy_unit(node.privacy_unit, data.train)
    except ValueError as err:  # the owner asked for patient-level DP on data without group keys
        return _refused(msg, node.name, str(err))
    global_state = msg.content["arrays"].to_torch_state_dict()
    run_cfg = context.run_config
    simulated = node.data_path is None  # fault and dropout injection are simulation aids only
    if simulated and float(run_cfg.get("fault-rate", 0.0)) > 0:
        faults.inject(plan.seed, server_round, node.name, float(run_cfg["fault-rate"]),
                      hang_seconds=float(run_cfg.get("round-timeout", 3600.0)) + 5.0)
    # Under client-level noise no per-node statistic leaves the node (as update-norm below): no label counts.
    client_level = float(config.get("client-noise-multiplier", 0.0)) > 0.0
    outcome = train_round(node, plan, data, global_state, server_round, str(config["run-id"]),
                          label_counts_allowed=not client_level)
    metrics = {**outcome.metrics, "declined": int(outcome.declined)}
    if outcome.state is not None and secure:
        # Keep the encoded update here; only its masked form will leave the node. Its
        # client-level noise and stochastic rounding come from secret entropy.
        delta = secagg.flatten_delta(outcome.state, global_state)
        if not client_level:
            # The norm before clipping helps choose --clip-norm; a function of the DP-SGD output
            # (sample-level DP covers it), not hidden by SecAgg+. Not sent once client-level
            # noise is on: it would be one node's statistic outside client-level DP.
            metrics["update-norm"] = float(np.linalg.norm(delta))
        secagg.store_encoded_update(context, delta, config, node_randomness(node, plan, server_round, "secagg-encoding"),
                                    spool_dir=node.state_dir / "secagg-spool",
                                    num_examples=outcome.metrics["num-examples"])
        if simulated:
            secagg.plan_dropout(context, float(config.get("dropout-rate", 0.0)),
                                (plan.seed, server_round, node.partition_id))
    content = RecordDict({
        "metrics": MetricRecord(metrics),
        "node": ConfigRecord({"name": outcome.node, "reason": outcome.reason, "privacy-unit": outcome.unit}),
    })
    if outcome.state is not None and not secure:
        content["arrays"] = ArrayRecord(outcome.state)
    return Message(content=content, reply_to=msg)


def _secagg_stage(stage: str):
    def handler(msg: Message, context: Context) -> Message:
        plan = TrainingPlan.from_run_config(dict(context.run_config))
        node = node_identity(context, plan)
        reply = secagg.handle_stage(stage, msg.content, context, signing_identity(context, node))
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
