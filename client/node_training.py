"""One node's round of federated DP training, independent of Flower's message types.

Order of a round (DESIGN 4.1):
1. compute the noise multiplier for the whole run once: Opacus's RDP search for the run's
   `epsilon` over `rounds * local_steps` steps at this node's sampling rate (constant per
   node, so the ledger's history stays one entry per run);
2. ask the ledger what epsilon training *would* reach on the records it trains (each
   record's own history, whatever run, seed or subset spent it); if that exceeds the
   owner's `max-epsilon`, decline (a reply, not an error) and train nothing;
3. otherwise charge the ledger first (write-ahead), then train exactly the steps charged,
   with noise and Poisson sampling drawn from secret OS entropy (`privacy.secret_randomness`),
   then check that the steps Opacus's accountant saw are the steps charged.

The validation share is the node's, not the run's: a record's side follows from a hash of
its own content id (`split_validation`), so no run-config value, and no other record, moves
it between training and validation.

Privacy unit (issue 19): the node's owner picks it (`privacy-unit`; `privacy_unit`). With a
group unit ("patient", "user") and group keys on the records, the node trains with
user-level DP-SGD (`privacy.user_level`): the sampling rate, the noise, the ledger's charge
and every epsilon it reports are about a whole group; the validation share then holds whole
groups. Without group keys, a node whose owner asked for a group unit refuses to train.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from client.config import NodeIdentity, privacy_unit
from privacy.accountants import PrivacyLedger, calibrate_noise_multiplier
from privacy.accountants.ledger import group_unit_id
from privacy.audit.canaries import node_canaries
from privacy.dp_sgd import LocalTrainingSession, evaluate, poisson_sample_rate, steps_per_epoch
from privacy.label_counts import (LABEL_COUNTS, calibrate_with_label_counts, noisy_label_counts,
                                  release_noise_multiplier)
from privacy.secret_randomness import SecretRandom
from privacy.user_level import group_index
from shared_models import build_model
from shared_models.datasets import load_local
from shared_models.datasets.named import load_dataset
from shared_models.datasets.partitioning import partition_indices
from shared_models.records import LabeledArrays, concat
from shared_models.run_config import TrainingPlan

log = logging.getLogger("fedpriv.client")


@dataclass(frozen=True)
class NodeData:
    """A node's data: the training share (used by DP-SGD) and its validation share."""

    train: LabeledArrays
    val: LabeledArrays

    @property
    def record_ids(self) -> list[str]:
        """Content ids of every record the node holds (training and validation)."""
        return self.train.record_ids + self.val.record_ids

    @functools.cached_property
    def train_digest(self) -> str:
        """SHA-256 of the training share's record ids: which data a training session was built on."""
        return hashlib.sha256("\n".join(self.train.record_ids).encode()).hexdigest()


@dataclass
class RoundOutcome:
    """What a node sends back after a training request."""

    node: str
    declined: bool
    reason: str
    state: dict[str, torch.Tensor] | None
    metrics: dict[str, float] = field(default_factory=dict)
    unit: str = "record"  # the privacy unit the metrics' epsilon is about (`privacy_unit`)


@dataclass(frozen=True)
class TrainingUnits:
    """What a node's DP-SGD samples and its ledger charges: records, or groups (user-level).

    unit: "record" or the group unit's name; trained: ledger ids of the training units
    (record ids, or `group_unit_id`s); held: ledger ids of every unit the node holds
    (training and validation), over which its epsilon is reported; groups: group id -> its
    training record ids (None at record level); group_of: (N,) int64 group index of each
    training record, the order of `trained` (None at record level).
    """

    unit: str
    trained: list[str]
    held: list[str]
    groups: dict[str, list[str]] | None = None
    group_of: np.ndarray | None = None


def training_units(unit: str, data: NodeData) -> TrainingUnits:
    """The node's `TrainingUnits` for a resolved privacy unit (`client.config.privacy_unit`)."""
    if unit == "record":
        return TrainingUnits(unit, data.train.record_ids, data.record_ids)
    keys, group_of = group_index(data.train.groups)
    ids = [group_unit_id(k) for k in keys]
    groups: dict[str, list[str]] = {gid: [] for gid in ids}
    for rid, g in zip(data.train.record_ids, group_of):
        groups[ids[g]].append(rid)
    val = [] if data.val.groups is None else sorted({group_unit_id(k) for k in data.val.groups} - set(ids))
    return TrainingUnits(unit, ids, ids + val, groups, group_of)


