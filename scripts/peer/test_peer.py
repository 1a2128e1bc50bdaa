#!/usr/bin/env python3
"""Checks of the peer benchmark's own machinery (not a CI test: it needs numpy, gguf-py and a
built flashmoe; what is missing is said, `skipped: <why>`):

- the cold-round reading: a file read into the page cache shows resident, and after
  `drop_from_page_cache` shows nothing (what every larger-than-memory round relies on);
- the F32 twin holds exactly the quantized twin's values dequantized (what the accuracy row's
  llama.cpp figure relies on);
- `base_logit_spread` reads llama-perplexity's base-logits layout.

    python3 scripts/peer/test_peer.py [--flashmoe target/release/flashmoe]
        [--llama-src ~/.cache/flashmoe-peer/llama_cpp_python-VER/vendor/llama.cpp]
"""
import argparse
import glob
import os
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

from cgroup import drop_from_page_cache, resident_bytes  # noqa: E402


def test_drop_empties_the_page_cache(args):
    # On the repository's disk: tmpfs pages are never dropped.
    with tempfile.TemporaryDirectory(dir=os.path.join(REPO, "target")) as d:
        p = os.path.join(d, "f.bin")
        with open(p, "wb") as f:
            f.write(os.urandom(8 << 20))
            f.flush()
            os.fsync(f.fileno())
        with open(p, "rb") as f:
            while f.read(1 << 20):
                pass
        before = resident_bytes([p])
        if before == 0:
            return "skipped: a file just read shows no resident pages here"
        drop_from_page_cache([p])
        after = resident_bytes([p])
        assert after == 0, f"{after} bytes still resident after the drop ({before} before)"


def test_f32_twin_holds_the_same_values(args):
    try:
        import numpy as np
    except ImportError:
        return "skipped: numpy not installed"
    if not os.access(args.flashmoe, os.X_OK):
        return f"skipped: no flashmoe at {args.flashmoe} (cargo build --release -p flashmoe)"
    if not args.llama_src:
        return "skipped: no llama.cpp source (run peer.py once, or --llama-src)"
    from gguf_twin import import_gguf, write_twin

    gguf = import_gguf(args.llama_src)
    with tempfile.TemporaryDirectory() as d:
        model = os.path.join(d, "m")
        subprocess.run([args.flashmoe, "synth", "--preset", "qwen3-30b-a3b", "--layers", "1",
                        "--experts", "16", "--vocab", "512", "--out", model],
                       check=True, capture_output=True)
        q, f = os.path.join(d, "q.gguf"), os.path.join(d, "f.gguf")
        write_twin(model, q, args.llama_src)
        write_twin(model, f, args.llama_src, f32=True)
        rq = {t.name: t for t in gguf.GGUFReader(q).tensors}
        rf = {t.name: t for t in gguf.GGUFReader(f).tensors}
        assert rq.keys() == rf.keys()
        compared = 0
        for name, t in rq.items():
            want = np.asarray(t.data)
            if t.tensor_type != gguf.GGMLQuantizationType.F32:
                want = gguf.quants.dequantize(want, t.tensor_type)
            got = np.asarray(rf[name].data)
            assert rf[name].tensor_type == gguf.GGMLQuantizationType.F32, name
            assert np.array_equal(want.reshape(got.shape), got), f"{name}: values differ"
            compared += 1
        assert compared > 10, f"only {compared} tensors"


def test_base_logit_spread_reads_the_layout(args):
    try:
        import numpy as np
    except ImportError:
        return "skipped: numpy not installed"
    from peer import base_logit_spread

    n_ctx, n_vocab, n_chunk = 8, 5, 2
    rows = (n_ctx - 1 - n_ctx // 2) * n_chunk
    nv = 2 * ((n_vocab + 1) // 2) + 4
    rng = np.random.default_rng(0)
    lp = np.log(rng.dirichlet(np.ones(n_vocab), rows))
    b = bytearray(b"_logits_" + struct.pack("<Iii", n_ctx, n_vocab, n_chunk))
    b += np.zeros(n_ctx * n_chunk, np.int32).tobytes()
    for row in lp:
        lo, hi = row.min(), row.max()
        scale = (hi - lo) / 65535
        codes = np.round((row - lo) / scale).astype(np.uint16)
        rec = np.zeros(nv, np.uint16)
        rec[:4] = np.array([scale, lo], np.float32).view(np.uint16)
        rec[4:4 + n_vocab] = codes
        b += rec.tobytes()
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(b)
        f.flush()
        got = base_logit_spread(f.name)
    want = float(lp.std(axis=1).mean())
    assert abs(got - want) < 1e-3 * want, (got, want)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flashmoe", default=os.path.join(REPO, "target/release/flashmoe"))
    src = sorted(glob.glob(os.path.expanduser(
        "~/.cache/flashmoe-peer/llama_cpp_python-*/vendor/llama.cpp")))
    ap.add_argument("--llama-src", default=src[-1] if src else None)
    args = ap.parse_args()
    failed = 0
    for name, fn in sorted(globals().items()):
        if not (name.startswith("test_") and callable(fn)):
            continue
        try:
            why = fn(args)
            print(f"{why} ({name})" if why else f"ok {name}")
        except Exception as e:  # noqa: BLE001 - a failed check is reported, the rest still run
            failed += 1
            print(f"FAILED {name}: {e!r}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
