#!/usr/bin/env bash
# DP-SGD cost and one utility row on a CUDA device, in under 8 minutes.
#
# The device machine has torch but no network: Opacus (and what it needs beyond torch and
# numpy) comes from a carried folder of wheels, never from the repository. Prepare it here:
#
#   pip download opacus==1.6.0 opt_einsum==3.4.0 --no-deps -d wheels/   # + scipy if the device lacks it
#   mkdir -p data && cp ../shared/data/pneumoniamnist/pneumoniamnist.npz data/   # ignored, never committed
#
# and run there from the repository root (WHEELS, DATA and OUT are folders; OUT gets the JSON):
#
#   WHEELS=wheels DATA=data OUT=/some/dir bash benchmarks/gpu_run.sh
#
# Dry run on a CPU-only machine (no install when opacus imports already):
#
#   DEVICE=cpu QUICK=1 DATA=../shared/data/pneumoniamnist OUT=/tmp/gpu-dry bash benchmarks/gpu_run.sh
#
# Writes $OUT/dp_sgd_cost_<device>.json and $OUT/gpu_utility_row_<device>.json.
set -euo pipefail

DEVICE="${DEVICE:-cuda}"
OUT="${OUT:?set OUT to the folder for the JSON results}"
DATA="${DATA:?set DATA to the folder holding pneumoniamnist.npz}"
WHEELS="${WHEELS:-wheels}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"

if ! "$PY" -c "import opacus" 2>/dev/null; then
    if [ ! -d "$WHEELS" ]; then
        echo "error: opacus is not installed and the wheel folder '$WHEELS' does not exist (see the header)" >&2
        exit 2
    fi
    "$PY" -m pip install --no-index --no-deps --find-links "$WHEELS" "$WHEELS"/*.whl
fi
"$PY" -c "import torch, opacus; print('torch', torch.__version__, 'opacus', opacus.__version__, 'cuda', torch.cuda.is_available())"

npz="$DATA/pneumoniamnist.npz"
[ -f "$npz" ] || npz="$DATA/pneumoniamnist/pneumoniamnist.npz"

# A step that runs past its limit still leaves its JSON (rows are written as they finish);
# the next step runs anyway.
step() { "$@" || echo "warning: '$*' exited with $? (124 = time limit)" >&2; }

if [ -n "${QUICK:-}" ]; then
    # Dry run: three cheap models, 3 timed steps each; one epoch of the utility row.
    step timeout 300 "$PY" benchmarks/dp_sgd_cost.py --device "$DEVICE" --quick --models cnn conv ngram-linear \
        --out "$OUT/dp_sgd_cost_$DEVICE.json" > /dev/null
    step timeout 300 "$PY" benchmarks/gpu_utility_row.py --device "$DEVICE" --data "$npz" --quick \
        --out "$OUT/gpu_utility_row_$DEVICE.json"
else
    # On a GPU all eight models fit: the recurrent text models are the slow ones (Opacus's
    # DPLSTM/DPGRU are Python loops over 200 steps), hence the per-row time budget.
    step timeout 330 "$PY" benchmarks/dp_sgd_cost.py --device "$DEVICE" --steps 30 --budget-s 8 \
        --out "$OUT/dp_sgd_cost_$DEVICE.json" > /dev/null
    step timeout 120 "$PY" benchmarks/gpu_utility_row.py --device "$DEVICE" --data "$npz" --epsilon 8 --epochs 10 \
        --out "$OUT/gpu_utility_row_$DEVICE.json"
fi
ls -l "$OUT"
