#!/usr/bin/env bash
# A shorter device round than device-round.sh: the device tests (in parallel) and the bench with
# kernels and VRAM decode only. Run from the repo root on the GPU machine with carry/ prepared.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export FLASHMOE_SHARED=$PWD/carry/shared FLASHMOE_CACHE=/tmp/flashmoe-cache CI=true
if ! ldconfig -p | grep -q 'libnvrtc.so '; then
  lib=$(ls /usr/local/cuda/lib64/libnvrtc.so* 2>/dev/null | head -1)
  mkdir -p /tmp/nvl && ln -sf "$lib" /tmp/nvl/libnvrtc.so
  export LD_LIBRARY_PATH=/tmp/nvl:$(dirname "$lib"):${LD_LIBRARY_PATH:-}
fi
carry/device 2>&1 | tee "$OUT/tests.log" | grep -E "test result|panicked|FAILED" | head
carry/cuda_bench carry/shared/golden/tiny-a/mlx-4bit --layers ${LAYERS:-8} --tokens ${TOKENS:-32} ${BENCH_ARGS:---vram-only} \
  >"$OUT/bench.json" 2>"$OUT/bench.err"; echo "bench rc=$?"; tail -3 "$OUT/bench.err"
python3 - "$OUT/bench.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for k in d["kernels"]:
    print(f'{k["kernel"][22:70]:48} {k["rows"]:>7}x{k["cols"]:<5} {k["of_d2d_ratio"]:.3f}')
for m, v in d["synthetic"]["modes"].items():
    print(m, {a: round(b, 3) for a, b in v.items() if isinstance(b, float) and "ms" in a or "ratio" in a})
PY
