# Sourced from the repository root by the device rounds (combined-round.sh and its part 2,
# crates/wgpu/scripts/resident-round.sh; carry-c/env.sh there): this round's binaries, fixtures
# and PTX cache from carry-c, unpacked into /tmp/r once per carry (a warm machine given a new
# carry unpacks again), and NVRTC on the library path. Sets C, R, BIN and exports
# FLASHMOE_SHARED, FLASHMOE_CACHE, CI.
C=$PWD/carry-c; R=/tmp/r; BIN=$R/bin
sum=$(cksum < $C/bins.txz)
if [ "$(cat $R/unpacked 2>/dev/null)" != "$sum" ]; then
  mkdir -p $R /tmp/flashmoe-cache
  (cd $R && { tar xJf $C/bins.txz 2>/dev/null || python3 -c "import tarfile; tarfile.open('$C/bins.txz','r:xz').extractall('.')"; } && tar xzf $C/shared.tgz) && echo "$sum" > $R/unpacked
  for f in $C/cache/*.gz; do gunzip -c "$f" > /tmp/flashmoe-cache/$(basename "$f" .gz); done
fi
export FLASHMOE_CACHE=/tmp/flashmoe-cache CI=true FLASHMOE_SHARED=$R
if ! ldconfig -p | grep -q 'libnvrtc.so '; then
  lib=$(ls /usr/local/cuda/lib64/libnvrtc.so* 2>/dev/null | head -1)
  [ -z "$lib" ] && lib=$(find / -name 'libnvrtc.so*' -not -path '/proc/*' 2>/dev/null | grep -v alt | head -1)
  [ -n "$lib" ] && { mkdir -p /tmp/nvl && ln -sf "$lib" /tmp/nvl/libnvrtc.so
    export LD_LIBRARY_PATH=/tmp/nvl:$(dirname "$lib"):${LD_LIBRARY_PATH:-}; }
fi
