#!/usr/bin/env bash
# One wgpu device round on the NVIDIA machine (issue 19's targets from one run), from the repo
# root, carrying `wgpu-carry` (crates/wgpu/scripts/prepare-carry.sh) and `.gl` (the Vulkan
# loader debs, /work/.library/device/README.md):
#   1. `flashmoe devices`; the wgpu conformance, golden, slot and expert-batch tests on NVIDIA
#      Vulkan (CI=true: a missing adapter or fixture fails);
#   2. a 397B-shaped synthetic model (`flashmoe synth`, SYNTH_LAYERS x SYNTH_EXPERTS; its head is
#      the 248320 x 4096 matrix) and `bench decode --backend wgpu` beside `--backend cuda` on it;
#   3. greedy `run --ids 1 --timing` on both backends at RUN_SHORT and RUN_LONG tokens: the
#      marginal ms/token between them is decode with every expert resident (64 experts a layer
#      are all touched within the short run's first tokens) on the same CLI path;
#   4. the targets: 4-bit matvec / device copy traffic (>= 0.6; CUDA's d2d counts read + write),
#      resident decode wgpu / cuda (<= 1.5),
#      streamed-from-host decode / its bound (<= 1.2), printed and in $OUT/summary.json.
# Files in $OUT: round.log (all of this), tests.log, bench_wgpu.json, bench_cuda.json,
# runs.log, summary.json. NO_CUDA=1 skips the CUDA side (a machine without it, e.g. lavapipe).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/round.log") 2>&1
H=$PWD
C=$H/wgpu-carry
R=/tmp/wgpu-round
SYNTH_PRESET=${SYNTH_PRESET:-qwen3.5-397b-a17b}
SYNTH_LAYERS=${SYNTH_LAYERS:-4}
SYNTH_EXPERTS=${SYNTH_EXPERTS:-64}
BENCH_TOKENS=${BENCH_TOKENS:-16}
RUN_SHORT=${RUN_SHORT:-64}
RUN_LONG=${RUN_LONG:-320}
echo "== wgpu device round: carry of commit $(cat "$C/commit" 2>/dev/null || echo '?'), $(date -u +%H:%M:%S)"
rm -rf "$R" && mkdir -p "$R" /tmp/flashmoe-cache
(cd "$R" && tar xzf "$C/bins.tgz" && tar xzf "$C/shared.tgz") || { echo "no carry at $C"; exit 1; }
B=$R/bin
if [ -d "$H/.gl" ] && ! ldconfig -p | grep -q libvulkan; then
  for f in "$H"/.gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi
NV=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
[ -f $NV ] && export VK_DRIVER_FILES=$NV
echo "VK_DRIVER_FILES=${VK_DRIVER_FILES:-unset}"
export FLASHMOE_SHARED=$R/shared FLASHMOE_CACHE=/tmp/flashmoe-cache CI=true
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if [ -z "${NO_CUDA:-}" ] && ! ldconfig -p | grep -q 'libnvrtc.so '; then
  # cudarc dlopens libnvrtc.so; CUDA 13 images ship libnvrtc.so.13 only.
  lib=$(ls /usr/local/cuda/lib64/libnvrtc.so* 2>/dev/null | head -1)
  [ -z "$lib" ] && lib=$(find / -name 'libnvrtc.so*' -not -path '/proc/*' 2>/dev/null | grep -v alt | head -1)
  if [ -n "$lib" ]; then
    mkdir -p /tmp/nvl && ln -sf "$lib" /tmp/nvl/libnvrtc.so && echo "nvrtc: $lib"
    export LD_LIBRARY_PATH=/tmp/nvl:$(dirname "$lib"):${LD_LIBRARY_PATH:-}
  fi
fi

echo "== devices"
timeout 60 "$B/flashmoe" devices

declare -A RC
for t in conformance golden slots experts; do
  echo "== wgpu $t"
  timeout 240 "$B/wgpu_$t" --test-threads=1 --nocapture >>"$OUT/tests.log" 2>&1
  RC[$t]=$?
  echo "rc=${RC[$t]}"
done
grep -E "^test |test result|product kernels|wgpu adapter|panicked|max abs err|all resident" "$OUT/tests.log" | sort | uniq -c | sort -rn | head -40

