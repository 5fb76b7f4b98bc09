#!/usr/bin/env bash
# One device call (<= 9 min wall): which tiling of the Triton flash attention passes its GPU tests?
# Every fast test id of tests/ops/test_kernels_flash_attention.py runs in its own process (an illegal memory access
# poisons only its own CUDA context), under each tiling below (pytest --attention-tiling, tests/ops/conftest.py: the
# tiling the kernel tests launch), with MAE_FAST_TRITON_UNVERIFIED=1 and
# CUDA_LAUNCH_BLOCKING=1 (a fault then surfaces at the launch of the kernel that made it). Then
# compute-sanitizer memcheck on the first 2 failing ids of the first variant with failures, in the background while
# the other variants run. Results: $OUT/triage.json (status per id per variant) and $OUT/triage-logs.tar.gz.
#
#   bash bench/triage_triton_attention.sh                       (repo root, device call)
#   TRIAGE_DRY_RUN=1 bash bench/triage_triton_attention.sh      (CPU plumbing check: 2 ids, interpreter,
#                                                                no install, no sanitizer)
# Knobs: TRIAGE_JOBS (parallel processes, 8), TRIAGE_TEST_S (per id, 150), TRIAGE_TOTAL_S (420 s from the
# start for all variants: ids not started by then are "not_run", running ones and the sanitizer are cut 45 s
# later), TRIAGE_SAN_S (per sanitizer run, 150), TRIAGE_MAX_IDS (0 = all), TRIAGE_IDS (space-separated test
# ids instead of collecting), TRIAGE_VARIANTS (names to run), TRIAGE_SANITIZE (1; 0 skips compute-sanitizer),
# TRIAGE_INSTALL (1; 0 when the caller installed the project already),
# TRIAGE_EXCLUDE (an extended regex: test ids matching it are not run).
# Device call: {"command": "timeout 560 bash bench/triage_triton_attention.sh", "timeout_s": 600}
set -u
REPO=$(pwd)
OUT=${OUT:-/tmp/triage_out}
DRY=${TRIAGE_DRY_RUN:-0}
JOBS=${TRIAGE_JOBS:-8}
TEST_S=${TRIAGE_TEST_S:-150}
TOTAL_S=${TRIAGE_TOTAL_S:-420}
SAN_S=${TRIAGE_SAN_S:-150}
MAX_IDS=${TRIAGE_MAX_IDS:-0}
TEST_FILE="$REPO/tests/ops/test_kernels_flash_attention.py"
SANITIZE=${TRIAGE_SANITIZE:-1}
if [ "$DRY" = 1 ] && [ -z "${TRIAGE_IDS:-}" ]; then MAX_IDS=${TRIAGE_MAX_IDS:-2}; fi
if [ "$DRY" = 1 ]; then TEST_S=${TRIAGE_TEST_S:-120}; SANITIZE=${TRIAGE_SANITIZE:-0}; fi

# name|pytest arguments (word-split)
ALL_VARIANTS=(
  "default|"
  "wrap|--attention-tiling=wrap"
  "equal|--attention-tiling=equal"
)
VARIANTS=()
for v in "${ALL_VARIANTS[@]}"; do
  if [ -z "${TRIAGE_VARIANTS:-}" ] || [[ " $TRIAGE_VARIANTS " == *" ${v%%|*} "* ]]; then VARIANTS+=("$v"); fi
done

WORK=$(mktemp -d /tmp/triage.XXXXXX)
LOGS=$WORK/logs
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1 MAE_FAST_TRITON_UNVERIFIED=1 CUDA_LAUNCH_BLOCKING=1
T0=$(date +%s)
HARD_END=$(( T0 + TOTAL_S + 45 ))  # nothing (test or sanitizer) runs past this

if [ "$DRY" != 1 ] && [ "${TRIAGE_INSTALL:-1}" = 1 ]; then
  timeout 120 python3 -m pip install -q --no-deps --no-build-isolation . >"$LOGS/install.log" 2>&1 \
    || { echo "install failed"; tail -5 "$LOGS/install.log"; }
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv >"$LOGS/gpu.txt" 2>&1
fi
cd /tmp

# ---- test ids ------------------------------------------------------------------------------------
if [ -n "${TRIAGE_IDS:-}" ]; then
  printf '%s\n' $TRIAGE_IDS >"$WORK/ids.txt"
