#!/usr/bin/env bash
# Everything that needs a GPU, in one command, on a CUDA machine with torch and triton installed:
#   OUT=gpu-results bash bench/gpu_check.sh
# 1. the GPU tests (bitwise parity with the reference math on this GPU, >2**31 elements, compile,
#    export, CUDA graphs), 2. autotuning of the standard shapes (and a second process that must not
#    re-tune), 3. the issues' targets (bench/gpu_targets.py), 4. the full speed comparison.
# Logs and results land in $OUT. Nothing is installed: the package runs from this checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
export FSQ_TRITON_CACHE_DIR="$OUT/tuning-cache"
PY=${PYTHON:-$(command -v python || command -v python3)}
status=0

(nvidia-smi; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)") > "$OUT/env.txt" 2>&1
echo "== GPU tests" | tee "$OUT/summary.txt"
"$PY" -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu-tests.log" | tail -3 | tee -a "$OUT/summary.txt" || status=1
echo "== autotune" | tee -a "$OUT/summary.txt"
"$PY" -m fsq_triton autotune --quick --reset 2>&1 | tee "$OUT/autotune.log" | tail -12 | tee -a "$OUT/summary.txt" || status=1
"$PY" - <<'PYEOF' 2>&1 | tee -a "$OUT/summary.txt"
# a second process, with on-the-fly tuning on, loads the cache and must not re-tune the shapes it holds
import os
os.environ["FSQ_TRITON_AUTOTUNE"] = "1"
import torch, fsq_triton
from fsq_triton import autotune
fsq = fsq_triton.FSQ([8, 8, 8, 5, 5, 5]).cuda()
fsq(torch.randn(8, 6, 16, 64, 64, device="cuda"))
print("second process: cache", autotune.cache_path(torch.device("cuda")), "entries", len(autotune._cached(torch.device("cuda"))), "re-tuned", len(autotune._TUNED_LOG))
PYEOF
echo "== targets" | tee -a "$OUT/summary.txt"
"$PY" bench/gpu_targets.py --out "$OUT" 2>&1 | tee "$OUT/targets.log" | tee -a "$OUT/summary.txt" || status=1
echo "== bench" | tee -a "$OUT/summary.txt"
"$PY" -m fsq_triton bench --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log" | tail -40 | tee -a "$OUT/summary.txt" || status=1
exit $status
