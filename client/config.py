"""What a node needs to know, read from Flower's run-config and node-config.

Run-config (the coordinator's, same for every node): the training plan.
Node-config (the data owner's, set when the SuperNode starts): where the data is, and the
privacy budget. The owner's `max-epsilon`/`delta` win over the run's: the budget is theirs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context


class ConfigError(ValueError):
    """A run-config or node-config value is missing or out of range (message names the key)."""


@dataclass(frozen=True)
class TrainingPlan:
    """The coordinator's training plan, identical on every node of a run."""

    task: str
    dataset: str
    model: str  # "" = the task's DP default
    activation: str  # "tanh" (DP-friendly default) or "relu"
    rounds: int
    local_epochs: int
    batch_size: int
    lr: float
    optimizer: str
    momentum: float  # SGD momentum
    dp: bool
    epsilon: float  # what this run may spend per node: sets the noise multiplier
    delta: float
    max_grad_norm: float  # per-sample clipping norm C
    val_fraction: float
    partition: str
    alpha: float
    seed: int
    run_name: str
    data_dir: str  # folder of the named datasets ("" = default)
    canaries: int = 0  # simulation audit aid: canaries built, half inserted (privacy.audit.canaries)

    @classmethod
    def from_run_config(cls, cfg: dict) -> TrainingPlan:
        """Parse and range-check Flower's run-config. Raises ConfigError naming the key."""
        def get(key, kind):
            if key not in cfg:
                raise ConfigError(f"run-config is missing '{key}'")
            try:
                return kind(cfg[key])
            except (TypeError, ValueError) as err:
                raise ConfigError(f"run-config '{key}' must be {kind.__name__}, got {cfg[key]!r}") from err

        plan = cls(
            task=get("task", str),
            dataset=get("dataset", str),
            model=get("model", str),
            activation=str(cfg.get("activation", "tanh")),
            rounds=get("num-server-rounds", int),
            local_epochs=get("local-epochs", int),
            batch_size=get("batch-size", int),
            lr=get("lr", float),
            optimizer=get("optimizer", str),
            momentum=float(cfg.get("momentum", 0.0)),
            dp=get("dp", bool),
            epsilon=get("epsilon", float),
            delta=get("delta", float),
            max_grad_norm=get("max-grad-norm", float),
            val_fraction=get("val-fraction", float),
            partition=get("partition", str),
            alpha=get("alpha", float),
            seed=get("seed", int),
            run_name=get("run-name", str),
            data_dir=str(cfg.get("data-dir", "")),
            canaries=get("canaries", int) if "canaries" in cfg else 0,
        )
        checks = [
            (plan.rounds >= 1, "num-server-rounds", "an integer >= 1"),
            (plan.local_epochs >= 1, "local-epochs", "an integer >= 1"),
            (plan.batch_size >= 1, "batch-size", "an integer >= 1"),
            (plan.lr > 0, "lr", "> 0"),
            (plan.optimizer in ("sgd", "adam"), "optimizer", "'sgd' or 'adam'"),
            (0 <= plan.momentum < 1, "momentum", "in [0, 1)"),
            (plan.activation in ("tanh", "relu"), "activation", "'tanh' or 'relu'"),
            (not plan.dp or plan.epsilon > 0, "epsilon", "> 0"),
            (0 < plan.delta < 1, "delta", "in (0, 1)"),
            (plan.max_grad_norm > 0, "max-grad-norm", "> 0"),
            (0 <= plan.val_fraction < 0.5, "val-fraction", "in [0, 0.5)"),
            (plan.canaries >= 0, "canaries", "an integer >= 0"),
        ]
        for ok, key, expected in checks:
            if not ok:
                raise ConfigError(f"run-config '{key}' must be {expected}, got {cfg[key]!r}")
        return plan


@dataclass(frozen=True)
class NodeIdentity:
    """Who this node is and the budget its data owner set."""

    name: str
    state_dir: Path
    max_epsilon: float
    delta: float
    data_path: str | None  # None in simulation: data comes from the run's partition
    partition_id: int | None
    num_partitions: int | None


def default_state_dir() -> Path:
    """Per-user folder for node ledgers: $FEDPRIV_STATE_DIR or the platform's user state dir."""
    env = os.environ.get("FEDPRIV_STATE_DIR")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_state_dir

    return Path(user_state_dir("fedpriv"))


def node_identity(context: Context, plan: TrainingPlan) -> NodeIdentity:
    """Read the node's identity and budget from node-config (deployment) or the run (simulation).

    Deployment node-config keys: `data-path` (required), `node-name`, `task`, `max-epsilon`,
    `delta`, `state-dir`. In deployment the ledger folder is the data owner's alone (node-config
    or the per-user default), never the run-config's: a coordinator must not be able to point a
    node at a fresh ledger. Simulation: Flower sets `partition-id`/`num-partitions`; the
    run-config's `max-epsilon`, `delta` and `state-dir` stand in for the data owner's.
    Raises ConfigError naming the key (also when the node's `task` is not the run's).
    """
    node_cfg, run_cfg = dict(context.node_config), dict(context.run_config)
    data_path = node_cfg.get("data-path")
    if data_path is None and "partition-id" not in node_cfg:
        raise ConfigError("node-config needs 'data-path' (deployment) or 'partition-id' (simulation)")
    if data_path is None:
        pid, n = int(node_cfg["partition-id"]), int(node_cfg["num-partitions"])
        name = f"node-{pid}"
    else:
        pid = n = None
        name = str(node_cfg.get("node-name", "node"))
        node_task = node_cfg.get("task")
        if node_task is not None and str(node_task) != plan.task:
            raise ConfigError(f"this node holds {node_task} data (node-config 'task'), but the run trains a {plan.task} "
                              "model (run-config 'task')")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(f"node-config 'node-name' must use letters, digits, '_', '.', '-' only, got {name!r}")
    budget_default = run_cfg.get("max-epsilon", plan.epsilon) if data_path is None else plan.epsilon
    max_eps = float(node_cfg.get("max-epsilon", budget_default) or plan.epsilon)
    delta = float(node_cfg.get("delta", plan.delta))
    if max_eps <= 0:
        raise ConfigError(f"'max-epsilon' must be > 0, got {max_eps}")
    if not 0 < delta < 1:
        raise ConfigError(f"'delta' must be in (0, 1), got {delta}")
    state = node_cfg.get("state-dir") or (run_cfg.get("state-dir") if data_path is None else "") or ""
    return NodeIdentity(
        name=name,
        state_dir=Path(state).expanduser() if state else default_state_dir(),
        max_epsilon=max_eps,
        delta=delta,
        data_path=str(data_path) if data_path is not None else None,
        partition_id=pid,
        num_partitions=n,
    )
