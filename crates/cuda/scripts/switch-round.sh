#!/usr/bin/env bash
# Device round for issue 18 phase 2 (cuda-switch): the Backend tests (conformance with the fused
# ops, golden on Model<Cuda>, the fused-kernel and prepared-x checks), the existing device tests,
# an A/B of cuda_bench before (main fbebb99) and after, alternating, the after runs with
# --core-path (Model<Cuda> against CudaModel in the same process), then (time allowing)
# `flashmoe bench decode --backend cuda` on the golden tiny model, before and after.
# Carry (git-ignored a2carry/): backend, device, bench_before, bench_after,
# flashmoe_{before,after}.xz, cache/*.ptx.gz, shared/{golden,tokenizer}.
set -uo pipefail
C=$PWD/a2carry
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/flashmoe-cache
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
for f in $C/cache/*.gz; do gunzip -c "$f" > /tmp/flashmoe-cache/$(basename "$f" .gz); done
export FLASHMOE_SHARED=$C/shared FLASHMOE_CACHE=/tmp/flashmoe-cache CI=true
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
if ! ldconfig -p | grep -q 'libnvrtc.so '; then
  lib=$(ls /usr/local/cuda/lib64/libnvrtc.so* 2>/dev/null | head -1)
  [ -z "$lib" ] && lib=$(find / -name 'libnvrtc.so*' -not -path '*/proc/*' 2>/dev/null | grep -v alt | head -1)
  mkdir -p /tmp/nvl && ln -sf "$lib" /tmp/nvl/libnvrtc.so && echo "nvrtc: $lib"
  export LD_LIBRARY_PATH=/tmp/nvl:$(dirname "$lib"):${LD_LIBRARY_PATH:-}
fi
echo "== backend tests ($(el) s)"
timeout 150 $C/backend --test-threads=1 --nocapture > "$OUT/backend.log" 2>&1; echo "rc=$?"
grep -E "^test |test result|skipped|panicked|NMSE|disagrees|fused|on cuda|assert" "$OUT/backend.log" | head -70
echo "== device tests ($(el) s)"; timeout 90 $C/device --test-threads=1 > "$OUT/device.log" 2>&1; echo "rc=$?"; grep -E "test result|FAILED|panicked" "$OUT/device.log" | head
echo "== A/B cuda_bench ($(el) s)"
for r in 1 2; do for w in before after; do
  [ $r = 2 ] && [ "$(el)" -gt ${LATEST:-230} ] && { echo "skipped $w $r (time)"; continue; }
  x=""; [ $w = after ] && x="--core-path"
  timeout 90 $C/bench_$w $C/shared/golden/tiny-a/mlx-4bit --layers 8 --tokens 16 --no-kernels --prefill-tokens 64 $x >"$OUT/bench_${w}_$r.json" 2>"$OUT/bench_${w}_$r.err"; echo "$w $r rc=$? ($(el) s)"
done; done
python3 - "$OUT" <<'PY'
import json, sys, glob
for f in sorted(glob.glob(sys.argv[1] + "/bench_*.json")):
    try: d = json.load(open(f))
    except Exception as e: print(f, "unreadable", e); continue
    row = {m: round(x["ms_per_token"], 4) for m, x in d["synthetic"]["modes"].items() if "ms_per_token" in x}
    row["model"] = round(d.get("model", {}).get("ms_per_token", 0), 4)
    for src in (d, d.get("synthetic", {}), d.get("model", {})):
        pf = src.get("prefill") if isinstance(src, dict) else None
        if isinstance(pf, dict):
            row.update({"prefill." + k: round(v, 3) for k, v in pf.items() if isinstance(v, float)})
    print(f.split("/")[-1], row)
    kt = d["synthetic"]["modes"].get("experts_in_vram", {}).get("kernel_trace", {})
    print("  old vram trace: launches", kt.get("launches"), "gpu_us", kt.get("total_us"))
    cp = d.get("core_path")
    if cp:
        for k, v in cp.items():
            try:
                if isinstance(v, dict) and "decode_ms_per_token" in v:
                    t = v["trace_one_token"]
                    print("  core_path", k, {"decode": v["decode_ms_per_token"], "prefill": v["prefill_ms"], "agree": v["greedy_tokens_agree"],
                          "launches": {p: t[p]["launches"] for p in ("old", "core")},
                          "gpu_us": {p: round(t[p]["gpu_us"], 1) for p in ("old", "core")}})
                elif isinstance(v, dict) and "modes" in v:
                    for mn, mv in v["modes"].items():
                        tr = mv.get("trace_one_token", {})
                        print("  core_path", k, mn, {a: b for a, b in mv.items() if a != "trace_one_token"},
                              "launches", tr.get("launches"), "gpu_us", tr.get("gpu_us"))
                else:
                    print("  core_path", k, json.dumps(v)[:600])
            except Exception as e:
                print("  core_path", k, "unreadable", e)
PY
if [ "$(el)" -lt 200 ] && [ -f $C/flashmoe_before.xz ]; then
  echo "== CLI bench decode --backend cuda ($(el) s)"
  for w in before after; do xz -dc $C/flashmoe_$w.xz > /tmp/flashmoe_$w && chmod +x /tmp/flashmoe_$w; done
  for w in before after; do
    timeout 70 /tmp/flashmoe_$w bench decode --backend cuda --model $C/shared/golden/tiny-a/mlx-4bit --json --tokens 8 --no-cold --no-compare >"$OUT/cli_$w.json" 2>"$OUT/cli_$w.err"; echo "cli $w rc=$? ($(el) s)"
  done
  python3 - "$OUT" <<'PY'
import json, sys
for w in ("before", "after"):
    try: d = json.load(open(f"{sys.argv[1]}/cli_{w}.json"))
    except Exception as e: print(w, "unreadable", e); continue
    c = d.get("cuda", {})
    print("cli", w, {"model": c.get("model", {}).get("ms_per_token"), "vram": c.get("synthetic", {}).get("modes", {}).get("experts_in_vram", {}).get("ms_per_token")})
PY
fi
echo "== done ($(el) s)"
