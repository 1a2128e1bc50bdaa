#!/usr/bin/env python3
"""flashmoe against llama.cpp on the same model shapes and bits per weight (issue 20).

    scripts/peer/peer.py [--preset qwen3-30b-a3b --layers 4 --vocab 4096] [--threads N]
                         [--rounds 3] [--cases decode,prefill,load,larger,accuracy] [--cuda]
                         [--record results.tsv]

The CUDA comparison on a GPU machine without network is scripts/peer/device-round.sh
(prepared here by scripts/peer/prepare-device.sh).

1. Obtains llama.cpp from the package registry: the `llama-cpp-python` sdist vendors it
   (`pip download --no-binary llama-cpp-python --no-deps`), unpacked and built with CMake into
   a cache directory outside the repository (~/.cache/flashmoe-peer; --cache). CPU by default;
   --cuda builds with -DGGML_CUDA=ON for the card's architecture only. Needs pip, cmake
   (`pip install cmake`) and a C++ compiler; numpy for the GGUF writer.
2. Makes the flashmoe model with `flashmoe synth` (random weights at a preset's shapes, cut to
   --layers and --vocab) and its GGUF twin (gguf_twin.py): every tensor at the same bits per
   weight (4-bit affine g64 = Q4_0 or Q4_K, 8-bit = Q8_0), written straight as random blocks.
3. Runs `llama-bench` and `flashmoe bench --json` in alternating rounds with the same threads
   (warm page cache), and prints each path's llama.cpp and flashmoe tok/s (min and median over
   the rounds) and their ratio: decode (flashmoe's defaults, kept mapped, and the same
   run's --exact f32 activations, with int8's KL divergence and top-1 agreement against
   it), prefill at each --prompts length, load to first token (a whole process, warm page
   cache: llama-bench -n 1 without warm-up against `flashmoe run --tokens 1`) with the peak
   resident memory of a --tokens decode process of each, and decode of a model larger than memory
   (a memory cgroup of --cgroup-fraction of the model's size: llama.cpp mmap against flashmoe
   --io direct) where cgroups can be made. Every round of it starts cold: the models' files
   are dropped from the page cache and what the cgroup still holds is reclaimed before each
   engine's run, and the round's table shows the reading (bytes of the files resident at its
   start, bytes read from the disk and major faults during it).
4. Accuracy of llama.cpp's own activation quantization (--cases accuracy): the Q4_0 twin, whose
   products quantize activations to Q8_0, against an F32 twin holding the same weights
   dequantized (so its products take F32 activations), through `llama-perplexity
   --kl-divergence` on the same tokens (this README, one token per call as in decode, and a
   whole chunk per call as in prefill), printed beside flashmoe's int8-against-exact figures
   from `bench decode`.
5. Appends one row per path to --record (the TSV `flashmoe bench --record` writes).

A script people run, not a CI test: it builds llama.cpp (~15 min on 2 cores).
"""
import argparse
import json
import os
import re
import resource
import shutil
import struct
import statistics
import subprocess
import sys
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

from cgroup import drop_from_page_cache, memory_cgroup, resident_bytes  # noqa: E402


def say(msg):
    print(f"[peer] {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw):
    say("$ " + " ".join(str(c) for c in cmd))
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def llama_source(cache, version):
    """The vendored llama.cpp of the llama-cpp-python sdist (downloaded once); its version."""
    os.makedirs(cache, exist_ok=True)
    spec = f"llama-cpp-python=={version}" if version else "llama-cpp-python"
    have = sorted(f for f in os.listdir(cache) if f.startswith("llama_cpp_python-")
                  and f.endswith(".tar.gz"))
    if version:
        have = [f for f in have if f == f"llama_cpp_python-{version}.tar.gz"]
    if not have:
        run([sys.executable, "-m", "pip", "download", "--no-binary", "llama-cpp-python",
             "--no-deps", spec, "-d", cache])
        have = sorted(f for f in os.listdir(cache) if f.startswith("llama_cpp_python-")
                      and f.endswith(".tar.gz"))
    sdist = have[-1]
    ver = sdist[len("llama_cpp_python-"):-len(".tar.gz")]
    src = os.path.join(cache, f"llama_cpp_python-{ver}", "vendor", "llama.cpp")
    if not os.path.isdir(src):
        say(f"unpacking {sdist}")
        with tarfile.open(os.path.join(cache, sdist)) as t:
            t.extractall(cache, filter="data")
    return src, ver


def cuda_arch():
    out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                         capture_output=True, text=True, check=True).stdout
    return out.split()[0].replace(".", "")


