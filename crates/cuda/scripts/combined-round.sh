#!/usr/bin/env bash
# Combined device round (one call, < 600 s). Part 1, issue 18: main's CUDA tests (conformance,
# golden, sessions, GEMM twins, prompt mixers; device tests), then the A/B: before = 86c3e95 (the
# old loop), after = this checkout (Model<Cuda>), alternating before/after/before/after:
#  - cuda_bench --vram-only on tiny-a + the 8-layer 397B-shaped MoE synthetic (VRAM decode,
#    its kernel trace, 128-token prompts);
#  - disk mode: `flashmoe run --backend cuda --io direct` on a 4-layer 397B-shaped packed model
#    with a 0.1 GB VRAM expert cache (nearly every routed expert read from the disk), a
#    128-token prompt then 24 tokens (prefill ms and decode tok/s from --timing);
#  - one full cuda_bench of the after binary (pinned and pageable host tiers).
# Part 2, issue 19: round-w.sh (crates/wgpu/scripts/resident-round.sh).
# CUDA_TESTS=0 skips the CUDA tests, CUDA_TESTS=device runs only the device tests; TINY=1 adds the A/B of tiny-a's decode (cuda_bench --layers 2). AB=0: the tests and part 2 only (no A/B, no disk runs, no full bench).
set -uo pipefail
. $PWD/carry-c/env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/logs; L=/tmp/logs
LIM=${LIM:-540}; P1=${P1:-$(( LIM * 50 / 100 ))}; T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
summ() { echo "$*" | tee -a "$OUT/summary.txt"; }
pack() { (cd $L && tar czf $OUT/logs.tgz * 2>/dev/null); }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a $OUT/summary.txt
nproc | sed 's/^/cpus /' | tee -a $OUT/summary.txt; grep -o -m1 'avx512f' /proc/cpuinfo | tee -a $OUT/summary.txt
if [ "${CUDA_TESTS:-1}" = 1 ]; then
summ "== cuda backend tests ($(el) s)"
timeout 90 $BIN/cuda_backend --test-threads=1 > $L/cuda_backend.log 2>&1; summ "rc=$?"
grep -E "test result|FAILED|panicked" $L/cuda_backend.log | tail -8 | tee -a "$OUT/summary.txt"
fi
if [ "${CUDA_TESTS:-1}" != 0 ]; then
summ "== cuda device tests ($(el) s)"
timeout 60 $BIN/cuda_device --test-threads=1 > $L/cuda_device.log 2>&1; summ "rc=$?"
grep -E "test result|FAILED|panicked" $L/cuda_device.log | tail -8 | tee -a "$OUT/summary.txt"
fi
pack
M=$R/golden/tiny-a/mlx-4bit
ab() { # name, then the cuda_bench arguments
  local n=$1; shift
  for w in before after before after; do
    [ "$(el)" -gt $P1 ] && { summ "$w $n skipped (time)"; continue; }
    b=$BIN/cuda_bench; [ $w = before ] && b=$BIN/bench_before
    k=$(ls $L/bench_${w}_${n}_*.json 2>/dev/null | wc -l)
    timeout 60 $b $M "$@" > $L/bench_${w}_${n}_$k.json 2> $L/bench_${w}_${n}_$k.err; summ "$w $n rc=$? ($(el) s)"
  done
}
if [ "${TINY:-0}" = 1 ]; then # tiny-a's decode and the 2-layer synthetic, every mode
  P1S=$P1; P1=$(( $(el) + 120 )); ab tiny --layers 2 --tokens 16 --no-kernels; P1=$P1S
  python3 - $L <<'PY' | tee -a $OUT/summary.txt
import json, sys, glob
for w in ["before", "after"]:
    for f in sorted(glob.glob(f"{sys.argv[1]}/bench_{w}_tiny_*.json")):
        try: d = json.load(open(f))
        except Exception as e: print(w, f, "unreadable", e); continue
        m = d["synthetic"]["modes"]
        print(f"{w} {f.split('_')[-1]}: tiny-a {d['model']['ms_per_token']:.4f} ms; 2-layer MoE " + ", ".join(f"{k} {v['ms_per_token']:.4f}" for k, v in m.items()))
PY
fi
[ "${AB:-1}" = 0 ] && P1=0
ab vram --layers 8 --tokens 16 --no-kernels --vram-only; pack
python3 - $L <<'PY' | tee -a $OUT/summary.txt
import json, sys, glob
for w in ["before", "after"]:
    for f in sorted(glob.glob(f"{sys.argv[1]}/bench_{w}_vram_*.json")):
        try: d = json.load(open(f))
        except Exception as e: print(w, f, "unreadable", e); continue
        v = d["synthetic"]["modes"]["experts_in_vram"]; kt = v.get("kernel_trace", {})
        an = [k for k in kt.get("kernels", []) if k["kernel"] == "add_rmsnorm"]
        print(f"{w} {f.split('_')[-1]}: MoE VRAM {v['ms_per_token']:.4f} ms (traced {kt.get('total_us', 0):.1f} us; add_rmsnorm grid {an[0]['grid'] if an else '-'}), prompt {v.get('prefill', {})}")
PY
S=/tmp/q397; timeout 60 $BIN/flashmoe synth --preset qwen3.5-397b-a17b --layers 4 --experts 64 --out $S --force > $L/synth.log 2>&1; summ "synth rc=$? ($(el) s)"
IDS=$(seq -s, 1 128)
for w in after before after before; do
  [ "$(el)" -gt $(( P1 + 40 )) ] && { summ "disk $w skipped (time)"; continue; }
  f=$BIN/flashmoe; [ $w = before ] && f=$BIN/flashmoe_before
  k=$(ls $L/disk_${w}_*.err 2>/dev/null | wc -l)
  timeout 60 $f run --backend cuda --model $S --io direct --vram-cache-gb 0.1 --ids $IDS --tokens 24 --timing > $L/disk_${w}_$k.out 2> $L/disk_${w}_$k.err
  summ "disk $w rc=$? $(grep -E '^prefill:|^decode: [0-9]+ tokens' $L/disk_${w}_$k.err | tr '\n' ' ') ($(el) s)"
done
pack
summ "== part 2: wgpu ($(el) s)"
timeout $(( LIM - 60 - $(el) )) bash $C/round-w.sh
pack
if [ "${AB:-1}" != 0 ] && [ "$(el)" -lt $(( LIM - 50 )) ]; then
  timeout $(( LIM - $(el) )) $BIN/cuda_bench $M --layers 8 --tokens 16 --no-kernels > $L/bench_after_full.json 2> $L/bench_after_full.err
  summ "after full rc=$? ($(el) s)"
fi
summ "== done ($(el) s)"
pack
