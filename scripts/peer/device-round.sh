#!/usr/bin/env bash
# flashmoe CUDA against llama.cpp CUDA on one GPU machine (issue 20), in one call:
#
#   here:   scripts/peer/prepare-device.sh carry-peer       # a git-ignored folder of the repo
#   there:  CARRY=carry-peer bash carry-peer/peer/device-round.sh   (from the repo root)
#
# Phases (PHASES, comma separated; each skips what an earlier call on the same machine left):
#   build   llama.cpp from CARRY/llama-trim.tar.gz, llama-bench only, -DGGML_CUDA=ON for this
#           card's architecture, flash-attention kernels off (FA=ON keeps them), ninja -j$(nproc);
#           or CARRY/llama-bench.xz.part-* when a former call brought the binary back
#           (SAVE_LLAMA=1 writes those parts under $OUT)
#   model   `flashmoe synth --preset $PRESET` (full depth unless LAYERS) and its GGUF twin
#           (gguf_twin.py: the same shapes and bits per weight, Q4_0 for 4-bit)
#   vram    all experts in VRAM: `llama-bench -ngl 99 -n TOKENS -d DEPTH` against flashmoe
#           `run --backend cuda` (default VRAM cache: every expert fits) decoding FM_TOKENS
#           sampled tokens after a prompt of about DEPTH tokens, alternating, ROUNDS each
#   beyond  experts beyond VRAM: llama.cpp `--n-cpu-moe N` (the experts of N layers on the CPU,
#           computed there) against flashmoe `run --backend cuda --vram-cache-gb G
#           --pinned-cache-gb P` (experts copied from a pinned host tier on a VRAM miss), for
#           N = all layers with G = BEYOND_VRAM_GB, and N = half with G = half the experts
#   bench   one `flashmoe bench decode --backend cuda --json`: its cuda.model_experts_from_disk
#           holds the model's decode with every expert preloaded into VRAM (no first touches),
#           and with every routed expert read from the disk; its decode section the CPU figures
#           and int8's accuracy against --exact (about 90 s: after a build, past DEADLINE)
# Under $OUT: steps.log, rounds.tsv (one line per measurement), summary.md (the table) and
# logs.tar.gz (the build, synth and twin logs, each measurement's JSON or text). WORK
# (target/peer-work) holds the build and the models; it is git-ignored, so a warm machine keeps
# it for the next call. On an H100 (2026-12-07) the build took 135 s, the model and twin 26 s
# beside it, flashmoe's first run 70 s more for its NVRTC compile (cached in WORK after).
set -uo pipefail
T0=$(date +%s)
OUT=${OUT:-/tmp/out}
CARRY=${CARRY:-carry-peer}
WORK=${WORK:-$PWD/target/peer-work}
PHASES=${PHASES:-build,model,vram,beyond,bench}
PRESET=${PRESET:-qwen3-30b-a3b}
LAYERS=${LAYERS:-}
TOKENS=${TOKENS:-64}
ROUNDS=${ROUNDS:-2}
BEYOND_VRAM_GB=${BEYOND_VRAM_GB:-1}
NPROC=$(nproc)
# At most 8 files come back from $OUT: steps.log, rounds.tsv, summary.md, logs.tar.gz (every
# other log and JSON, from $LOG), up to 3 parts of the saved llama-bench and flashmoe's PTX
# cache.
LOG=$WORK/logs
mkdir -p "$OUT" "$WORK"
rm -rf "$LOG" && mkdir -p "$LOG"
CARRY=$(cd "$CARRY" && pwd)
FM=$CARRY/flashmoe
LLAMA_SRC=$WORK/llama.cpp
BUILD=$WORK/build-cuda
LB=${LB:-$BUILD/bin/llama-bench}
MODEL=$WORK/${PRESET}${LAYERS:+-l$LAYERS}-b4-d4
GGUF=$MODEL.gguf
TSV=$OUT/rounds.tsv
[ -s "$TSV" ] || printf 'phase\tengine\tround\tsetting\ttok_s\tnote\n' >"$TSV"