def split_validation(data: LabeledArrays, fraction: float,
                     by_group: bool = False) -> tuple[LabeledArrays, LabeledArrays]:
    """(train, validation) shares of a node's records, fixed by each record's own content.

    A record is in the validation share iff SHA-256("fedpriv-validation", record id), read
    as a number in [0, 1), is below `fraction`: its side depends on nothing else, so no run,
    seed or file order moves it, and adding or removing *another* record never does (two
    neighbouring datasets differ in one training record, not two). The share holds about
    fraction * N records (Binomial). by_group: hash the record's group key instead (the
    `group_unit_id`), so a group is wholly on one side (user-level DP: its unit is the
    group). Raises ValueError when no training record would be left.
    """
    keys = [group_unit_id(g) for g in data.groups] if by_group and data.groups is not None else data.record_ids
    in_val = np.array([_unit_hash(key) < fraction for key in keys], dtype=bool)
    if in_val.all():
        raise ValueError(f"node has {len(data)} records: too few to keep a validation share of {fraction}")
    return data.subset(np.flatnonzero(~in_val)), data.subset(np.flatnonzero(in_val))


def _unit_hash(record_id: str) -> float:
    digest = hashlib.sha256(b"fedpriv-validation\0" + record_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def load_node_data(node: NodeIdentity, plan: TrainingPlan) -> NodeData:
    """The node's data: its local `data-path`, or in simulation its partition of the run's dataset.

    The validation share is `node.val_fraction` (the owner's), never the run's; it holds
    whole groups when the node's unit is a group (`privacy_unit`). In simulation, a group
    unit also keeps each group on one node (partitioned as units).
    """
    by_group = node.privacy_unit != "record"
    if node.data_path is not None:
        return _load_local_node_data(node.data_path, plan.task, node.val_fraction, plan.canaries, node.data_options,
                                     by_group)
    return _load_simulated_node_data(node.partition_id, node.num_partitions, plan.task, plan.dataset, plan.partition,
                                     plan.alpha, plan.seed, node.val_fraction, plan.data_dir, plan.canaries,
                                     plan.data_options(), by_group, plan.synthetic_patients)


@functools.lru_cache(maxsize=4)
def _simulation_partitions(dataset, task, data_dir, num_partitions, partition, alpha, seed,
                           options=None, whole_groups=False, synthetic_patients=False) -> list[np.ndarray]:
    """Every simulated node's row indices in the run's training set.

    Computed once per process and shared by all the nodes it hosts: partitioning is over
    the whole dataset, so doing it per node made 1,000 nodes cost 1,000 partitionings.
    whole_groups: partition groups, not records (a group unit: a patient is at one node).
    """
    train = load_dataset(dataset, task, data_dir, options, synthetic_patients)["train"]
    return partition_indices(train.y, num_partitions, partition, alpha=alpha, groups=train.groups, seed=seed,
                             whole_groups=whole_groups and train.groups is not None)


@functools.lru_cache(maxsize=4)
def _load_local_node_data(data_path, task, val_fraction, canaries, options=None, by_group=False) -> NodeData:
    if canaries:
        raise ValueError("canaries (run-config 'canaries') are a simulation-only audit aid; a deployed node "
                         "never trains on them")
    return NodeData(*split_validation(load_local(data_path, task, options), val_fraction, by_group))


@functools.lru_cache(maxsize=64)
def _load_simulated_node_data(partition_id, num_partitions, task, dataset, partition, alpha, seed, val_fraction,
                              data_dir, canaries, options=None, by_group=False, synthetic_patients=False) -> NodeData:
    train = load_dataset(dataset, task, data_dir, options, synthetic_patients)["train"]
    # Patients stay whole on one node under a group unit, and always with synthetic patients
    # (so record- and patient-level runs of them compare on the same node shares).
    parts = _simulation_partitions(dataset, task, data_dir, num_partitions, partition, alpha, seed, options,
                                   by_group or synthetic_patients, synthetic_patients)
    local_train, val = split_validation(train.subset(parts[partition_id]), val_fraction, by_group)
    if canaries:
        # Audit canaries (privacy.audit.canaries) join the training share only, never validation.
        inserted = node_canaries(train, canaries, seed, partition_id, num_partitions)
        if local_train.groups is not None:  # under a group unit each canary is a patient of its own
            inserted.groups = np.asarray(inserted.record_ids)
        local_train = concat([local_train, inserted])
    return NodeData(train=local_train, val=val)


def device() -> torch.device:
    """The local GPU if there is one (CUDA), else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# Sessions survive across rounds in this process: make_private once per (node, data, plan).
_SESSIONS: OrderedDict[tuple, LocalTrainingSession] = OrderedDict()
_MAX_SESSIONS = 16


def _session(key: tuple, factory) -> LocalTrainingSession:
    if key in _SESSIONS:
        _SESSIONS.move_to_end(key)
        return _SESSIONS[key]
    session = factory()
    _SESSIONS[key] = session
    if len(_SESSIONS) > _MAX_SESSIONS:
        _SESSIONS.popitem(last=False)
    return session


def plan_noise(plan: TrainingPlan, num_train: int, delta: float, unit: str = "record") -> tuple[float, float, int]:
    """(noise_multiplier, sample_rate, local_steps per round) for this node and plan.

    num_train: the node's training units (records, or groups under user-level DP: `unit`). The
    noise is chosen so that all `plan.rounds` rounds together, with the node's label-count
    release when the plan asks one and the unit is "record" (`label_count_share`), spend
    `plan.epsilon` at `delta` (the node's own delta, at which its ledger reports).
    """
    q = poisson_sample_rate(num_train, plan.batch_size)
    local_steps = plan.local_epochs * steps_per_epoch(num_train, plan.batch_size)
    share = label_count_share(plan, unit)
    if share > 0:
        sigma = calibrate_with_label_counts(plan.epsilon, delta, q, plan.rounds * local_steps, share)
    else:
        sigma = calibrate_noise_multiplier(plan.epsilon, delta, q, plan.rounds * local_steps)
    return sigma, q, local_steps


def label_count_share(plan: TrainingPlan, unit: str) -> float:
    """The plan's label-count share where this node releases its counts (DP, record-level), else 0."""
    return plan.label_count_share if plan.dp and unit == "record" else 0.0


def release_label_counts(node: NodeIdentity, plan: TrainingPlan, data: NodeData, sigma: float, run_steps: int,
                         run_id: str, server_round: int, ledger: PrivacyLedger) -> dict[str, object]:
    """The node's one label-count release of run `run_id` (`privacy.label_counts`), as reply metrics.

    sigma, run_steps: DP-SGD's noise multiplier and steps of the whole run, as `plan_noise`
    calibrated them (the release's noise follows from both). Released in the first round the node
    trains in the run, after its charge to every training record (write-ahead, like DP-SGD's); {}
    in later rounds (the ledger's events say it was released) and when the charge is declined.
    Returns {"label-counts": (K,) noisy counts, "label-count-noise": their std}.
    """
    if any(e.run == run_id and e.mechanism == LABEL_COUNTS and not e.declined for e in ledger.events(node.name)):
        return {}
    s = release_noise_multiplier(sigma, run_steps, plan.label_count_share)
    entry = ledger.charge(data.train.record_ids, node=node.name, delta=node.delta, noise_multiplier=s,
                          sample_rate=1.0, steps=1, max_epsilon=node.max_epsilon, run=run_id, round=server_round,
                          mechanism=LABEL_COUNTS)
    if entry.declined:
        log.info("%s releases no label counts: %s", node.name, entry.reason)
        return {}
    counts = noisy_label_counts(data.train.y, data.train.num_classes, s,
                                node_randomness(node, plan, server_round, LABEL_COUNTS))
    return {"label-counts": [float(c) for c in counts], "label-count-noise": s}


def node_randomness(node: NodeIdentity, plan: TrainingPlan, server_round: int, purpose: str) -> SecretRandom:
    """The generator of one round's secret draws for `purpose` ("dp-sgd", "secagg-encoding").

    Always fresh OS entropy, except in a simulation whose run-config sets
    `reproducible-noise` (a researcher's switch for comparing runs), where it is derived
    from the run's seed, the node and the round. Raises ValueError if a deployed node is
    asked for reproducible noise (its policy refuses such runs before they get here).
    """
    if not plan.reproducible_noise:
        return SecretRandom()
    if node.data_path is not None:
        raise ValueError("reproducible noise is a simulation switch; a deployed node never derives noise from the run")
    return SecretRandom.reproducible(str(plan.seed), node.name, str(server_round), purpose)


def train_round(
    node: NodeIdentity,
    plan: TrainingPlan,
    data: NodeData,
    global_state: dict[str, torch.Tensor],
    server_round: int,
    run_id: str,
    label_counts_allowed: bool = True,
) -> RoundOutcome:
    """Train one round on the node's data starting from `global_state`.

    Returns a RoundOutcome whose `state` is the new local weights, or `declined=True` with
    the reason when a training unit would pass the node's budget. Metrics released:
    `num-examples`, `round-steps`; under DP the ledger's view (`epsilon`, the largest over
    all the node's units at `delta`, `max-epsilon`, `noise-multiplier`, `sample-rate`,
    `steps-total`: the ledger's, each label-count release counted as one step; under user-level DP
    also `num-groups`; `label-counts` and `label-count-noise` in the round a node releases them); `unit` names what the epsilon is
    about (`privacy_unit`); validation metrics of the incoming model only when the owner
    keeps a validation share. label_counts_allowed: False where the reply must carry no per-node
    statistic (client-level noise on: the counts would be one node's release outside it). Raises ValueError when delta is not below 1/n for the node's n
    training units (DESIGN 4.1) or the node's unit needs group keys its data lacks,
    RuntimeError when the steps run differ from the steps charged.
    """
    n = len(data.train)
    unit = privacy_unit(node.privacy_unit, data.train) if plan.dp else "record"
    metrics: dict[str, float] = {"num-examples": float(n)}
    dev = device()
    units = training_units(unit, data)
    if plan.dp:
        n_units = len(units.trained)
        if units.groups is not None:
            metrics["num-groups"] = float(n_units)
        if node.delta >= 1.0 / n_units:
            raise ValueError(f"delta={node.delta} must be < 1/n = {1.0 / n_units:.3g} for this node's {n_units} "
                             f"training {'records' if unit == 'record' else 'groups'}")
        sigma, q, local_steps = plan_noise(plan, n_units, node.delta, unit)
        ledger = PrivacyLedger(node.state_dir)
        ledger.adopt_legacy(node.name, data.record_ids, node.delta)
        entry = ledger.charge(
            data.train.record_ids, node=node.name, delta=node.delta, noise_multiplier=sigma, sample_rate=q,
            steps=local_steps, max_epsilon=node.max_epsilon, run=run_id, round=server_round, groups=units.groups,
            unit=unit,
        )
        if not entry.declined and label_count_share(plan, unit) > 0 and label_counts_allowed:
            metrics.update(release_label_counts(node, plan, data, sigma, plan.rounds * local_steps, run_id,
                                                server_round, ledger))
        held = units.held
        if entry.unit != unit:  # declined: records spent outside their patients; only their own epsilon is proven
            unit, held = entry.unit, data.record_ids
        epsilon, history = ledger.worst(held, node.delta)
        metrics.update({
            "epsilon": epsilon, "delta": node.delta, "max-epsilon": node.max_epsilon,
            "noise-multiplier": sigma, "sample-rate": q, "steps-total": float(sum(h[2] for h in history)),
        })
        if entry.declined:
            log.info("%s declines round %s: %s", node.name, server_round, entry.reason)
            return RoundOutcome(node=node.name, declined=True, reason=entry.reason, state=None, metrics=metrics,
                                unit=unit)
    else:
        sigma = None

    key = (node.name, data.train_digest, plan, sigma, unit)
    session = _session(key, lambda: LocalTrainingSession(
        build_model(plan.task, plan.model or None, data.train.input_shape, data.train.num_classes, plan.activation),
        data.train, batch_size=plan.batch_size, lr=plan.lr, optimizer=plan.optimizer, momentum=plan.momentum,
        noise_multiplier=sigma, max_grad_norm=plan.max_grad_norm, device=dev, proximal_mu=plan.proximal_mu,
        groups=units.group_of, max_records_per_group=plan.max_records_per_group, clipping=plan.clipping,
    ))
    session.load_global(global_state)
    if len(data.val):
        val = evaluate(session.module, data.val, dev)  # the incoming global model on local validation
        metrics.update({"val-loss": val["loss"], "val-accuracy": val["accuracy"], "num-val-examples": float(len(data.val))})
    before = session.opacus_steps()
    result = session.train_epochs(plan.local_epochs, node_randomness(node, plan, server_round, "dp-sgd"))
    if plan.dp and session.opacus_steps() - before != local_steps:
        raise RuntimeError(
            f"ledger charged {local_steps} steps but Opacus ran {session.opacus_steps() - before}; refusing to send"
        )
    # The training loss is computed on the training records without noise: it stays here.
    log.info("%s round %s: %d steps, train loss %.4f", node.name, server_round, result.steps, result.train_loss)
    metrics["round-steps"] = float(result.steps)
    for name, tensor in result.state.items():
        if not torch.isfinite(tensor).all():
            raise ValueError(f"local update has NaN/Inf in '{name}'; refusing to send it")
    return RoundOutcome(node=node.name, declined=False, reason="", state=result.state, metrics=metrics, unit=unit)
