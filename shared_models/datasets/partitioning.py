"""Split a training set across simulated nodes with `flwr-datasets` partitioners.

- iid: `IidPartitioner` (uniform random, equal sizes);
- dirichlet: `DirichletPartitioner` over the label, concentration `alpha` (Hsu et al. 2019);
- natural: `NaturalIdPartitioner` over the dataset's natural id (FSDD: the speaker).
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

PARTITIONS = ("iid", "dirichlet", "natural")


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    scheme: str,
    *,
    alpha: float = 0.5,
    groups: np.ndarray | None = None,
    seed: int = 0,
    whole_groups: bool = False,
) -> list[np.ndarray]:
    """Row indices (sorted int64 arrays) of each of `num_partitions` partitions.

    labels: (N,) class ids; groups: (N,) natural ids, needed for scheme "natural", whose
    number of distinct values must equal num_partitions. whole_groups: for "iid" and
    "dirichlet", partition the groups (each labelled by its most frequent class) and give
    each partition all its groups' rows, so no group is split across nodes (user-level DP).
    Raises ValueError naming the bad argument (unknown scheme, alpha <= 0, missing groups,
    empty partition).
    """
    if whole_groups and scheme != "natural":
        if groups is None:
            raise ValueError("whole_groups needs group keys")
        names, of = np.unique(np.asarray(groups).astype(str), return_inverse=True)
        group_labels = np.array([np.bincount(labels[of == g]).argmax() for g in range(len(names))])
        parts = partition_indices(group_labels, num_partitions, scheme, alpha=alpha, seed=seed)
        return [np.sort(np.flatnonzero(np.isin(of, part))).astype(np.int64) for part in parts]
    if scheme not in PARTITIONS:
        raise ValueError(f"partition must be one of {list(PARTITIONS)}, got {scheme!r}")
    if num_partitions < 1 or num_partitions > len(labels):
        raise ValueError(f"clients must be in [1, {len(labels)}] for {len(labels)} records, got {num_partitions}")
    table = {"label": labels.astype(np.int64).tolist(), "row": np.arange(len(labels)).tolist()}
    if scheme == "natural":
        if groups is None:
            raise ValueError("partition 'natural' needs a dataset with natural ids (e.g. fsdd's speakers)")
        names = sorted(set(groups.tolist()))
        if len(names) != num_partitions:
            raise ValueError(f"partition 'natural' gives {len(names)} partitions ({names}); set --clients {len(names)}")
        table["group"] = [str(g) for g in groups]
        partitioner = NaturalIdPartitioner(partition_by="group")
    elif scheme == "dirichlet":
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min(10, len(labels) // num_partitions),
            self_balancing=True,
            seed=seed,
        )
    else:
        partitioner = IidPartitioner(num_partitions=num_partitions)
    partitioner.dataset = Dataset.from_dict(table)
    if scheme == "natural":
        # NaturalIdPartitioner numbers ids its own way; order partitions by sorted name.
        _ = partitioner.num_partitions  # builds the id mapping
        order = {name: pid for pid, name in partitioner.partition_id_to_natural_id.items()}
        pids = [order[name] for name in names]
    else:
        pids = list(range(num_partitions))
    out = []
    for pid in pids:
        rows = np.sort(np.asarray(partitioner.load_partition(pid)["row"], dtype=np.int64))
        if len(rows) == 0:
            raise ValueError(f"partition {pid} of {num_partitions} ({scheme}) is empty; use fewer clients")
        out.append(rows)
    return out
