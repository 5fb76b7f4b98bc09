#!/bin/bash
# One device call that fits a GPU session's 15 minutes of device time (machine start included), highest value
# first, every step cut so the whole call ends by GPU_SUITE_S seconds (default 570) after it starts:
#   1. the Triton attention's GPU tests in its other tilings, "wrap" (head dim 80 in one 128 tile with contiguous,
#      pipelinable loads) and "equal" (80 as three 32-column tiles: 96 columns of work instead of 128), one
#      process per test id (bench/triage_triton_attention.sh);
#   2. attention TFLOP/s against the SDPA backends at head dims 80/88/64/32/128, the default tiling and equal
#      tiles side by side, then the wrap tiling;
#   3. the end-to-end step of ViT-H/14 at 476 and 224 px, mae_fast against the reference formulation (and the
#      fused LayerNorm when its GPU tests pass);
#   the other GPU tests (model, lean, masking kernels, fused LayerNorm) run beside step 1, correctness only;
#   4. the LayerNorm / masking benchmarks and a step profile, as far as the time goes.
# A step with under 20 s left is skipped; $OUT/suite.json records every step's exit code and seconds
# (124 = cut by its time limit). At most 8 files come back from a device call: the JSONs (triage, attention,
# attention-wrap, e2e, suite) and logs.tar.gz (logs, and the masking / LayerNorm / profile JSONs).
#   device call:  {"command": "bash bench/run_gpu_suite.sh", "timeout_s": 600}
#   GPU_SUITE_DRY_RUN=1 bash bench/run_gpu_suite.sh     (any machine: prints the plan, runs nothing)
# Afterwards, on any machine: python bench/memory_estimate.py --measured <the e2e.json> checks the memory
# estimator against every eager peak of this run (no device time needed).
set -u
REPO=$(pwd)
OUT=${OUT:-/tmp/gpu_suite}
SUITE_S=${GPU_SUITE_S:-570}
DRY=${GPU_SUITE_DRY_RUN:-0}
T0=$(date +%s)
END=$(( T0 + SUITE_S ))
mkdir -p "$OUT/logs"
: >"$OUT/logs/steps.tsv"
export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=/tmp/torch_ext TORCH_CUDA_ARCH_LIST=9.0

# step NAME BUDGET_S CMD...: runs CMD (log: $OUT/logs/NAME.log) for at most BUDGET_S and never past END
step() {
  local name=$1 budget=$2; shift 2
  local left=$(( END - $(date +%s) ))
  [ "$budget" -gt "$left" ] && budget=$left
  if [ "$budget" -lt 20 ]; then
    printf '%s\tskipped\t0\t%s\n' "$name" "$budget" >>"$OUT/logs/steps.tsv"; echo "$name: skipped (${left}s left)"
    return 99
  fi
  if [ "$DRY" = 1 ]; then
    printf '%s\tdry\t0\t%s\n' "$name" "$budget" >>"$OUT/logs/steps.tsv"
    echo "$name: up to ${budget}s: $*"; END=$(( END - budget )); return 0
  fi
  local t=$(date +%s)
  timeout "$budget" "$@" >"$OUT/logs/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t ))" "$budget" >>"$OUT/logs/steps.tsv"
  echo "$name: rc=$rc in $(( $(date +%s) - t ))s (limit ${budget}s)"
  return $rc
}

step install 60 python3 -m pip install -q --no-deps --no-build-isolation .
[ "$DRY" = 1 ] || nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv \
  >"$OUT/logs/gpu.txt" 2>&1
[ "$DRY" = 1 ] || (cd /tmp && python3 -m mae_fast.info >"$OUT/logs/info.txt" 2>&1)

# 1. correctness, all at once (no timing runs beside them): the attention GPU tests in the wrap and equal tilings,
#    one process per test id (the default tiling passed them all: bench/results/gpu-tests-*.txt), the fused
#    LayerNorm's and the rest (only ids that launch the kernels at a head dim the two tilings change: not
#    power-of-two head dims, no tiling tables, dispatch, input checks or ops.attention calls, which launch the default)
WRAP_EXCLUDE='^test_(head_dim_tiles|single_tile_is|gpu_reasons|cpu_dispatch|thirdparty|bad_inputs|stride_alignment'
WRAP_EXCLUDE+='|opcheck|autocast|torch_compile|rows_whose_scores|many_key_blocks)|\[(32|64|128)-'
step attention_tests 165 env OUT="$OUT" TRIAGE_VARIANTS="wrap equal" TRIAGE_TOTAL_S=105 TRIAGE_SANITIZE=0 \
  TRIAGE_INSTALL=0 TRIAGE_JOBS=6 TRIAGE_EXCLUDE="$WRAP_EXCLUDE" \
  bash "$REPO/bench/triage_triton_attention.sh" &
