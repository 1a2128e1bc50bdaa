#!/usr/bin/env bash
# Same-machine A/B of environment settings on the synthetic decode bench, one bench run per
# argument: `bash carry/ab.sh "A=0" "FLASHMOE_L2_PREFETCH=0"`. Run from the repo root on the GPU
# machine with carry/ prepared (prepare-carry.sh) and the PTX cache in carry/cache.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/flashmoe-cache
cp carry/cache/*.ptx /tmp/flashmoe-cache/ 2>/dev/null
export FLASHMOE_CACHE=/tmp/flashmoe-cache
if ! ldconfig -p | grep -q 'libnvrtc.so '; then
  lib=$(ls /usr/local/cuda/lib64/libnvrtc.so* 2>/dev/null | head -1)
  mkdir -p /tmp/nvl && ln -sf "$lib" /tmp/nvl/libnvrtc.so
  export LD_LIBRARY_PATH=/tmp/nvl:$(dirname "$lib"):${LD_LIBRARY_PATH:-}
fi
i=0
for v in "$@"; do
  i=$((i + 1))
  env $v carry/cuda_bench carry/shared/golden/tiny-a/mlx-4bit --layers ${LAYERS:-8} --tokens ${TOKENS:-32} \
    ${BENCH_ARGS:---vram-only --no-kernels} >"$OUT/ab$i.json" 2>"$OUT/ab$i.err" ||
    { echo "rc=$? $v"; tail -5 "$OUT/ab$i.err"; continue; }
  python3 - "$OUT/ab$i.json" "$v" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for m, x in d["synthetic"]["modes"].items():
    keep = {a: round(b, 4) for a, b in x.items() if isinstance(b, float) and (a in ("ms_per_token", "time_over_bound_ratio"))}
    print(sys.argv[2], m, keep)
PY
done
