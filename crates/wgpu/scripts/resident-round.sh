#!/usr/bin/env bash
# Device round of issue 19 with main's wgpu defaults (decode form r8 for one-token products,
# every kernel without forced loop bounding). One call, under 240 s:
#  1. the wgpu tests on NVIDIA's Vulkan driver: product twins, every golden fixture, the
#     conformance harness;
#  2. `flashmoe bench decode --backend wgpu` (product candidates, resident and streamed decode
#     with the default, its kernel trace);
#  3. greedy runs alternating wgpu / CUDA, 32 and 416 tokens, three rounds: decode tok/s and the
#     token md5 of each; the marginal ms per token between the two lengths (min and median over
#     rounds) is the resident-decode ratio of the issue's target (<= 1.5x CUDA).
# Carry: carry-c (crates/cuda/scripts/combined-round-prepare.sh; env.sh unpacks it) and .gl (the
# Vulkan loader).
# Part 2 of crates/cuda/scripts/combined-round.sh (carry-c/round-w.sh there). It replaces the
# product-candidates round of 09f4580 (in git history as candidates-round.sh): the bench it runs
# still times every candidate.
# TESTS: which wgpu tests (default: products golden conformance); BENCH=0 skips step 2.
# Output: $OUT/summary.txt, $OUT/bench_default.json, $OUT/logs-w.tgz.
set -uo pipefail
. $PWD/carry-c/env.sh
OUT=${OUT:-/tmp/out}; L=$R/logs; mkdir -p "$OUT" $L
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
summ() { echo "$*" | tee -a "$OUT/summary.txt"; }
pack() { (cd $L && tar czf $OUT/logs-w.tgz * 2>/dev/null); }
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
NV=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json; [ -f $NV ] && export VK_DRIVER_FILES=$NV
S=/tmp/q397
[ -d $S ] || timeout 60 $BIN/flashmoe synth --preset qwen3.5-397b-a17b --layers 4 --experts 64 --out $S --force > $L/synth.log 2>&1
for t in ${TESTS:-products golden conformance}; do
  [ "$(el)" -gt 150 ] && { summ "wgpu $t skipped (time)"; continue; }
  timeout 60 $BIN/wgpu_$t --test-threads=1 > $L/wgpu_$t.log 2>&1; summ "wgpu $t rc=$? ($(el) s)"
  grep -E "test result|FAILED|panicked" $L/wgpu_$t.log | head -3 | tee -a "$OUT/summary.txt"
done
# The CLI's wgpu tests (run, chat, serve, logits, generate, bench): they run the binary at
# the path it was built at, so this checkout's binary goes there.
if [ "${CLI:-1}" != 0 ] && [ -f $BIN/wgpu_cli ]; then
  p=$(cat $BIN/flashmoe.path); mkdir -p "$(dirname "$p")"; [ -e "$p" ] || ln -s $BIN/flashmoe "$p"
  timeout 90 $BIN/wgpu_cli --test-threads=1 > $L/wgpu_cli.log 2>&1; summ "wgpu cli rc=$? ($(el) s)"
  grep -E "test result|FAILED|panicked" $L/wgpu_cli.log | head -3 | tee -a "$OUT/summary.txt"
fi
pack
run() { # backend, tokens
  local ids rc tps
  ids=$(timeout 30 $BIN/flashmoe run --backend $1 --model $S --ids 1 --tokens $2 --timing 2>$L/run_$1_$2_$3.err); rc=$?
  tps=$(sed -n 's/^decode: \([0-9.]*\) tok\/s.*/\1/p' $L/run_$1_$2_$3.err | tail -1)
  summ "run $1 $2 round $3 rc=$rc decode_tok_s=${tps:-none} tokens=$(echo "$ids" | tr ',' '\n' | grep -c .) md5=$(echo "$ids" | md5sum | cut -c1-8) ($(el) s)"
}
for r in 1 2 3; do
  [ "$(el)" -gt 170 ] && { summ "greedy round $r skipped (time)"; continue; }
  for n in 32 416; do run wgpu $n $r; run cuda $n $r; done
done
python3 - $OUT/summary.txt <<'PY' | tee -a $OUT/summary.txt
import re, sys, statistics as st
runs = {}
for l in open(sys.argv[1]):
    m = re.match(r"run (\w+) (\d+) round (\d+) rc=0 decode_tok_s=([0-9.]+) tokens=(\d+)", l)
    if m: runs[(m[1], int(m[2]), m[3])] = (int(m[5]), float(m[4]))
marg = {}
for (b, n, r), (t, tps) in runs.items():
    if n != 416 or (b, 32, r) not in runs: continue
    t1, s1 = runs[(b, 32, r)]
    marg.setdefault(b, []).append((t / tps - t1 / s1) * 1e3 / (t - t1))
for b, v in marg.items():
    print(f"marginal {b}: ms/token min {min(v):.3f} median {st.median(v):.3f} over {len(v)} rounds {['%.3f' % x for x in v]}")
if "wgpu" in marg and "cuda" in marg:
    print(f"ratio wgpu/cuda: min/min {min(marg['wgpu']) / min(marg['cuda']):.2f}, median/median {st.median(marg['wgpu']) / st.median(marg['cuda']):.2f}")
PY
pack
BENCH="--model $S --json --no-cold --no-compare --constrained-rounds 0 --tokens 16 --backend wgpu"
[ "${BENCH:-1}" != 0 ] && [ "$(el)" -lt 190 ] && { timeout $(( 235 - $(el) )) $BIN/flashmoe bench decode $BENCH > $OUT/bench_default.json 2> $L/bench_default.err
  summ "bench default rc=$? ($(el) s)"; }
[ "${BENCH:-1}" != 0 ] && python3 - "$OUT/bench_default.json" <<'PY' 2>&1 | tee -a $OUT/summary.txt
import json, sys
w = json.load(open(sys.argv[1]))["wgpu"]
dr = w["decode_resident"]
print(f"resident default ({w['products']}): {dr['ms_per_token']:.3f} ms/token, traced sum {dr['kernel_trace'].get('sum_us')} us span {dr['kernel_trace'].get('span_us')} us")
lt = dr.get("lean_kernels_toggled", {})
print(f"resident lean={lt.get('lean_kernels')}: {lt.get('ms_per_token', 0):.3f} ms/token")
ks = sorted(dr["kernel_trace"].get("kernels", []), key=lambda k: -k.get("total_us", 0))[:8]
print("trace: " + ", ".join(f"{k.get('kernel')} {k.get('total_us', 0):.0f}us/{k.get('launches')}" for k in ks))
for k in w["kernels"]:
    if k.get("default"): print(f"default product {k['shape']}: {k['gpu_us']:.1f} us {k.get('gpu_weight_gbps', 0):.0f} GB/s")
d = w["decode"]
print(f"copy {w['device_copy_gbps']:.0f} GB/s, upload {w['upload_gbps']:.2f} GB/s; streamed from host ({d['pipeline']}): {d['ms_per_token']:.2f} ms/token, bound {d['bound_ms']:.2f}, ratio {d['time_over_bound_ratio']:.3f}, serial {d.get('serial_ms_per_token', 0):.2f} ms")
PY
summ "== wgpu done ($(el) s)"
pack
