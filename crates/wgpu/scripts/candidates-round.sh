#!/usr/bin/env bash
# Device round of branch wgpu-product (issue 19: the one-token affine products on the H100's
# Vulkan driver). One call, under 240 s:
#  1. `flashmoe bench decode --backend wgpu` with the default products: every product candidate
#     (plain fast.wgsl, `_lean` = no forced loop bounding, the decode form fast_dec.wgsl `_d1`
#     / `_d2`, each at several widths and rows) GPU-timed at 4096x4096, 16384x4096,
#     248320x4096, and the resident decode with the default;
#  2. the wgpu tests on NVIDIA's driver: products twins (every form against the per-thread
#     kernel at f32 rounding), the conformance harness (every form), the 4-bit golden
#     fixture (default, fast, decode form lean);
#  3. the fastest candidate by GPU time (mean ratio to the default over the three shapes)
#     through FLASHMOE_WGPU_FAST: the bench's resident decode and kernel trace with it; then
#     greedy runs of 32 and 160 tokens (tok/s, token md5) with the default, CUDA, the pick
#     (also with every kernel lean, FLASHMOE_WGPU_LEAN=1), `r2_lg32_wg256_sg_d2_lean`, and the
#     default products with every kernel lean. The bench's resident decode also reports the
#     same decode with every kernel's loop bounding toggled (lean_kernels_toggled).
# Carry: carry-c (bins.txz: bin/{flashmoe,wgpu_conformance,wgpu_products,
# wgpu_golden}; shared-mini.tgz: golden/tiny-a's 4-bit fixture; cache/: the sm_90 PTX of
# main's kernels.cu for --backend cuda; this script) and .gl (the Vulkan loader).
# Part 2 of crates/cuda/scripts/combined-round.sh (carry-c/round-w.sh there).
# Built from branch wgpu-product at 2613fc0 (README-only commits after it).
# Output: $OUT/summary.txt, $OUT/bench_default.json (and bench_best.json), $OUT/logs.tgz.
set -uo pipefail
C=$PWD/carry-c
OUT=${OUT:-/tmp/out}; R=/tmp/wp; L=$R/logs; mkdir -p "$OUT" $L /tmp/wp-cache
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
summ() { echo "$*" | tee -a "$OUT/summary.txt"; }
pack() { (cd $L && tar czf $OUT/logs-w.tgz * 2>/dev/null); }
(cd $R && { tar xJf $C/bins.txz 2>/dev/null || python3 -c "import tarfile; tarfile.open('$C/bins.txz','r:xz').extractall('.')"; }; tar xzf $C/shared.tgz)
for f in $C/cache/*.gz; do gunzip -c "$f" > /tmp/wp-cache/$(basename "$f" .gz); done
export FLASHMOE_CACHE=/tmp/wp-cache CI=true FLASHMOE_SHARED=$R
if ! ldconfig -p | grep -q 'libnvrtc.so '; then
  lib=$(ls /usr/local/cuda/lib64/libnvrtc.so* 2>/dev/null | head -1)
  [ -z "$lib" ] && lib=$(find / -name 'libnvrtc.so*' -not -path '/proc/*' 2>/dev/null | grep -v alt | head -1)
  [ -n "$lib" ] && { mkdir -p /tmp/nvl && ln -sf "$lib" /tmp/nvl/libnvrtc.so
    export LD_LIBRARY_PATH=/tmp/nvl:$(dirname "$lib"):${LD_LIBRARY_PATH:-}; }
fi
for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig
NV=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json; [ -f $NV ] && export VK_DRIVER_FILES=$NV
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a $OUT/summary.txt
BIN=$R/bin; S=/tmp/q397
[ -d $S ] || timeout 60 $BIN/flashmoe synth --preset qwen3.5-397b-a17b --layers 4 --experts 64 --out $S --force > $L/synth.log 2>&1
summ "synth rc=$? ($(el) s)"
# Correctness of every form on NVIDIA's driver.
for t in products golden conformance; do
  [ "$(el)" -gt 170 ] && { summ "wgpu $t skipped (time)"; continue; }
  f=  # every test (golden: every fixture)
  timeout 60 $BIN/wgpu_$t $f --test-threads=1 > $L/wgpu_$t.log 2>&1; summ "wgpu $t rc=$? ($(el) s)"
  grep -E "test result|FAILED|panicked" $L/wgpu_$t.log | head -3 | tee -a "$OUT/summary.txt"
done
# SM/memory clocks and P-state during the benches (does the Vulkan work boost the card?).
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,pstate,utilization.gpu --format=csv -lms 500 > $L/clocks.csv 2>&1 &
SMI=$!
BENCH="--model $S --json --no-cold --no-compare --constrained-rounds 0 --tokens 16 --backend wgpu"
timeout 150 $BIN/flashmoe bench decode $BENCH > $OUT/bench_default.json 2> $L/bench_default.err
summ "bench default rc=$? ($(el) s)"
pack
# Per shape: the default, the best of each family by GPU time; then the pick.
python3 - "$OUT/bench_default.json" > $L/pick.txt 2> $L/pick.err <<'EOF'
import json, sys
w = json.load(open(sys.argv[1]))["wgpu"]
ks = [k for k in w["kernels"] if k.get("gpu_us")]
def fam(k):
    s = k.get("spec") or k["products"]
    return ("decode" if "_d" in s else "plain") + ("_lean" if s.endswith("_lean") else "")
shapes = sorted({tuple(k["shape"]) for k in ks})
default = {tuple(k["shape"]): k["gpu_us"] for k in ks if k["default"]}
for sh in shapes:
    row = [k for k in ks if tuple(k["shape"]) == sh]
    out = [f"{sh[0]}x{sh[1]}: default {default[sh]:.1f} us"]
    for f in ["plain", "plain_lean", "decode", "decode_lean"]:
        c = [k for k in row if fam(k) == f and k.get("spec")]
        if c:
            b = min(c, key=lambda k: k["gpu_us"])
            out.append(f"{f} {b['gpu_us']:.1f} us ({b['spec']}, {b['gpu_weight_gbps']:.0f} GB/s)")
    print("shape " + "; ".join(out))
specs = {k["spec"] for k in ks if k.get("spec")}
def score(s):
    r = [k["gpu_us"] / default[tuple(k["shape"])] for k in ks if k.get("spec") == s]
    return sum(r) / len(r) if len(r) == len(shapes) else 9e9
for s in sorted(specs, key=score)[:6]:
    print(f"top {s}: mean gpu time / default {score(s):.3f}")
if specs:
    best = min(specs, key=score)
    print(f"pick {best} mean gpu time / default {score(best):.3f}")
dr = w["decode_resident"]
print(f"resident default ({w['products']}): {dr['ms_per_token']:.3f} ms/token, traced token sum {dr['kernel_trace'].get('sum_us')} us span {dr['kernel_trace'].get('span_us')} us")
lt = dr.get("lean_kernels_toggled", {})
print(f"resident every kernel lean={lt.get('lean_kernels')}: {lt.get('ms_per_token', 0):.3f} ms/token, traced token sum {lt.get('kernel_trace', {}).get('sum_us')} us span {lt.get('kernel_trace', {}).get('span_us')} us")
for name, tr in [("default", dr["kernel_trace"]), ("lean-all", lt.get("kernel_trace", {}))]:
    ks2 = sorted(tr.get("kernels", []), key=lambda k: -k.get("total_us", 0))[:8]
    print(f"trace {name}: " + ", ".join(f"{k.get('kernel')} {k.get('total_us', 0):.0f}us/{k.get('launches')}" for k in ks2))
print(f"copy {w['device_copy_gbps']:.0f} GB/s (timestamps {w.get('device_copy_gbps_timestamps')})")
EOF
cat $L/pick.txt | tee -a $OUT/summary.txt
BEST=$(sed -n 's/^pick \([^ ]*\) .*/\1/p' $L/pick.txt)
[ -z "$BEST" ] && summ "no pick (python3 or bench failed; see pick.err)"
# Greedy runs: default, CUDA, the pick and two fixed candidates (tok/s, same tokens?).
run() { # name, backend, FLASHMOE_WGPU_FAST or empty, tokens (LEAN=1: every kernel lean)
  local ids rc tps
  ids=$(env ${3:+FLASHMOE_WGPU_FAST=$3} FLASHMOE_WGPU_LEAN=${LEAN:-0} timeout 30 $BIN/flashmoe run --backend $2 --model $S --ids 1 --tokens $4 --timing 2>$L/run_$1_$4.err); rc=$?
  tps=$(sed -n 's/^decode: \([0-9.]*\) tok\/s.*/\1/p' $L/run_$1_$4.err | tail -1)
  summ "run $1 ($2 ${3:-default} lean-all=${LEAN:-0}) $4 rc=$rc decode_tok_s=${tps:-none} tokens=$(echo "$ids" | tr ',' '\n' | grep -c .) md5=$(echo "$ids" | md5sum | cut -c1-8) ($(el) s)"
}
runall() { [ "$(el)" -gt 330 ] && { summ "run $1 skipped (time)"; return; }; run "$@"; }
for n in 32 160; do
  runall wgpu wgpu "" $n
  runall cuda cuda "" $n
  [ -n "$BEST" ] && runall best wgpu "$BEST" $n
  [ -n "$BEST" ] && LEAN=1 runall bestleanall wgpu "$BEST" $n
  runall d2lean wgpu r2_lg32_wg256_sg_d2_lean $n
  LEAN=1 runall leanall wgpu "" $n
done
pack
kill $SMI 2>/dev/null
awk -F, 'NR>1{print $2,$3,$4}' $L/clocks.csv | sort | uniq -c | sort -rn | head -5 | sed 's/^/clocks /' | tee -a $OUT/summary.txt
summ "== done ($(el) s)"
pack
