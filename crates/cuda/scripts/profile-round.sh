#!/usr/bin/env bash
# Kernel profile on the GPU machine (Nsight Compute, clocks left alone): per-kernel times of a
# VRAM-resident decode of the synthetic 397B-shape model, and the full section set on chosen
# launches. Prepare carry/ here with prepare-carry.sh; run from the repo root there.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export FLASHMOE_SHARED=$PWD/carry/shared FLASHMOE_CACHE=/tmp/flashmoe-cache
if ! ldconfig -p | grep -q 'libnvrtc.so '; then
  lib=$(ls /usr/local/cuda/lib64/libnvrtc.so* 2>/dev/null | head -1)
  mkdir -p /tmp/nvl && ln -sf "$lib" /tmp/nvl/libnvrtc.so
  export LD_LIBRARY_PATH=/tmp/nvl:$(dirname "$lib"):${LD_LIBRARY_PATH:-}
fi
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: $NCU"
M=carry/shared/golden/tiny-a/mlx-4bit
B="carry/cuda_bench $M --layers ${LAYERS:-8}"
# Warm the NVRTC cache outside the profiler.
$B --no-kernels --vram-only --tokens 2 >"$OUT/plain.json" 2>"$OUT/plain.err"; echo "plain rc=$?"
grep -E '"ms_per_token"|gpu_compute|time_over' "$OUT/plain.json"
$NCU --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv --page raw \
  $B --no-kernels --vram-only --tokens 3 >"$OUT/decode.csv" 2>"$OUT/decode.err"; echo "ncu decode rc=$?"
for spec in ${SPECS:-}; do
  k=${spec%%@*}; skip=${spec##*@}
  $NCU --clock-control none --cache-control none --set full -k "regex:^${k}\$" --launch-skip "$skip" --launch-count 1 \
    $B --no-kernels --vram-only --tokens 2 >"$OUT/full-$k-$skip.txt" 2>&1; echo "ncu $k rc=$?"
done
