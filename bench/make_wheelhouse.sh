#!/bin/bash
# Fill bench/wheelhouse/ (gitignored) with the wheels bench/gpu_plan.py installs on a GPU machine that has no
# network: torchao (precision: fp8) and, with --fa4, flash-attn-4 with its CuTe-DSL runtime. The device call carries
# the folder (carry=["bench/wheelhouse"]), and a call's whole working tree must stay under 64 MiB, so the folder is
# kept under WHEELHOUSE_MIB (55).
#
# Sizes as downloaded for CPython 3.12 / manylinux x86_64 (the GPU image's python): torchao 0.18.0 3.4 MB;
# flash-attn-4 4.0.0b40 0.6 MB + quack-kernels 0.7 + apache-tvm-ffi 3.3 + torch-c-dlpack-ext 0.9 +
# nvidia-cutlass-dsl 4.8.1 (0.01, a meta package) + -libs-core 1.6 + -libs-base 3.1 + -libs-cu13 92 MB (the MLIR
# compiler, 237 MB unpacked; xz -9 would still leave about 60 MB). flash-attn-4 therefore does NOT fit one device
# call: --fa4 downloads the set and refuses to leave it over the limit (the plan then reports flash_attn_4 as not
# installed). Only torchao goes by default.
#
#   bash bench/make_wheelhouse.sh            # torchao
#   bash bench/make_wheelhouse.sh --fa4      # + flash-attn-4 if it fits (it does not, with cutlass-dsl 4.8.1)
set -eu
REPO=$(cd "$(dirname "$0")/.." && pwd)
DEST=${WHEELHOUSE:-$REPO/bench/wheelhouse}
LIMIT_MIB=${WHEELHOUSE_MIB:-55}
PY=${PYTHON:-python3}
PLATFORM="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
  --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform any"
TORCHAO=(torchao==0.18.0)  # ABI-stable against torch 2.11+ (the GPU image has 2.11)
FA4=(flash-attn-4==4.0.0b40 quack-kernels==0.6.5 "apache-tvm-ffi==0.1.15.post2" torch-c-dlpack-ext==0.1.5
     nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
     nvidia-cutlass-dsl-libs-cu13==4.8.1)
mkdir -p "$DEST"
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps $PLATFORM -d "$DEST" "${TORCHAO[@]}"
if [ "${1:-}" = "--fa4" ]; then
  TMP=$(mktemp -d)
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --no-deps --pre $PLATFORM -d "$TMP" "${FA4[@]}"
  fa4=$(du -sm "$TMP" | cut -f1); have=$(du -sm "$DEST" | cut -f1)
  if [ $(( fa4 + have )) -gt "$LIMIT_MIB" ]; then
    echo "flash-attn-4 and its runtime take ${fa4} MiB (+${have} MiB already here): over ${LIMIT_MIB} MiB, left out"
    du -sm "$TMP"/* | sort -n | tail -3
  else
    mv "$TMP"/*.whl "$DEST"/
  fi
  rm -rf "$TMP"
fi
du -sm "$DEST"; ls "$DEST"
