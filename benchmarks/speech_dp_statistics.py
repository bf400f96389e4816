"""Benchmark (issue 14, a lead for the speech head, not product code): would DP estimates of
FSDD's feature statistics, spent from the same per-node budget, lift the linear head under DP?

A pooled stand-in for README's FSDD command (`pooled_dp.py`: 6 nodes' noise, 40 full-batch steps,
momentum 0.9, lr 8, an EMA 0.9); test accuracy of the EMA, mean ± sample standard deviation over 5
noise draws. Feature rows (each then scaled to unit
norm, by its own values only):
- `v3`: today's features (fixed standardisation with synthetic-clip statistics: no record used);
- `exact-std`: each coefficient standardised with the training split's own mean and std: the
  non-private ceiling of the idea (no budget spent on it);
- `dp-mean`, `dp-std`: each node releases the sums of its rows (||x|| = 1: sensitivity 1) and,
  for `dp-std`, of their squares (||x*x|| <= 1) with Gaussian noise of multiplier sigma_s (one
  more Gaussian mechanism at sampling rate 1 on the node's records; the pair has sensitivity
  sqrt(2)); the server sums them; variances are floored at 0.1/d (unit rows of d coefficients
  have mean square 1/d: a fixed floor, no record used).
  The training noise multiplier is then searched so that the composition of both (Opacus's RDP
  accountant: 40 steps at sigma plus one release at sigma_s / sqrt(2) for `dp-std`, sigma_s for
  `dp-mean`) spends exactly epsilon at delta 1e-5: the statistics cost the training noise.

    python benchmarks/speech_dp_statistics.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pooled_dp import ROOT, accuracy, noisy_full_batch_descent

EPSILONS, DELTA = (1.0, 3.0, 8.0), 1e-5
STEPS, NODES, LR, MOMENTUM, EMA, SEEDS = 40, 6, 8.0, 0.9, 0.9, tuple(range(5))
STAT_SIGMAS = (4.0, 16.0)  # noise multipliers of the statistics release, tried per epsilon


def composed_sigma(epsilon: float, release_sigma: float | None) -> float | None:
    """Training noise multiplier that, composed with one full-batch Gaussian release at
    `release_sigma` (None: no release), spends exactly `epsilon` at DELTA in STEPS full-batch
    steps (bisection on Opacus's RDP accountant); None when the release alone spends more."""
    from opacus.accountants import RDPAccountant

    from privacy.accountants.sample_level import RDP_ORDERS

    def spent(sigma: float) -> float:
        accountant = RDPAccountant()
        accountant.history = [(sigma, 1.0, STEPS)] + ([(release_sigma, 1.0, 1)] if release_sigma else [])
        return accountant.get_epsilon(delta=DELTA, alphas=RDP_ORDERS)  # the orders a node's ledger uses

    low, high = 0.3, 200.0
    if spent(high) > epsilon:
        return None
    for _ in range(60):
        mid = (low * high) ** 0.5
        low, high = (mid, high) if spent(mid) > epsilon else (low, mid)
    return high


def main(argv: list[str] | None = None) -> int:
    import statistics

    import torch

    from shared_models.datasets.local import LocalDataOptions
    from shared_models.datasets.named import load_dataset

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "speech_dp_statistics.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    splits = load_dataset("fsdd", options=LocalDataOptions(audio_features="scattering"))
    train = torch.as_tensor(splits["train"].x[:, 0, :], dtype=torch.float32)
    test = torch.as_tensor(splits["test"].x[:, 0, :], dtype=torch.float32)
    labels, test_labels = torch.as_tensor(splits["train"].y), torch.as_tensor(splits["test"].y)
    unit = lambda a: a / a.norm(dim=1, keepdim=True).clamp(min=1e-12)  # noqa: E731 - per row
    # Floor for a noisy variance, fixed (no record used): unit-norm rows of d coefficients have
    # mean square 1/d, so a tenth of that.
    floor = torch.full((train.shape[1],), 0.1 / train.shape[1])
    rows = []

    def record(name: str, eps: float, sigma: float, release_sigma: float | None, make) -> None:
        accs = []
        for seed in SEEDS:
            features, test_features = make(seed)
            _, averaged = noisy_full_batch_descent(features, labels, sigma, nodes=NODES, steps=STEPS, lr=LR,
                                                   momentum=MOMENTUM, ema=EMA, seed=seed)
            accs.append(accuracy(averaged, test_features, test_labels))
        rows.append({"features": name, "epsilon": eps, "sigma": round(sigma, 3), "release_sigma": release_sigma,
                     "ema_accuracy": round(statistics.mean(accs), 4), "ema_accuracy_sd": round(statistics.stdev(accs), 4),
                     "seeds": len(SEEDS)})
        print(json.dumps(rows[-1]), flush=True)

    mean, std = train.mean(0), train.std(0)
    n = len(train)
    for eps in EPSILONS:
        plain = composed_sigma(eps, None)
        record("v3", eps, plain, None, lambda seed: (train, test))
        record("exact-std", eps, plain, None, lambda seed: (unit((train - mean) / std), unit((test - mean) / std)))
        for release in STAT_SIGMAS:
            for name in ("dp-mean", "dp-std"):
                accountant_sigma = release / 2 ** 0.5 if name == "dp-std" else release
                sigma = composed_sigma(eps, accountant_sigma)
                if sigma is None:
                    continue

                def make(seed: int, name=name, release=release):
                    gen = torch.Generator().manual_seed(1000 + seed)
                    noise = lambda: torch.randn(train.shape[1], generator=gen) * release * NODES ** 0.5  # noqa: E731
                    noisy_mean = (train.sum(0) + noise()) / n
                    if name == "dp-mean":
                        return unit(train - noisy_mean), unit(test - noisy_mean)
                    noisy_var = ((train ** 2).sum(0) + noise()) / n - noisy_mean ** 2
                    noisy_std = torch.maximum(noisy_var, floor).sqrt()
                    return unit((train - noisy_mean) / noisy_std), unit((test - noisy_mean) / noisy_std)

                record(name, eps, sigma, release, make)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "speech_dp_statistics", "steps": STEPS, "nodes": NODES, "lr": LR,
                                    "momentum": MOMENTUM, "ema": EMA, "delta": DELTA, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
