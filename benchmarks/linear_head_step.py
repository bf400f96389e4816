"""Benchmark (issue 14): the cost of a node's DP step for the default linear heads, on the
product's own path, against the plain step, timed interleaved in one process.

For each default head, today's and the earlier ones (vision `linear-pool3` on 81x7x7 scattering
maps pooled to 3 x 3 and `linear` on the full maps, speech `linear` on 336 scattering
coefficients, text `ngram-sqrt` and `ngram-linear` on 200 byte ids) and each batch (64, and the full
batch a default node trains on: `--records`), one `privacy.dp_sgd.LocalTrainingSession` per
mode on the same random records, full batch (`batch_size=0`: every record, one step per
`train_epochs(1)`):

- plain: no DP (torch SGD on the mean loss);
- closed-form: DP-SGD as a node runs it for these heads (`per_sample_gradients="auto"`:
  `clipped_linear_head_sums`, the secret ChaCha20 noise of `SecretNoiseDPOptimizer`, the
  Poisson draw at q = 1, Opacus's accountant);
- hooks: the same with Opacus's GradSampleModule (`per_sample_gradients="hooks"`), what a node
  ran before.

The modes take turns step by step (`--reps` rounds of one step each, after `--warmup`), so a
shared machine's load falls on all of them alike; each figure is the median step time (ms),
and the ratios are to plain of the same head and batch. One torch thread.

    python benchmarks/linear_head_step.py [--reps 200] [--warmup 20] [--out FILE]

Prints JSON and writes benchmarks/results/linear_head_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from privacy.dp_sgd import LocalTrainingSession  # noqa: E402
from privacy.secret_randomness import SecretRandom  # noqa: E402
from shared_models import build_model  # noqa: E402
from shared_models.records import LabeledArrays  # noqa: E402

# (task, model, one record's shape, classes, a default node's records: FSDD 450 per speaker less
# validation, SMS ~900 per node, PneumoniaMNIST up to ~1,300).
HEADS = [
    ("vision", "linear-pool3", (81, 7, 7), 2, 1024),
    ("vision", "linear", (81, 7, 7), 2, 1024),
    ("speech", "linear", (1, 336), 10, 405),
    ("text", "ngram-sqrt", (200,), 2, 800),
    ("text", "ngram-linear", (200,), 2, 800),
]
MODES = ("plain", "closed-form", "hooks")


def _records(task: str, shape: tuple[int, ...], classes: int, n: int) -> LabeledArrays:
    rng = np.random.default_rng(0)
    if task == "text":
        x = rng.integers(1, 257, size=(n, *shape)).astype(np.int64)
        x[:, shape[0] // 2:] = 0  # padded tails, like encoded SMS messages
    else:
        x = rng.normal(size=(n, *shape)).astype(np.float32)
    y = (np.arange(n) % classes).astype(np.int64)
    return LabeledArrays(task, x, y, [str(c) for c in range(classes)], [f"r{i}" for i in range(n)])


def _session(task, name, shape, classes, data, mode) -> LocalTrainingSession:
    torch.manual_seed(0)
    model = build_model(task, name, shape, classes)
    dp = mode != "plain"
    return LocalTrainingSession(model, data, batch_size=0, lr=0.1, optimizer="sgd",
                                noise_multiplier=1.0 if dp else None, max_grad_norm=1.0, device=torch.device("cpu"),
                                per_sample_gradients="hooks" if mode == "hooks" else "auto")


def measure(reps: int, warmup: int) -> list[dict]:
    """Median step time per (head, batch, mode), the modes interleaved step by step."""
    rows = []
    for task, name, shape, classes, full in HEADS:
        for batch in (64, full):
            data = _records(task, shape, classes, batch)
            sessions = {mode: _session(task, name, shape, classes, data, mode) for mode in MODES}
            times = {mode: [] for mode in MODES}
            for rep in range(warmup + reps):
                for mode, session in sessions.items():
                    randomness = SecretRandom()
                    started = time.perf_counter()
                    session.train_epochs(1, randomness)
                    if rep >= warmup:
                        times[mode].append((time.perf_counter() - started) * 1000.0)
            plain = statistics.median(times["plain"])
            for mode in MODES:
                median = statistics.median(times[mode])
                rows.append({"task": task, "model": name, "batch": batch, "mode": mode,
                             "params": sum(p.numel() for p in sessions[mode].module.parameters()),
                             "step_ms_median": median, "time_ratio_vs_plain": median / plain})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "linear_head_step.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    rows = measure(args.reps, args.warmup)
    result = {"benchmark": "linear_head_step", "reps": args.reps, "warmup": args.warmup, "threads": 1,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
              "load_average_1m_before_and_after": [load_before, os.getloadavg()[0]],
              "command": "python benchmarks/linear_head_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
