#!/usr/bin/env bash
# The wgpu speed round on the device (issue 19): the issue's three targets from one run: bench
# decode --backend wgpu (matvec ratios, resident decode and its GPU trace) on a 397B-shaped
# synth model, greedy runs on wgpu and cuda (32 and 160 tokens: marginal ms/token), then the
# wgpu tests on NVIDIA's Vulkan driver. Everything into $OUT.
# Carry folder carry-wgpu-speed/ (and .gl): bins2.tgz (stripped flashmoe built with
# --features cuda,wgpu, and the wgpu_{router,trace,conformance,golden} test binaries),
# shared.tgz (the golden/ fixtures), cache/kernels-sm_90-*.ptx.gz (cuda_bench --ptx-only), this
# script; run: bash carry-wgpu-speed/speed-round.sh (about 40 s without the tests: TESTS=0).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; W=/tmp/wsp2; L=$W/logs; mkdir -p $L /tmp/wsp2-cache
C=$PWD/carry-wgpu-speed; T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
exec > >(tee -a $L/round.log) 2>&1
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
NV=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json; [ -f $NV ] && export VK_DRIVER_FILES=$NV
mkdir -p $W/b && tar xzf $C/bins2.tgz -C $W/b && tar xzf $C/shared.tgz -C $W
for f in $C/cache/*.gz; do gunzip -c "$f" > /tmp/wsp2-cache/$(basename "$f" .gz); done
export FLASHMOE_CACHE=/tmp/wsp2-cache FLASHMOE_SHARED=$W CI=true
if ! ldconfig -p | grep -q 'libnvrtc.so '; then
  lib=$(ls /usr/local/cuda/lib64/libnvrtc.so* 2>/dev/null | head -1)
  [ -z "$lib" ] && lib=$(find / -name 'libnvrtc.so*' -not -path '/proc/*' 2>/dev/null | grep -v alt | head -1)
  mkdir -p /tmp/nvl && ln -sf "$lib" /tmp/nvl/libnvrtc.so
  export LD_LIBRARY_PATH=/tmp/nvl:$(dirname "$lib"):${LD_LIBRARY_PATH:-}
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
B=$W/b; M=$W/m397
timeout 60 $B/flashmoe synth --preset qwen3.5-397b-a17b --layers 4 --experts 64 --out $M --force 2>&1 | tail -1
echo "synth $(el) s"
# SM and memory clocks and P-state while the wgpu bench and the greedy runs go (does the
# Vulkan workload boost the GPU as CUDA's does?).
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,pstate,utilization.gpu,power.draw --format=csv -lms 250 > $L/clocks.csv 2>&1 &
SMI=$!
timeout 100 $B/flashmoe bench decode --model $M --json --no-cold --no-compare --constrained-rounds 0 --tokens 16 --backend wgpu > $OUT/bench_wgpu.json 2> $L/bench_wgpu.err
echo "bench wgpu rc=$? $(el) s"; grep -A40 "one resident decode token" $L/bench_wgpu.err | head -42
for b in wgpu cuda; do for n in 32 160; do
  s=$(date +%s%N)
  ids=$(timeout 60 $B/flashmoe run --backend $b --model $M --ids 1 --tokens $n --timing 2>$L/run_${b}_$n.err); rc=$?
  e=$(date +%s%N); echo "$ids" > $L/run_${b}_$n.ids
  tps=$(sed -n 's/^decode: \([0-9.]*\) tok\/s.*/\1/p' $L/run_${b}_$n.err | tail -1)
  echo "run $b $n rc=$rc wall_ms=$(( (e - s) / 1000000 )) decode_tok_s=${tps:-none} tokens=$(echo "$ids" | tr ',' '\n' | grep -c .) md5=$(echo "$ids" | md5sum | cut -c1-8) ($(el) s)" | tee -a $OUT/runs.txt
done; done
kill $SMI 2>/dev/null
sort -t, -k2 -n $L/clocks.csv | awk -F, 'NR>1{print $2,$3,$4}' | sort | uniq -c | sort -rn | head -8
# TESTS=0 skips the tests on the device (~40 s; lavapipe runs them in CI).
for t in router trace conformance golden; do
  [ "${TESTS:-1}" = 1 ] || { echo "test $t skipped (TESTS=0)"; continue; }
  [ "$(el)" -gt 200 ] && { echo "test $t skipped (time)"; continue; }
  timeout 50 $B/wgpu_$t --test-threads=1 > $L/wgpu_$t.log 2>&1; echo "wgpu $t rc=$? ($(el) s)"
  grep -E "test result|FAILED|panicked" $L/wgpu_$t.log | head -3
done
tar czf $OUT/logs.tgz -C $W logs
echo "done $(el) s"
