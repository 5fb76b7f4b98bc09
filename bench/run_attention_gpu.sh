#!/usr/bin/env bash
# One device call: tune launch configs, then the full MAE table with those configs (+ correctness
# checks), then the attention tests on the GPU. Results land in $OUT (default: bench/results/tmp).
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/bench/results/tmp}
TUNE_BUDGET=${TUNE_BUDGET:-110}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation "$REPO" >"$OUT/pip.log" 2>&1 || tail -5 "$OUT/pip.log"
cd /tmp
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$OUT/gpu.txt"
if [ "$TUNE_BUDGET" != "0" ]; then
  python3 "$REPO/bench/bench_attention.py" --tune --budget-s "$TUNE_BUDGET" --out "$OUT/tune.json" >"$OUT/tune.log" 2>&1
  grep -A40 "best configs" "$OUT/tune.log" || tail -20 "$OUT/tune.log"
  TUNED="--tuned-configs $OUT/tune.json"
else
  TUNED=""
fi
python3 "$REPO/bench/bench_attention.py" --check $TUNED --out "$OUT/attention.json" 2>&1 | tee "$OUT/bench.log" | cut -c1-150
timeout "${TEST_TIMEOUT:-90}" python3 -m pytest -q -x -p no:cacheprovider "$REPO/tests/ops/test_kernels_flash_attention.py" 2>&1 | tail -15
