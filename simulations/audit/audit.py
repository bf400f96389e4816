"""Empirical privacy audit of a finished run: membership inference on the final model.

`audit_run(run_dir)` rebuilds the run's data exactly (config.json: dataset, partition,
alpha, seed, num-supernodes, val-fraction, data-dir, through the same
`client.node_training.load_node_data` the nodes used), loads `final_model.pt`, and attacks it:

- members: training records of the nodes (each node's training share);
- non-members: records of the *same distribution* that no node trained on: the nodes'
  validation shares (drawn at random from the same partitions, never trained on) and the
  dataset's held-out splits, except a split known to come from elsewhere
  (`SHIFTED_SPLITS`: PneumoniaMNIST's test split is Kermany et al.'s separate test set, with
  other class priors, on which every model does worse; members vs. such records measure the
  shift, not memorisation);
- the two are balanced: as many members as non-members, drawn at random (seeded), with the
  same number of each label on both sides (`balanced_targets`).

Attacks (`privacy.audit.membership`): the loss threshold (Yeom et al. 2018) and LiRA
offline (Carlini et al. 2022) with K shadow models (`privacy.audit.shadows`). By default
each shadow model is the result of a simulated federation run like the audited one (the
run's nodes, partition scheme, rounds, local epochs and DP-SGD settings, same training
code), on a random subset of a shadow pool that holds none of the targets: the members
not drawn as targets and the held-out records not drawn as non-members.

Canaries (`privacy.audit.canaries`, when the run was made with `--canaries N`): inserted vs.
not-inserted canaries are scored apart, with the same attacks and the same shadow models.

Unit of the game (`unit`, default the run's privacy unit, summary.json `privacy_unit`):
"record" as above, or "group" when the run protected groups (patients, users, speakers:
user-level DP-SGD, issue 19). Then the targets are whole groups (`LabeledArrays.groups`):
member groups are those in the nodes' training shares, non-member groups those of the
held-out records (validation shares, held-out splits not in `SHIFTED_SPLITS`) that no
node trained on: a group with records on both sides is never a non-member
(`member_and_nonmember_groups`). Member and non-member groups are balanced by count and
by majority label (seeded, `balanced_groups`), each group is scored by the mean of its
records' scores (`group_scores`, Kandpal et al. 2023), and the ROC is over groups. The
shadow pool holds no record of a target group; for a run whose nodes trained on groups,
the shadows do too (user-level DP-SGD, `shadows`).

Bound (`privacy.audit.bounds`): the run's (epsilon, delta) = the largest per-node
epsilon of the run's privacy unit (summary.json `max_client_epsilon`) at the run's delta.
Nodes hold disjoint records (and, in a group-level run, disjoint groups), so each target is
protected by its own node's epsilon (parallel composition); the largest one bounds every
target. Without DP the bound is vacuous. A record-level epsilon does not bound a group's
membership (that needs group privacy), so a group audit of a record-level DP run is
refused. A record audit of a group-level run compares with the group-level epsilon: it
bounds a record whose whole group is in or out of training, so there held-out records of a
trained group are left out of the non-members.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from client.config import NodeIdentity
from client.node_training import load_node_data
from privacy.audit.bounds import advantage_bound, auc_bound, epsilon_lower_bound, tpr_bound
from privacy.audit.canaries import inserted_mask, is_canary, make_canaries
from privacy.audit.membership import (
    DEFAULT_FPRS,
    attack_metrics,
    group_attack_metrics,
    lira_offline_scores,
    loss_threshold_scores,
    per_example_outputs,
)
from shared_models import build_model
from shared_models.datasets import load_npz
from shared_models.datasets.named import _RELATIVE_PATHS, data_dir, load_dataset
from shared_models.datasets.synthetic_patients import assign_synthetic_patients
from shared_models.records import LabeledArrays, concat
from shared_models.run_config import ConfigError, TrainingPlan

from .shadows import shadow_subset_size, train_shadow_federations, train_shadow_models_central

log = logging.getLogger("fedpriv.audit")


class AuditError(ValueError):
    """A run folder lacks what the audit needs (the message names the file and field)."""


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise AuditError(f"{path} not found: is {path.parent} a finished fedpriv run folder?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AuditError(f"{path}: not valid JSON ({err})") from err


def node_records(config: dict, plan) -> tuple[list[LabeledArrays], list[LabeledArrays]]:
    """Each simulated node's (training shares, validation shares), rebuilt as the nodes did."""
    clients = int(config.get("num-supernodes", 0))
    if clients < 1:
        raise AuditError("config.json: 'num-supernodes' must be >= 1 (only simulated runs can be audited)")
    trains, vals = [], []
    for pid in range(clients):
        # The run-config's privacy-unit decides how a node splits validation (whole groups) and
        # how the simulation partitions (whole groups), as `fedpriv simulate` made the nodes.
        node = NodeIdentity(name=f"node-{pid}", state_dir=Path("."), max_epsilon=1.0, delta=plan.delta,
                            data_path=None, partition_id=pid, num_partitions=clients, val_fraction=plan.val_fraction,
                            privacy_unit=str(config.get("privacy-unit", "record")))
        data = load_node_data(node, plan)
        trains.append(data.train)
        vals.append(data.val)
    return trains, vals


