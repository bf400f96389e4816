"""One utility row on an accelerator: centralized DP-SGD on PneumoniaMNIST with the shared CNN.

The device machine has torch but not the federated stack (Flower, Ray, librosa, scikit-learn),
so this row needs only torch, numpy, Opacus and `shared_models`: the vision `cnn` of the
utility table, trained on the official PneumoniaMNIST training split with Opacus DP-SGD
(Abadi et al. 2016; Poisson sampling, per-sample clipping norm 1, RDP accountant, noise
calibrated with `make_private_with_epsilon` so that all epochs spend `--epsilon` at delta
1e-5), then test accuracy and ROC AUC on the official test split. It is the centralized DP
counterpart of the utility table's rows, not one of its federated rows.

    python benchmarks/gpu_utility_row.py --data <dir>/pneumoniamnist/pneumoniamnist.npz \
        [--device cuda] [--epsilon 8] [--epochs 10] [--batch 256] [--lr 1.0] [--quick] [--out FILE]

Input file: the MedMNIST npz with `train_images (N,28,28) uint8`, `train_labels (N,1)`,
`test_images`, `test_labels`; a missing key raises SystemExit naming the file and key.
Prints JSON and writes `--out` (default benchmarks/results/gpu_utility_row_<device>.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DELTA = 1e-5


def load_npz(path: Path):
    """(x_train, y_train, x_test, y_test): images (N,1,28,28) float32 in [0,1], labels (N,) int64."""
    import numpy as np

    if not path.exists():
        raise SystemExit(f"{path}: no such file (expected the PneumoniaMNIST npz)")
    with np.load(path) as z:
        out = []
        for split in ("train", "test"):
            for key in (f"{split}_images", f"{split}_labels"):
                if key not in z:
                    raise SystemExit(f"{path}: missing key {key!r} (expected MedMNIST layout)")
            out += [z[f"{split}_images"].astype(np.float32)[:, None] / 255.0, z[f"{split}_labels"].reshape(-1).astype(np.int64)]
    return out


def roc_auc(scores, labels) -> float:
    """ROC AUC by the rank statistic (Mann-Whitney U; ties get mean ranks). scores, labels: (N,)."""
    import numpy as np

    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = ((ends - counts + 1 + ends) / 2.0)[inverse]  # 1-based mean rank of each tie group
    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true", help="1 epoch (a dry run)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.epochs = 1

    import torch
    from opacus import PrivacyEngine
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from shared_models import build_model

    dev = torch.device(args.device)
    x_tr, y_tr, x_te, y_te = load_npz(args.data)
    torch.manual_seed(0)
    model = build_model("vision", "cnn", x_tr.shape[1:], 2).to(dev).train()
    loader = DataLoader(TensorDataset(torch.from_numpy(x_tr), torch.from_numpy(y_tr)), batch_size=args.batch)
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=args.lr), data_loader=loader,
        target_epsilon=args.epsilon, target_delta=DELTA, epochs=args.epochs, max_grad_norm=1.0,
        grad_sample_mode="hooks")
    criterion = nn.CrossEntropyLoss()
    started = time.perf_counter()
    for _ in range(args.epochs):
        for x, y in loader:
            if len(y) == 0:
                continue  # an empty Poisson batch: Opacus skips the step's noise as well
            optimizer.zero_grad(set_to_none=True)
            criterion(model(x.to(dev)), y.to(dev)).backward()
            optimizer.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    train_seconds = time.perf_counter() - started
    model.eval()
    with torch.no_grad():
        probs = torch.cat([torch.softmax(model(torch.from_numpy(x_te[i:i + 512]).to(dev)), 1).cpu()
                           for i in range(0, len(x_te), 512)]).numpy()
    result = {
        "benchmark": "gpu_utility_row",
        "row": "centralized DP-SGD, PneumoniaMNIST, vision cnn",
        "device": args.device,
        "device_name": torch.cuda.get_device_name(0) if dev.type == "cuda" else platform.processor() or "cpu",
        "epsilon_target": args.epsilon, "epsilon_spent": engine.get_epsilon(DELTA), "delta": DELTA,
        "noise_multiplier": optimizer.noise_multiplier, "epochs": args.epochs, "batch": args.batch, "lr": args.lr,
        "seed": 0, "train_seconds": train_seconds,
        "test_accuracy": float((probs.argmax(1) == y_te).mean()), "test_auc": roc_auc(probs[:, 1], y_te),
        "peak_cuda_mem_mib": torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()},
        "command": "python benchmarks/gpu_utility_row.py " + " ".join(sys.argv[1:]),
    }
    out = args.out or ROOT / "benchmarks" / "results" / f"gpu_utility_row_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
