#!/usr/bin/env bash
# One device round: CUDA tests, then the benchmark. Run on the GPU machine from the repo root,
# with carry/ holding `device` (the tests binary), `cuda_bench` and shared/golden/*.
# Prepare here:  crates/cuda/scripts/prepare-carry.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# CI=true: a missing fixture fails the golden tests instead of skipping them.
export FLASHMOE_SHARED=$PWD/carry/shared FLASHMOE_CACHE=/tmp/flashmoe-cache CI=true
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# cudarc dlopens libnvrtc.so / libnvrtc.so.12; CUDA 13 images ship libnvrtc.so.13.
if ! ldconfig -p | grep -q 'libnvrtc.so '; then
  lib=$(ls /usr/local/cuda/lib64/libnvrtc.so* 2>/dev/null | head -1)
  [ -z "$lib" ] && lib=$(find / -name 'libnvrtc.so*' -not -path '*/proc/*' 2>/dev/null | grep -v alt | head -1)
  mkdir -p /tmp/nvl && ln -sf "$lib" /tmp/nvl/libnvrtc.so && echo "nvrtc: $lib"
  export LD_LIBRARY_PATH=/tmp/nvl:$(dirname "$lib"):${LD_LIBRARY_PATH:-}
fi
carry/device --test-threads=1 --nocapture 2>&1 | tee "$OUT/tests.log" | grep -E "^test |test result|skipped|panicked"
echo "parallel:"; carry/device 2>&1 | tail -2
carry/cuda_bench carry/shared/golden/tiny-a/mlx-4bit --layers ${LAYERS:-8} --tokens ${TOKENS:-32} >"$OUT/bench.json" 2>"$OUT/bench.err"
echo "bench rc=$?"; tail -5 "$OUT/bench.err"; cat "$OUT/bench.json"