# Held-out splits that do not share the training split's distribution (see module docstring).
SHIFTED_SPLITS = {("pneumoniamnist", "test")}


def held_out_records(plan, node_validation: list[LabeledArrays] = ()) -> LabeledArrays:
    """Records of the run's distribution that no node trained on.

    The nodes' validation shares, plus the dataset's held-out splits (test; PneumoniaMNIST's
    official val split) less those in `SHIFTED_SPLITS`. Raises AuditError when none remain.
    """
    return concat(held_out_parts(plan, node_validation))


def held_out_parts(plan, node_validation: list[LabeledArrays] = ()) -> list[LabeledArrays]:
    """`held_out_records` before stacking: one LabeledArrays per source, each with its own
    group keys or None. With run-config `synthetic-patients` the held-out splits get their own
    pseudo-patients, as the run's loader gives them ("synthetic-test-...", "synthetic-val-...":
    never a training patient's key). Raises AuditError when none remain.
    """
    parts = [v for v in node_validation if len(v)]
    if (plan.dataset, "test") not in SHIFTED_SPLITS:
        parts.append(load_dataset(plan.dataset, plan.task, plan.data_dir, plan.data_options(),
                                  plan.synthetic_patients)["test"])
    if plan.dataset == "pneumoniamnist":
        root = Path(plan.data_dir) if plan.data_dir else data_dir()
        splits = load_npz(root / _RELATIVE_PATHS["pneumoniamnist"], classes=parts[0].classes if parts else None)
        if "val" in splits:
            val = splits["val"]
            parts.append(assign_synthetic_patients(val, "val") if plan.synthetic_patients else val)
    if not parts:
        raise AuditError(f"{plan.dataset}: no held-out records of the training distribution (val-fraction 0?)")
    return parts


def stack(parts: list[LabeledArrays]) -> LabeledArrays:
    """`concat` that keeps the group keys (as str) when every part has them, else None."""
    out = concat(parts)
    if all(p.groups is not None for p in parts):
        out.groups = np.concatenate([np.asarray(p.groups).astype(str) for p in parts])
    return out


def _keys(groups: np.ndarray) -> np.ndarray:
    return np.asarray(groups).astype(str)


def without_groups(data: LabeledArrays, keys: np.ndarray) -> LabeledArrays:
    """The records of `data` whose group key is not in `keys` (all of them when data has no groups)."""
    if data.groups is None:
        return data
    return data.subset(np.flatnonzero(~np.isin(_keys(data.groups), _keys(keys))))


def member_and_nonmember_groups(trained_groups: np.ndarray, held_out_groups: np.ndarray
                                ) -> tuple[np.ndarray, np.ndarray]:
    """(member keys, non-member keys) of a group-level game, each sorted, unique, str.

    trained_groups: (N,) group key of every record a node trained on; held_out_groups: (M,)
    those of records no node trained on. A member group is one with a trained record; a
    non-member group has held-out records only. A group with records on both sides (a
    record-level validation split, a test split of the same speakers) is a member, never a
    non-member: its records did shape the model. The two results share no key.
    """
    members = np.unique(_keys(trained_groups))
    return members, np.setdiff1d(np.unique(_keys(held_out_groups)), members)


