"""Canaries for a tighter audit (Jagielski, Ullman, Oprea, "Auditing differentially private
machine learning: how private is private SGD?", NeurIPS 2020; Nasr, Song, Thakurta, Papernot,
Carlini, "Adversary instantiation: lower bounds for differentially private machine
learning", IEEE S&P 2021).

Natural records are hard to single out, so a membership attack on them says little about the
worst case that DP bounds. Canaries are records built to stand out: out-of-distribution
inputs with random labels, whose influence on the model (if trained on) is not explained by
any other record. `fedpriv simulate --canaries N` builds N of them from the run's seed, and
inserts a seeded half (`inserted_mask`) into the nodes' training shares, one node after the
other; the other half is never trained on. The audit then scores inserted vs. not-inserted
canaries, a balanced membership game whose members and non-members come from the same
(canary) distribution by construction.

Canary inputs per task (same shape and dtype as the dataset's records):
- vision: uniform noise pixels in [0, 1];
- text: printable ASCII bytes (32..126) at random, padded with 0 after a random length;
- speech: Gaussian frames with the dataset's mean and standard deviation.
Labels are uniform over the classes. Everything depends only on (seed, count, the dataset's
train split), so nodes and the audit rebuild exactly the same canaries.
"""

from __future__ import annotations

import numpy as np

from shared_models.records import LabeledArrays

CANARY_PREFIX = "canary-"
_SEED_SALT = 0xCA7A  # keeps canary draws independent of the run's other seeded draws


def make_canaries(template: LabeledArrays, count: int, seed: int) -> LabeledArrays:
    """`count` out-of-distribution records with random labels, shaped like `template`'s.

    template: the dataset's train split (its task, shape, dtype, classes; for speech its
    mean/std). Record ids are "canary-<i>". Raises ValueError for count < 1 or an unknown task.
    """
    if count < 1:
        raise ValueError(f"canary count must be >= 1, got {count}")
    rng = np.random.default_rng([seed, _SEED_SALT])
    shape = (count, *template.input_shape)
    if template.task == "vision":
        x = rng.random(shape, dtype=np.float32)
    elif template.task == "text":
        x = rng.integers(32, 127, size=shape, dtype=np.int64)
        lengths = rng.integers(max(1, shape[1] // 4), shape[1] + 1, size=count)
        x[np.arange(shape[1])[None, :] >= lengths[:, None]] = 0
        x = x.astype(template.x.dtype)
    elif template.task == "speech":
        mean, std = float(template.x.mean()), float(template.x.std()) or 1.0
        x = (mean + std * rng.standard_normal(shape)).astype(template.x.dtype)
    else:
        raise ValueError(f"canaries: unknown task {template.task!r}")
    y = rng.integers(0, template.num_classes, size=count).astype(np.int64)
    return LabeledArrays(task=template.task, x=x, y=y, classes=list(template.classes),
                         record_ids=[f"{CANARY_PREFIX}{i}" for i in range(count)], source="canaries")


def inserted_mask(count: int, seed: int) -> np.ndarray:
    """(count,) bool: which canaries are trained on (exactly count // 2 of them, seeded)."""
    rng = np.random.default_rng([seed, _SEED_SALT, 1])
    mask = np.zeros(count, dtype=bool)
    mask[rng.permutation(count)[: count // 2]] = True
    return mask


def node_canaries(template: LabeledArrays, count: int, seed: int, partition_id: int, num_partitions: int) -> LabeledArrays:
    """The inserted canaries that node `partition_id` of `num_partitions` trains on.

    Inserted canaries are dealt out in turn: the j-th inserted one goes to node j mod
    num_partitions. Raises ValueError for a partition id out of range.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id must be in [0, {num_partitions}), got {partition_id}")
    canaries = make_canaries(template, count, seed)
    inserted = np.flatnonzero(inserted_mask(count, seed))
    return canaries.subset(inserted[partition_id::num_partitions])


def is_canary(record_id: str) -> bool:
    """True for the record ids `make_canaries` gives."""
    return str(record_id).startswith(CANARY_PREFIX)
