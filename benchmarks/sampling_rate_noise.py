"""Benchmark (issue 14, the budget planner's question): at a node's N, epsilon, delta and the
run's rounds R x local epochs E, which sampling rate leaves the least noise per unit of signal?

For each k = steps per epoch (q = 1/k, T = R*E*k steps: the same compute, E passes over the data
a round), the noise multiplier sigma that spends exactly epsilon is taken from the accountant
(`privacy.accountants.calibrate_noise_multiplier`, Opacus's RDP search), and the run's noise per
unit of signal is sigma / (q N sqrt(T)): each step's mean-gradient estimate carries noise std
sigma*C/(q N) per coordinate, and over T steps a steady gradient adds up T times while the noise
adds up sqrt(T) times. Printed as a ratio to full batch (k = 1). No training: a calculation.

    python benchmarks/sampling_rate_noise.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (name, records per node N, rounds R, local epochs E): the federations of the utility table and README.
CASES = (("fsdd speaker node", 450, 40, 1), ("fsdd speaker node, 2 local epochs", 450, 40, 2),
         ("pneumoniamnist node", 900, 15, 2), ("sms_spam node", 800, 15, 2))
EPSILONS = (1.0, 3.0, 8.0)
STEPS_PER_EPOCH = (1, 2, 4, 8, 16, 32)
DELTA = 1e-5


def main(argv: list[str] | None = None) -> int:
    from privacy.accountants import calibrate_noise_multiplier

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sampling_rate_noise.json")
    args = parser.parse_args(argv)
    rows = []
    for name, n, rounds, epochs in CASES:
        for eps in EPSILONS:
            cells = []
            for k in STEPS_PER_EPOCH:
                q, steps = 1.0 / k, rounds * epochs * k
                sigma = calibrate_noise_multiplier(eps, DELTA, q, steps)
                cells.append({"steps_per_epoch": k, "sample_rate": q, "steps": steps, "noise_multiplier": sigma,
                              "noise_per_signal": sigma / (q * n * math.sqrt(steps))})
            full = cells[0]["noise_per_signal"]
            for c in cells:
                c["ratio_to_full_batch"] = round(c["noise_per_signal"] / full, 4)
            best = min(cells, key=lambda c: c["noise_per_signal"])
            rows.append({"case": name, "records": n, "rounds": rounds, "local_epochs": epochs, "epsilon": eps,
                         "best_steps_per_epoch": best["steps_per_epoch"], "cells": cells})
            print(json.dumps({"case": name, "epsilon": eps, "best_steps_per_epoch": best["steps_per_epoch"],
                              "ratios": [c["ratio_to_full_batch"] for c in cells]}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "sampling_rate_noise", "delta": DELTA, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
