#!/usr/bin/env bash
# Instructions one forward pass executes, counted by valgrind's callgrind: a figure that does
# not move with the machine's load, for comparing CPU kernel changes on a noisy machine where
# timers cannot see a few percent. One thread, one prompt token and one generated token.
#   scripts/instructions.sh [MODEL_DIR] [FLASHMOE_BINARY]
# MODEL_DIR defaults to a 2-layer 397B-shaped synthetic model made with
#   flashmoe synth --preset qwen3.5-397b-a17b --layers 2 --out DIR
set -euo pipefail
model=${1:?usage: scripts/instructions.sh MODEL_DIR [FLASHMOE_BINARY]}
bin=${2:-target/release/flashmoe}
command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }
out=$(mktemp -d)
RAYON_NUM_THREADS=1 valgrind --tool=callgrind --callgrind-out-file="$out/cg.out" \
  "$bin" run --model "$model" --ids 5 --tokens 1 >"$out/ids.txt" 2>"$out/cg.err"
echo "output ids: $(cat "$out/ids.txt")"
grep -o 'Collected : [0-9]*' "$out/cg.err" | sed 's/Collected :/instructions:/'
callgrind_annotate "$out/cg.out" 2>/dev/null | sed -n '/PROGRAM TOTALS/,+6p' | cut -c1-150
rm -rf "$out"