(cd /tmp && step layer_norm_tests 165 python3 -m pytest "$REPO/tests/ops/test_layer_norm.py" -q -x -p no:cacheprovider) &
(cd /tmp && step gpu_tests 165 python3 -m pytest "$REPO/tests/models" "$REPO/tests/ops/test_lean.py" \
  "$REPO/tests/ops/test_kernels_masking.py" -q -p no:cacheprovider) &
wait
[ "$DRY" = 1 ] && END=$(( END - 165 ))  # the three ran side by side (in subshells, so their dry step() left END alone)
[ -f "$OUT/triage-logs.tar.gz" ] && mv "$OUT/triage-logs.tar.gz" "$OUT/logs/"

# 2. attention TFLOP/s, checked against an fp32 reference on every row; equal tiles beside the default in the same
#    run (triton:equal, rows 80/88), the wrap tiling (triton:wrap) in its own run
cd /tmp
step attention_bench 125 env MAE_FAST_TRITON_UNVERIFIED=1 python3 "$REPO/bench/bench_attention.py" --check \
  --tilings equal --only-head-dim 80 88 64 32 128 --out "$OUT/attention.json"
step attention_bench_wrap 45 env MAE_FAST_TRITON_UNVERIFIED=1 \
  python3 "$REPO/bench/bench_attention.py" --check --tilings wrap --only-head-dim 80 88 --out "$OUT/attention-wrap.json"

# 3. the end-to-end step; the fused LayerNorm only if its GPU tests passed (a fault would end that configuration's
#    process)
IMPLS="mae_fast,reference,mae_fast_lean_ckpt"
grep -qP "^layer_norm_tests\t0\t" "$OUT/logs/steps.tsv" && IMPLS="$IMPLS,mae_fast_fused_ln"
step e2e 150 python3 "$REPO/bench/e2e.py" --only mae_vit_huge_patch14:476,mae_vit_huge_patch14:224 \
  --impls "$IMPLS" --plans "$REPO/bench/results/memory-estimate-h100-shapes-2026-11-22.json" --no-hf \
  --steps 8 --warmup 3 --out "$OUT/e2e.json"

# 4. as far as the time goes
step layer_norm_bench 35 python3 "$REPO/bench/bench_layer_norm.py" --out "$OUT/logs/layer_norm.json"
step masking_bench 45 python3 "$REPO/bench/bench_masking.py" --res 476,952 --out "$OUT/logs/masking.json"
step profile 50 python3 "$REPO/bench/profile_step.py" --model mae_vit_huge_patch14 --img-size 476 --batch 24 \
  --out "$OUT/logs/profile.json"

# summary: steps as JSON, the tables people read, then pack the logs (8 files come back at most)
python3 - "$OUT" "$SUITE_S" "$DRY" <<'EOF'
import json, sys, time
out, suite_s, dry = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
steps = []
for line in open(f"{out}/logs/steps.tsv"):
    name, rc, secs, limit = line.rstrip("\n").split("\t")
    steps.append({"step": name, "rc": rc if rc in ("skipped", "dry") else int(rc), "seconds": int(secs),
                  "limit_s": int(limit)})
meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "suite_s": suite_s, "dry_run": dry}
try:
    import torch, triton
    meta.update(torch=torch.__version__, triton=triton.__version__,
                gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
except Exception as e:  # the step table must still come out
    meta["version_error"] = repr(e)
json.dump({"meta": meta, "steps": steps}, open(f"{out}/suite.json", "w"), indent=1)
print(f"\n{'step':24s} {'rc':>7s} {'s':>5s} {'limit':>5s}")
for s in steps:
    print(f"{s['step']:24s} {str(s['rc']):>7s} {s['seconds']:5d} {s['limit_s']:5d}")
EOF
if [ "$DRY" != 1 ]; then
  grep -E "^[a-z_+]+ +[0-9]+ +[0-9]+" "$OUT/logs/attention_tests.log" | head -3
  tail -12 "$OUT/logs/attention_bench.log" | cut -c1-160
  tail -6 "$OUT/logs/attention_bench_wrap.log" | cut -c1-160
  tail -14 "$OUT/logs/e2e.log" | cut -c1-200
  grep -E "passed|failed" "$OUT/logs/gpu_tests.log" "$OUT/logs/layer_norm_tests.log" | tail -3
fi
(cd "$OUT" && tar czf logs.tar.gz logs && rm -rf logs)
echo "total $(( $(date +%s) - T0 ))s"; ls "$OUT"
