"""Benchmark: cost of one DP-SGD training step per model, plain torch vs Opacus, in one run.

For every model of `shared_models` (vision cnn, linear on 81x7x7 scattering maps; speech conv, conv-lstm, conv-gru, linear; text
ngram-linear, ngram-wordchar, conv, lstm, gru) on random inputs of the named datasets' shapes
(vision 1x28x28 as PneumoniaMNIST, speech 64x40 log-mel as FSDD or 1x336 scattering
coefficients for `linear`, text 200 byte ids as SMS Spam),
with the same batch for every mode, it times one training step (forward + backward +
optimizer step; `--warmup` steps, then the median of up to `--steps` timed steps, stopping
early once `--budget-s` seconds are spent but never below 3) and the step's peak memory:

- plain: torch SGD, no per-sample gradients;
- hooks: Opacus 1.6 `make_private(grad_sample_mode="hooks")` (Abadi et al. 2016 DP-SGD with
  per-sample gradients from module hooks), fixed batches (no Poisson sampling, so every
  mode sees the same batch), noise multiplier 1, clipping norm 1;
- ghost: Opacus `grad_sample_mode="ghost"` (ghost clipping, Li et al. 2022 / Bu et al. 2023:
  per-sample gradient norms without materialising per-sample gradients, two backward
  passes); where Opacus refuses a model the error is recorded instead;
- closed-form (linear heads on fixed features only: speech linear, text ngram-linear and
  ngram-wordchar): the clipped per-sample gradient sum from `privacy.dp_sgd.
  clipped_linear_head_sums` (rank-one gradients, nothing materialised: what a node runs for
  these heads), then Opacus's `DPOptimizer` noise (torch's generator, as in hooks) and step.

Peak memory: on CUDA `torch.cuda.max_memory_allocated` minus the memory allocated before
the first step; on CPU (tracemalloc does not see torch's allocator) the growth of the
process's peak RSS (`resource.getrusage(...).ru_maxrss`) over the peak before the first
step. Each (model, mode) runs in a fresh subprocess so that one mode's allocations never
hide another's. Ratios are hooks/plain and ghost/plain for the same model in the same run.

    python benchmarks/dp_sgd_cost.py [--device cpu|cuda] [--batch 64] [--steps 20] [--budget-s 15] [--quick]

Prints JSON and writes benchmarks/results/dp_sgd_cost[_<device>].json (`--out` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (task, model name, one example's shape, classes): the shapes of the named datasets.
MODELS = [
    ("vision", "cnn", (1, 28, 28), 2),
    ("vision", "linear", (81, 7, 7), 2),  # on PneumoniaMNIST's scattering maps (--image-features scattering)
    ("speech", "conv", (64, 40), 10),
    ("speech", "conv-lstm", (64, 40), 10),
    ("speech", "conv-gru", (64, 40), 10),
    ("speech", "linear", (1, 336), 10),  # on FSDD's scattering features (--audio-features scattering)
    ("text", "ngram-linear", (200,), 2),
    ("text", "ngram-wordchar", (200,), 2),
    ("text", "conv", (200,), 2),
    ("text", "lstm", (200,), 2),
    ("text", "gru", (200,), 2),
]
MODES = ("plain", "hooks", "ghost", "closed-form")
CLOSED_FORM_MODELS = ("linear", "ngram-linear", "ngram-wordchar")  # `privacy.dp_sgd.linear_head` models


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def measure(task: str, name: str, mode: str, batch: int, steps: int, warmup: int, device: str, threads: int,
            budget_s: float = 1e9) -> dict:
    """Time and memory of up to `steps` training steps of one model in one mode (this process).

    Timing stops early once `budget_s` seconds of timed steps are spent (at least 3 steps).
    Returns {"step_ms_median", "step_ms_p90", "steps_timed", "peak_mem_mib", "params"}. Raises whatever
    Opacus raises for a model it cannot handle in `mode` (the caller records it).
    """
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from shared_models import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    shape, classes = next((s, k) for t, n, s, k in MODELS if t == task and n == name)
    dev = torch.device(device)
    if task == "text":
        # Byte ids 1..256 with a padded tail, like encoded SMS messages.
        x = torch.randint(1, 257, (batch, *shape))
        x[:, shape[0] // 2:] = 0
    else:
        x = torch.randn(batch, *shape)
    y = torch.randint(0, classes, (batch,))
    model = build_model(task, name, shape, classes).to(dev).train()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    criterion = nn.CrossEntropyLoss()
    if mode == "closed-form":
        from opacus.optimizers import DPOptimizer

        from privacy.dp_sgd import clipped_linear_head_sums, linear_head

        head = linear_head(model)
        dp = DPOptimizer(optimizer, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch)
    elif mode != "plain":
        from opacus import PrivacyEngine

        loader = DataLoader(TensorDataset(x, y), batch_size=batch)
        engine = PrivacyEngine(accountant="rdp")
        made = engine.make_private(module=model, optimizer=optimizer, data_loader=loader, criterion=criterion,
                                   noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
                                   grad_sample_mode=mode)
        if mode == "ghost":
            model, optimizer, criterion, _ = made
        else:
            model, optimizer, _ = made
    xb, yb = x.to(dev), y.to(dev)

    def closed_form_step() -> None:
        with torch.no_grad():
            features = model.features(xb).flatten(1)
            weight, bias = clipped_linear_head_sums(features, head(features), yb, 1.0)
        for p, total in ((head.weight, weight), (head.bias, bias)):
            p.summed_grad = total
        dp.add_noise()
        for p in (head.weight, head.bias):
            p.grad /= batch
            p.summed_grad = None
        optimizer.step()

    def step() -> None:
        if mode == "closed-form":
            return closed_form_step()
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(xb), yb)
        loss.backward()
        optimizer.step()

    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _peak_rss_mib()
    times = []
    for i in range(warmup + steps):
        started = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - started) * 1000.0)
            if len(times) >= 3 and sum(times) > budget_s * 1000.0:
                break
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else _peak_rss_mib() - base
    times.sort()
    return {"step_ms_median": statistics.median(times), "step_ms_p90": times[int(0.9 * (len(times) - 1))],
            "steps_timed": len(times), "peak_mem_mib": peak, "params": params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per (model, mode); median reported")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=15.0, help="stop timing a row after this many seconds (>= 3 steps)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--models", nargs="+", default=None, help="subset of model names, e.g. cnn conv")
    parser.add_argument("--quick", action="store_true", help="3 timed steps, 1 warm-up (a dry run)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", nargs=3, metavar=("TASK", "MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup = 3, 1
    if args.one:
        print(json.dumps(measure(*args.one, args.batch, args.steps, args.warmup, args.device, args.threads,
                                 args.budget_s)))
        return
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device")
    out = args.out or ROOT / "benchmarks" / "results" / f"dp_sgd_cost{'' if args.device == 'cpu' else '_' + args.device}.json"

    load_before = os.getloadavg()[0]
    rows = []
    for task, name, shape, _classes in MODELS:
        if args.models and name not in args.models:
            continue
        for mode in MODES:
            if mode == "closed-form" and name not in CLOSED_FORM_MODELS:
                continue
            cmd = [sys.executable, __file__, "--one", task, name, mode, "--batch", str(args.batch), "--steps",
                   str(args.steps), "--warmup", str(args.warmup), "--device", args.device, "--threads", str(args.threads),
                   "--budget-s", str(args.budget_s)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                                  env={**os.environ, "PYTHONWARNINGS": "ignore"})
            row = {"task": task, "model": name, "mode": mode, "input_shape": list(shape), "batch": args.batch}
            if proc.returncode != 0:
                lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
                row["error"] = lines[-1][:300] if lines else f"exit code {proc.returncode}"
            else:
                row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            _write(args, out, rows, load_before)  # a later timeout still leaves the rows so far
    print(json.dumps(_write(args, out, rows, load_before), indent=2))


def _write(args, out: Path, rows: list[dict], load_before: float) -> dict:
    """Add the ratios against `plain` of the same model and write the result file."""
    plain = {(r["task"], r["model"]): r for r in rows if r["mode"] == "plain" and "error" not in r}
    for r in rows:
        base = plain.get((r["task"], r["model"]))
        if base and "error" not in r:
            r["time_ratio_vs_plain"] = r["step_ms_median"] / base["step_ms_median"]
            r["mem_ratio_vs_plain"] = r["peak_mem_mib"] / base["peak_mem_mib"] if base["peak_mem_mib"] > 0 else None
    import torch

    result = {
        "benchmark": "dp_sgd_cost",
        "device": args.device,
        "device_name": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu",
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "budget_s": args.budget_s,
        "threads": args.threads,
        "memory_measure": ("torch.cuda.max_memory_allocated minus allocated before the first step"
                           if args.device.startswith("cuda") else
                           "growth of peak RSS (ru_maxrss) over the peak before the first step, fresh process per row"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "torch": torch.__version__},
        # Other work on a shared machine slows every mode alike; the ratios are the robust figure.
        "load_average_1m_before_and_after": [load_before, os.getloadavg()[0]],
        "command": "python benchmarks/dp_sgd_cost.py " + " ".join(sys.argv[1:]),
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