def build_llama(cache, src, ver, cuda, jobs, target="llama-bench"):
    """`target` (llama-bench, llama-perplexity) built from `src` (once per version and
    backend); its path."""
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
             "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
             "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF"]
    tag = "cpu"
    if cuda:
        arch = cuda_arch()
        flags += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={arch}"]
        tag = f"cuda{arch}"
    build = os.path.join(cache, f"build-{ver}-{tag}")
    exe = os.path.join(build, "bin", target)
    if not os.path.exists(exe):
        if shutil.which("cmake") is None:
            sys.exit("cmake not found: `pip install cmake` (or your package manager's)")
        if not os.path.exists(os.path.join(build, "CMakeCache.txt")):
            run(["cmake", "-S", src, "-B", build] + flags)
        run(["cmake", "--build", build, "--target", target, f"-j{jobs}"])
    return exe


def llama_bench(exe, gguf, threads, prompt=0, gen=0, ngl=0):
    """tok/s of one llama-bench measurement (one repetition, as flashmoe's one run)."""
    cmd = [exe, "-m", gguf, "-t", threads, "-p", prompt, "-n", gen, "-r", 1, "-o", "json",
           "-ngl", ngl]
    out = run(cmd, capture_output=True, text=True).stdout
    rows = json.loads(out)
    return rows[0]["avg_ts"]



def timed(cmd):
    """Wall seconds from spawning `cmd` to its exit, and its peak resident memory in bytes
    (this child's own rusage through wait4, not the maximum over every child so far)."""
    say("$ " + " ".join(str(c) for c in cmd))
    t0 = time.monotonic()
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.read()[-2000:]}")
    return wall, ru.ru_maxrss * 1024


def flashmoe_bench(fm, model, what, threads, extra=()):
    cmd = [fm, "bench", what, "--model", model, "--json", "--threads", threads] + list(extra)
    return json.loads(run(cmd, capture_output=True, text=True).stdout)


def in_cgroup(cmd, cg):
    """stdout of `cmd` run inside the cgroup, or None (said) when it fails there."""
    say("$ " + " ".join(str(c) for c in cmd) + "   (in the memory cgroup)")
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                       preexec_fn=cg.enter)
    if r.returncode != 0:
        say(f"failed in the cgroup (status {r.returncode}): {r.stderr.strip()[-300:]}")
        return None
    return r.stdout


def cold_run(cmd, cg, files):
    """`cmd` in the cgroup after dropping `files` from the page cache and reclaiming what the
    cgroup holds: (stdout or None, the reading that says the run began cold)."""
    drop_from_page_cache(files)
    reclaimed = cg.reclaim()
    before = resident_bytes(files)
    ru0, st0 = resource.getrusage(resource.RUSAGE_CHILDREN), cg.stat()
    out = in_cgroup(cmd, cg)
    ru1, st1 = resource.getrusage(resource.RUSAGE_CHILDREN), cg.stat()
    return out, {
        "resident_mib_at_start": before / 2**20,
        "reclaimed": reclaimed,
        # Block input of the run (512-byte units): what it read from the disk, page cache
        # misses and O_DIRECT reads alike.
        "read_mib": (ru1.ru_inblock - ru0.ru_inblock) * 512 / 2**20,
        "major_faults": ru1.ru_majflt - ru0.ru_majflt,
        "cgroup_pgmajfault": st1.get("pgmajfault", 0) - st0.get("pgmajfault", 0),
    }


