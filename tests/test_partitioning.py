import numpy as np
import pytest

from shared_models.datasets.partitioning import partition_indices

LABELS = np.repeat(np.arange(4), 50)


def _check_disjoint_cover(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist())) == n


def test_iid_gives_equal_disjoint_shares():
    parts = partition_indices(LABELS, 4, "iid")
    assert [len(p) for p in parts] == [50, 50, 50, 50]
    _check_disjoint_cover(parts, 200)


def test_dirichlet_is_seeded_skewed_and_disjoint():
    a = partition_indices(LABELS, 5, "dirichlet", alpha=0.3, seed=1)
    b = partition_indices(LABELS, 5, "dirichlet", alpha=0.3, seed=1)
    c = partition_indices(LABELS, 5, "dirichlet", alpha=0.3, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    _check_disjoint_cover(a, 200)
    # Label skew: at alpha 0.3 some node's majority label holds well over a quarter of its data.
    shares = [np.bincount(LABELS[p], minlength=4).max() / len(p) for p in a]
    assert max(shares) > 0.5


def test_natural_partition_follows_groups():
    groups = np.array(["ann", "bob", "cy"] * 10)
    labels = np.arange(30) % 2
    parts = partition_indices(labels, 3, "natural", groups=groups)
    assert [sorted(set(groups[p])) for p in parts] == [["ann"], ["bob"], ["cy"]]
    with pytest.raises(ValueError, match="set --clients 3"):
        partition_indices(labels, 4, "natural", groups=groups)
    with pytest.raises(ValueError, match="needs a dataset with natural ids"):
        partition_indices(labels, 3, "natural")


def test_bad_arguments():
    with pytest.raises(ValueError, match="partition must be one of"):
        partition_indices(LABELS, 2, "shards")
    with pytest.raises(ValueError, match="clients must be in"):
        partition_indices(LABELS, 0, "iid")
    with pytest.raises(ValueError, match="alpha must be > 0"):
        partition_indices(LABELS, 2, "dirichlet", alpha=0)
