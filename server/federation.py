"""The coordinator's round loop over Flower's Grid (Message API FedAvg).

Each round: send the global model to the sampled nodes (`train` messages), collect replies
within `round-timeout` seconds, sort them into trained / declined / failed, average the
trained ones weighted by their number of examples (FedAvg, McMahan et al. 2017, with
Flower's `aggregate_arrayrecords`), evaluate centrally on the test split, record every
node's epsilon in the coordinator's ledger, and checkpoint. A round in which no node
trained keeps the global model unchanged; one node's failure never stops the run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from server.ledger import CoordinatorLedger
from server.run_folder import RunFolder

log = logging.getLogger("fedpriv.server")


@dataclass
class FederationSettings:
    """Round-loop settings from the run-config."""

    rounds: int
    fraction_train: float = 1.0
    min_nodes: int = 1
    round_timeout: float = 3600.0  # seconds to wait for replies in a round
    node_wait_timeout: float = 120.0  # seconds to wait for min_nodes to connect
    seed: int = 0
    run_id: str = ""


@dataclass
class RoundReport:
    round: int
    trained: list[str] = field(default_factory=list)
    declined: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    aggregated: bool = False
    test: dict[str, float] = field(default_factory=dict)
    val_accuracy: float | None = None
    seconds: float = 0.0


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    """Node ids once at least `minimum` are connected. Raises TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= minimum:
            return node_ids
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(node_ids)} of the {minimum} required nodes connected within {timeout:.0f} s")
        time.sleep(1.0)


def sample_nodes(node_ids: list[int], fraction: float, minimum: int, rng: np.random.Generator) -> list[int]:
    """A seeded sample of max(minimum, round(fraction * len)) node ids (all if fewer), sorted."""
    k = min(len(node_ids), max(minimum, int(round(fraction * len(node_ids)))))
    # Sample positions, not ids: Flower's 64-bit unsigned node ids overflow numpy's int64.
    picks = rng.permutation(len(node_ids))[:k]
    return sorted(node_ids[int(i)] for i in picks)


def _reply_node_name(reply: Message) -> str:
    try:
        return str(reply.content["node"]["name"])
    except (KeyError, TypeError):
        return f"node-id-{reply.metadata.src_node_id}"


def run_federation(
    grid: Grid,
    initial: ArrayRecord,
    settings: FederationSettings,
    evaluate_fn: Callable[[ArrayRecord], dict[str, float]],
    folder: RunFolder,
    ledger: CoordinatorLedger,
    on_round_end: Callable[[RoundReport, ArrayRecord], None] | None = None,
) -> tuple[ArrayRecord, list[RoundReport]]:
    """Run `settings.rounds` rounds; returns (final global arrays, per-round reports)."""
    rng = np.random.default_rng(settings.seed)
    arrays, reports = initial, []
    for server_round in range(1, settings.rounds + 1):
        started = time.monotonic()
        report = RoundReport(round=server_round)
        node_ids = wait_for_nodes(grid, settings.min_nodes, settings.node_wait_timeout)
        sampled = sample_nodes(node_ids, settings.fraction_train, settings.min_nodes, rng)
        config = ConfigRecord({"server-round": server_round, "run-id": settings.run_id})
        messages = [
            Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=nid, message_type=MessageType.TRAIN)
            for nid in sampled
        ]
        replies = list(grid.send_and_receive(messages, timeout=settings.round_timeout))
        answered = {r.metadata.src_node_id for r in replies}
        for nid in sorted(set(sampled) - answered):
            name = f"node-id-{nid}"
            ledger.record_failure(name, server_round, f"no reply within {settings.round_timeout:.0f} s")
            report.failed.append(name)

        trained_records, val_acc, val_n = [], 0.0, 0.0
        for reply in replies:
            name = _reply_node_name(reply)
            if reply.has_error():
                ledger.record_failure(name, server_round, f"{reply.error.code}: {reply.error.reason}")
                report.failed.append(name)
                continue
            metrics = dict(reply.content["metrics"])
            declined = bool(metrics.get("declined", 0))
            ledger.record_reply(name, server_round, metrics, declined)
            if declined:
                report.declined.append(name)
                continue
            if "arrays" not in reply.content:
                ledger.record_failure(name, server_round, "reply had no model weights")
                report.failed.append(name)
                continue
            report.trained.append(name)
            trained_records.append(reply.content)
            if "val-accuracy" in metrics:
                val_acc += metrics["val-accuracy"] * metrics["num-val-examples"]
                val_n += metrics["num-val-examples"]

        if trained_records:
            arrays = aggregate_arrayrecords(trained_records, "num-examples")
            report.aggregated = True
        report.val_accuracy = val_acc / val_n if val_n else None
        report.test = evaluate_fn(arrays)
        report.seconds = time.monotonic() - started
        reports.append(report)
        folder.append_metrics({
            "round": server_round,
            "seconds": report.seconds,
            "test": report.test,
            "val_accuracy_before_round": report.val_accuracy,
            "trained": report.trained,
            "declined": report.declined,
            "failed": report.failed,
            "aggregated": report.aggregated,
            "epsilon": {n: r.epsilon for n, r in ledger.nodes.items()},
        })
        log.info(
            "round %d/%d: test accuracy %.4f, trained %d, declined %d, failed %d (%.1f s)",
            server_round, settings.rounds, report.test.get("accuracy", float("nan")),
            len(report.trained), len(report.declined), len(report.failed), report.seconds,
        )
        if on_round_end:
            on_round_end(report, arrays)
    return arrays, reports
