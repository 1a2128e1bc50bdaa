#!/usr/bin/env bash
# Prepares the carry folder for scripts/peer/device-round.sh (run here, not on the device):
#   scripts/peer/prepare-device.sh CARRY_DIR
# CARRY_DIR gets
#   flashmoe          this checkout's flashmoe built with --features cuda (no wgpu), stripped
#   llama-trim.tar.gz the llama.cpp vendored by the llama-cpp-python sdist (peer.py fetches
#                     and unpacks it into ~/.cache/flashmoe-peer), cut to what llama-bench
#                     with CUDA needs: CMake files, ggml (core, CPU, CUDA), src, include,
#                     common, vendor, tools/llama-bench (tools/CMakeLists.txt replaced by one
#                     that adds only it), and gguf-py for the GGUF twin
#   peer/             scripts/peer (device-round.sh, gguf_twin.py, ...)
# The device machine has no network and carries at most 64 MiB per call (working tree
# included): the three together are about 30 MB.
set -euo pipefail
CARRY=${1:?usage: prepare-device.sh CARRY_DIR}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${FLASHMOE_PEER_CACHE:-$HOME/.cache/flashmoe-peer}
VER=${LLAMA_CPP_PYTHON:-0.3.36}
SRC=$CACHE/llama_cpp_python-$VER/vendor/llama.cpp
if [ ! -d "$SRC" ]; then
  # peer.py's fetch (pip download of the sdist, unpacked into the cache).
  python3 -c "import sys; sys.path.insert(0, '$REPO/scripts/peer'); import peer; \
print(peer.llama_source('$CACHE', '$VER'))"
fi
mkdir -p "$CARRY"
(cd "$REPO" && cargo build --release -p flashmoe --no-default-features --features cuda)
strip -o "$CARRY/flashmoe" "${CARGO_TARGET_DIR:-$REPO/target}/release/flashmoe"

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
dst=$stage/llama.cpp
mkdir -p "$dst/ggml/src" "$dst/tools"
(cd "$SRC" && cp -r CMakeLists.txt LICENSE cmake src include common vendor gguf-py "$dst/")
(cd "$SRC/ggml" && cp -r CMakeLists.txt cmake include "$dst/ggml/")
(cd "$SRC/ggml/src" && cp -r CMakeLists.txt ./*.c ./*.cpp ./*.h ./*.in ggml-cpu ggml-cuda "$dst/ggml/src/")
cp -r "$SRC/tools/llama-bench" "$dst/tools/"
cat >"$dst/tools/CMakeLists.txt" <<'EOF'
# Trimmed by flashmoe's scripts/peer/prepare-device.sh: llama-bench only.
find_package(Threads REQUIRED)
llama_add_compile_flags()
add_subdirectory(llama-bench)
EOF
echo "$VER" >"$dst/LLAMA_CPP_PYTHON_VERSION"
# Without its .git, llama.cpp's build-info would take the commit of whatever repository holds
# the source there (flashmoe's checkout on the device): pin the vendored commit instead.
commit=$(git -C "$SRC" rev-parse --short HEAD 2>/dev/null || echo unknown)
count=$(git -C "$SRC" rev-list --count HEAD 2>/dev/null || echo 0)
echo "$commit" >"$dst/LLAMA_COMMIT"
printf '\n# pinned by flashmoe prepare-device.sh: the vendored commit, not the enclosing repo'"'"'s\nset(BUILD_COMMIT "%s")\nset(BUILD_NUMBER %s)\n' \
  "$commit" "$count" >>"$dst/cmake/build-info.cmake"
tar -C "$stage" -czf "$CARRY/llama-trim.tar.gz" llama.cpp
rm -rf "$CARRY/peer"
cp -r "$REPO/scripts/peer" "$CARRY/peer"
rm -rf "$CARRY/peer/__pycache__"
du -sh "$CARRY"/*
