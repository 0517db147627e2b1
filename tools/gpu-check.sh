#!/usr/bin/env bash
# The GPU machine's check (no GStreamer, no Rust toolchain there): run from the repository root
# with a dfwatch built here by
#   cargo build --release --no-default-features --features cuda && strip -o var/gpu/dfwatch target/release/dfwatch
# and var/photos/astronaut.png carried along. Each check has its own timeout, so one failure
# still reports the rest; everything goes to $OUT/gpu-check.txt (and the JSON beside it).
#
# So far it checks what exists: the CUDA libraries and device, NVRTC compilation of every
# kernel for the device, and the crop kernel against the CPU fused crop. The ViT-B/32 engine and
# its PyTorch baselines are not built yet.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-var/gpu/out}"
mkdir -p "$OUT"
BIN="${DFWATCH_BIN:-var/gpu/dfwatch}"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export DFWATCH_CUDA_INCLUDE="${DFWATCH_CUDA_INCLUDE:-/usr/local/cuda/include}"
report="$OUT/gpu-check.txt"
: > "$report"

check() {
  local name="$1" limit="$2"
  shift 2
  echo "=== $name" | tee -a "$report"
  timeout "$limit" "$@" >> "$report" 2>&1
  local rc=$?
  echo "--- $name: exit $rc" | tee -a "$report"
}

check "nvidia-smi" 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
check "gpu-info (JSON, kernels compiled by NVRTC)" 120 "$BIN" gpu-info --json --compile
check "crop kernel vs CPU fused crop (astronaut, 16 maps)" 120 "$BIN" gpu-info --check-crop var/photos/astronaut.png
cat "$report"
