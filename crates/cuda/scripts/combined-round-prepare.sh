#!/usr/bin/env bash
# Prepares the combined device round (crates/cuda/scripts/combined-round.sh, which runs
# crates/wgpu/scripts/resident-round.sh as its part 2; ROUND_W names another script of that
# folder) in carry-c/: this checkout's binaries (CUDA tests, cuda_bench, flashmoe, wgpu tests,
# the CLI's wgpu tests), the before binaries, fixtures, PTX caches. Then: run with carry
# ["carry-c", ".gl"], command `LIM=420 bash carry-c/round.sh` (LIM: the seconds the round may
# take; combined-round.sh's header lists its switches). Used at 09f4580 to d7ede6e (2026-12-07).
# BEFORE: a folder with the before binaries (bench_before = cuda_bench, flashmoe_before) and the
# PTX of their kernels.cu (kernels-sm_90-*.ptx.gz), e.g. built at 86c3e95 (the old loop).
BEFORE=${BEFORE:?set BEFORE to the folder of the before binaries}
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
F=carry-c; rm -rf $F; mkdir -p $F/bin $F/cache /tmp/cptx
cargo build --release -p flashmoe --features cuda,wgpu
cargo build --release -p flashmoe-cuda --example cuda_bench
exe() { cargo test --release -p $1 --test $2 --no-run 2>&1 | sed -n "s/.*Executable tests\/$2.rs (\(.*\))/\1/p"; }
for t in backend device; do strip -o $F/bin/cuda_$t "$(exe flashmoe-cuda $t)"; done
for t in products conformance golden; do strip -o $F/bin/wgpu_$t "$(exe flashmoe-wgpu $t)"; done
# The CLI's wgpu tests run this checkout's binary by its path here (CARGO_BIN_EXE_flashmoe).
cli=$(cargo test --release -p flashmoe --features cuda,wgpu --test wgpu_cli --no-run 2>&1 | sed -n 's/.*Executable tests\/wgpu_cli.rs (\(.*\))/\1/p')
strip -o $F/bin/wgpu_cli "$cli"; echo "$PWD/target/release/flashmoe" > $F/bin/flashmoe.path
strip -o $F/bin/flashmoe target/release/flashmoe
strip -o $F/bin/cuda_bench target/release/examples/cuda_bench
cp "$BEFORE/bench_before" "$BEFORE/flashmoe_before" $F/bin/
rm -f /tmp/cptx/*
LD_LIBRARY_PATH=/tmp/nvl:/tmp/nvrtc/nvidia/cuda_nvrtc/lib FLASHMOE_CACHE=/tmp/cptx $F/bin/cuda_bench --ptx-only
for f in /tmp/cptx/*.ptx; do gzip -c $f > $F/cache/$(basename $f).gz; done
cp "$BEFORE"/kernels-sm_90-*.ptx.gz $F/cache/
(cd $F && tar cJf bins.txz bin && rm -rf bin)
(cd "${FLASHMOE_SHARED:-../shared}" && tar czf "$OLDPWD/$F/shared.tgz" golden tokenizer)
cp crates/cuda/scripts/carry-env.sh $F/env.sh; cp crates/cuda/scripts/combined-round.sh $F/round.sh; cp crates/wgpu/scripts/${ROUND_W:-resident-round.sh} $F/round-w.sh
du -sh $F; ls -la $F $F/cache
