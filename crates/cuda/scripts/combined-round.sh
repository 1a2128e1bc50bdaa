#!/usr/bin/env bash
# Combined device round (one call, < 600 s). Part 1, issue 18: main's CUDA tests (conformance,
# golden, sessions, GEMM twins, prompt mixers; device tests), then the A/B: before = 86c3e95 (the
# old loop, with --core-path), after = main (Model<Cuda>), cuda_bench alternating, and
# `flashmoe bench decode --backend cuda` (disk mode included) after/before on a 4-layer
# 397B-shaped packed model. Part 2, issue 19: round-w.sh (wgpu product candidates, the pick,
# tests on NVIDIA's Vulkan driver, greedy runs beside CUDA).
set -uo pipefail
C=$PWD/carry-c
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/flashmoe-cache /tmp/logs; L=/tmp/logs
LIM=${LIM:-580}; P1=$(( LIM * 45 / 100 )); T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
summ() { echo "$*" | tee -a "$OUT/summary.txt"; }
pack() { (cd $L && tar czf $OUT/logs.tgz * 2>/dev/null); }
R=/tmp/r; mkdir -p $R; (cd $R && { tar xJf $C/bins.txz 2>/dev/null || python3 -c "import tarfile; tarfile.open('$C/bins.txz','r:xz').extractall('.')"; }; tar xzf $C/shared.tgz)
for f in $C/cache/*.gz; do gunzip -c "$f" > /tmp/flashmoe-cache/$(basename "$f" .gz); done
export FLASHMOE_CACHE=/tmp/flashmoe-cache CI=true
if ! ldconfig -p | grep -q 'libnvrtc.so '; then
  lib=$(ls /usr/local/cuda/lib64/libnvrtc.so* 2>/dev/null | head -1)
  [ -z "$lib" ] && lib=$(find / -name 'libnvrtc.so*' -not -path '/proc/*' 2>/dev/null | grep -v alt | head -1)
  mkdir -p /tmp/nvl && ln -sf "$lib" /tmp/nvl/libnvrtc.so
  export LD_LIBRARY_PATH=/tmp/nvl:$(dirname "$lib"):${LD_LIBRARY_PATH:-}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a $OUT/summary.txt
nproc | sed 's/^/cpus /' | tee -a $OUT/summary.txt; grep -o -m1 'avx512f' /proc/cpuinfo | tee -a $OUT/summary.txt
BIN=$R/bin
export FLASHMOE_SHARED=$R
summ "== cuda backend tests ($(el) s)"
timeout 90 $BIN/cuda_backend --test-threads=1 > $L/cuda_backend.log 2>&1; summ "rc=$?"
grep -E "test result|FAILED|panicked" $L/cuda_backend.log | tail -8 | tee -a "$OUT/summary.txt"
summ "== cuda device tests ($(el) s)"
timeout 60 $BIN/cuda_device --test-threads=1 > $L/cuda_device.log 2>&1; summ "rc=$?"
grep -E "test result|FAILED|panicked" $L/cuda_device.log | tail -8 | tee -a "$OUT/summary.txt"
pack
M=$R/golden/tiny-a/mlx-4bit
A="--layers 8 --tokens 16 --prefill-tokens 512 --no-kernels --core-path"
ab() { for w in before after; do
  [ "$(el)" -gt $P1 ] && { summ "$w $1 skipped (time)"; continue; }
  b=$BIN/cuda_bench; [ $w = before ] && b=$BIN/bench_before
  timeout 60 $b $M $A > $L/bench_${w}_$1.json 2> $L/bench_${w}_$1.err; summ "$w $1 rc=$? ($(el) s)"
done; }
ab 1; pack
S=/tmp/q397; timeout 60 $BIN/flashmoe synth --preset qwen3.5-397b-a17b --layers 4 --experts 64 --out $S --force > $L/synth.log 2>&1; summ "synth rc=$? ($(el) s)"
for w in after before after before; do
  [ "$(el)" -gt $(( P1 + 30 )) ] && { summ "cli $w skipped (time)"; continue; }
  f=$BIN/flashmoe; [ $w = before ] && f=$BIN/flashmoe_before
  n=$(ls $L/cli_${w}_*.json 2>/dev/null | wc -l)
  timeout 45 $f bench decode --backend cuda --model $S --json --tokens 16 --no-compare --constrained-rounds 0 > $L/cli_${w}_$n.json 2> $L/cli_${w}_$n.err; summ "cli $w rc=$? ($(el) s)"
done
[ "$(el)" -lt $(( P1 - 10 )) ] && ab 2
pack
summ "== part 2: wgpu ($(el) s)"
timeout $(( LIM - $(el) )) bash $C/round-w.sh
summ "== done ($(el) s)"
pack
