"""Benchmark (issue 14, a lead for the speech head): does standardising the scattering
coefficients speed up gradient descent on FSDD, and can the statistics avoid the data?

Centralised, non-private full-batch gradient descent (momentum 0.9, the pooled FSDD training
split, 40 / 80 steps, lr 8 / 16) of a linear head on today's features (`scattering`: each clip
log-scattered and normalised per order by its own values) and on three standardisations:
- `dataset-std`: per-coefficient mean and std of the training split (what kymatio's FSDD
  example does; under DP it would need DP estimates of them, a new release);
- `synthetic-std`: the mean and std of the same features computed on 300 seeded synthetic
  clips (coloured noise of random spectral slope under a Hann envelope): fixed constants, no
  record involved; then each row scaled to unit norm (by its own values only).
Test accuracy on FSDD's test split. No DP: it measures how fast the head optimises, the limit
the federated DP runs showed (the head reaches 0.80 without DP in 40 rounds).

The recorded table was measured before the fixed standardisation became the product's
features (93a9a0d): its `scattering` rows are the per-order (v2) features. `load_dataset` now
returns the standardised (v3) ones, so a rerun starts from those; rebuilding v2 rows from the
WAV files is left to do.

    python benchmarks/feature_standardisation.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def gradient_descent_accuracy(x, y, x_test, y_test, steps: int, lr: float, momentum: float = 0.9) -> float:
    """Test accuracy of a linear head after `steps` full-batch heavy-ball GD steps from zero."""
    import torch

    x, x_test = torch.tensor(x, dtype=torch.float32), torch.tensor(x_test, dtype=torch.float32)
    y, y_test = torch.as_tensor(y), torch.as_tensor(y_test)
    weight = torch.zeros(x.shape[1], int(y.max()) + 1, requires_grad=True)
    bias = torch.zeros(int(y.max()) + 1, requires_grad=True)
    velocity = [torch.zeros_like(weight), torch.zeros_like(bias)]
    for _ in range(steps):
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(x @ weight + bias, y), [weight, bias])
        with torch.no_grad():
            for i, (param, grad) in enumerate(zip((weight, bias), grads)):
                velocity[i] = momentum * velocity[i] + grad
                param -= lr * velocity[i]
    return float(((x_test @ weight + bias).argmax(1) == y_test).float().mean())


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    from shared_models.datasets.audio import _per_order_log_scattering, synthetic_reference_clips
    from shared_models.datasets.local import LocalDataOptions
    from shared_models.datasets.named import load_dataset

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "feature_standardisation.json")
    args = parser.parse_args(argv)
    splits = load_dataset("fsdd", options=LocalDataOptions(audio_features="scattering"))
    x, x_test = splits["train"].x[:, 0, :].astype(np.float64), splits["test"].x[:, 0, :].astype(np.float64)
    y, y_test = splits["train"].y, splits["test"].y
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731 - per row, its own values only
    mean, std = x.mean(0), x.std(0)
    # The reference clips and their per-order rows are the product's own (`reference_statistics`).
    synthetic = _per_order_log_scattering(synthetic_reference_clips())
    s_mean, s_std = synthetic.mean(0), synthetic.std(0)
    variants = {
        "scattering": (x, x_test),
        "dataset-std": (unit((x - mean) / std), unit((x_test - mean) / std)),
        "synthetic-std": (unit((x - s_mean) / s_std), unit((x_test - s_mean) / s_std)),
    }
    rows = []
    for name, (train, test) in variants.items():
        for steps in (40, 80):
            for lr in (8.0, 16.0):
                acc = gradient_descent_accuracy(train, y, test, y_test, steps, lr)
                rows.append({"features": name, "steps": steps, "lr": lr, "test_accuracy": round(acc, 4)})
                print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "feature_standardisation", "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