def group_labels(keys: np.ndarray, groups: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(G,) the most frequent label of each group in `keys` (ties: the lowest), over records
    with (N,) `groups` keys and (N,) labels `y`. A synthetic patient has one label; a speaker
    who says every digit equally often gets label 0, so speakers are balanced by count alone."""
    names, of = np.unique(_keys(groups), return_inverse=True)
    counts = np.zeros((len(names), int(np.max(y, initial=0)) + 1), dtype=np.int64)
    np.add.at(counts, (of, np.asarray(y, dtype=np.int64)), 1)
    where = np.searchsorted(names, _keys(keys))
    if np.any(where >= len(names)) or np.any(names[np.minimum(where, len(names) - 1)] != _keys(keys)):
        raise ValueError("a key has no record in `groups`")
    return counts.argmax(axis=1)[where]


def balanced_groups(member_keys: np.ndarray, nonmember_keys: np.ndarray, seed: int,
                    max_targets: int | None = None, member_labels: np.ndarray | None = None,
                    nonmember_labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """As many member groups as non-member groups, drawn at random (seeded), capped at max_targets each.

    With labels ((G,) per key, `group_labels`) also as many of each label on both sides, as
    `balanced_targets` does for records (a class-prior shift would pass for memorisation);
    without, by count only. Returns two sorted str arrays of keys of equal length. Raises
    AuditError when either side has no group, or no label occurs on both sides.
    """
    if not len(member_keys) or not len(nonmember_keys):
        raise AuditError(f"a group-level audit needs member and non-member groups, got {len(member_keys)} "
                         f"and {len(nonmember_keys)} (non-members are the validation groups no node trained on: "
                         "is the run's val-fraction 0, or is it a record-level run whose validation split "
                         "cuts through every group?)")
    mem, non = balanced_targets(np.zeros(len(member_keys), int) if member_labels is None else member_labels,
                                np.zeros(len(nonmember_keys), int) if nonmember_labels is None else nonmember_labels,
                                seed, max_targets)
    return np.sort(_keys(member_keys)[mem]), np.sort(_keys(nonmember_keys)[non])


def balanced_targets(member_y: np.ndarray, nonmember_y: np.ndarray, seed: int,
                     max_targets: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices of as many members as non-members, with the same count of each label on both sides.

    Why per label: a held-out split can have other class priors than the training data
    (PneumoniaMNIST: 74% pneumonia in train, 62.5% in test), and then even a constant model
    has a lower loss on members, an "attack" that measures label shift, not memorisation.
    max_targets caps each side (per-label counts scaled down proportionally). Returns two
    sorted int arrays of equal length. Raises AuditError when no label occurs on both sides.
    """
    rng = np.random.default_rng(seed)
    labels = np.intersect1d(np.unique(member_y), np.unique(nonmember_y))
    counts = {c: min(int((member_y == c).sum()), int((nonmember_y == c).sum())) for c in labels}
    total = sum(counts.values())
    if total == 0:
        raise AuditError("members and held-out records share no label: nothing to compare")
    if max_targets and max_targets < total:
        # Scale down per label, handing the rounding remainder to the largest fractions.
        exact = {c: k * max_targets / total for c, k in counts.items()}
        counts = {c: int(v) for c, v in exact.items()}
        for c in sorted(exact, key=lambda c: exact[c] - counts[c], reverse=True)[: max_targets - sum(counts.values())]:
            counts[c] += 1
    mem, non = [], []
    for c, k in counts.items():
        mem.append(rng.permutation(np.flatnonzero(member_y == c))[:k])
        non.append(rng.permutation(np.flatnonzero(nonmember_y == c))[:k])
    return np.sort(np.concatenate(mem)), np.sort(np.concatenate(non))


UNITS = ("record", "group")


def run_privacy_unit(summary: dict) -> str:
    """The unit the run's epsilon is about: summary.json `privacy_unit` ("record" when absent,
    as in runs made before issue 19; else a group unit such as "patient", "user", or "mixed")."""
    return str(summary.get("privacy_unit") or "record")


def audit_unit(summary: dict, requested: str | None = None) -> str:
    """The audit's unit: `requested` ("record" or "group"), or by default the run's: "group"
    when summary.json `privacy_unit` is not "record". Raises ValueError on another value."""
    if requested is None:
        return "record" if run_privacy_unit(summary) == "record" else "group"
    if requested not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {requested!r}")
    return requested


def run_bound(summary: dict, config: dict, fprs: tuple[float, ...] = DEFAULT_FPRS, unit: str = "record") -> dict:
    """The (epsilon, delta) bound for a run's `unit` ("record" or "group"), from summary.json.

    `vacuous` without DP (any unit). `unit` in the result is what the epsilon protects (the
    run's `privacy_unit`: "record", "patient", ...). Raises AuditError for a group bound of a
    record-level DP run (its epsilon bounds one record; a group of k records gets about
    k * epsilon by group privacy, not applied here) or of a "mixed" run (its record-level
    nodes' groups have no group-level epsilon), and when summary.json lacks the epsilon.
    """
    privacy_unit = run_privacy_unit(summary)
    if not summary.get("dp", config.get("dp", True)):
        return {"epsilon": None, "delta": None, "vacuous": True, "unit": privacy_unit,
                "note": "the run trained without DP (--no-dp): no bound applies",
                "tpr_at_fpr": {str(f): 1.0 for f in fprs}, "advantage": 1.0, "auc": 1.0}
    if unit == "group" and privacy_unit == "record":
        said = "is 'record'" if "privacy_unit" in summary else "is absent (a record-level run)"
        raise AuditError(f"summary.json: privacy_unit {said}: the run's epsilon bounds the membership of one "
                         "record, not of a group of records (that needs group privacy: about k * epsilon for a "
                         "group of k records); audit it with --unit record, or make a group-level run "
                         "(--privacy-unit patient/user)")
    if unit == "group" and privacy_unit == "mixed":
        raise AuditError("summary.json: privacy_unit is 'mixed': some nodes protected records, not groups, so "
                         "max_client_epsilon does not bound a group's membership; audit it with --unit record")
    eps = summary.get("max_client_epsilon")
    delta = summary.get("delta", config.get("delta"))
    if eps is None or delta is None:
        raise AuditError("summary.json: 'max_client_epsilon' and 'delta' are needed for the bound of a DP run")
    eps, delta = float(eps), float(delta)
    level = "sample" if privacy_unit == "record" else privacy_unit
    note = f"largest per-node {level}-level epsilon of the run (summary.json max_client_epsilon)"
    if unit == "record" and privacy_unit != "record":
        note += (f"; it bounds a record whose whole {privacy_unit} is in or out of training (non-member records "
                 f"of a trained {privacy_unit} are left out)")
    return {"epsilon": eps, "delta": delta, "vacuous": False, "unit": privacy_unit, "note": note,
            "tpr_at_fpr": {str(f): tpr_bound(f, eps, delta) for f in fprs},
            "advantage": advantage_bound(eps, delta), "auc": auc_bound(eps, delta)}


def compare_with_bound(metrics: dict, bound: dict) -> dict:
    """Does an attack beat the (epsilon, delta) bound? Two answers per ROC point:

    `above_bound`: the empirical point (FPR, TPR) lies above the bound, informational only:
    with a few hundred records an FPR of 0 is often measured where the true FPR is not 0.
    `bound_violated`: it does so beyond sampling error: the lower end of the TPR interval
    lies above the bound at the upper end of the FPR interval (Clopper-Pearson, jointly
    at `metrics["confidence"]` over the points checked). That is the flag that means a bug.
    `epsilon_lower_bound`: the largest epsilon those intervals prove (`bounds.epsilon_lower_bound`),
    at the same joint confidence; a violation is the same event as it exceeding the run's epsilon.
    """
    # The epsilon the attack proves (at the run's delta; 1e-5 when the run had none).
    delta_lb = bound["delta"] if bound["delta"] is not None else 1e-5
    eps_lb = max(epsilon_lower_bound(p["tpr_ci"][0], p["fpr_ci"][1], delta_lb)
                 for p in metrics["roc_points"].values())
    if bound["vacuous"]:
        return {"bound_violated": False, "above_bound": {}, "epsilon_lower_bound": eps_lb,
                "detail": "no bound (no DP)"}
    eps, delta = bound["epsilon"], bound["delta"]
    above, violated = {}, {}
    for key, p in metrics["roc_points"].items():
        above[key] = bool(p["tpr"] > tpr_bound(p["fpr"], eps, delta) + 1e-12)
        violated[key] = bool(p["tpr_ci"][0] > tpr_bound(p["fpr_ci"][1], eps, delta) + 1e-12)
    above["auc"] = bool(metrics["auc"] > bound["auc"] + 1e-12)
    return {"bound_violated": any(violated.values()), "above_bound": above, "violated_at": violated,
            "epsilon_lower_bound": eps_lb}


def load_final_model(run_dir: Path, plan, shape, num_classes: int) -> torch.nn.Module:
    """The run's released global model (final_model.pt state_dict), rebuilt as the server built it."""
    path = run_dir / "final_model.pt"
    if not path.exists():
        raise AuditError(f"{path} not found: the run did not finish (no released model to audit)")
    model = build_model(plan.task, plan.model or None, shape, num_classes, plan.activation)
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except (RuntimeError, OSError) as err:
        raise AuditError(f"{path}: does not fit the run's {plan.task} model '{plan.model or 'default'}' ({err})") from err
    return model.eval()


def _audit_canaries(plan, template: LabeledArrays, model, shadows: list, bound: dict) -> dict:
    """Score inserted vs. not-inserted canaries (Jagielski et al. 2020) with both attacks.

    The shadow models never saw a canary, so they give every canary's OUT distribution.
    """
    train = load_dataset(plan.dataset, plan.task, plan.data_dir, plan.data_options())["train"]  # the nodes' template
    canaries = make_canaries(train, plan.canaries, plan.seed)
    inserted = inserted_mask(plan.canaries, plan.seed)
    losses, phis = per_example_outputs(model, canaries)
    scores = {"loss_threshold": loss_threshold_scores(losses)}
    if shadows:
        scores["lira_offline"] = lira_offline_scores(phis, np.stack([per_example_outputs(m, canaries)[1]
                                                                     for m in shadows]))
    attacks = {}
    for name, s in scores.items():
        metrics = attack_metrics(s[inserted], s[~inserted])
        metrics.update(compare_with_bound(metrics, bound))
        attacks[name] = metrics
    return {"count": plan.canaries, "inserted": int(inserted.sum()), "not_inserted": int((~inserted).sum()),
            "kind": f"out-of-distribution {plan.task} inputs with random labels (privacy.audit.canaries)",
            "attacks": attacks, "bound_violated": any(a["bound_violated"] for a in attacks.values())}


def _group_noun(privacy_unit: str) -> str:
    return privacy_unit if privacy_unit not in ("record", "mixed") else "group"


def audit_run(run_dir: Path, shadow_models: int = 4, seed: int = 0, max_targets: int | None = None,
              shadow_epochs: int | None = None, progress: Callable[[str], None] | None = None,
              shadow_training: str = "federated", unit: str | None = None) -> dict:
    """Audit one run folder; returns the JSON-ready report (see module docstring).

    shadow_models: K for LiRA (0 = loss attack only). max_targets: cap on members (= on
    non-members) per side, for quick checks (records, or groups with unit "group").
    shadow_training: "federated" (default: a simulated federation per shadow, like the run)
    or "central" (one model trained on the whole subset for `shadow_epochs`, default
    rounds x local-epochs). unit: "record" or "group" (default: the run's, `audit_unit`).
    Raises AuditError naming the file/field when the folder is incomplete, when a group
    audit is asked of a record-level DP run (`run_bound`) or of records without group keys,
    ValueError on a bad option.
    """
    if shadow_training not in ("federated", "central"):
        raise ValueError(f"shadow_training must be 'federated' or 'central', got {shadow_training!r}")
    run_dir = Path(run_dir)
    config = _read_json(run_dir / "config.json")
    summary = _read_json(run_dir / "summary.json")
    try:
        plan = TrainingPlan.from_run_config(config)
    except ConfigError as err:
        raise AuditError(f"{run_dir / 'config.json'}: {err}") from err
    unit = audit_unit(summary, unit)
    privacy_unit = run_privacy_unit(summary)
    bound = run_bound(summary, config, unit=unit)  # refuses a group audit of a record-level run before any work
    noun = _group_noun(privacy_unit)
    say = progress or (lambda msg: None)
    trains, vals = node_records(config, plan)
    members_all = stack(trains)
    natural = np.array([not is_canary(r) for r in members_all.record_ids])
    members_all = members_all.subset(np.flatnonzero(natural))  # canaries are audited apart
    parts = held_out_parts(plan, vals)
    if unit == "group":
        if members_all.groups is None:
            raise AuditError(f"--unit group needs a group key on every training record (LabeledArrays.groups: the "
                             f"patient, user or speaker), and the run's {plan.dataset} training shares have none: "
                             "make the run with --synthetic-patients (PneumoniaMNIST) or on a dataset with groups "
                             "(FSDD's speakers), or audit it with --unit record")
        parts = [p for p in parts if p.groups is not None]  # a record of no known group cannot be a group target
    if (unit == "group" or privacy_unit != "record") and members_all.groups is not None:
        # Group-level epsilon bounds a target whose whole group is in or out: a held-out record
        # of a trained group (a test split of the same speakers) is neither.
        parts = [without_groups(p, members_all.groups) for p in parts]
    parts = [p for p in parts if len(p)]
    if not parts:
        raise AuditError(f"{plan.dataset}: no held-out {'groups' if unit == 'group' else 'records'} that no node "
                         "trained on (val-fraction 0?)")
    held_out = stack(parts)
    member_ids = set(members_all.record_ids)
    overlap = member_ids.intersection(held_out.record_ids)
    if overlap:
        raise AuditError(f"{len(overlap)} held-out records also appear in the nodes' training data")

    if unit == "group":
        member_keys, nonmember_keys = member_and_nonmember_groups(members_all.groups, held_out.groups)
        target_members, target_nonmembers = balanced_groups(
            member_keys, nonmember_keys, seed, max_targets, group_labels(member_keys, members_all.groups, members_all.y),
            group_labels(nonmember_keys, held_out.groups, held_out.y))
        mem_idx = np.flatnonzero(np.isin(members_all.groups, target_members))
        non_idx = np.flatnonzero(np.isin(held_out.groups, target_nonmembers))
        n = len(target_members)
        say(f"{n} member {noun}s ({len(mem_idx)} records; of {len(member_keys)} {noun}s trained on {len(trains)} "
            f"nodes) vs {n} non-member {noun}s ({len(non_idx)} records; of {len(nonmember_keys)} held-out {noun}s)")
    else:
        mem_idx, non_idx = balanced_targets(members_all.y, held_out.y, seed, max_targets)
        n = len(mem_idx)
        say(f"{n} members (of {len(members_all)} training records on {len(trains)} nodes) vs {n} non-members "
            f"(of {len(held_out)} held-out records)")
    members, nonmembers = members_all.subset(mem_idx), held_out.subset(non_idx)

    model = load_final_model(run_dir, plan, members.input_shape, members.num_classes)
    targets = stack([members, nonmembers])
    losses, phis = per_example_outputs(model, targets)
    is_member = np.arange(len(targets)) < len(members)
    scores = {"loss_threshold": loss_threshold_scores(losses)}

    shadow_info = {"count": 0}
    if shadow_models:
        rest = np.setdiff1d(np.arange(len(members_all)), mem_idx)
        rest_out = np.setdiff1d(np.arange(len(held_out)), non_idx)
        pool = stack([members_all.subset(rest), held_out.subset(rest_out)])
        if set(pool.record_ids) & set(targets.record_ids):
            raise RuntimeError("shadow pool overlaps the audit targets")  # would make LiRA's OUT models IN
        if unit == "group" and np.isin(pool.groups, targets.groups).any():
            raise RuntimeError("shadow pool holds records of a target group")  # OUT models must never see the group
        each = shadow_subset_size(len(pool), len(members_all))
        # The run's nodes trained on groups (user-level DP-SGD, whole groups per node): so do the shadows.
        by_group = str(config.get("privacy-unit", "record")) != "record" and pool.groups is not None
        dp_kind = "user-level (groups sampled and clipped)" if by_group and plan.dp else "record-level"
        if shadow_training == "federated":
            models = train_shadow_federations(plan, pool, shadow_models, seed, nodes=len(trains), records_each=each,
                                              secagg=bool(config.get("secagg", False)), by_group=by_group,
                                              progress=say)
            how = (f"federated: {len(trains)} nodes ({plan.partition}), {plan.rounds} rounds x {plan.local_epochs} "
                   f"local epochs, privacy.dp_sgd.LocalTrainingSession with the run's settings ({dp_kind}), FedAvg")
        else:
            epochs = shadow_epochs or plan.rounds * plan.local_epochs
            models = train_shadow_models_central(plan, pool, shadow_models, seed, epochs, each, by_group=by_group,
                                                 progress=say)
            how = (f"centralised: {epochs} epochs, privacy.dp_sgd.LocalTrainingSession with the run's settings "
                   f"({dp_kind})")
        shadow_phi = np.stack([per_example_outputs(m, targets)[1] for m in models])
        scores["lira_offline"] = lira_offline_scores(phis, shadow_phi)
        shadow_info = {"count": shadow_models, "pool_records": len(pool), "records_each": each,
                       "training": how}

    attacks = {}
    for name, s in scores.items():
        if unit == "group":
            metrics = group_attack_metrics(s[is_member], targets.groups[is_member], s[~is_member],
                                           targets.groups[~is_member])
        else:
            metrics = attack_metrics(s[is_member], s[~is_member])
        metrics.update(compare_with_bound(metrics, bound))
        attacks[name] = metrics

    canary_report = None
    if plan.canaries:
        canary_report = _audit_canaries(plan, members_all, model, models if shadow_models else [], bound)
        say(f"canaries: {canary_report['inserted']} inserted vs {canary_report['not_inserted']} not")
    sizes = {"members": int(n), "nonmembers": int(n), "training_records": len(members_all),
             "held_out_records": len(held_out), "nodes": len(trains),
             "note": "TPR at FPR f is resolved only when nonmembers >= 1/f (1000 for 0.1%)"}
    if unit == "group":
        sizes.update({"member_groups": int(n), "nonmember_groups": int(n), "member_records": len(members),
                      "nonmember_records": len(nonmembers), "training_groups": len(member_keys),
                      "held_out_groups": len(nonmember_keys),
                      "note": f"members and nonmembers count {noun}s (one score each: the mean of its records' "
                              "scores); TPR at FPR f is resolved only when nonmembers >= 1/f (1000 for 0.1%)"})
    return {
        "run_dir": str(run_dir.resolve()),
        "dataset": plan.dataset, "task": plan.task, "model": summary.get("model", plan.model),
        "dp": plan.dp, "rounds": summary.get("rounds_completed"), "test_accuracy": summary.get("final", {}).get("test_accuracy"),
        "unit": unit, "privacy_unit": privacy_unit,
        "target": "record" if unit == "record" else noun,
        "sizes": sizes,
        "attacks": attacks,
        "bound": bound,
        "bound_violated": any(a["bound_violated"] for a in attacks.values())
        or bool(canary_report and canary_report["bound_violated"]),
        "canaries": canary_report,
        "shadow_models": shadow_info,
        "seed": seed,
    }
