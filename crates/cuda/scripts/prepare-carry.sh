#!/usr/bin/env bash
# Builds the CUDA tests and bench here and copies them, stripped, with the golden fixtures into
# carry/ (git-ignored) for the device machine.
set -euo pipefail
cargo build --release -p flashmoe-cuda --example cuda_bench
t=$(cargo test --release -p flashmoe-cuda --test device --no-run 2>&1 | sed -n 's/.*Executable tests\/device.rs (\(.*\))/\1/p')
rm -rf carry && mkdir -p carry/shared/golden
strip -o carry/device "$t"
strip -o carry/cuda_bench "${CARGO_TARGET_DIR:-target}/release/examples/cuda_bench"
for f in tiny-a tiny-next-a tiny-qwen3moe-a; do cp -r "${FLASHMOE_SHARED:-../shared}/golden/$f" carry/shared/golden/; done
# The shared-data rule (flashmoe-testdata) wants both golden/ and tokenizer/.
cp -r "${FLASHMOE_SHARED:-../shared}/tokenizer" carry/shared/
chmod -R u+w carry
du -sh carry
