"""Benchmark (issue 14, the lead that gave `ngram-sqrt`): which fixed text features and which EMA
suit SMS Spam's linear head under full-batch DP gradient descent?

A pooled stand-in for README's SMS command (`pooled_dp.py`): 40 full-batch steps, 5 nodes' noise,
sigma the noise multiplier that spends epsilon at delta 1e-5 in 40 steps at sampling rate 1
(Opacus's RDP search, what a node's plan calibrates), momentum 0.9 (FedAvgM) at lr 8, an EMA. Test accuracy of the last iterate and
of the EMA on SMS's test split, mean and sample standard deviation over noise seeds 0-9. Rows:
- features `counts` (ngram-linear: hashed byte 1-3-gram counts, L2-normalised) or `sqrt`
  (ngram-sqrt: the counts square-rooted, then normalised); EMA 0.9 or 0.5.
Its figures run ~0.01 above README's command (it leaves out the nodes' split, the validation
share and round 1's equal weights).

    python benchmarks/text_features.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pooled_dp import ROOT, accuracy, noisy_full_batch_descent

EPSILONS = (1.0, 3.0, 8.0)
STEPS, NODES, LR, MOMENTUM, SEEDS = 40, 5, 8.0, 0.9, tuple(range(10))


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
                runs = []
                for seed in SEEDS:
                    last, averaged = noisy_full_batch_descent(train, labels, sigma, nodes=NODES, steps=STEPS, lr=LR,
                                                              momentum=MOMENTUM, ema=ema, seed=seed)
                    runs.append((accuracy(last, test, test_labels), accuracy(averaged, test, test_labels)))
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