# flashmoe's int8-against-exact fields of `bench decode` (decode: one token per call;
# prompt: the sequence in one call).
ACC_KEYS = ("int8_decode_kl_mean", "int8_decode_top1_agree", "int8_prompt_kl_mean",
            "int8_prompt_top1_agree")


def llama_accuracy(a, src, ver, model, gguf, t):
    """llama.cpp's Q8_0 activations against F32 ones on the same weights: the Q4_0 twin against
    an F32 twin of its dequantized values (written once, same seed), `llama-perplexity
    --kl-divergence` over this repository's README. {mode: (KL mean, top-1 agreement)}, mode
    "decode" (one token per call, -ub 1) and "prompt" (the whole chunk in one call)."""
    from gguf_twin import write_twin

    ppl = build_llama(a.cache, src, ver, False, a.jobs, target="llama-perplexity")
    f32 = gguf[:-len(".gguf")] + "-f32.gguf"
    if not os.path.exists(f32) or os.path.getmtime(f32) < os.path.getmtime(gguf):
        say(f"writing the F32 twin {f32} (the Q4_0 twin's values, dequantized)")
        write_twin(model, f32 + ".partial", src, q4k=a.q4k, f32=True)
        os.replace(f32 + ".partial", f32)
    text = os.path.join(REPO, "README.md")
    base = os.path.join(a.cache, "kld-base.bin")
    common = ["-f", text, "-c", a.kl_ctx, "-b", a.kl_ctx, "--chunks", a.kl_chunks, "-t", t,
              "--kl-divergence-base", base]
    run([ppl, "-m", f32, "-ub", 1] + common, capture_output=True, text=True)
    out = {"logit_std": base_logit_spread(base)}
    for mode, ub in (("decode", 1), ("prompt", a.kl_ctx)):
        r = run([ppl, "-m", gguf, "-ub", ub, "--kl-divergence"] + common,
                capture_output=True, text=True)
        log = r.stdout + r.stderr
        kl = re.search(r"Mean\s+KLD:\s+([-0-9.eE+]+)", log)
        top = re.search(r"Same top p:\s+([0-9.]+)", log)
        if not (kl and top):
            sys.exit(f"llama-perplexity printed no KL statistics:\n{log[-2000:]}")
        out[mode] = (float(kl.group(1)), float(top.group(1)) / 100)
    return out


