#!/usr/bin/env bash
# The engine crate's tests built for aarch64 and run under qemu-user, so that the NEON kernels
# (crates/core/src/kernels/neon.rs) are checked against their plain twins and the golden data
# on an x86-64 machine. Needs the Rust target and Debian's qemu-user, gcc-aarch64-linux-gnu and
# libc6-dev-arm64-cross (`--install` installs what is missing). When one of them cannot be had
# it says so and exits 3 (and a failing test exits non-zero as cargo does), so a skip is never
# silent.
set -euo pipefail
cd "$(dirname "$0")/.."
missing() {
  echo "test-aarch64: skipped: $1"
  exit 3
}
if [ "${1:-}" = "--install" ]; then
  if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross) \
      >/dev/null || missing "could not install qemu-user and the aarch64 cross linker"
  fi
  rustup target list --installed | grep -q '^aarch64-unknown-linux-gnu$' ||
    rustup target add aarch64-unknown-linux-gnu || missing "could not add the aarch64 Rust target"
fi
for tool in qemu-aarch64 aarch64-linux-gnu-gcc; do
  command -v "$tool" >/dev/null || missing "$tool not found (run with --install)"
done
rustup target list --installed | grep -q '^aarch64-unknown-linux-gnu$' ||
  missing "the aarch64-unknown-linux-gnu Rust target is not installed (run with --install)"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
cargo test --release --target aarch64-unknown-linux-gnu -p flashmoe-core
