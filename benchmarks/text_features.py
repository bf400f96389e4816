"""Benchmark (issue 14, the lead that gave `ngram-sqrt`): which fixed text features and which EMA
suit SMS Spam's linear head under full-batch DP gradient descent?

A pooled stand-in for README's SMS command, fast enough to compare variants over 3 noise draws:
the whole SMS training split in one place, 40 full-batch steps from zero, per-record clipping at
C = 1 (the product's closed form, `privacy.dp_sgd.clipped_linear_head_sums`), Gaussian noise of
std sigma C sqrt(5) on the clipped sum (5 nodes each adding their own sigma C, as the federated
run's record-weighted mean does), sigma the noise multiplier that spends epsilon at delta 1e-5 in
40 steps at sampling rate 1 (Opacus's RDP search, what a node's plan calibrates), heavy-ball
momentum 0.9 (FedAvgM) at lr 8, and an EMA of the weights. Test accuracy of the last iterate and
of the EMA on SMS's test split, mean and sample standard deviation over noise seeds 0-9. Rows:
- features `counts` (ngram-linear: hashed byte 1-3-gram counts, L2-normalised) or `sqrt`
  (ngram-sqrt: the counts square-rooted, then normalised); EMA 0.9 or 0.5.
It leaves out what the federated run adds (the nodes' Dirichlet split, the 10% validation
share, round 1's equal weights): its figures run ~0.01 above README's command; use it to rank
variants, README's table for the product's figures.

    python benchmarks/text_features.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EPSILONS = (1.0, 3.0, 8.0)
STEPS, NODES, LR, MOMENTUM, SEEDS = 40, 5, 8.0, 0.9, tuple(range(10))


def noisy_gradient_descent(features, labels, test_features, test_labels, sigma: float, ema: float,
                           seed: int) -> tuple[float, float]:
    """(last-iterate, EMA) test accuracy of a linear head after STEPS clipped, noised full-batch steps.

    features (N, d) float32, labels (N,) int64; sigma: noise multiplier (0: clipping only).
    """
    import torch

    from privacy.dp_sgd import clipped_linear_head_sums

    generator = torch.Generator().manual_seed(seed)
    classes = int(labels.max()) + 1
    weight, bias = torch.zeros(classes, features.shape[1]), torch.zeros(classes)
    velocity = [torch.zeros_like(weight), torch.zeros_like(bias)]
    averaged = [weight.clone(), bias.clone()]
    for _ in range(STEPS):
        sums = clipped_linear_head_sums(features, features @ weight.T + bias, labels, 1.0, "flat")
        for i, (param, total) in enumerate(zip((weight, bias), sums)):
            noise = torch.randn(total.shape, generator=generator) * sigma * NODES ** 0.5
            velocity[i] = MOMENTUM * velocity[i] + (total + noise) / len(labels)
            param -= LR * velocity[i]
            averaged[i] = ema * averaged[i] + (1 - ema) * param
    accuracy = lambda w, b: float(((test_features @ w.T + b).argmax(1) == test_labels).float().mean())  # noqa: E731
    return accuracy(weight, bias), accuracy(*averaged)


def main(argv: list[str] | None = None) -> int:
    import statistics

    import torch
    from opacus.accountants.utils import get_noise_multiplier

    from shared_models import build_model
    from shared_models.datasets.named import load_dataset

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "text_features.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    splits = load_dataset("sms_spam")
    labels, test_labels = torch.as_tensor(splits["train"].y), torch.as_tensor(splits["test"].y)
    sigmas = {eps: get_noise_multiplier(target_epsilon=eps, target_delta=1e-5, sample_rate=1.0, steps=STEPS,
                                        accountant="rdp") for eps in EPSILONS}
    rows = []
    for name, model in (("counts", "ngram-linear"), ("sqrt", "ngram-sqrt")):
        head = build_model("text", model, (splits["train"].x.shape[1],), 2)
        with torch.no_grad():
            train = head.features(torch.as_tensor(splits["train"].x))
            test = head.features(torch.as_tensor(splits["test"].x))
        for ema in (0.9, 0.5):
            for eps, sigma in sigmas.items():
                runs = [noisy_gradient_descent(train, labels, test, test_labels, sigma, ema, seed) for seed in SEEDS]
                rows.append({"features": name, "model": model, "ema": ema, "epsilon": eps, "sigma": round(sigma, 4),
                             "last_accuracy": round(statistics.mean(r[0] for r in runs), 4),
                             "last_accuracy_sd": round(statistics.stdev(r[0] for r in runs), 4),
                             "ema_accuracy": round(statistics.mean(r[1] for r in runs), 4),
                             "ema_accuracy_sd": round(statistics.stdev(r[1] for r in runs), 4), "seeds": len(SEEDS)})
                print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "text_features", "steps": STEPS, "nodes": NODES, "lr": LR,
                                    "momentum": MOMENTUM, "delta": 1e-5, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
