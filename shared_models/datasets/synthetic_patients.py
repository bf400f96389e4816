"""Synthetic pseudo-patients: group keys for a dataset that has none (issue 19, a simulation aid).

Public medical benchmarks such as PneumoniaMNIST ship one record per row without a patient
id, yet a hospital holds several records per patient. To measure patient-level (user-level)
DP on them, `assign_synthetic_patients` gives each record a *synthetic* patient key: within
each class, the records (in file order, shuffled by a fixed seed) are cut into consecutive
pseudo-patients of 1-8 records, sizes drawn uniformly. Same label per patient, nothing else
in common: every figure made with them says "synthetic patients".
"""

from __future__ import annotations

import numpy as np

from shared_models.records import LabeledArrays

SYNTHETIC_SEED = 0  # fixed: the assignment is part of the benchmark, not of a run
RECORDS_PER_PATIENT = (1, 8)


def assign_synthetic_patients(data: LabeledArrays, split: str, seed: int = SYNTHETIC_SEED,
                              sizes: tuple[int, int] = RECORDS_PER_PATIENT) -> LabeledArrays:
    """`data` with `groups` set to pseudo-patient keys "synthetic-<split>-<class>-<j>".

    split: the split's name (keeps train and test patients apart); sizes: inclusive range of
    records per pseudo-patient (the last one of a class may be smaller). Deterministic in
    (records in order, seed). Raises ValueError when `data` already has group keys (its
    natural groups are never overwritten) or for a bad size range.
    """
    if data.groups is not None:
        raise ValueError(f"{data.source or 'dataset'} already has group keys; synthetic patients are for data "
                         "without them")
    low, high = sizes
    if not 1 <= low <= high:
        raise ValueError(f"records per synthetic patient must satisfy 1 <= low <= high, got {sizes}")
    rng = np.random.default_rng(seed)
    groups = np.empty(len(data), dtype=object)
    for label in range(data.num_classes):
        rows = rng.permutation(np.flatnonzero(data.y == label))
        start, patient = 0, 0
        while start < len(rows):
            size = int(rng.integers(low, high + 1))
            groups[rows[start:start + size]] = f"synthetic-{split}-{data.classes[label]}-{patient}"
            start, patient = start + size, patient + 1
    out = data.subset(np.arange(len(data)))
    out.groups = groups.astype(str)
    out.meta["synthetic_patients"] = f"synthetic patients: {low}-{high} records each, seed {seed}"
    return out