echo "== synth $SYNTH_PRESET, $SYNTH_LAYERS layers x $SYNTH_EXPERTS experts"
M=/tmp/wgpu-round-model
timeout 300 "$B/flashmoe" synth --preset "$SYNTH_PRESET" --layers "$SYNTH_LAYERS" --experts "$SYNTH_EXPERTS" \
  --out "$M" --force 2>&1 | tail -2
du -sh "$M"

BENCH=(bench decode --model "$M" --json --no-cold --no-compare --constrained-rounds 0 --tokens "$BENCH_TOKENS")
echo "== bench --backend wgpu"
timeout 300 "$B/flashmoe" "${BENCH[@]}" --backend wgpu >"$OUT/bench_wgpu.json" 2>"$R/bench_wgpu.err"
echo "rc=$?"; tail -3 "$R/bench_wgpu.err"
if [ -z "${NO_CUDA:-}" ]; then
  echo "== bench --backend cuda"
  timeout 300 "$B/flashmoe" "${BENCH[@]}" --backend cuda >"$OUT/bench_cuda.json" 2>"$R/bench_cuda.err"
  echo "rc=$?"; tail -3 "$R/bench_cuda.err"
fi

echo "== greedy runs (--timing) at $RUN_SHORT and $RUN_LONG tokens"
BACKENDS="wgpu"
[ -z "${NO_CUDA:-}" ] && BACKENDS="wgpu cuda"
for b in $BACKENDS; do
  for n in "$RUN_SHORT" "$RUN_LONG"; do
    ids=$(timeout 300 "$B/flashmoe" run --backend "$b" --model "$M" --ids 1 --tokens "$n" --timing \
      2>"$R/run_${b}_$n.err")
    rc=$?
    got=$(echo "$ids" | tr ',' '\n' | grep -c .)
    tps=$(sed -n 's/^decode: \([0-9.]*\) tok\/s.*/\1/p' "$R/run_${b}_$n.err" | tail -1)
    echo "run $b $n: rc=$rc tokens=$got decode_tok_s=${tps:-none}" | tee -a "$OUT/runs.log"
    grep -E "^(wgpu|backend|note|error|Error)" "$R/run_${b}_$n.err" | head -3 | tee -a "$OUT/runs.log"
  done
done

echo "== targets"
python3 - "$OUT" "${RC[conformance]}" "${RC[golden]}" "${RC[slots]}" "${RC[experts]}" <<'PY'
import json, re, sys
out, rc_conf, rc_golden, rc_slots, rc_experts = sys.argv[1], *map(int, sys.argv[2:6])
def load(name):
    try:
        return json.load(open(f"{out}/{name}"))
    except Exception as e:
        print(f"{name}: unreadable ({e})")
        return {}
w = load("bench_wgpu.json").get("wgpu", {})
c = load("bench_cuda.json").get("cuda", {})
s = {"tests": {"conformance_rc": rc_conf, "golden_rc": rc_golden, "slots_rc": rc_slots,
               "experts_rc": rc_experts},
     "adapter": w.get("adapter"), "products": w.get("products"),
     "device_copy_gbps": w.get("device_copy_gbps"), "upload_gbps": w.get("upload_gbps"),
     "cuda_d2d_gbps": c.get("d2d_gbps"), "cuda_h2d_pinned_gbps": c.get("h2d_pinned_gbps")}
print(f"tests: conformance rc={rc_conf} golden rc={rc_golden} slots rc={rc_slots} experts rc={rc_experts}")
print(f"adapter {s['adapter']}, default products {s['products']}")
print(f"wgpu device copy {s['device_copy_gbps']} GB/s (bytes copied; traffic twice that), upload {s['upload_gbps']} GB/s; "
      f"CUDA d2d {s['cuda_d2d_gbps']}, pinned h2d {s['cuda_h2d_pinned_gbps']}")
mv = []
for t in w.get("matvec_targets", []):
    row = {k: t.get(k) for k in ("shape", "best_products", "best_vs_copy", "best_vs_copy_traffic",
                                 "default_vs_copy", "default_vs_copy_traffic")}
    # Judged against the copy's traffic (read + write), CUDA's d2d convention (the bytes
    # copied per second are half of it); both are printed.
    row["pass"] = (t.get("best_vs_copy_traffic") or 0) >= 0.6
    mv.append(row)
    print(f"matvec 4-bit {t.get('shape')}: best {t.get('best_vs_copy_traffic', 0):.3f} of copy traffic "
          f"({t.get('best_vs_copy', 0):.3f} of bytes copied/s) by {t.get('best_products')}; "
          f"default {t.get('default_vs_copy_traffic', 0):.3f} -> target 0.6 {'PASS' if row['pass'] else 'FAIL'}")
