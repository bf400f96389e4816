"""What the pooled DP stand-ins share (`text_features.py`, `speech_dp_statistics.py`,
`vision_pooling.py`): README's federated command replayed on the pooled training split, fast
enough to compare feature variants over several noise draws.

Full-batch DP gradient descent of a linear head from zero: each step the product's closed-form
clipped per-record gradient sum (`privacy.dp_sgd.clipped_linear_head_sums`, clipping norm 1),
plus Gaussian noise of std sigma sqrt(nodes) (each node adds its own sigma x C to its sum; the
record-weighted mean of the nodes' steps is the pooled sum plus that noise over N), heavy-ball
momentum (FedAvgM), and an EMA of the weights. It leaves out what the federated run adds (the
nodes' split, the validation share, round 1's equal weights): it ranks variants; README's tables
hold the product's figures.

Imported as a sibling module (`python benchmarks/<script>.py` puts this folder first on sys.path).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def noisy_full_batch_descent(features, labels, sigma: float, *, nodes: int, steps: int, lr: float = 8.0,
                             momentum: float = 0.9, ema: float = 0.9, seed: int = 0):
    """((weight, bias) of the last iterate, (weight, bias) of the EMA) after `steps` steps.

    features (N, d) float32, labels (N,) int64; sigma: noise multiplier (0: clipping only);
    weight (K, d), bias (K,) with K = labels.max() + 1.
    """
    import torch

    from privacy.dp_sgd import clipped_linear_head_sums

    generator = torch.Generator().manual_seed(seed)
    classes = int(labels.max()) + 1
    weight, bias = torch.zeros(classes, features.shape[1]), torch.zeros(classes)
    velocity = [torch.zeros_like(weight), torch.zeros_like(bias)]
    averaged = [weight.clone(), bias.clone()]
    for _ in range(steps):
        sums = clipped_linear_head_sums(features, features @ weight.T + bias, labels, 1.0, "flat")
        for i, (param, total) in enumerate(zip((weight, bias), sums)):
            noise = torch.randn(total.shape, generator=generator) * sigma * nodes ** 0.5
            velocity[i] = momentum * velocity[i] + (total + noise) / len(labels)
            param -= lr * velocity[i]
            averaged[i] = ema * averaged[i] + (1 - ema) * param
    return (weight, bias), tuple(averaged)


def accuracy(head, features, labels) -> float:
    """Accuracy of the linear head (weight, bias) on features (M, d), labels (M,)."""
    weight, bias = head
    return float(((features @ weight.T + bias).argmax(1) == labels).float().mean())
