"""Shadow models for LiRA, trained by the same code and schedule as the audited run.

LiRA (Carlini et al., IEEE S&P 2022) compares the audited model's confidence on a record
with the confidence of shadow models that never trained on it. The comparison is only fair
when the shadows are trained *like* the audited model: the paper's shadows share the
target's architecture, data distribution, training-set size and training recipe. A
federated run is not centralised training: each node runs DP-SGD on a non-IID share and
the server averages, round after round. Shadows trained centrally for the same number of
epochs fit the training distribution better than the federated model does, which shifts
every OUT confidence up and pushed LiRA's AUC *below* chance on PneumoniaMNIST (0.46, with
the loss attack at 0.55 on the same run).

So the default here is a shadow *federation* per shadow model (`train_shadow_federations`):
the pool is split into the run's number of nodes with the run's partition scheme (fresh
seed), each node trains with `privacy.dp_sgd.LocalTrainingSession` and the noise multiplier
`client.node_training.plan_noise` would give it, and the shadow server averages them for the
run's rounds (FedAvg weighted by examples, McMahan et al. 2017; equal weights under SecAgg+,
as `server.federation` does). Not reproduced: client-level noise and clipping of SecAgg+
runs, node sampling below `fraction-train` 1, faults and declines. The centralised variant
(`train_shadow_models_central`) stays for comparison (`fedpriv audit --shadow-training central`).

A run whose nodes protected groups (user-level DP-SGD, issue 19) gets user-level shadows
(`by_group`): each shadow's subset is drawn as whole groups, the shadow federation keeps
groups whole on one node, and each shadow node samples and clips groups
(`privacy.user_level`) with the noise its number of groups implies.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from client.node_training import plan_noise
from privacy.accountants import calibrate_noise_multiplier
from privacy.dp_sgd import LocalTrainingSession, poisson_sample_rate, steps_per_epoch
from privacy.user_level import group_index
from shared_models import build_model
from shared_models.datasets.partitioning import partition_indices
from shared_models.records import LabeledArrays

# A shadow trains on a random subset of the pool as large as the run's training data; when
# the pool is smaller, on this fraction of it, so that the K shadows still see different data.
SMALL_POOL_FRACTION = 0.8


def shadow_subset_size(pool_size: int, run_training_records: int) -> int:
    """Records per shadow model: the run's training-set size, or 80% of a smaller pool (>= 1)."""
    if pool_size < 1:
        raise ValueError("the shadow pool is empty")
    if run_training_records < pool_size:
        return run_training_records
    return max(1, int(SMALL_POOL_FRACTION * pool_size))


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """FedAvg (McMahan et al., AISTATS 2017): weighted mean of model states (floating tensors);
    other tensors (integer buffers) are taken from the first state.

    states: K state_dicts with the same keys and shapes; weights: K non-negative numbers, not
    all zero. Raises ValueError on an empty list or all-zero weights.
    """
    if not states or len(states) != len(weights):
        raise ValueError(f"need one weight per state, got {len(states)} states and {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("FedAvg weights sum to zero")
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            out[key] = sum(s[key] * (w / total) for s, w in zip(states, weights))
        else:
            out[key] = first.clone()
    return out


def _shadow_subsets(pool: LabeledArrays, k: int, seed: int, records_each: int,
                    by_group: bool = False) -> list[LabeledArrays]:
    """The K seeded random subsets of `pool` (records_each records each) the shadow models train on.

    by_group: draw whole groups (`pool.groups`) in random order until records_each records
    are reached, so a shadow's groups are as large as the run's. Raises ValueError when
    k < 2 (LiRA fits a variance over the shadows) or by_group without group keys.
    """
    if k < 2:
        raise ValueError(f"LiRA needs at least 2 shadow models, got {k}")
    rng = np.random.default_rng(seed)
    if not by_group:
        return [pool.subset(np.sort(rng.permutation(len(pool))[:records_each])) for _ in range(k)]
    if pool.groups is None:
        raise ValueError("user-level shadow models need group keys on the shadow pool")
    _, group_of = group_index(pool.groups)
    sizes = np.bincount(group_of)
    subsets = []
    for _ in range(k):
        order = rng.permutation(len(sizes))
        # The first groups whose records reach records_each (at least one group).
        take = order[: max(1, int(np.searchsorted(np.cumsum(sizes[order]), records_each)) + 1)]
        subsets.append(pool.subset(np.flatnonzero(np.isin(group_of, take))))
    return subsets


def _units(data: LabeledArrays, by_group: bool) -> tuple[int, np.ndarray | None]:
    """(sampled units, (N,) group index or None): records, or under user-level DP the groups."""
    if not by_group:
        return len(data), None
    keys, group_of = group_index(data.groups)
    return len(keys), group_of


def _session(plan, data: LabeledArrays, noise_multiplier: float | None, groups: np.ndarray | None = None):
    model = build_model(plan.task, plan.model or None, data.input_shape, data.num_classes, plan.activation)
    return LocalTrainingSession(model, data, batch_size=plan.batch_size, lr=plan.lr, optimizer=plan.optimizer,
                                momentum=plan.momentum, noise_multiplier=noise_multiplier,
                                max_grad_norm=plan.max_grad_norm, device=torch.device("cpu"), groups=groups,
                                max_records_per_group=plan.max_records_per_group, clipping=plan.clipping)


def train_shadow_federations(plan, pool: LabeledArrays, k: int, seed: int, *, nodes: int, records_each: int,
                             secagg: bool = False, by_group: bool = False,
                             progress: Callable[[str], None] | None = None) -> list[torch.nn.Module]:
    """K shadow models, each the outcome of a simulated federation on a random subset of `pool`.

    plan: the run's `client.config.TrainingPlan` (model, rounds, local epochs, batch, lr,
    optimizer, clipping, epsilon/delta, partition scheme and alpha). pool: records none of
    the audit targets are in. nodes: the run's number of nodes. records_each: records per
    shadow federation (`shadow_subset_size`). secagg: the run used SecAgg+ (equal-weight
    mean instead of example-weighted FedAvg). Under DP every shadow node gets the noise
    multiplier its share size implies (`plan_noise`: the run's epsilon at the run's delta over
    all rounds). by_group: the run's nodes trained with user-level DP-SGD: whole groups per
    subset and per node, groups sampled and clipped, noise from the number of groups.
    Returns K models in eval mode. Raises ValueError when k < 2 or the pool cannot be split
    into `nodes` non-empty shares.
    """
    models = []
    for i, subset in enumerate(_shadow_subsets(pool, k, seed, records_each, by_group)):
        shares = [subset.subset(ix) for ix in partition_indices(
            subset.y, nodes, plan.partition, alpha=plan.alpha, groups=subset.groups, seed=seed * 7919 + i,
            whole_groups=by_group) if len(ix)]
        if not shares:
            raise ValueError(f"shadow federation {i + 1}: no node received records")
        torch.manual_seed(seed * 7919 + i)
        model = build_model(plan.task, plan.model or None, pool.input_shape, pool.num_classes, plan.activation)
        global_state = {key: v.detach().clone() for key, v in model.state_dict().items()}
        sessions = []
        for share in shares:
            units, groups = _units(share, by_group)
            sessions.append(_session(plan, share, plan_noise(plan, units, plan.delta)[0] if plan.dp else None,
                                     groups))
        weights = [1.0 if secagg else float(len(share)) for share in shares]
        for _ in range(plan.rounds):
            states, losses = [], []
            for session in sessions:
                session.load_global(global_state)
                result = session.train_epochs(plan.local_epochs)
                states.append(result.state)
                losses.append(result.train_loss)
            global_state = fedavg(states, weights)
        model.load_state_dict(global_state)
        models.append(model.eval())
        if progress:
            progress(f"shadow federation {i + 1}/{k}: {len(subset)} records"
                     f"{' (%d groups)' % _units(subset, True)[0] if by_group else ''} on {len(shares)} nodes, "
                     f"{plan.rounds} rounds x {plan.local_epochs} epochs, "
                     f"{'DP-SGD' if plan.dp else 'no DP'}, last-round train loss {np.nanmean(losses):.3f}")
    return models


def train_shadow_models_central(plan, pool: LabeledArrays, k: int, seed: int, epochs: int, records_each: int,
                                by_group: bool = False,
                                progress: Callable[[str], None] | None = None) -> list[torch.nn.Module]:
    """K shadow models, each trained centrally on a random subset of `pool` for `epochs` passes.

    Same model/optimizer/lr/batch/clipping as the run's plan; under DP the noise multiplier
    is calibrated (Opacus RDP search) so that `epochs` passes spend the run's epsilon at its
    delta. by_group: user-level DP-SGD over whole groups (as `train_shadow_federations`).
    Raises ValueError when k < 2.
    """
    models = []
    for i, subset in enumerate(_shadow_subsets(pool, k, seed, records_each, by_group)):
        sigma = None
        n, groups = _units(subset, by_group)
        if plan.dp:
            sigma = calibrate_noise_multiplier(plan.epsilon, plan.delta, poisson_sample_rate(n, plan.batch_size),
                                               epochs * steps_per_epoch(n, plan.batch_size))
        torch.manual_seed(seed * 7919 + i)
        session = _session(plan, subset, sigma, groups)
        result = session.train_epochs(epochs)
        session.module.load_state_dict(result.state)
        models.append(session.module.eval())
        if progress:
            progress(f"shadow model {i + 1}/{k}: {len(subset)} records, {epochs} epochs, "
                     f"{'noise %.3f' % sigma if sigma else 'no DP'}, train loss {result.train_loss:.3f}")
    return models