s["matvec"] = mv
kern = [k for k in w.get("kernels", [])]
s["kernels"] = kern
for k in kern:
    print(f"  {k.get('shape')} {k.get('products')}: {k.get('us', 0):.1f} us, {k.get('weight_gbps', 0):.1f} GB/s")
# Resident decode: marginal ms/token between the short and long greedy runs, same CLI path.
runs = {}
for line in open(f"{out}/runs.log"):
    m = re.match(r"run (\w+) (\d+): rc=(\d+) tokens=(\d+) decode_tok_s=([0-9.]+)", line)
    if m:
        b, n, rc, got, tps = m.groups()
        runs[(b, int(n))] = (int(rc), int(got), float(tps))
def marginal(b):
    ks = sorted(n for (bb, n) in runs if bb == b)
    if len(ks) < 2:
        return None
    (rc1, g1, t1), (rc2, g2, t2) = runs[(b, ks[0])], runs[(b, ks[-1])]
    if rc1 or rc2 or g2 <= g1 or t1 <= 0 or t2 <= 0:
        return None
    # tok/s counts generated - 1 steps.
    s1, s2 = (g1 - 1) / t1, (g2 - 1) / t2
    return (s2 - s1) / (g2 - g1) * 1e3
mw, mc = marginal("wgpu"), marginal("cuda")
s["resident_decode_ms"] = {"wgpu_marginal": mw, "cuda_marginal": mc,
                           "wgpu_bench_resident": w.get("decode_resident", {}).get("ms_per_token"),
                           "cuda_synthetic_experts_in_vram": c.get("synthetic", {}).get("modes", {})
                               .get("experts_in_vram", {}).get("ms_per_token")}
if mw and mc:
    s["resident_decode_ms"]["ratio"] = mw / mc
    print(f"decode, experts resident: wgpu {mw:.3f} ms/token, cuda {mc:.3f} ms/token -> {mw / mc:.2f}x "
          f"(target <= 1.5: {'PASS' if mw / mc <= 1.5 else 'FAIL'})")
else:
    print(f"decode, experts resident: wgpu {mw}, cuda {mc} (a run failed)")
print(f"  bench: wgpu resident {s['resident_decode_ms']['wgpu_bench_resident']} ms/token "
      f"(this model), cuda synthetic all-in-VRAM {s['resident_decode_ms']['cuda_synthetic_experts_in_vram']} "
      f"ms/token (its own 8-layer model)")
dr = w.get("decode_resident", {})
s["resident_by_commands_per_submission"] = dr.get("by_commands_per_submission")
print(f"  bench resident decode by commands per submission: "
      + ", ".join(f"{b.get('commands_per_submission')}: {b.get('ms_per_token', 0):.3f} ms"
                  for b in dr.get("by_commands_per_submission") or [])
      + f"; resident layer calls/token {dr.get('resident_layer_calls_per_token')}, "
        f"slot fills/token {dr.get('slot_fills_per_token')}")
d = w.get("decode", {})
s["streamed_decode"] = {k: d.get(k) for k in ("ms_per_token", "serial_ms_per_token",
                                              "expert_bytes_uploaded_per_token",
                                              "expert_upload_bound_ms", "bound_ms", "time_over_bound_ratio")}
print(f"  streamed pipeline: overlapped {d.get('ms_per_token')} ms/token, serial {d.get('serial_ms_per_token')} ms/token")
r = d.get("time_over_bound_ratio")
if r:
    print(f"decode, experts streamed from host: {d.get('ms_per_token', 0):.2f} ms/token, bound "
          f"{d.get('bound_ms', 0):.2f} ms -> {r:.2f}x (target <= 1.2: {'PASS' if r <= 1.2 else 'FAIL'})")
cp = c.get("synthetic", {}).get("modes", {}).get("experts_in_pinned_ram", {})
if cp:
    print(f"  cuda, experts in pinned RAM: {cp.get('ms_per_token')} ms/token, "
          f"{cp.get('time_over_bound_ratio')} of its bound")
json.dump(s, open(f"{out}/summary.json", "w"), indent=1)
PY
echo "== done $(date -u +%H:%M:%S)"
