#!/usr/bin/env bash
# Second device call: find which kernel variant runs the fault cases cleanly (each variant in its own
# process, a sync after every launch), show compute-sanitizer's view of the first fault, then run the
# table and the tests with the first clean variant.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/bench/results/tmp}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation "$REPO" >"$OUT/pip.log" 2>&1 || tail -5 "$OUT/pip.log"
cd /tmp
CHOSEN=""
for V in "base" "stages2 MAE_FAST_FA_MAX_STAGES=2" "clamp MAE_FAST_FA_CLAMP_D=1" "stages1 MAE_FAST_FA_MAX_STAGES=1"; do
  set -- $V; NAME=$1; shift
  echo "== variant $NAME"
  env "$@" CUDA_LAUNCH_BLOCKING=1 timeout 60 python3 "$REPO/bench/bench_attention.py" --diagnose >"$OUT/diag-$NAME.log" 2>&1
  grep "^diag\|ALLOK" "$OUT/diag-$NAME.log" | cut -c1-160
  if grep -q ALLOK "$OUT/diag-$NAME.log"; then CHOSEN="$*"; echo "chosen: $NAME"; break; fi
done
if ! grep -q ALLOK "$OUT"/diag-*.log; then
  timeout 100 compute-sanitizer --tool memcheck --print-limit 4 --show-backtrace no python3 "$REPO/bench/bench_attention.py" --diagnose >"$OUT/sanitizer.log" 2>&1
  grep -m12 "Invalid\|out of bounds\|at .*0x\|by thread\|Address\|diag\|ERROR SUMMARY" "$OUT/sanitizer.log" | cut -c1-200
  exit 1
fi
[ -n "$CHOSEN" ] && export $CHOSEN
env | grep MAE_FAST_FA || true
python3 "$REPO/bench/bench_attention.py" --check --out "$OUT/attention.json" 2>&1 | tee "$OUT/bench.log" | cut -c1-140
timeout "${TEST_TIMEOUT:-60}" python3 -m pytest -q -x -p no:cacheprovider "$REPO/tests/test_attention_triton.py" 2>&1 | tail -6
