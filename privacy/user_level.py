"""User-level (patient-level) DP-SGD: the privacy unit is a group of records, not one record.

A hospital holds several records per patient (X-rays, recordings, notes). Record-level
DP-SGD bounds what one *record* changes; a patient with k records is only protected at
roughly k times that epsilon (group privacy). Here the unit is the group (a patient, a
speaker, a user: the group key a site's loader gives each record), following the
user-level-sampling DP-SGD of Levy et al. 2021 ("Learning with User-Level Privacy",
Alg. 1's gradient averaging per user) and Charles et al. 2024 ("Fine-Tuning Large Language
Models with User-Level Differential Privacy", "user-level sampling" (ULS)):

1. each step Poisson-samples *groups*: every group joins independently with probability q
   (secret draws, `GroupPoissonSampler`); a sampled group brings its records, at most m
   of them chosen at random when the site caps records per step (m = 0: all);
2. each record's gradient comes from Opacus's per-sample gradients (`GradSampleModule`);
   a group's gradient is the mean of its records' gradients (`group_means`);
3. each group's gradient is clipped to norm C as one unit, summed, Gaussian noise of std
   sigma*C added (secret), and the sum divided by the expected number of groups G*q
   (`privacy.dp_sgd.SecretNoiseDPOptimizer` given the step's `GroupBatch`).

Adding or removing a whole group changes the noised sum by at most C, whatever its number
of records, so the step is the subsampled Gaussian mechanism over groups: the RDP
accountant at sampling rate q over groups (Mironov et al. 2019) gives the group-level
(epsilon, delta). The node's ledger charges the group (its unit), not the record.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from privacy.secret_randomness import SecretRandom


@dataclass(frozen=True)
class GroupBatch:
    """One user-level step's Poisson sample.

    records: (R,) int64 row indices of the sampled groups' records (R = 0 when no group
       was sampled); slots: (R,) int64, each record's sampled group as 0..groups-1;
    groups: how many groups were sampled.
    """

    records: np.ndarray
    slots: np.ndarray
    groups: int


def group_index(keys: np.ndarray) -> tuple[list[str], np.ndarray]:
    """(sorted distinct group keys, (N,) int64 index of each record's key in that list).

    keys: (N,) group keys (anything `str` turns into the key). Raises ValueError when empty.
    """
    names = np.asarray([str(k) for k in keys])
    if len(names) == 0:
        raise ValueError("no records: group keys are empty")
    distinct, index = np.unique(names, return_inverse=True)
    return [str(d) for d in distinct], index.astype(np.int64)


class GroupPoissonSampler:
    """Batches of user-level DP-SGD: each group joins each step independently with probability q.

    group_of: (N,) int64 group index of each record (0..G-1, every index present);
    max_records_per_group: m >= 1 caps a sampled group's records per step to m of them,
    chosen uniformly at random; 0 takes all. Yields exactly `steps` `GroupBatch`es per pass.
    Every draw (which groups, which of a big group's records) comes from `randomness`,
    secret on a node. Raises ValueError for a bad rate, step count, cap or index.
    """

    def __init__(self, group_of: np.ndarray, sample_rate: float, steps: int, randomness: SecretRandom,
                 max_records_per_group: int = 0) -> None:
        group_of = np.asarray(group_of, dtype=np.int64)
        if len(group_of) == 0 or steps < 1 or not 0 < sample_rate <= 1 or max_records_per_group < 0:
            raise ValueError(f"need records, steps >= 1, 0 < sample_rate <= 1 and max_records_per_group >= 0; got "
                             f"{len(group_of)} records, {steps}, {sample_rate}, {max_records_per_group}")
        self.num_groups = int(group_of.max()) + 1
        order = np.argsort(group_of, kind="stable")
        bounds = np.searchsorted(group_of[order], np.arange(self.num_groups + 1))
        self.members = [order[bounds[g]:bounds[g + 1]] for g in range(self.num_groups)]
        if any(len(m) == 0 for m in self.members):
            raise ValueError("group indices must cover 0..G-1 without gaps")
        self.sample_rate, self.steps, self.randomness = sample_rate, steps, randomness
        self.max_records_per_group = max_records_per_group

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        m = self.max_records_per_group
        for _ in range(self.steps):
            chosen = np.flatnonzero(self.randomness.bernoulli(self.num_groups, self.sample_rate))
            records, slots = [], []
            for slot, g in enumerate(chosen):
                rows = self.members[g]
                if m and len(rows) > m:
                    rows = np.sort(rows[np.argsort(self.randomness.uniform(len(rows)))[:m]])
                records.append(rows)
                slots.append(np.full(len(rows), slot, dtype=np.int64))
            yield GroupBatch(
                records=np.concatenate(records) if records else np.zeros(0, dtype=np.int64),
                slots=np.concatenate(slots) if slots else np.zeros(0, dtype=np.int64),
                groups=len(chosen),
            )


def group_means(per_record: torch.Tensor, slots: torch.Tensor, groups: int) -> torch.Tensor:
    """(groups, ...) mean of `per_record` (R, ...) rows over each slot (slots: (R,) in 0..groups-1)."""
    out = torch.zeros((groups, *per_record.shape[1:]), dtype=per_record.dtype, device=per_record.device)
    out.index_add_(0, slots, per_record)
    sizes = torch.bincount(slots, minlength=groups).clamp(min=1).to(per_record.dtype)
    return out / sizes.view(-1, *[1] * (per_record.dim() - 1))
