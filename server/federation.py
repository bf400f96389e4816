"""The coordinator's round loop over Flower's Grid (Message API FedAvg).

Each round: send the global model to the sampled nodes (`train` messages), collect replies
within `round-timeout` seconds, sort them into trained / declined / failed, then aggregate:
- plain: average the returned weights, weighted by number of examples (FedAvg, McMahan et
  al. 2017, with Flower's `aggregate_arrayrecords`), or a robust rule (`aggregation`:
  median, trimmed mean, Krum; `server.robust_aggregation`);
- secure (`secagg`): the nodes kept their encoded updates, each weighted by min(1, n/W) for
  its n records and the round's cap W (`secure_weight_cap`: the most records any node reported
  before; equal weights in the first round and under client-level noise); SecAgg+ stages
  (`server.secure_aggregation`) give the sum over the survivors, and the global model moves
  by the sum over the survivors' weights, the record-weighted mean when W >= every n; the
  client-level accountant is charged for the release.
The aggregate then goes through the server optimiser (`server.server_optimizer`: fedavg keeps
it as it is; FedAvgM, FedAdam, FedYogi step along the pseudo-gradient aggregate - global), and,
when `ema_decay` > 0, into an exponential moving average of the global model, which is what
gets evaluated and released. Both are post-processing of the aggregate: no node's ledger
changes. Then evaluate centrally on the test split, record every node's epsilon in the
coordinator's ledger, and checkpoint (the optimiser's and the average's state included).
A round in which nothing could be aggregated keeps the global model (and the optimiser's
and the average's state) unchanged; one node's failure never stops the run. A node whose
owner's policy refuses the round (DP or SecAgg+ required) says why; the refusal is recorded
and shown, not retried.

Client-level DP (secure rounds with client-level noise) is accounted as the server sees it:
the server picks each round's sample itself, so no amplification by sampling is claimed
(q = 1), and each node's share of the noise is sized so that the honest survivors alone
carry std sigma*C when up to `colluding_nodes` of the survivors collude with the server
(Kairouz, Liu & Steinke, ICML 2021, sec. 5): per-node std sigma*C / sqrt(t - colluding).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from privacy.accountants import ClientLevelAccountant
from privacy.secagg import EncodingParams, RoundSetup, SecAggAbort
from privacy.secagg.encoding import summed_keys
from privacy.secagg.parameters import (DEFAULT_CORRUPT_FRACTION, DEFAULT_DROPOUT_FRACTION, SecAggParameterError,
                                       SecAggParameters, parameters_for)
from privacy.secagg.protocol import encoding_from_config, encoding_to_config
from server.ledger import CoordinatorLedger
from server.robust_aggregation import AGGREGATIONS, aggregate_in_clear
from server.messaging import exchange
from server.secure_aggregation import secure_sum
from server.run_folder import RunFolder
from server.server_optimizer import ModelEMA, ServerOptimizer

log = logging.getLogger("fedpriv.server")


@dataclass
class FederationSettings:
    """Round-loop settings from the run-config."""

    rounds: int
    fraction_train: float = 1.0
    min_nodes: int = 1  # connected nodes needed before the first round (later rounds: any)
    round_timeout: float = 3600.0  # seconds to wait for replies in a round
    node_wait_timeout: float = 120.0  # seconds to wait for min_nodes to connect
    seed: int = 0
    run_id: str = ""
    # Secure aggregation (SecAgg+) with distributed client-level DP; see server.secure_aggregation.
    secagg: bool = False
    num_shares: int = 0  # neighbourhood size k, self included (>= #clients: complete graph); 0 = from the bounds
    threshold: int = 0  # t; 0 = the least t that meets the bounds (privacy.secagg.parameters)
    corrupt_fraction: float = DEFAULT_CORRUPT_FRACTION  # of a round's nodes that may collude with the server
    dropout_fraction: float = DEFAULT_DROPOUT_FRACTION  # of a round's nodes that may drop
    clip_norm: float = 1000.0  # L2 clip C of each client's model delta (run-config default: encoding bound only)
    client_noise_multiplier: float = 0.0  # sigma of the distributed client-level Gaussian
    client_delta: float = 1e-5
    colluding_nodes: int = -1  # survivors that may collude with the server; -1 = t - 1 (the most SecAgg+ tolerates)
    dropout_rate: float = 0.0  # simulation: chance a node vanishes at one SecAgg+ stage
    # Without SecAgg+: how the updates the server sees are combined (server.robust_aggregation).
    aggregation: str = "fedavg"
    trim_fraction: float = 0.2  # trimmed-mean: share cut at each end, per coordinate
    # Post-processing of each round's aggregate (server.server_optimizer): costs no privacy.
    server_optimizer: str = "fedavg"  # fedavg (the aggregate as it is), fedavgm, fedadam or fedyogi
    server_lr: float = 1.0  # eta
    server_momentum: float = 0.9  # beta1: FedAvgM's momentum, FedAdam/FedYogi's first-moment decay
    server_beta2: float = 0.99  # FedAdam/FedYogi's second-moment decay
    server_tau: float = 1e-3  # FedAdam/FedYogi's adaptivity
    ema_decay: float = 0.0  # D of the global model's EMA, which is evaluated and released; 0 = off

    def optimizer(self) -> ServerOptimizer:
        """A fresh server optimiser with these settings (ValueError for out-of-range ones)."""
        return ServerOptimizer(self.server_optimizer, self.server_lr, self.server_momentum, self.server_beta2,
                               self.server_tau)

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"run-config 'aggregation' must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.secagg and self.aggregation != "fedavg":
            raise ValueError(f"run-config 'aggregation' = {self.aggregation!r} needs each node's update in the clear, "
                             "but with SecAgg+ the server holds only their sum: use fedavg (the update clip "
                             "'clip-norm' bounds each node's influence) or turn secure aggregation off")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ValueError(f"run-config 'trim-fraction' must be in [0, 0.5), got {self.trim_fraction}")
        try:
            self.optimizer()
        except ValueError as err:
            raise ValueError(f"run-config 'server-optimizer'/'server-lr'/'server-momentum'/'server-beta2'/"
                             f"'server-tau': {err}") from err
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"run-config 'ema-decay' must be in [0, 1) (0: off), got {self.ema_decay}")


@dataclass
class RoundReport:
    """What happened in one round: who trained, declined or failed, test metrics, SecAgg+ outcome."""

    round: int
    trained: list[str] = field(default_factory=list)
    declined: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # node -> why its policy refused the round
    failed: list[str] = field(default_factory=list)
    aggregated: bool = False
    test: dict[str, float] = field(default_factory=dict)
    val_accuracy: float | None = None
    seconds: float = 0.0
    update_norms: dict[str, float] = field(default_factory=dict)  # L2 norm of each update before clipping
    secure: dict = field(default_factory=dict)  # SecAgg+ outcome: survivors, dropped per stage, error
    client_epsilon: float | None = None


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
    """A seeded, sorted sample of node ids, of size max(minimum, round(fraction * len)) (all if fewer).

    The server knows (and logs) this sample, so client-level accounting takes no
    amplification by sampling from it.
    """
    k = min(len(node_ids), max(minimum, int(round(fraction * len(node_ids)))))
    # Sample positions, not ids: Flower's 64-bit unsigned node ids overflow numpy's int64.
    picks = rng.permutation(len(node_ids))[:k]
    return sorted(node_ids[int(i)] for i in picks)


def _reply_node_name(reply: Message, nid: int) -> str:
    try:
        return str(reply.content["node"]["name"])
    except (KeyError, TypeError):
        return f"node-id-{nid}"


@dataclass
class TrainReplies:
    """Train replies of one round, sorted by what the node did."""

    trained: dict[int, RecordDict] = field(default_factory=dict)  # node id -> reply content
    names: dict[int, str] = field(default_factory=dict)  # node id -> the name it reports
    val_accuracy: float | None = None


def _train_stage(grid, arrays, config, sampled, settings, ledger, report, known_names: dict[int, str]) -> TrainReplies:
    messages = [
        Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=nid, message_type=MessageType.TRAIN)
        for nid in sampled
    ]
    replies = exchange(grid, messages, settings.round_timeout)
    out = TrainReplies()
    for nid, reply in replies.items():
        if not reply.has_error():
            known_names[nid] = _reply_node_name(reply, nid)
            ledger.merge_alias(f"node-id-{nid}", known_names[nid])
    for nid in sorted(set(sampled) - set(replies)):
        name = known_names.get(nid, f"node-id-{nid}")
        ledger.record_failure(name, report.round, f"no reply within {settings.round_timeout:.0f} s")
        report.failed.append(name)
    val_acc, val_n = 0.0, 0.0
    for nid, reply in sorted(replies.items()):
        name = known_names.get(nid, f"node-id-{nid}")
        out.names[nid] = name
        if reply.has_error():
            ledger.record_failure(name, report.round, f"{reply.error.code}: {reply.error.reason}")
            report.failed.append(name)
            continue
        metrics = dict(reply.content["metrics"])
        if metrics.get("failed"):  # the node caught its own error and said so
            ledger.record_failure(name, report.round, str(reply.content["node"]["error"]))
            report.failed.append(name)
            continue
        if metrics.get("refused"):  # the site's policy refuses this run: nothing trained, nothing charged
            reason = str(reply.content["node"].get("reason", "refused by the site's policy"))
            ledger.record_refusal(name, report.round, reason)
            report.refused[name] = reason
            log.warning("round %d: %s refused: %s", report.round, name, reason)
            continue
        declined = bool(metrics.get("declined", 0))
        reason = str(reply.content["node"].get("reason", "")) if declined and "node" in reply.content else ""
        unit = str(reply.content["node"].get("privacy-unit", "record")) if "node" in reply.content else None
        ledger.record_reply(name, report.round, metrics, declined, reason, unit)
        if declined:
            report.declined.append(name)
            continue
        if not settings.secagg and "arrays" not in reply.content:
            ledger.record_failure(name, report.round, "reply had no model weights")
            report.failed.append(name)
            continue
        report.trained.append(name)
        out.trained[nid] = reply.content
        if "update-norm" in metrics:
            report.update_norms[name] = float(metrics["update-norm"])
        if "val-accuracy" in metrics:
            val_acc += metrics["val-accuracy"] * metrics["num-val-examples"]
            val_n += metrics["num-val-examples"]
    out.val_accuracy = val_acc / val_n if val_n else None
    return out


def round_parameters(settings: FederationSettings, participants: int) -> SecAggParameters:
    """(k, t) for a round of `participants` sampled nodes, from Bell et al.'s bounds at the
    run's corrupt and dropout fractions, or the run's settings checked against them.

    Raises SecAggParameterError when no (k, t) (or the set one) is secure and live.
    """
    return parameters_for(participants, settings.num_shares, settings.threshold,
                          settings.corrupt_fraction, settings.dropout_fraction)


def round_threshold(settings: FederationSettings, participants: int) -> int:
    """t for a round (`round_parameters`)."""
    return round_parameters(settings, participants).threshold


def colluding_nodes(settings: FederationSettings, threshold: int) -> int:
    """How many survivors of a round with threshold t may collude with the server: t - 1 by
    default, else the setting, at most t - 1 (at least one survivor must be honest; the run's
    client-level record states the smallest value any released round used)."""
    return threshold - 1 if settings.colluding_nodes < 0 else min(settings.colluding_nodes, threshold - 1)


def secure_weight_cap(settings: FederationSettings, ledger: CoordinatorLedger) -> float:
    """W of the next secure round: the most training records any node has reported in this run
    (its public `num-examples`), so each node's weight min(1, n/W) is proportional to its n
    (FedAvg's record-weighted mean). 0 (equal weights) before any node has reported, and under
    client-level noise, whose calibration gives every node the same share of the sum."""
    if settings.client_noise_multiplier > 0:
        return 0.0
    return float(max((rec.num_examples for rec in ledger.nodes.values()), default=0))


def secagg_train_config(settings: FederationSettings, arrays: ArrayRecord, num_sampled: int,
                        weight_cap: float = 0.0) -> dict:
    """What each node needs at training time to encode its update for SecAgg+.

    The client-level noise is split over min_clients = t - colluding nodes: the fewest
    honest survivors a sum can have (see the module docstring). weight_cap: W of the
    record-count weights (`secure_weight_cap`; 0 = equal weights).
    """
    dimension = sum(int(np.prod(arrays[k].shape)) for k in summed_keys(arrays))  # floating-point arrays only
    t = round_threshold(settings, num_sampled)
    params = EncodingParams.fitted(  # the scale fits the uint32 ring for num_sampled clients (encoding.default_scale)
        clip_norm=settings.clip_norm, noise_multiplier=settings.client_noise_multiplier,
        min_clients=t - colluding_nodes(settings, t), max_clients=num_sampled, dimension=dimension,
    )
    if settings.client_noise_multiplier == 0:
        params = replace(params, weight_cap=weight_cap)
    return {"secagg": True, "dropout-rate": settings.dropout_rate, **encoding_to_config(params)}


def release_client_level(ledger: CoordinatorLedger, accountant: ClientLevelAccountant, settings: FederationSettings,
                         num_sampled: int) -> float:
    """Account one released secure aggregate at client level; returns the epsilon so far.

    q = 1 (the server chose the sample, so it cannot be amplification's secret); the guarantee
    holds against the server and the fewest colluding survivors any released round allowed
    for (`colluding_nodes`). Writes `ledger.client_level` (summary.json `client_level`).
    """
    accountant.step(settings.client_noise_multiplier, 1.0)
    colluding = colluding_nodes(settings, round_threshold(settings, num_sampled))
    if "colluding_nodes" in ledger.client_level:
        colluding = min(colluding, ledger.client_level["colluding_nodes"])
    ledger.client_level = {
        "enabled": settings.client_noise_multiplier > 0, "epsilon": accountant.epsilon(),
        "delta": settings.client_delta, "noise_multiplier": settings.client_noise_multiplier,
        "sample_rate": 1.0, "rounds": sum(h[2] for h in accountant.history), "colluding_nodes": colluding,
        "assumption": (f"against the server and up to {colluding} surviving nodes colluding with it (each node "
                       "adds std sigma*C/sqrt(t - colluding) of the noise); no amplification by sampling, since "
                       "the server picks the sample"),
    }
    return ledger.client_level["epsilon"]


def _aggregate_secure(grid, arrays, config, train, settings, ledger, report) -> ArrayRecord | None:
    """New global arrays from the SecAgg+ sum of the trained nodes, or None if the round failed."""
    participants = {nid: train.names.get(nid, f"node-id-{nid}") for nid in sorted(train.trained)}
    params = encoding_from_config(config)
    try:
        chosen = round_parameters(settings, int(params.max_clients))
        if len(participants) < chosen.threshold:
            return _secure_round_failed(report, f"{len(participants)} nodes trained, threshold is {chosen.threshold}")
        setup = RoundSetup(
            round_id=f"{settings.run_id}/round-{report.round}".encode(), participants=tuple(participants.values()),
            num_shares=chosen.num_shares, threshold=chosen.threshold, params=params, graph_seed=os.urandom(16),
        )
    except ValueError as err:  # parameters below the bounds, or two nodes reporting one name
        return _secure_round_failed(report, str(err))
    report.secure["parameters"] = {"num_shares": chosen.num_shares, "threshold": chosen.threshold,
                                   "corrupt_nodes": chosen.corrupt, "dropout_nodes": chosen.dropouts}
    dimension = sum(int(np.prod(arrays[k].shape)) for k in summed_keys(arrays))  # floating-point arrays only
    error = None
    try:
        outcome = secure_sum(grid, participants, setup, dimension, settings.round_timeout)
    except SecAggAbort as err:
        error, outcome = str(err), err.outcome  # type: ignore[attr-defined]
    for nid, why in outcome.errors.items():
        name = train.names.get(nid, f"node-id-{nid}")
        ledger.record_failure(name, report.round, f"secure aggregation, {why}")
        report.failed.append(name)
    report.secure["dropped"] = {stage: [train.names.get(n, str(n)) for n in ids] for stage, ids in outcome.dropped.items()}
    if error:
        return _secure_round_failed(report, error)
    report.secure["survivors"] = [train.names.get(n, str(n)) for n in outcome.survivors]
    # Each survivor encoded its update times min(1, n/W) with the n it reported (encoding step
    # 1b; 1 for all when W = 0 or under client-level noise): dividing by the sum of those
    # weights gives the record-weighted mean, or the equal-weight one.
    # A node reporting n < 1 (only a faulty one can: an honest node refuses to encode then) counts
    # as 1 rather than stopping the round; its input is in the sum either way, bounded by C.
    weights = {n: params.weight(max(1.0, float(train.trained[n]["metrics"].get("num-examples", 1))))
               for n in outcome.survivors}
    if params.weight_cap > 0:
        report.secure["weight_cap"] = params.weight_cap
        report.secure["weights"] = {train.names.get(n, str(n)): w for n, w in weights.items()}
    mean = outcome.total / sum(weights.values())
    return apply_secure_mean(arrays, mean)


def apply_secure_mean(arrays: ArrayRecord, mean: np.ndarray) -> ArrayRecord:
    """The global arrays moved by the securely aggregated mean update.

    mean: (d,) float64, the floating-point arrays' deltas concatenated in key order
    (`privacy.secagg.encoding.summed_keys`, decided by the global arrays' dtypes exactly as
    the nodes decide). Each floating-point array gets its slice added (and keeps its dtype);
    integer arrays (counters such as num_batches_tracked) keep the global value: the nodes
    never send them, since they depend on local data sizes and their mean means nothing.
    Raises ValueError if mean's length is not the floating-point arrays' total size.
    """
    keys = set(summed_keys(arrays))
    expected = sum(int(np.prod(arrays[k].shape)) for k in keys)
    if mean.shape != (expected,):
        raise ValueError(f"mean update has shape {mean.shape}, expected ({expected},) (the floating-point arrays)")
    out, offset = {}, 0
    for key, array in arrays.items():
        if key not in keys:
            out[key] = array
            continue
        value = array.numpy()
        out[key] = Array((value.astype(np.float64) + mean[offset: offset + value.size].reshape(value.shape)).astype(value.dtype))
        offset += value.size
    return ArrayRecord(out)


def _secure_round_failed(report: RoundReport, why: str) -> None:
    report.secure["error"] = why
    log.warning("round %d: secure aggregation failed (%s); the global model is kept", report.round, why)
    return None


def evaluate_on_nodes(grid: Grid, arrays: ArrayRecord, timeout: float) -> dict[str, float]:
    """Send the model to every node's `evaluate` handler; example-weighted validation metrics.

    Returns {"val_loss", "val_accuracy", "val_nodes"} (empty when no node answered).
    """
    messages = [Message(RecordDict({"arrays": arrays}), dst_node_id=nid, message_type=MessageType.EVALUATE)
                for nid in sorted(grid.get_node_ids())]
    total = {"loss": 0.0, "accuracy": 0.0}
    n, nodes = 0.0, 0
    for reply in exchange(grid, messages, timeout).values():
        if reply.has_error():
            continue
        metrics = reply.content["metrics"]
        weight = float(metrics.get("num-val-examples", 0.0))
        if weight and "val-accuracy" in metrics:
            total["loss"] += metrics["val-loss"] * weight
            total["accuracy"] += metrics["val-accuracy"] * weight
            n, nodes = n + weight, nodes + 1
    return {"val_loss": total["loss"] / n, "val_accuracy": total["accuracy"] / n, "val_nodes": nodes} if n else {}


def run_federation(
    grid: Grid,
    initial: ArrayRecord,
    settings: FederationSettings,
    evaluate_fn: Callable[[ArrayRecord], dict[str, float]],
    folder: RunFolder,
    ledger: CoordinatorLedger,
    on_round_end: Callable[[RoundReport, ArrayRecord, dict], None] | None = None,
    resume: dict | None = None,
) -> tuple[ArrayRecord, list[RoundReport]]:
    """Run rounds up to `settings.rounds`; returns (the released model, reports of rounds run).

    The released model is the final global arrays, or their EMA when `settings.ema_decay` > 0
    (and some round was aggregated); `evaluate_fn` sees the same model each round.
    resume: {"round", "rng", "client_history", and "server_optimizer" / "ema" where the
    checkpoint has them} from a checkpoint: continue after that round with the same sampling
    RNG, client-level accountant, server-optimiser moments and average. `on_round_end(report,
    arrays, state)` receives that same state dict for the next checkpoint, with `arrays` the
    global model the next round trains from (never the EMA).
    """
    rng = np.random.default_rng(settings.seed)
    client_accountant = ClientLevelAccountant(delta=settings.client_delta)
    optimizer = settings.optimizer()
    ema = ModelEMA(settings.ema_decay) if settings.ema_decay > 0 else None
    first_round = 1
    if resume:
        rng.bit_generator.state = resume["rng"]
        client_accountant.history = [tuple(h) for h in resume["client_history"]]
        first_round = int(resume["round"]) + 1
        if "server_optimizer" in resume:  # a checkpoint written before server optimisers has none: fedavg's
            optimizer.load_state_dict(resume["server_optimizer"])
        if ema is not None and resume.get("ema") is not None:
            ema.load_state_dict(resume["ema"])
    arrays, reports = initial, []
    known_names: dict[int, str] = {}  # node id -> the name it reported, for nodes that later go silent
    for server_round in range(first_round, settings.rounds + 1):
        started = time.monotonic()
        report = RoundReport(round=server_round)
        # min-nodes gates the start of the run; later rounds go on with whoever is still
        # connected, so one lost node (crash, network) never stalls or ends the federation.
        minimum = settings.min_nodes if server_round == first_round else 1
        node_ids = wait_for_nodes(grid, minimum, settings.node_wait_timeout)
        sampled = sample_nodes(node_ids, settings.fraction_train, settings.min_nodes, rng)
        config = {"server-round": server_round, "run-id": settings.run_id}
        unsafe = ""
        if settings.secagg:
            try:
                config.update(secagg_train_config(settings, arrays, len(sampled), secure_weight_cap(settings, ledger)))
            except SecAggParameterError as err:  # e.g. too few nodes connected for a secure threshold
                unsafe = str(err)
        config = ConfigRecord(config)
        if unsafe:  # nothing is trained (nor charged) in a round whose sum could not be secure
            train = TrainReplies()
            _secure_round_failed(report, unsafe)
        else:
            train = _train_stage(grid, arrays, config, sampled, settings, ledger, report, known_names)

        if settings.secagg and not unsafe:
            new_arrays = _aggregate_secure(grid, arrays, config, train, settings, ledger, report)
            if new_arrays is not None:
                report.client_epsilon = release_client_level(ledger, client_accountant, settings, len(sampled))
        elif train.trained:
            new_arrays = aggregate_in_clear(settings.aggregation, list(train.trained.values()),
                                            trim_fraction=settings.trim_fraction,
                                            byzantine_fraction=settings.corrupt_fraction)
        else:
            new_arrays = None
        if new_arrays is not None:
            arrays, report.aggregated = optimizer.step(arrays, new_arrays), True
            if ema is not None:
                ema.update(arrays)
        released = _released(arrays, ema)
        report.val_accuracy = train.val_accuracy
        report.test = evaluate_fn(released)
        # With the EMA on, the global model the nodes train from is evaluated too, for comparison.
        test_global = evaluate_fn(arrays) if released is not arrays else None
        report.seconds = time.monotonic() - started
        reports.append(report)
        folder.append_metrics({
            "round": server_round,
            "seconds": report.seconds,
            "test": report.test,
            "evaluated_model": "global" if released is arrays else "ema",  # what "test" (and the release) is
            **({"test_global": test_global} if test_global is not None else {}),
            "val_accuracy_before_round": report.val_accuracy,
            "trained": report.trained,
            "declined": report.declined,
            "refused": report.refused,
            "failed": report.failed,
            "aggregated": report.aggregated,
            "epsilon": {n: r.epsilon for n, r in ledger.nodes.items()},
            # Each node's DP-SGD plan as it reported it (its own calibration to its budget; issue 14's planner).
            "dp_plan": {n: {"sample_rate": r.sample_rate, "noise_multiplier": r.noise_multiplier}
                        for n, r in ledger.nodes.items() if n in report.trained and r.noise_multiplier is not None},
            **({"secure_aggregation": report.secure, "client_epsilon": report.client_epsilon,
                "update_norms": report.update_norms} if settings.secagg else {}),
        })
        log.info(
            "round %d/%d: test accuracy %.4f, trained %d, declined %d, refused %d, failed %d (%.1f s)",
            server_round, settings.rounds, report.test.get("accuracy", float("nan")),
            len(report.trained), len(report.declined), len(report.refused), len(report.failed), report.seconds,
        )
        if on_round_end:
            on_round_end(report, arrays, {"round": server_round, "rng": rng.bit_generator.state,
                                          "client_history": [list(h) for h in client_accountant.history],
                                          "server_optimizer": optimizer.state_dict(),
                                          "ema": None if ema is None else ema.state_dict()})
    return _released(arrays, ema), reports


def _released(arrays: ArrayRecord, ema: ModelEMA | None) -> ArrayRecord:
    """The model evaluated and released: the EMA when on and something was averaged, else the global arrays."""
    average = ema.arrays if ema is not None else None
    return arrays if average is None else average