else
  timeout 120 python3 -m pytest --collect-only -q -p no:cacheprovider -m "not slow" "$TEST_FILE" \
    >"$LOGS/collect.log" 2>&1
  grep "::" "$LOGS/collect.log" | sed 's/^[^:]*:://' >"$WORK/ids.txt"
fi
if [ -n "${TRIAGE_EXCLUDE:-}" ]; then grep -vE "$TRIAGE_EXCLUDE" "$WORK/ids.txt" >"$WORK/ids.tmp"; mv "$WORK/ids.tmp" "$WORK/ids.txt"; fi
if [ "$MAX_IDS" -gt 0 ]; then head -n "$MAX_IDS" "$WORK/ids.txt" >"$WORK/ids.tmp" && mv "$WORK/ids.tmp" "$WORK/ids.txt"; fi
N_IDS=$(wc -l <"$WORK/ids.txt")
echo "$N_IDS test ids x ${#VARIANTS[@]} variants, $JOBS parallel; collected at +$(( $(date +%s) - T0 ))s"
if [ "$N_IDS" -eq 0 ]; then echo "no test ids collected:"; tail -20 "$LOGS/collect.log"; fi

# ---- one id in one process -----------------------------------------------------------------------
cat >"$WORK/run_one.sh" <<'EOF'
#!/usr/bin/env bash
# run_one.sh VARIANT_DIR PYTEST_ARGS DEADLINE HARD_END TEST_S TEST_FILE IDS_FILE INDEX
dir=$1; args=$2; deadline=$3; hard_end=$4; test_s=$5; test_file=$6; ids=$7; i=$8
id=$(sed -n "${i}p" "$ids")
t=$(date +%s)
if [ "$t" -ge "$deadline" ]; then echo not_run >"$dir/$i.rc"; exit 0; fi
[ $(( hard_end - t )) -lt "$test_s" ] && test_s=$(( hard_end - t > 10 ? hard_end - t : 10 ))
timeout "$test_s" python3 -m pytest -q -x -p no:cacheprovider --tb=short $args "$test_file::$id" >"$dir/$i.log" 2>&1
rc=$?
echo "$rc $(( $(date +%s) - t ))" >"$dir/$i.rc"
EOF

SAN_PID=""
run_sanitizer() {  # $1: the variant's pytest arguments; its first 2 failing ids, one after the other
  local args=$1 bin="" cand
  for cand in "$(command -v compute-sanitizer 2>/dev/null)" "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" \
      /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer \
      "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /nonexistent)")")/compute-sanitizer"; do
    if [ -n "$cand" ] && [ -x "$cand" ]; then bin=$cand; break; fi
  done
  if [ -z "$bin" ]; then
    bin=$(timeout 20 find /usr /opt -name compute-sanitizer -type f -perm -u+x 2>/dev/null | head -1)
  fi
  echo "${bin:-none}" >"$LOGS/sanitizer/binary.txt"
  [ -z "$bin" ] && return 0
  local k=0 id
  while read -r id; do
    k=$((k + 1))
    local t=$(( HARD_END - $(date +%s) )); [ "$t" -gt "$SAN_S" ] && t=$SAN_S
    [ "$t" -lt 20 ] && break
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$t" "$bin" --tool memcheck --print-limit 12 \
      python3 -m pytest -q -x -p no:cacheprovider --tb=short $args "$TEST_FILE::$id" >"$LOGS/sanitizer/$k.log" 2>&1
    echo "$? $id" >"$LOGS/sanitizer/$k.rc"
  done <"$LOGS/sanitizer/ids.txt"
}

