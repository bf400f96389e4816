"""Aggregation rules for updates the server sees one by one (secure aggregation off).

`fedavg` is the weighted mean (McMahan et al. 2017). The robust rules bound what a few
Byzantine nodes (scaled, sign-flipped or crafted updates) can do to the global model:
- `median`: the coordinate-wise median (Yin et al., ICML 2018);
- `trimmed-mean`: per coordinate, drop the largest and smallest `trim_fraction` of the values
  and average the rest (Yin et al. 2018);
- `krum`: the one update closest, in squared L2 distance, to its n - f - 2 nearest others
  (Blanchard et al., NeurIPS 2017), f = the nodes assumed Byzantine.

Each rule is Flower 1.42's own code (`flwr.serverapp.strategy`: FedAvg's `aggregate_arrayrecords`,
FedMedian's np.median, FedTrimmedAvg's `trim_mean`, Krum's `select_multikrum`), called on the
round's train replies without building Flower Messages; the rules are
translation-invariant, so applying them to the nodes' weights equals applying them to
their updates. With SecAgg+ the server holds only the sum: no rule but the mean is possible
and the per-node update clip (`--clip-norm`) is the defence (`fedpriv` refuses the pair).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import select_multikrum
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

AGGREGATIONS = ("fedavg", "median", "trimmed-mean", "krum")
WEIGHT_KEY = "num-examples"


def byzantine_nodes(num_nodes: int, fraction: float) -> int:
    """f for Krum: floor(fraction * n), at most n - 3 (Krum scores each update over n - f - 2 >= 1 others)."""
    return max(0, min(int(fraction * num_nodes), num_nodes - 3))


def aggregate_in_clear(rule: str, replies: list[RecordDict], *, trim_fraction: float = 0.2,
                       byzantine_fraction: float = 0.2) -> ArrayRecord:
    """The new global arrays from the round's train replies under `rule` (one of AGGREGATIONS).

    replies: each node's reply content, with its local weights in "arrays" (one Array per
    state key, same keys and shapes) and `num-examples` in "metrics" (fedavg's weights; the
    robust rules weigh every node alike). The median and trimmed mean keep the dtype the
    nodes sent (the median of an integer counter stays an integer). Raises ValueError for an unknown
    rule, no replies, or a trim_fraction outside [0, 0.5).
    """
    if rule not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {rule!r}")
    if not replies:
        raise ValueError("no replies to aggregate")
    if rule == "fedavg":
        return aggregate_arrayrecords(replies, WEIGHT_KEY)
    if rule == "krum":
        chosen = select_multikrum(list(replies), num_malicious_nodes=byzantine_nodes(len(replies), byzantine_fraction),
                                  num_nodes_to_select=1)
        return aggregate_arrayrecords(chosen, WEIGHT_KEY)
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim fraction must be in [0, 0.5), got {trim_fraction}")
    combine = (lambda stacked: np.median(stacked, axis=0)) if rule == "median" else (
        lambda stacked: trim_mean(stacked, trim_fraction))
    first = replies[0]["arrays"]
    out = ArrayRecord()
    for key in first.keys():
        stacked = np.stack([reply["arrays"][key].numpy() for reply in replies])
        out[key] = Array(np.asarray(combine(stacked)).astype(stacked.dtype, copy=False))  # a counter stays an integer
    return out
