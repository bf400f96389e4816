"""Benchmark (issue 14, a lead for the vision head, not product code): would fewer, spatially
pooled scattering features suit PneumoniaMNIST's linear head under DP?

A pooled stand-in for README's PneumoniaMNIST command (`pooled_dp.py`: 5 nodes' noise, 60
full-batch steps, momentum 0.9, lr 8, an EMA 0.9), on the first 90% of the training split (the
validation share); sigma spends epsilon at delta 1e-5 in 60 steps at sampling rate 1. Feature
rows, from today's Scattering2D maps (81 x 7 x 7 per image): `full` (the 3,969 values `linear`
trains on today) or each map average-pooled to k x k cells (`pool{k}`, PyTorch's adaptive
average pooling: cells may overlap), then scaled to unit norm by the image's own values (fixed,
data-independent). Test AUC and accuracy of the EMA, mean ± sample standard deviation over 3
noise draws.

    python benchmarks/vision_pooling.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pooled_dp import ROOT, noisy_full_batch_descent

EPSILONS, DELTA, STEPS, NODES, SEEDS = (1.0, 3.0, 8.0), 1e-5, 60, 5, (0, 1, 2)
POOLS = (None, 2, 3, 4)  # None: the full maps


def main(argv: list[str] | None = None) -> int:
    import statistics

    import torch
    from opacus.accountants.utils import get_noise_multiplier
    from sklearn.metrics import roc_auc_score

    from shared_models.datasets.local import LocalDataOptions
    from shared_models.datasets.named import load_dataset

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vision_pooling.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    splits = load_dataset("pneumoniamnist", options=LocalDataOptions(image_features="scattering"))
    train = torch.as_tensor(splits["train"].x, dtype=torch.float32)
    labels = torch.as_tensor(splits["train"].y)
    keep = int(0.9 * len(train))  # what a node trains on after its validation share
    train, labels = train[:keep], labels[:keep]
    test, test_labels = torch.as_tensor(splits["test"].x, dtype=torch.float32), splits["test"].y
    sigmas = {eps: get_noise_multiplier(target_epsilon=eps, target_delta=DELTA, sample_rate=1.0, steps=STEPS,
                                        accountant="rdp") for eps in EPSILONS}
    sigmas[None] = 0.0  # clipping, no noise

    def pooled(maps: torch.Tensor, k: int | None) -> torch.Tensor:
        if k is None:
            return maps.flatten(1)
        flat = torch.nn.functional.adaptive_avg_pool2d(maps, k).flatten(1)
        return flat / flat.norm(dim=1, keepdim=True).clamp(min=1e-12)

    rows = []
    for k in POOLS:
        features, test_features = pooled(train, k), pooled(test, k)
        for eps, sigma in sigmas.items():
            aucs, accs = [], []
            for seed in SEEDS:
                _, (weight, bias) = noisy_full_batch_descent(features, labels, sigma, nodes=NODES, steps=STEPS,
                                                             seed=seed)
                scores = test_features @ weight.T + bias
                aucs.append(roc_auc_score(test_labels, (scores[:, 1] - scores[:, 0]).numpy()))
                accs.append(float((scores.argmax(1).numpy() == test_labels).mean()))
            rows.append({"features": "full" if k is None else f"pool{k}", "dimension": features.shape[1],
                         "epsilon": eps, "sigma": round(sigma, 3),
                         "test_auc": round(statistics.mean(aucs), 4), "test_auc_sd": round(statistics.stdev(aucs), 4),
                         "test_accuracy": round(statistics.mean(accs), 4), "seeds": len(SEEDS)})
            print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "vision_pooling", "steps": STEPS, "nodes": NODES, "delta": DELTA,
                                    "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
