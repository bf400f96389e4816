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

Bound (`privacy.audit.bounds`): the run's (epsilon, delta) = the largest per-node
sample-level epsilon (summary.json `max_client_epsilon`) at the run's delta. Nodes hold
disjoint records, so each record is protected by its own node's epsilon (parallel
composition); the largest one bounds every record. Without DP the bound is vacuous.
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
    lira_offline_scores,
    loss_threshold_scores,
    per_example_outputs,
)
from shared_models import build_model
from shared_models.datasets import load_npz
from shared_models.datasets.named import _RELATIVE_PATHS, data_dir, load_dataset
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
        node = NodeIdentity(name=f"node-{pid}", state_dir=Path("."), max_epsilon=1.0, delta=plan.delta,
                            data_path=None, partition_id=pid, num_partitions=clients, val_fraction=plan.val_fraction)
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
    parts = [v for v in node_validation if len(v)]
    if (plan.dataset, "test") not in SHIFTED_SPLITS:
        parts.append(load_dataset(plan.dataset, plan.task, plan.data_dir, plan.data_options())["test"])
    if plan.dataset == "pneumoniamnist":
        root = Path(plan.data_dir) if plan.data_dir else data_dir()
        splits = load_npz(root / _RELATIVE_PATHS["pneumoniamnist"], classes=parts[0].classes if parts else None)
        if "val" in splits:
            parts.append(splits["val"])
    if not parts:
        raise AuditError(f"{plan.dataset}: no held-out records of the training distribution (val-fraction 0?)")
    return concat(parts)


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


def run_bound(summary: dict, config: dict, fprs: tuple[float, ...] = DEFAULT_FPRS) -> dict:
    """The (epsilon, delta) bound for a run, from summary.json; `vacuous` without DP."""
    if not summary.get("dp", config.get("dp", True)):
        return {"epsilon": None, "delta": None, "vacuous": True,
                "note": "the run trained without DP (--no-dp): no bound applies",
                "tpr_at_fpr": {str(f): 1.0 for f in fprs}, "advantage": 1.0, "auc": 1.0}
    eps = summary.get("max_client_epsilon")
    delta = summary.get("delta", config.get("delta"))
    if eps is None or delta is None:
        raise AuditError("summary.json: 'max_client_epsilon' and 'delta' are needed for the bound of a DP run")
    eps, delta = float(eps), float(delta)
    return {"epsilon": eps, "delta": delta, "vacuous": False,
            "note": "largest per-node sample-level epsilon of the run (summary.json max_client_epsilon)",
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


def audit_run(run_dir: Path, shadow_models: int = 4, seed: int = 0, max_targets: int | None = None,
              shadow_epochs: int | None = None, progress: Callable[[str], None] | None = None,
              shadow_training: str = "federated") -> dict:
    """Audit one run folder; returns the JSON-ready report (see module docstring).

    shadow_models: K for LiRA (0 = loss attack only). max_targets: cap on members (= on
    non-members) per side, for quick checks. shadow_training: "federated" (default: a
    simulated federation per shadow, like the run) or "central" (one model trained on the
    whole subset for `shadow_epochs`, default rounds x local-epochs). Raises AuditError
    naming the file/field when the folder is incomplete, ValueError on a bad option.
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
    say = progress or (lambda msg: None)
    trains, vals = node_records(config, plan)
    members_all = concat(trains)
    natural = np.array([not is_canary(r) for r in members_all.record_ids])
    members_all = members_all.subset(np.flatnonzero(natural))  # canaries are audited apart
    held_out = held_out_records(plan, vals)
    member_ids = set(members_all.record_ids)
    overlap = member_ids.intersection(held_out.record_ids)
    if overlap:
        raise AuditError(f"{len(overlap)} held-out records also appear in the nodes' training data")

    mem_idx, non_idx = balanced_targets(members_all.y, held_out.y, seed, max_targets)
    n = len(mem_idx)
    members, nonmembers = members_all.subset(mem_idx), held_out.subset(non_idx)
    say(f"{n} members (of {len(members_all)} training records on {len(trains)} nodes) vs {n} non-members "
        f"(of {len(held_out)} held-out records)")

    model = load_final_model(run_dir, plan, members.input_shape, members.num_classes)
    targets = concat([members, nonmembers])
    losses, phis = per_example_outputs(model, targets)
    is_member = np.arange(len(targets)) < n
    scores = {"loss_threshold": loss_threshold_scores(losses)}

    shadow_info = {"count": 0}
    if shadow_models:
        rest = np.setdiff1d(np.arange(len(members_all)), mem_idx)
        rest_out = np.setdiff1d(np.arange(len(held_out)), non_idx)
        pool = concat([members_all.subset(rest), held_out.subset(rest_out)])
        if set(pool.record_ids) & set(targets.record_ids):
            raise RuntimeError("shadow pool overlaps the audit targets")  # would make LiRA's OUT models IN
        each = shadow_subset_size(len(pool), len(members_all))
        if shadow_training == "federated":
            models = train_shadow_federations(plan, pool, shadow_models, seed, nodes=len(trains), records_each=each,
                                              secagg=bool(config.get("secagg", False)), progress=say)
            how = (f"federated: {len(trains)} nodes ({plan.partition}), {plan.rounds} rounds x {plan.local_epochs} "
                   "local epochs, privacy.dp_sgd.LocalTrainingSession with the run's settings, FedAvg")
        else:
            epochs = shadow_epochs or plan.rounds * plan.local_epochs
            models = train_shadow_models_central(plan, pool, shadow_models, seed, epochs, each, progress=say)
            how = f"centralised: {epochs} epochs, privacy.dp_sgd.LocalTrainingSession with the run's settings"
        shadow_phi = np.stack([per_example_outputs(m, targets)[1] for m in models])
        scores["lira_offline"] = lira_offline_scores(phis, shadow_phi)
        shadow_info = {"count": shadow_models, "pool_records": len(pool), "records_each": each,
                       "training": how}

    bound = run_bound(summary, config)
    attacks = {}
    for name, s in scores.items():
        metrics = attack_metrics(s[is_member], s[~is_member])
        metrics.update(compare_with_bound(metrics, bound))
        attacks[name] = metrics

    canary_report = None
    if plan.canaries:
        canary_report = _audit_canaries(plan, members_all, model, models if shadow_models else [], bound)
        say(f"canaries: {canary_report['inserted']} inserted vs {canary_report['not_inserted']} not")
    return {
        "run_dir": str(run_dir.resolve()),
        "dataset": plan.dataset, "task": plan.task, "model": summary.get("model", plan.model),
        "dp": plan.dp, "rounds": summary.get("rounds_completed"), "test_accuracy": summary.get("final", {}).get("test_accuracy"),
        "sizes": {"members": int(n), "nonmembers": int(n), "training_records": len(members_all),
                  "held_out_records": len(held_out), "nodes": len(trains),
                  "note": "TPR at FPR f is resolved only when nonmembers >= 1/f (1000 for 0.1%)"},
        "attacks": attacks,
        "bound": bound,
        "bound_violated": any(a["bound_violated"] for a in attacks.values())
        or bool(canary_report and canary_report["bound_violated"]),
        "canaries": canary_report,
        "shadow_models": shadow_info,
        "seed": seed,
    }