has() { case ",$PHASES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
say() { echo "[device-round +$(($(date +%s) - T0))s] $*" | tee -a "$OUT/steps.log"; }
row() { printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$TSV"; pack_logs; }
pack_logs() { tar -C "$WORK" -czf "$OUT/logs.tar.gz.tmp" logs && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"; }
trap pack_logs EXIT

say "machine: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader), $NPROC cores, $(free -g | awk '/Mem/{print $2}') GB RAM"
df -h "$WORK" | tail -1 | tee -a "$OUT/steps.log"
nvidia-smi --query-gpu=compute_cap --format=csv,noheader >"$LOG/compute_cap.txt" 2>&1
ARCH=${ARCH:-$(tr -d '.' <"$LOG/compute_cap.txt" | head -1)}

# flashmoe's kernels are compiled at run time by NVRTC, which cudarc opens as libnvrtc.so.
if ! ldconfig -p | grep -q 'libnvrtc.so '; then
  lib=$(ls /usr/local/cuda/lib64/libnvrtc.so* 2>/dev/null | head -1)
  [ -z "$lib" ] && lib=$(find / -name 'libnvrtc.so*' -not -path '/proc/*' 2>/dev/null | grep -v alt | head -1)
  mkdir -p /tmp/nvl && ln -sf "$lib" /tmp/nvl/libnvrtc.so
  export LD_LIBRARY_PATH=/tmp/nvl:$(dirname "$lib"):${LD_LIBRARY_PATH:-}
fi
# flashmoe's PTX cache (NVRTC output, keyed by the kernels' source): about 70 s of compiling
# on a fresh machine, skipped when a former call brought it back (SAVE_PTX=1).
export FLASHMOE_CACHE=$WORK/flashmoe-cache
if [ -f "$CARRY/flashmoe-cache.tar.gz" ] && [ ! -d "$FLASHMOE_CACHE" ]; then
  tar -C "$WORK" -xzf "$CARRY/flashmoe-cache.tar.gz" && say "flashmoe PTX cache from the carry"
fi

# The model and its twin are written while llama.cpp builds (disk and RNG against nvcc).
make_model() {
  # gguf_twin.py takes gguf-py from the llama.cpp source (a carried llama-bench skips the build).
  [ -d "$LLAMA_SRC/gguf-py" ] || tar -C "$WORK" -xzf "$CARRY/llama-trim.tar.gz"
  if [ ! -f "$MODEL/manifest.json" ]; then
    say "synth $PRESET ${LAYERS:+($LAYERS layers)}"
    "$FM" synth --preset "$PRESET" ${LAYERS:+--layers "$LAYERS"} --bits 4 --dense-bits 4 \
      --out "$MODEL" --force >"$LOG/synth.log" 2>&1 || { say "synth failed"; tail "$LOG/synth.log"; return 1; }
    say "synth done"
  fi
  if [ ! -f "$GGUF" ]; then
    say "GGUF twin"
    python3 "$CARRY/peer/gguf_twin.py" "$MODEL" "$GGUF" "$LLAMA_SRC" >"$LOG/twin.log" 2>&1 \
      || { say "twin failed"; tail "$LOG/twin.log"; return 1; }
  fi
  say "model $(du -sh "$MODEL" | cut -f1), GGUF $(du -sh "$GGUF" | cut -f1)"
}
MODEL_PID=
if has model; then
  # The build phase unpacks the source first; the twin only needs its gguf-py.
  [ -d "$LLAMA_SRC/gguf-py" ] || tar -C "$WORK" -xzf "$CARRY/llama-trim.tar.gz"
  make_model &
  MODEL_PID=$!
fi

if has build && [ ! -x "$LB" ]; then
  if ls "$CARRY"/llama-bench.xz.part-* >/dev/null 2>&1; then
    mkdir -p "$BUILD/bin"
    cat "$CARRY"/llama-bench.xz.part-* | xz -d >"$LB" && chmod +x "$LB"
    say "llama-bench from the carried parts"
  else
    [ -f "$LLAMA_SRC/CMakeLists.txt" ] || tar -C "$WORK" -xzf "$CARRY/llama-trim.tar.gz"
    if ! command -v nvcc >/dev/null; then
      nv=$(ls -d /usr/local/cuda*/bin/nvcc 2>/dev/null | head -1)
      [ -n "$nv" ] && export PATH=$(dirname "$nv"):$PATH
    fi
    say "configuring llama.cpp (CUDA arch $ARCH, flash attention ${FA:-OFF}, $(nvcc --version | tail -2 | head -1))"
    cmake -S "$LLAMA_SRC" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
      -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DGGML_CUDA_FA="${FA:-OFF}" \
      -DGGML_CUDA_NCCL=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
      -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
      -DBUILD_SHARED_LIBS=OFF >"$LOG/build.log" 2>&1 || { say "configure failed"; tail -30 "$LOG/build.log"; }
    b0=$(date +%s)
    # A failed build leaves flashmoe's measurements to run (llama.cpp's rows say -).
    if cmake --build "$BUILD" --target llama-bench -j"$NPROC" >>"$LOG/build.log" 2>&1; then
      say "built llama-bench in $(($(date +%s) - b0)) s"
    else
      say "build failed after $(($(date +%s) - b0)) s"; tail -30 "$LOG/build.log"
    fi
  fi
  if [ "${SAVE_LLAMA:-0}" = 1 ] && [ -x "$LB" ]; then
    strip -o "$WORK/llama-bench.stripped" "$LB" && xz -T"$NPROC" -4 -c "$WORK/llama-bench.stripped" \
      | split -b 15M - "$WORK/llama-bench.xz.part-"
    if [ "$(ls "$WORK"/llama-bench.xz.part-* | wc -l)" -le 3 ]; then
      mv "$WORK"/llama-bench.xz.part-* "$OUT/"
      ls -la "$OUT"/llama-bench.xz.part-* | tee -a "$OUT/steps.log"
    else
      say "llama-bench.xz is over 3 parts of 15 MiB: not saved"; rm -f "$WORK"/llama-bench.xz.part-*
    fi
  fi
fi
[ -x "$LB" ] && "$LB" --version >"$LOG/llama-version.txt" 2>&1
say "llama.cpp: llama-cpp-python $(cat "$LLAMA_SRC/LLAMA_CPP_PYTHON_VERSION" 2>/dev/null), commit $(cat "$LLAMA_SRC/LLAMA_COMMIT" 2>/dev/null || echo unknown) (the tarball's; llama-bench says: $(head -1 "$LOG/llama-version.txt" 2>/dev/null))"

if [ -n "$MODEL_PID" ]; then
  wait "$MODEL_PID" || { say "no model: stopping"; exit 1; }
fi

# Seconds a measurement may take: what DEADLINE leaves, less 5 (at least 10).
DEADLINE=${DEADLINE:-330}
remain() { local r=$((DEADLINE - ($(date +%s) - T0) - 5)); [ "$r" -lt 10 ] && r=10; echo "$r"; }
# llama-bench's tok/s of one measurement (JSON under $LOG/$1.json).
llama() {
  local tag=$1; shift
  timeout "$(remain)" "$LB" -m "$GGUF" -p 0 -n "$TOKENS" -d "$DEPTH" -r 1 -o json "$@" >"$LOG/$tag.json" 2>"$LOG/$tag.err"
  python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[0]['avg_ts'])" "$LOG/$tag.json" 2>/dev/null || echo -
}
# flashmoe `run` on CUDA after a prompt of about DEPTH tokens: its decode tok/s (stderr under
# $LOG/$1.txt). The prompt's prefill touches every expert, so the decode that is timed finds
# them where the run keeps them (VRAM, or the pinned host tier beyond it), as llama.cpp has its
# weights in place after loading; llama-bench decodes at the same depth. Tokens are sampled at
# temperature 1: a random model's greedy decode repeats one token, whose experts then stay in
# any VRAM cache (llama-bench feeds random tokens).
fmrun() {
  local tag=$1; shift
  timeout "$(remain)" "$FM" run --model "$MODEL" --backend "${FM_BACKEND:-cuda}" \
    --prompt-file "$PROMPT" --no-think --temperature 1 --seed 1 --tokens "$FM_TOKENS" \
    --ctx-size 2048 --timing "$@" >"$LOG/$tag.out" 2>"$LOG/$tag.txt"
  sed -nE 's/^(decode: (.*= )?|generated .* tokens, decode )([0-9.]+) tok\/s.*/\3/p' "$LOG/$tag.txt" | tail -1
}
FM_TOKENS=${FM_TOKENS:-128}
DEPTH=${DEPTH:-512}
PROMPT=$WORK/prompt.txt
# About one token per byte with the synthetic models' byte-level tokenizer.
head -c "$DEPTH" "$CARRY/peer/peer.py" >"$PROMPT"
NL=$(python3 -c "import json,sys; m=json.load(open(sys.argv[1])); c=m['config'].get('text_config', m['config']); print(c['num_hidden_layers'])" "$MODEL/manifest.json" 2>/dev/null || echo 0)

# Measurement order: round by round, each setting's llama.cpp then flashmoe run (alternating),
# the bench last; a step starts only while DEADLINE (seconds from the start, default 330) leaves
# 45 s, so a call that must also build and synthesize keeps what it measured.
time_left() { [ $((DEADLINE - ($(date +%s) - T0))) -ge 45 ] || { say "skipped (deadline): $*"; return 1; }; }
if has beyond; then
  EXP_GB=$(du -sb "$MODEL/experts" 2>/dev/null | awk '{printf "%.1f", $1/1e9}')
  HALF_GB=$(python3 -c "print(round($EXP_GB / 2, 1))")
  PIN_GB=$(python3 -c "print(round($EXP_GB * 1.1 + 1, 1))")
fi
for r in $(seq 1 "$ROUNDS"); do
  if has vram && time_left "vram round $r"; then
    v=$(llama "llama-vram-$r" -ngl 99); say "vram round $r: llama.cpp -ngl 99: $v tok/s"
    row vram llama.cpp "$r" "-ngl 99, tg$TOKENS at depth $DEPTH" "$v" "llama-bench"
    v=$(fmrun "flashmoe-vram-$r"); say "vram round $r: flashmoe run --backend cuda: $v tok/s"
    row vram flashmoe "$r" "run --backend cuda, $FM_TOKENS tokens (temperature 1) after $DEPTH" "$v" "experts loaded by the prompt's prefill"
  fi
  if has beyond; then
    for setting in "all:$NL:$BEYOND_VRAM_GB" "half:$((NL / 2)):$HALF_GB"; do
      IFS=: read -r name ncpu gb <<<"$setting"
      time_left "beyond $name round $r" || continue
      v=$(llama "llama-beyond-$name-$r" -ngl 99 --n-cpu-moe "$ncpu" -t "$NPROC")
      say "beyond ($name) round $r: llama.cpp -ngl 99 --n-cpu-moe $ncpu -t $NPROC: $v tok/s"
      row beyond llama.cpp "$r" "$name: -ngl 99 --n-cpu-moe $ncpu (of $NL layers) -t $NPROC, tg$TOKENS at depth $DEPTH" "$v" "experts of $ncpu layers on the CPU"
      v=$(fmrun "flashmoe-beyond-$name-$r" --vram-cache-gb "$gb" --pinned-cache-gb "$PIN_GB")
      say "beyond ($name) round $r: flashmoe --vram-cache-gb $gb --pinned-cache-gb $PIN_GB: $v tok/s"
      row beyond flashmoe "$r" "$name: run --backend cuda --vram-cache-gb $gb --pinned-cache-gb $PIN_GB, $FM_TOKENS tokens (temperature 1) after $DEPTH" "$v" "experts $EXP_GB GB, in the pinned tier after the prefill"
    done
  fi
done

if has bench && time_left "flashmoe bench decode --backend cuda"; then
  say "flashmoe bench decode --backend cuda"
  timeout "$(remain)" "$FM" bench decode --backend cuda --model "$MODEL" \
    --json --tokens 16 --no-compare --constrained-rounds 0 \
    >"$LOG/flashmoe-bench-decode-cuda.json" 2>"$LOG/flashmoe-bench-decode-cuda.err"
  tail -3 "$LOG/flashmoe-bench-decode-cuda.err"
  python3 - "$LOG/flashmoe-bench-decode-cuda.json" "$TSV" <<'EOF' || say "no bench JSON"
import json, sys
d = json.load(open(sys.argv[1]))
c = d.get("cuda", {})
disk = c.get("model_experts_from_disk", {})
m = c.get("model", {})
rows = []
v = disk.get("vram_resident_ms_per_token")
if v:
    rows.append(("vram", "flashmoe", 1, "bench: every expert preloaded in VRAM, argmax on the GPU", 1e3 / v, "cuda.model_experts_from_disk.vram_resident_ms_per_token"))
if m.get("tok_per_s"):
    rows.append(("vram", "flashmoe", 1, "bench: default cache, logits to the host, 16 tokens", m["tok_per_s"], "cuda.model (first touches included)"))
if disk.get("tok_per_s"):
    rows.append(("disk", "flashmoe", 1, "bench: every routed expert read from the disk (--io direct)", disk["tok_per_s"], f"bound_ms={disk.get('bound_ms')} ratio={disk.get('time_over_bound_ratio')}"))
dec = d.get("decode", {})
for k in ("warm_tok_s", "cold_tok_s"):
    if dec.get(k):
        rows.append(("cpu", "flashmoe", 1, f"bench decode CPU {k}", dec[k], f"threads={d.get('machine', {}).get('threads')}"))
for k in ("int8_decode_kl_mean", "int8_decode_top1_agree"):
    if k in dec:
        rows.append(("accuracy", "flashmoe", 1, k, dec[k], "CPU int8 vs --exact"))
with open(sys.argv[2], "a") as f:
    for r in rows:
        f.write("\t".join(str(x) for x in r) + "\n")
        print(*r, sep=" | ")
EOF
fi

python3 - "$TSV" "$OUT/summary.md" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
by = {}
for r in rows:
    try:
        v = float(r["tok_s"])
    except ValueError:
        continue
    by.setdefault((r["phase"], r["engine"], r["setting"]), []).append(v)
lines = ["| phase | engine | setting | runs | min | median |", "|---|---|---|---|---|---|"]
for (ph, eng, st), v in by.items():
    lines.append(f"| {ph} | {eng} | {st} | {len(v)} | {min(v):.4g} | {statistics.median(v):.4g} |")
open(sys.argv[2], "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
pack_logs
if [ "${SAVE_PTX:-0}" = 1 ] && [ -d "$FLASHMOE_CACHE" ]; then
  tar -C "$WORK" -czf "$OUT/flashmoe-cache.tar.gz" flashmoe-cache && ls -la "$OUT/flashmoe-cache.tar.gz"
fi
say "done"
