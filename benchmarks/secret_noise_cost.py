"""Benchmark: what secret noise costs a DP-SGD step, against torch's seeded generator, in one run.

Since issue 12 a node's DP-SGD noise and Poisson sampling come from `SecretRandom` (a
ChaCha20 keystream keyed by OS entropy, Box-Muller, 4 Gaussian draws per coordinate against
floating-point attacks). The baseline is the same `LocalTrainingSession` step with Opacus's
own `DPOptimizer.add_noise` (one `torch.normal` draw per coordinate from torch's generator,
what a seeded run used before), on the same model, batch and data.

For the default DP model of each task at the named datasets' shapes (vision cnn 1x28x28,
speech conv 64x40, text ngram-linear 200 bytes), on random records, it times whole epochs
of DP-SGD steps (Poisson batches of expected size `--batch`), alternating the two modes
`--repeats` times, and reports the median time per step and secret/torch ratios. Also the
time of the noise draw alone for each model's parameter count.

    python benchmarks/secret_noise_cost.py [--batch 64] [--records 1024] [--repeats 3]

Prints JSON and writes benchmarks/results/secret_noise_cost.json (`--out` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = [("vision", "cnn", (1, 28, 28), 2), ("speech", "conv", (64, 40), 10), ("text", "ngram-linear", (200,), 2)]


def _records(task: str, shape: tuple, classes: int, n: int):
    import numpy as np

    from shared_models.records import LabeledArrays

    rng = np.random.default_rng(0)
    x = rng.integers(1, 256, (n, *shape)).astype(np.int64) if task == "text" else rng.random((n, *shape), np.float32)
    y = rng.integers(0, classes, n).astype(np.int64)
    return LabeledArrays(task=task, x=x, y=y, classes=[str(c) for c in range(classes)],
                         record_ids=[str(i) for i in range(n)])


def measure(task: str, model_name: str, shape: tuple, classes: int, batch: int, records: int, repeats: int) -> dict:
    import torch
    from opacus.optimizers import DPOptimizer

    from privacy.dp_sgd import LocalTrainingSession
    from privacy.secret_randomness import SecretRandom
    from shared_models import build_model

    torch.manual_seed(0)
    data = _records(task, shape, classes, records)
    model = build_model(task, model_name, shape, classes)
    session = LocalTrainingSession(model, data, batch_size=batch, lr=0.1, optimizer="sgd", noise_multiplier=1.0,
                                   max_grad_norm=1.0, device=torch.device("cpu"))
    secret_noise = session.optimizer.add_noise
    torch_noise = types.MethodType(DPOptimizer.add_noise, session.optimizer)
    times = {"secret": [], "torch": []}
    session.train_epochs(1)  # warm-up
    for _ in range(repeats):
        for mode, add_noise in (("secret", secret_noise), ("torch", torch_noise)):
            session.optimizer.add_noise = add_noise
            start = time.perf_counter()
            result = session.train_epochs(1)
            times[mode].append((time.perf_counter() - start) / result.steps)
    params = sum(p.numel() for p in session.module.parameters())
    reference = torch.zeros(params)
    draw = {"secret": [], "torch": []}
    for _ in range(max(5, repeats)):
        start = time.perf_counter()
        SecretRandom().gaussian_like(reference, 1.0)
        draw["secret"].append(time.perf_counter() - start)
        start = time.perf_counter()
        torch.normal(0.0, 1.0, size=reference.shape)
        draw["torch"].append(time.perf_counter() - start)
    step = {mode: statistics.median(v) for mode, v in times.items()}
    noise = {mode: statistics.median(v) for mode, v in draw.items()}
    return {
        "task": task, "model": model_name, "parameters": params, "steps_per_epoch": session.steps_per_epoch,
        "step_ms": {m: 1e3 * v for m, v in step.items()}, "step_ratio_secret_over_torch": step["secret"] / step["torch"],
        "noise_draw_ms": {m: 1e3 * v for m, v in noise.items()},
        "noise_draw_ratio_secret_over_torch": noise["secret"] / noise["torch"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--records", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "secret_noise_cost.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows = [measure(*spec, args.batch, args.records, args.repeats) for spec in MODELS]
    result = {
        "benchmark": "secret_noise_cost",
        "command": "python benchmarks/secret_noise_cost.py " + " ".join(sys.argv[1:]),
        "batch": args.batch, "records": args.records, "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_before": load_before, "load_after": os.getloadavg()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
