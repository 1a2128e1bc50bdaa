#!/usr/bin/env bash
# Builds what crates/wgpu/scripts/device-round.sh runs on the GPU machine and packs it into
# wgpu-carry/ (git-ignored; carry it with .gl): the flashmoe binary with CUDA and wgpu, the
# wgpu test binaries (conformance, golden, slots, experts), all stripped, and the golden fixtures and
# tokenizer. Run from the repo root. Prints the carry's size (the device takes 64 MiB in all,
# .gl included).
set -euo pipefail
SHARED=${FLASHMOE_SHARED:-../shared}
C=wgpu-carry
# The carry must not travel as tracked files: ignore it where this checkout's git looks.
if ! git check-ignore -q "$C/x" 2>/dev/null; then
  echo "/$C/" >> "$(git rev-parse --git-common-dir)/info/exclude"
fi
cargo build --release -p flashmoe --features cuda
bin=${CARGO_TARGET_DIR:-target}/release/flashmoe
tests=$(cargo test --release -p flashmoe-wgpu --no-run 2>&1 | sed -n 's/.*Executable tests\/\([a-z_]*\)\.rs (\(.*\))/\1 \2/p')
rm -rf "$C" && mkdir -p "$C/stage/bin" "$C/stage/shared/golden"
strip -o "$C/stage/bin/flashmoe" "$bin"
while read -r name path; do
  case $name in conformance|golden|slots|experts) strip -o "$C/stage/bin/wgpu_$name" "$path" ;; esac
done <<< "$tests"
for t in conformance golden slots experts; do
  [ -x "$C/stage/bin/wgpu_$t" ] || { echo "missing test binary wgpu_$t" >&2; exit 1; }
done
for f in tiny-a tiny-next-a tiny-qwen3moe-a; do cp -r "$SHARED/golden/$f" "$C/stage/shared/golden/"; done
cp -r "$SHARED/tokenizer" "$C/stage/shared/"
chmod -R u+w "$C/stage"
(cd "$C/stage" && tar czf ../bins.tgz bin && tar czf ../shared.tgz shared)
rm -rf "$C/stage"
git rev-parse --short HEAD > "$C/commit"
du -sh "$C" $( [ -d .gl ] && echo .gl )
