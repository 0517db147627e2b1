#!/usr/bin/env bash
# The one check for a GPU machine (NVIDIA driver, CUDA 13 libraries in /usr/local/cuda/lib64,
# Python 3 with numpy and onnx, torch optional; no Rust, GStreamer, safetensors package or
# internet needed). Run from the repository root with the stripped cuda build carried:
#
#   cargo build --release --no-default-features --features cuda
#   strip -o var/gpu/dfwatch target/release/dfwatch        # about 20 MB; carry var/gpu
#   OUT=/some/dir tools/gpu-check.sh
#
# Steps, each with its own timeout so one failure still reports the rest:
#   1. the device (nvidia-smi) and `dfwatch gpu-info --compile` (NVRTC for this device);
#   2. the full-size synthetic ViT-B/32 bundle made here from its seed (tools/model.py synth);
#   3. `dfwatch gpu-check`: every kernel against its CPU twin, the crop kernel, the engine
#      against its fp16 CPU emulation (first block that parts on failure), speed per bucket;
#   4. `dfwatch bench gpu`: the daemon's GPU path (upload, crop into the batch, encode) against
#      its CPU twin, crop faces/s against the memory-bandwidth bound, encoder per bucket,
#      simulated 1080p30 streams;
#   5. tools/torch_baseline.py: the engine's embeddings against the PyTorch tower, and the
#      PyTorch baselines (OpenAI-CLIP tower and torchvision vit_b_32, fp16, eager and CUDA
#      graph) with the ratios the targets name.
# Everything goes to $OUT (gpu-check.txt, engine/report.json, bench-gpu.json, torch.json). Without a GPU it
# stops at once with exit status 3.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-var/gpu/out}"
mkdir -p "$OUT"
BIN="${DFWATCH_BIN:-var/gpu/dfwatch}"
WORK="${WORK:-$(mktemp -d)}"
PY="${PYTHON:-python3}"
report="$OUT/gpu-check.txt"
: > "$report"

if ! command -v nvidia-smi > /dev/null 2>&1 || ! nvidia-smi -L > /dev/null 2>&1; then
  echo "gpu-check: no NVIDIA GPU on this machine (nvidia-smi -L fails): nothing to check" | tee -a "$report" >&2
  exit 3
fi
if [ ! -x "$BIN" ]; then
  echo "gpu-check: $BIN is not an executable dfwatch (build it with --features cuda, see the header)" | tee -a "$report" >&2
  exit 2
fi

# CUDA libraries, then NVRTC and its headers wherever this machine has them (the CUDA
# toolkit, or the nvidia-* wheels PyTorch brought).
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
site=$("$PY" -c 'import site; print(" ".join(site.getsitepackages()))' 2> /dev/null || true)
if [ -z "${DFWATCH_CUDA_INCLUDE:-}" ]; then
  for d in /usr/local/cuda/include $(for s in $site; do ls -d "$s"/nvidia/*/include 2> /dev/null; done); do
    if [ -f "$d/cuda_fp16.h" ]; then export DFWATCH_CUDA_INCLUDE="$d"; break; fi
  done
fi
if ! ls /usr/local/cuda/lib64/libnvrtc.so* > /dev/null 2>&1; then
  for s in $site; do
    lib=$(ls -d "$s"/nvidia/*/lib/libnvrtc.so* 2> /dev/null | head -n 1)
    if [ -n "$lib" ]; then export LD_LIBRARY_PATH="$(dirname "$lib"):$LD_LIBRARY_PATH"; break; fi
  done
fi
echo "headers: ${DFWATCH_CUDA_INCLUDE:-none found}; LD_LIBRARY_PATH=$LD_LIBRARY_PATH" | tee -a "$report"

check() {
  local name="$1" limit="$2"
  shift 2
  echo "=== $name ($(date -u +%T))" | tee -a "$report"
  local t0=$SECONDS
  timeout "$limit" "$@" >> "$report" 2>&1
  local rc=$?
  echo "--- $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$report"
  return $rc
}

fails=0
check "nvidia-smi" 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
check "gpu-info (NVRTC compiles every kernel for this device)" 120 "$BIN" gpu-info --json --compile || fails=$((fails + 1))
if [ -f var/photos/astronaut.png ]; then
  check "crop kernel vs CPU fused crop (astronaut, 16 maps)" 60 "$BIN" gpu-info --check-crop var/photos/astronaut.png || fails=$((fails + 1))
fi
bundle="$WORK/vitb32-synth"
if [ ! -f "$bundle/manifest.toml" ]; then
  check "full-size synthetic ViT-B/32 from seed 1" 240 "$PY" tools/model.py synth --arch vit-b-32 --labels ffpp --seed 1 --out "$bundle" || fails=$((fails + 1))
fi
check "dfwatch gpu-check (kernels, engine vs CPU twin, speed)" 240 "$BIN" gpu-check --model "$bundle" --out "$OUT/engine" || fails=$((fails + 1))
check "dfwatch bench gpu (the daemon's GPU path: crop, encoder buckets, batch-1 latency, memory, simulated streams)" 240 \
  "$BIN" bench gpu --model "$bundle" --json "$OUT/bench-gpu.json" || fails=$((fails + 1))
check "PyTorch baselines and the engine's embeddings against the PyTorch tower" 240 \
  "$PY" tools/torch_baseline.py --model "$bundle" --inputs "$OUT/engine/inputs.f32" \
  --embeddings "$OUT/engine/embeddings.f32" --engine-report "$OUT/engine/report.json" --out "$OUT/torch.json" \
  || fails=$((fails + 1))
tail -n 60 "$report"
echo "gpu-check: $fails step(s) failed; report in $OUT" | tee -a "$report"
[ "$fails" -eq 0 ]