# ---- variants --------------------------------------------------------------------------------------
n_var=${#VARIANTS[@]}
for vi in "${!VARIANTS[@]}"; do
  v=${VARIANTS[$vi]}
  name=${v%%|*}; args=${v#*|}
  dir="$LOGS/$name"; mkdir -p "$dir"; echo "$args" >"$dir/args.txt"
  now=$(date +%s)
  left=$(( T0 + TOTAL_S - now )); [ "$left" -lt 0 ] && left=0
  deadline=$(( now + left / (n_var - vi) ))  # an even share of what is left; unused time rolls over
  seq 1 "$N_IDS" | xargs -P "$JOBS" -I{} bash "$WORK/run_one.sh" "$dir" "$args" "$deadline" "$HARD_END" "$TEST_S" \
    "$TEST_FILE" "$WORK/ids.txt" {}
  fails=$(for f in "$dir"/*.rc; do read -r rc _ <"$f"; [ "$rc" != 0 ] && [ "$rc" != not_run ] && echo x; done | wc -l)
  echo "variant $name [$args]: done at +$(( $(date +%s) - T0 ))s, $fails not passed"
  if [ "$SANITIZE" = 1 ] && [ -z "$SAN_PID" ] && [ "$fails" -gt 0 ]; then  # the first variant with failures
    mkdir -p "$LOGS/sanitizer"
    for i in $(seq 1 "$N_IDS"); do
      read -r rc _ <"$dir/$i.rc" 2>/dev/null || continue
      if [ "$rc" != 0 ] && [ "$rc" != not_run ] && [ "$rc" != 5 ]; then sed -n "${i}p" "$WORK/ids.txt"; fi
    done | head -2 >"$LOGS/sanitizer/ids.txt"
    echo "$name" >"$LOGS/sanitizer/variant.txt"
    if [ -s "$LOGS/sanitizer/ids.txt" ]; then run_sanitizer "$args" & SAN_PID=$!; fi
  fi
done
if [ -n "$SAN_PID" ]; then
  echo "waiting for compute-sanitizer (until +$(( HARD_END - T0 ))s at most)"
  wait "$SAN_PID"
fi

# ---- JSON + summary ------------------------------------------------------------------------------
python3 - "$WORK" "$OUT/triage.json" "$DRY" "$TOTAL_S" "$JOBS" <<'EOF'
import json, os, re, subprocess, sys, time

work, out_path, dry, total_s, jobs = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]), int(sys.argv[5])
logs = os.path.join(work, "logs")
ids = [l.strip() for l in open(os.path.join(work, "ids.txt")) if l.strip()]
KERNELS = ("_attn_fwd_kernel", "_bwd_delta_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")


def read(path):
    try:
        return open(path, errors="replace").read()
    except OSError:
        return ""


def classify(rc, text):
    if rc == 0:
        if re.search(r"\b\d+ passed\b", text):
            return "passed", None
        return ("skipped" if re.search(r"\b\d+ skipped\b", text) else "no_tests"), None
    if rc == 5:
        return "no_tests", None
    if rc in (124, 137):
        return "timeout", None
    low = text.lower()
    for pat, kind in (("illegal memory access", "illegal_access"), ("misaligned address", "misaligned_address"),
                      ("illegal instruction", "illegal_instruction"), ("unspecified launch failure", "launch_failure"),
                      ("outofresources", "out_of_resources"), ("out of resource", "out_of_resources"),
                      ("cuda error", "cuda_error"), ("triton error", "cuda_error")):
        if pat in low:
            return "failed", kind
    if rc in (134, 139) or rc < 0:
        return "failed", "crash"
    if "assertionerror" in low or "mismatched elements" in low:
        return "failed", "wrong_result"
    return "failed", "error"


def failure_line(text):
    m = re.findall(r"^(?:FAILED|ERROR) \S+(?: - (.*))?$", text, re.M)
    if m and m[-1]:
        return m[-1][:240]
    m = re.findall(r"^E +(.+)$", text, re.M)
    if m:
        return m[0][:240]
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    return lines[-1][:240] if lines else None


def faulting_kernel(text):
    # with CUDA_LAUNCH_BLOCKING=1 the traceback ends at the launch of the kernel that faulted
    hits = [(text.rfind(k + "["), k) for k in KERNELS]
    pos, k = max(hits)
    return k if pos >= 0 else None


result = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "dry_run": dry,
                   "jobs": jobs, "total_budget_s": total_s, "n_ids": len(ids),
                   "common_env": "MAE_FAST_TRITON_UNVERIFIED=1 CUDA_LAUNCH_BLOCKING=1"},
          "ids": ids, "variants": {}, "sanitizer": []}
try:
    import torch, triton
    result["meta"].update(torch=torch.__version__, triton=triton.__version__,
                          gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
except Exception as e:  # the summary must still come out
    result["meta"]["version_error"] = repr(e)

variant_dirs = [d for d in os.listdir(logs) if os.path.isfile(os.path.join(logs, d, "args.txt"))]
order = ["default", "wrap", "equal"]
variant_dirs.sort(key=lambda d: (order.index(d) if d in order else 99, d))
for name in variant_dirs:
    d = os.path.join(logs, name)
    per_id, counts = {}, {}
    for i, tid in enumerate(ids, 1):
        rc_txt = read(os.path.join(d, f"{i}.rc")).split()
        if not rc_txt or rc_txt[0] == "not_run":
            entry = {"status": "not_run"}
        else:
            rc, secs = int(rc_txt[0]), int(rc_txt[1]) if len(rc_txt) > 1 else None
            text = read(os.path.join(d, f"{i}.log"))
            status, kind = classify(rc, text)
            entry = {"status": status, "rc": rc, "seconds": secs}
            if status in ("failed", "timeout"):
                entry.update(kind=kind, kernel=faulting_kernel(text), message=failure_line(text))
        per_id[tid] = entry
        counts[entry["status"]] = counts.get(entry["status"], 0) + 1
        if entry.get("kind"):
            counts["failed:" + entry["kind"]] = counts.get("failed:" + entry["kind"], 0) + 1
    result["variants"][name] = {"pytest_args": read(os.path.join(d, "args.txt")).strip(), "counts": counts,
                                "results": per_id}

san_dir = os.path.join(logs, "sanitizer")
if os.path.isdir(san_dir):
    result["sanitizer_binary"] = read(os.path.join(san_dir, "binary.txt")).strip() or None
    result["sanitizer_variant"] = read(os.path.join(san_dir, "variant.txt")).strip() or None
    for k in (1, 2):
        rc_txt = read(os.path.join(san_dir, f"{k}.rc")).split(maxsplit=1)
        if not rc_txt:
            continue
        text = read(os.path.join(san_dir, f"{k}.log"))
        keep = [l.strip()[:200] for l in text.splitlines()
                if re.search(r"Invalid |out of bounds|Address 0x|by thread| at \S*0x|"
                             r"ERROR SUMMARY|Program hit|Saved host backtrace", l)]
        result["sanitizer"].append({"id": rc_txt[1].strip() if len(rc_txt) > 1 else None, "rc": int(rc_txt[0]),
                                    "n_invalid": sum("Invalid " in l for l in keep), "lines": keep[:30]})

with open(out_path, "w") as f:
    json.dump(result, f, indent=1)

# compact summary for the device call's output tail
names = list(result["variants"])
print(f"\n{'variant':26s} {'passed':>6s} {'failed':>6s} {'illegal':>7s} {'wrong':>5s} {'timeout':>7s} "
      f"{'skipped':>7s} {'not_run':>7s}")
for n in names:
    c = result["variants"][n]["counts"]
    print(f"{n:26s} {c.get('passed', 0):6d} {c.get('failed', 0):6d} {c.get('failed:illegal_access', 0):7d} "
          f"{c.get('failed:wrong_result', 0):5d} {c.get('timeout', 0):7d} {c.get('skipped', 0):7d} "
          f"{c.get('not_run', 0):7d}")
ABBR = {"passed": ".", "skipped": "s", "not_run": "-", "timeout": "T", "no_tests": "0"}
KABBR = {"illegal_access": "I", "wrong_result": "W", "misaligned_address": "M", "out_of_resources": "R",
         "crash": "C"}
bad = [t for t in ids if any(result["variants"][n]["results"][t]["status"] not in ("passed", "skipped")
                             for n in names)]
if bad:
    print("\nids not passing everywhere (. pass, I illegal access, W wrong result, M misaligned, R out of "
          "resources, C crash, E other failure, T timeout, - not run, s skipped); columns: " + " ".join(
              f"{j}={n}" for j, n in enumerate(names)))
    for t in bad:
        cells = []
        for n in names:
            e = result["variants"][n]["results"][t]
            cells.append(ABBR.get(e["status"]) or KABBR.get(e.get("kind"), "E"))
        k = next((result["variants"][n]["results"][t].get("kernel") for n in names
                  if result["variants"][n]["results"][t].get("kernel")), None)
        print(f"  {' '.join(cells)}  {t[:70]}" + (f"  ({k})" if k else ""))
for s in result["sanitizer"]:
    print(f"\nsanitizer rc={s['rc']} {s['id']}: {s['n_invalid']} invalid-access report(s)")
    for l in s["lines"][:8]:
        print("   " + l[:170])
if os.path.isdir(san_dir) and not result["sanitizer"]:
    print(f"\nsanitizer: none run (binary: {result.get('sanitizer_binary')})")
EOF

tar czf "$OUT/triage-logs.tar.gz" -C "$WORK" logs ids.txt
echo "total +$(( $(date +%s) - T0 ))s; files:"; ls -la "$OUT"
