#!/usr/bin/env bash
# cuda-gemm device round: GEMM twin test + backend suite (conformance, golden, sessions) in
# parallel, then cuda_bench --core-path at 512 tokens alone. Logs into $OUT/logs.tgz.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/flashmoe-cache /tmp/cg /tmp/cc
C=$PWD/carry-cuda-gemm
L=/tmp/cg/logs; mkdir -p $L
(cd /tmp/cg && tar xzf $C/bins.tgz && tar xzf $C/tiny.tgz && tar xzf $C/shared.tgz)
for f in $C/kernels-*.ptx.gz; do b=$(basename $f .gz); gunzip -c $f > /tmp/flashmoe-cache/$b; done
export FLASHMOE_CACHE=/tmp/flashmoe-cache CUDA_CACHE_PATH=/tmp/cc CUDA_CACHE_MAXSIZE=4294967296
export FLASHMOE_SHARED=/tmp/cg/shared CI=true
if ! ldconfig -p | grep -q 'libnvrtc.so '; then
  lib=$(ls /usr/local/cuda/lib64/libnvrtc.so* 2>/dev/null | head -1)
  [ -z "$lib" ] && lib=$(find / -name 'libnvrtc.so*' -not -path '/proc/*' 2>/dev/null | grep -v alt | head -1)
  mkdir -p /tmp/nvl && ln -sf "$lib" /tmp/nvl/libnvrtc.so
  export LD_LIBRARY_PATH=/tmp/nvl:$(dirname "$lib"):${LD_LIBRARY_PATH:-}
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $L/gpu.txt
T0=$SECONDS
# Warm the driver's JIT cache once (both test binaries then load the cubin from it).
timeout 60 /tmp/cg/gemm --test-threads=1 --nocapture gemm_matches_mm_twin_cuda > $L/gemm1.log 2>&1; echo "gemm twin rc=$? t=$((SECONDS-T0))" | tee -a $L/rc.txt
( timeout 100 /tmp/cg/gemm --test-threads=1 --nocapture gemm_expert_table > $L/gemm2.log 2>&1; echo "gemm table rc=$? t=$((SECONDS-T0))" >> $L/rc.txt ) &
( timeout 100 /tmp/cg/backend --test-threads=2 --nocapture > $L/backend.log 2>&1; echo "backend rc=$? t=$((SECONDS-T0))" >> $L/rc.txt ) &
wait
cat $L/rc.txt
timeout 130 /tmp/cg/cuda_bench /tmp/cg/mlx-4bit --layers 8 --tokens 16 --no-kernels --prefill-tokens 512 --core-path --vram-only > $L/bench_p512.json 2> $L/bench_p512.err; echo "bench rc=$? t=$((SECONDS-T0))" | tee -a $L/rc.txt
cp $L/bench_p512.json $OUT/ 2>/dev/null
tar czf $OUT/logs.tgz -C /tmp/cg logs
tail -5 $L/gemm1.log; grep -E "test result|FAILED|panicked" $L/*.log | head -20