def base_logit_spread(path):
    """Mean over positions of the standard deviation of the base run's log-probabilities (=
    of its logits) in a `llama-perplexity --kl-divergence-base` file: per position two f32
    (scale, min) and n_vocab u16 codes, log p = min + scale * code."""
    import numpy as np

    b = open(path, "rb").read()
    if b[:8] != b"_logits_":
        raise ValueError(f"{path}: not a llama-perplexity logits file")
    n_ctx, n_vocab, n_chunk = struct.unpack_from("<Iii", b, 8)
    off = 8 + 12 + 4 * n_ctx * n_chunk
    nv = 2 * ((n_vocab + 1) // 2) + 4
    rows = (n_ctx - 1 - n_ctx // 2) * n_chunk
    a = np.frombuffer(b, dtype=np.uint16, offset=off, count=rows * nv).reshape(rows, nv)
    head = a[:, :4].copy().view(np.float32)
    lp = head[:, :1] * a[:, 4:4 + n_vocab].astype(np.float64) + head[:, 1:2]
    return float(lp.std(axis=1).mean())


def flashmoe_logit_spread(a, model, t):
    """Mean over positions of the standard deviation of flashmoe's exact logits over the
    README's first 64 bytes (as byte tokens): the scale its KL divergence is taken on."""
    import numpy as np

    ids = ",".join(str(x) for x in open(os.path.join(REPO, "README.md"), "rb").read()[:64])
    out = os.path.join(a.cache, "flashmoe-logits.safetensors")
    run([a.flashmoe, "logits", "--model", model, "--ids", ids, "--out", out, "--threads", t],
        capture_output=True, text=True)
    b = open(out, "rb").read()
    n = struct.unpack_from("<Q", b, 0)[0]
    h = json.loads(b[8:8 + n])
    t_ = h["logits"]
    s, e = t_["data_offsets"]
    x = np.frombuffer(b, dtype=np.float32, offset=8 + n + s, count=(e - s) // 4)
    return float(x.reshape(-1, t_["shape"][-1]).std(axis=1).mean())


def stats(v):
    return (min(v), statistics.median(v)) if v else (None, None)


def fmt(x):
    return "-" if x is None else f"{x:.2f}"


def git_commit():
    r = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                       capture_output=True, text=True)
    return r.stdout.strip() or "-"


def record(path, rows, model, bits, k, note, extra=None):
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a") as f:
        if new:
            f.write("commit\tmodel\tbits\tk\ttok_s\tttft_ms\tmem_gb\tnotes\n")
        for name, ll, fm in rows:
            ratio = fm[1] / ll[1] if ll[1] and fm[1] else None
            notes = (f"peer path={name} (tok_s: flashmoe median) llama_tok_s={fmt(ll[1])} "
                     f"ratio={fmt(ratio)} flashmoe_min={fmt(fm[0])} llama_min={fmt(ll[0])} "
                     f"{note}{(extra or {}).get(name, '')}")
            f.write(f"{git_commit()}\t{model}\t{bits}\t{k}\t{fmt(fm[1])}\t-\t-\t{notes}\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--bits", default="4", choices=["4", "8"])
    ap.add_argument("--dense-bits", default="4", choices=["4", "8", "16"])
    ap.add_argument("--q4k", action="store_true", help="4-bit tensors as Q4_K (default Q4_0)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32, help="decode tokens per measurement")
    ap.add_argument("--prompts", default="512", help="prefill lengths, comma separated")
    ap.add_argument("--cgroup-fraction", type=float, default=0.5,
                    help="memory limit of the larger-than-memory case, as a fraction of the "
                         "GGUF's size (0 skips the case)")
    ap.add_argument("--cuda", action="store_true", help="llama.cpp with CUDA, -ngl 99")
    ap.add_argument("--llama-cpp-python", help="sdist version (default: the newest)")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/flashmoe-peer"))
    ap.add_argument("--flashmoe", default=os.path.join(REPO, "target/release/flashmoe"))
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--record", help="append rows to this TSV (as `bench --record`)")
    ap.add_argument("--cases", default="decode,prefill,load,larger,accuracy",
                    help="which of decode, prefill, load (to first token, and peak memory of "
                    "a decode), larger (than memory), accuracy to run")
    ap.add_argument("--kl-ctx", type=int, default=128,
                    help="accuracy: tokens per llama-perplexity chunk (the second half scored)")
    ap.add_argument("--kl-chunks", type=int, default=4, help="accuracy: chunks compared")
    a = ap.parse_args()
    cases = set(a.cases.split(","))
    known = {"decode", "prefill", "load", "larger", "accuracy"}
    if cases - known:
        sys.exit(f"--cases: unknown {sorted(cases - known)}")

    src, ver = llama_source(a.cache, a.llama_cpp_python)
    exe = build_llama(a.cache, src, ver, a.cuda, a.jobs)
    from gguf_twin import TWIN_FORMAT, write_twin

    name = (f"{a.preset}-l{a.layers}-v{a.vocab}" + (f"-e{a.experts}" if a.experts else "")
            + f"-b{a.bits}-d{a.dense_bits}")
    models = os.path.join(a.cache, "models")
    model = os.path.join(models, name)
    if not os.path.exists(os.path.join(model, "manifest.json")):
        cmd = [a.flashmoe, "synth", "--preset", a.preset, "--layers", a.layers, "--vocab",
               a.vocab, "--bits", a.bits, "--dense-bits", a.dense_bits, "--out", model,
               "--force"]
        if a.experts:
            cmd += ["--experts", a.experts]
        run(cmd)
    gguf = os.path.join(models, name + ("-q4k" if a.q4k else "") + f".twin{TWIN_FORMAT}.gguf")
    if not os.path.exists(gguf):
        say(f"writing the GGUF twin {gguf}")
        write_twin(model, gguf + ".partial", src, q4k=a.q4k)
        os.replace(gguf + ".partial", gguf)
    size = os.path.getsize(gguf)
    man = json.load(open(os.path.join(model, "manifest.json")))
    cfg = man["config"].get("text_config", man["config"])
    k = cfg["num_experts_per_tok"]
    t, ngl = a.threads, (99 if a.cuda else 0)
    dec = ["--tokens", a.tokens, "--no-cold"]
    prompts = [int(p) for p in a.prompts.split(",") if p]

    res = {}  # path -> ([llama tok/s], [flashmoe tok/s])
    acc = {}  # int8 accuracy field -> [value per round]

    def add(path, ll=None, fm=None):
        r = res.setdefault(path, ([], []))
        if ll is not None:
            r[0].append(ll)
        if fm is not None:
            r[1].append(fm)

    mem = {}  # engine -> [peak RSS bytes of a warm decode]
    for rnd in range(a.rounds if {"decode", "prefill", "load"} & cases else 0):
        say(f"round {rnd + 1}/{a.rounds}")
        if "decode" in cases:
            add("decode", ll=llama_bench(exe, gguf, t, gen=a.tokens, ngl=ngl))
            d = flashmoe_bench(a.flashmoe, model, "decode", t, dec)["decode"]
            add("decode", fm=d["warm_tok_s"])
            add("decode, --io mapped", fm=d.get("warm_kept_mapped_tok_s"))
            # The same run's exact-activation decode, and int8's accuracy against it.
            add("decode, --exact", fm=d.get("warm_exact_tok_s"))
            for key in ACC_KEYS:
                acc.setdefault(key, []).append(d.get(key))
        if "load" in cases:
            # Process start to the first generated token (warm page cache): llama-bench
            # without its warm-up run, one token; flashmoe `run`, one token. Then the peak
            # memory of a whole process decoding --tokens tokens, each engine's defaults.
            w, _ = timed([exe, "-m", gguf, "-t", t, "-p", 0, "-n", 1, "-r", 1, "--no-warmup",
                          "-o", "json", "-ngl", ngl])
            add("load to first token, s", ll=w)
            w, _ = timed([a.flashmoe, "run", "--model", model, "--ids", "1", "--tokens", 1,
                          "--threads", t] + (["--backend", "cuda"] if a.cuda else []))
            add("load to first token, s", fm=w)
            _, rss = timed([exe, "-m", gguf, "-t", t, "-p", 0, "-n", a.tokens, "-r", 1,
                            "--no-warmup", "-o", "json", "-ngl", ngl])
            mem.setdefault("llama.cpp", []).append(rss)
            _, rss = timed([a.flashmoe, "run", "--model", model, "--ids", "1", "--tokens",
                            a.tokens, "--threads", t] + (["--backend", "cuda"] if a.cuda else []))
            mem.setdefault("flashmoe", []).append(rss)
        for p in prompts if "prefill" in cases else []:
            add(f"prefill {p}", ll=llama_bench(exe, gguf, t, prompt=p, ngl=ngl))
            r = flashmoe_bench(a.flashmoe, model, "prefill", t,
                               ["--prompt-tokens", p, "--tokens", 1, "--no-cold",
                                "--no-compare"])
            add(f"prefill {p}", fm=r["prefill"]["warm_prefill_tok_s"])
            acc.setdefault(f"prefill {p} fraction of bound", []).append(
                r["prefill"].get("warm_prefill_fraction_of_bound"))

    larger, readings = None, []
    if "larger" in cases and a.cgroup_fraction > 0 and not a.cuda:
        limit = int(size * a.cgroup_fraction)
        files = [gguf] + [os.path.join(d, f) for d, _, fs in os.walk(model) for f in fs]
        with memory_cgroup(limit) as cg:
            if cg is None:
                say("larger-than-memory case skipped: no memory cgroup can be made here "
                    "(needs root with cgroup v1 memory or v2 with the memory controller)")
            else:
                larger = f"decode, model {size / limit:.1f}x the memory limit ({limit >> 20} MiB)"
                # llama.cpp mmaps the GGUF (its default); CPU repacking would copy every
                # weight into anonymous memory, which cannot exceed the limit (OOM-killed).
                llama = [exe, "-m", gguf, "-t", t, "-p", 0, "-n", 8, "-r", 1, "-o", "json",
                         "--repack", 0]
                fmb = [a.flashmoe, "bench", "decode", "--model", model, "--json", "--threads",
                       t, "--tokens", 8, "--no-compare", "--constrained-rounds", 0]
                for rnd in range(a.rounds):
                    out, r = cold_run(llama, cg, files)
                    v = out and json.loads(out)[0]["avg_ts"]
                    add(larger, ll=v)
                    readings.append(("llama.cpp", rnd + 1, v, r))
                    out, r = cold_run(fmb, cg, files)
                    v = out and json.loads(out)["decode"].get("cold_tok_s")
                    add(larger, fm=v)
                    readings.append(("flashmoe", rnd + 1, v, r))

    llama_acc = None
    if "accuracy" in cases and not a.cuda:
        llama_acc = llama_accuracy(a, src, ver, model, gguf, t)
        llama_acc["flashmoe_logit_std"] = flashmoe_logit_spread(a, model, t)
        if not acc.get("int8_decode_kl_mean"):
            d = flashmoe_bench(a.flashmoe, model, "decode", t,
                               dec + ["--no-compare", "--constrained-rounds", 0])["decode"]
            for key in ACC_KEYS:
                acc.setdefault(key, []).append(d.get(key))

    cpu = "CUDA -ngl 99" if a.cuda else f"CPU, {t} threads"
    print(f"\nflashmoe {git_commit()} vs llama.cpp (llama-cpp-python {ver}), {cpu}; model "
          f"{name} ({size / 2**30:.2f} GiB GGUF, {'Q4_K' if a.q4k else 'Q4_0'}); "
          f"{a.rounds} alternating rounds, tok/s min / median\n")
    print("| path | llama.cpp | flashmoe | ratio (medians) |\n|---|---|---|---|")
    rows = []
    base = {p: stats(res.get("decode", ([], []))[0])
            for p in ("decode, --io mapped", "decode, --exact")}
    for path, (ll, fm) in res.items():
        ll = [x for x in ll if x is not None]
        # flashmoe's decode variants stand against llama.cpp's one decode figure.
        lls = stats(ll) if ll else base.get(path, (None, None))
        fms = stats([x for x in fm if x is not None])
        ratio = fms[1] / lls[1] if lls[1] and fms[1] else None
        if path.endswith(", s"):
            # A time: the ratio says how many times sooner flashmoe is there.
            ratio = lls[1] / fms[1] if lls[1] and fms[1] else None
        print(f"| {path} | {fmt(lls[0])} / {fmt(lls[1])} | {fmt(fms[0])} / {fmt(fms[1])} | "
              f"{fmt(ratio)} |")
        if not path.endswith(", s"):
            rows.append((path, lls, fms))
    if mem.get("llama.cpp") and mem.get("flashmoe"):
        ll, fm = max(mem["llama.cpp"]) / 2**30, max(mem["flashmoe"]) / 2**30
        print(f"| peak RSS of a {a.tokens}-token decode process, GiB (max over rounds) | "
              f"{ll:.2f} | {fm:.2f} | {ll / fm:.1f}x less |")
    if larger is None and "larger" in cases and a.cgroup_fraction > 0 and not a.cuda:
        print("| decode, model larger than memory | skipped: no memory cgroup here | | |")
    notes = {}
    if readings:
        print(f"\n{larger}, each round's reading (files dropped from the page cache and the "
              "cgroup's pages reclaimed before it): the models' bytes resident when it began, "
              "what it read from the disk (block input, O_DIRECT included) and its major faults\n")
        print("| engine | round | tok/s | resident at start, MiB | read from disk, MiB | "
              "major faults |\n|---|---|---|---|---|---|")
        for eng, rnd, v, r in readings:
            print(f"| {eng} | {rnd} | {fmt(v)} | {r['resident_mib_at_start']:.1f} | "
                  f"{r['read_mib']:.0f} | {r['major_faults']} |")
        for eng in ("llama.cpp", "flashmoe"):
            rs = [r for e, _, _, r in readings if e == eng]
            notes.setdefault(larger, "")
            notes[larger] += (f" {eng.replace('.cpp', '')}_resident_mib_at_start_max="
                              f"{max(r['resident_mib_at_start'] for r in rs):.1f} "
                              f"{eng.replace('.cpp', '')}_read_mib="
                              + ",".join(f"{r['read_mib']:.0f}" for r in rs))
    fm_acc = {k: [x for x in acc.get(k, []) if x is not None] for k in ACC_KEYS}
    if llama_acc:
        print("\nActivations quantized against exact, same weights: KL(P_exact || P_quantized) "
              "mean, nats / top-1 agreement. llama.cpp: Q8_0 activations (the Q4_0 twin) against "
              "F32 (the F32 twin of the same values), llama-perplexity --kl-divergence over "
              f"README.md ({a.kl_chunks} chunks of {a.kl_ctx} tokens, the second halves "
              "scored); flashmoe: int8 (the default) "
              "against --exact in `bench decode` (median of its runs), on its own synthetic "
              "weights of the same shapes. Both models' next-token logits have a standard "
              f"deviation of {llama_acc['logit_std']:.3f} (llama.cpp's F32 twin) and "
              f"{llama_acc['flashmoe_logit_std']:.3f} (flashmoe --exact) per position, so "
              "sqrt(2 KL), the RMS logit error the quantization adds (to second order), "
              "compares the two directly\n")
        print("| path | llama.cpp Q8_0 vs F32 | flashmoe int8 vs --exact | RMS logit error "
              "sqrt(2 KL), llama.cpp / flashmoe |\n|---|---|---|---|")
        for mode, what in (("decode", "one token per call"), ("prompt", "whole sequence per call")):
            ll_kl, ll_top = llama_acc[mode]
            kls, t1 = fm_acc[f"int8_{mode}_kl_mean"], fm_acc[f"int8_{mode}_top1_agree"]
            fm_s = (f"{statistics.median(kls):.3g} / {statistics.median(t1):.3f}"
                    if kls and t1 else "-")
            rms = (f"{(2 * ll_kl) ** 0.5:.2g} / "
                   + (f"{(2 * statistics.median(kls)) ** 0.5:.2g}" if kls else "-"))
            print(f"| {mode} ({what}) | {ll_kl:.3g} / {ll_top:.3f} | {fm_s} | {rms} |")
            notes[f"accuracy {mode}"] = (
                f" llama_q8_kl={ll_kl:.3g} llama_q8_top1={ll_top:.3f} flashmoe_int8="
                + fm_s.replace(" / ", ",top1=").replace(" ", ""))
            rows.append((f"accuracy {mode}", (None, None), (None, None)))
    kl = fm_acc["int8_decode_kl_mean"]
    top1 = fm_acc["int8_decode_top1_agree"]
    for key, v in acc.items():
        v = [x for x in v if x is not None]
        if key.startswith("prefill") and v:
            print(f"flashmoe {key.replace(' fraction of bound', '')}: "
                  f"{statistics.median(v):.2f} of the same run's bound max(bytes / memory "
                  f"bandwidth, multiply-adds / measured f32 and int8 peaks) (median)")
    if kl and top1:
        print(f"\nflashmoe's default int8 activations against --exact, decode (median of rounds): "
              f"KL divergence {statistics.median(kl):.3g} nats, top-1 agreement "
              f"{statistics.median(top1):.3f}")
    if a.record:
        record(a.record, rows, name, a.bits, k,
               f"llama.cpp={ver} threads={t} {'cuda' if a.cuda else 'cpu'}", notes)
        say(f"appended {len(rows)} rows to {a.record}")


if __name__ == "__main__":
    t0 = time.time()
    main()
    say(f"done in {time.time() - t0:.0f}s")
