"""The GGUF twin of a flashmoe packed model: same architecture, shapes and bits per weight,
random weights, written block by block with gguf-py (no bf16 intermediate), for llama.cpp.

Each tensor's GGML type follows the packed model's manifest: 4-bit affine (group 64, bf16
scale and bias: 4.5 bits per weight) -> Q4_0 (or Q4_K with --q4k; both 4.5), 8-bit (8.5) ->
Q8_0 (8.5), bf16 -> BF16, f32 -> F32. Only the `qwen3_moe` family (llama.cpp `qwen3moe`)
is mapped; the Qwen3.5/Qwen3-Next hybrids need llama.cpp's SSM tensor layout (not done).

Random codes are uniform with block scales giving a standard deviation of about 0.02 (as
`flashmoe synth` draws), so activations stay ordinary and routing is spread.

Tensors are generated in parallel (one seeded generator per tensor, so the draw does not depend
on the thread count) and streamed to the file one at a time: a full-depth twin (16 GiB for
qwen3-30b-a3b) never sits in memory. `--f32` writes every quantized tensor dequantized to F32
instead (the same values as the quantized twin of the same seed): llama.cpp then multiplies
with F32 activations, so the quantized twin against it measures llama.cpp's own Q8 activation
quantization alone (peer.py's accuracy row).

    python3 gguf_twin.py MODEL_DIR OUT.gguf LLAMA_CPP_SRC [--q4k] [--f32]
"""
import concurrent.futures
import json
import os
import sys

import numpy as np

QK = {"Q4_0": (32, 18), "Q8_0": (32, 34), "Q4_K": (256, 144)}

# How the random values are drawn (2: one generator per tensor, seeded by its index). A twin and
# its --f32 twin hold the same values only when both were written with one format, so
# peer.py puts it in the file names.
TWIN_FORMAT = 2


def import_gguf(llama_src):
    """gguf-py vendored with the llama.cpp being benchmarked (matches its format), else PyPI's."""
    vend = os.path.join(llama_src, "gguf-py")
    if os.path.isdir(vend):
        sys.path.insert(0, vend)
    import gguf  # noqa: E402

    return gguf


def f16_bytes(x, n):
    return np.full(n, x, dtype=np.float16).view(np.uint8).reshape(n, 2)


def random_blocks(rng, kind, shape):
    """uint8 array [..., rows, bytes_per_row] of random `kind` blocks for a [.., rows, cols]."""
    *lead, cols = shape
    qk, size = QK[kind]
    if cols % qk:
        raise ValueError(f"{kind}: row length {cols} is not a multiple of {qk}")
    nblk = int(np.prod(lead)) * (cols // qk)
    b = rng.integers(0, 256, size=(nblk, size), dtype=np.uint8)
    if kind == "Q4_0":  # d * (q - 8), q uniform 0..15: std 4.6 d
        b[:, 0:2] = f16_bytes(0.02 / 4.6, nblk)
    elif kind == "Q8_0":  # d * q, q uniform int8: std 74 d
        b[:, 0:2] = f16_bytes(0.02 / 74.0, nblk)
    else:  # Q4_K: d * sc * q - dmin * m, 6-bit sc, m ~ 32, q ~ 7.5 +- 4.6
        b[:, 0:2] = f16_bytes(0.02 / (32 * 4.6), nblk)
        b[:, 2:4] = f16_bytes(0.02 * 7.5 / (32 * 4.6), nblk)
    return b.reshape(*lead, (cols // qk) * size)


def ggml_kind(info, q4k):
    q = info.get("quant")
    if q:
        bits = q["bits"]
        if bits == 4:
            return "Q4_K" if q4k else "Q4_0"
        if bits == 8:
            return "Q8_0"
        raise ValueError(f"{info['name']}: {bits}-bit has no GGML type of the same size here")
    return {"f32": "F32", "bf16": "BF16", "f16": "F16"}[info["dtype"].lower()]


def byte_tokens():
    """GPT-2's byte-to-unicode table (the byte-level BPE llama.cpp's `gpt2` model expects)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, (chr(c) for c in cs)))
    return [table[b] for b in range(256)]


NAMES = {
    "embed_tokens.weight": "token_embd.weight",
    "lm_head.weight": "output.weight",
    "norm.weight": "output_norm.weight",
}
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
}


def gguf_name(name):
    if name in NAMES:
        return NAMES[name]
    parts = name.split(".", 2)
    if parts[0] == "layers" and len(parts) == 3 and parts[2] in LAYER_NAMES:
        return f"blk.{parts[1]}.{LAYER_NAMES[parts[2]]}"
    if name.endswith((".scales", ".biases")):
        return None  # travel with their packed weight
    raise ValueError(f"no qwen3moe GGUF name for flashmoe tensor {name}")


def write_twin(model_dir, out_path, llama_src, q4k=False, seed=0, f32=False):
    """Writes the twin of packed model `model_dir` to `out_path`; returns its byte size.
    `f32`: quantized tensors written as F32 of their dequantized values (same seed, same
    values)."""
    gguf = import_gguf(llama_src)
    man = json.load(open(os.path.join(model_dir, "manifest.json")))
    cfg = man["config"].get("text_config", man["config"])
    if cfg["model_type"] != "qwen3_moe":
        raise SystemExit(
            f"{model_dir}: model_type {cfg['model_type']}: only qwen3_moe presets "
            "(qwen3-30b-a3b, qwen3-235b-a22b) have a GGUF twin so far"
        )
    arch = "qwen3moe"
    w = gguf.GGUFWriter(out_path, arch)
    h, n_layer = cfg["hidden_size"], cfg["num_hidden_layers"]
    n_exp, moe_i = cfg["num_experts"], cfg["moe_intermediate_size"]
    w.add_name(f"flashmoe-peer twin of {os.path.basename(os.path.normpath(model_dir))}"
               + (" (f32 of the dequantized values)" if f32 else ""))
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(h)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(cfg.get("intermediate_size", moe_i * 8))
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_rope_freq_base(float(cfg.get("rope_theta", 1e6)))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_expert_count(n_exp)
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_expert_feed_forward_length(moe_i)
    # Tokenizer: byte-level BPE over GPT-2's byte table, one merge, fillers up to the vocab.
    vocab = cfg["vocab_size"]
    toks = byte_tokens() + ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "\u0120\u0120"]
    toks += [f"<|filler_{i}|>" for i in range(vocab - len(toks))]
    types = [1] * 256 + [3, 3, 3, 1] + [4] * (vocab - 260)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(toks[:vocab])
    w.add_token_types(types[:vocab])
    w.add_token_merges(["\u0120 \u0120"])
    w.add_eos_token_id(256)
    w.add_bos_token_id(256)
    w.add_add_bos_token(False)

    # The plan: (GGUF name, element shape, GGML type name, maker of the tensor's array).
    plan = []

    def quantized(name, kind, shape):
        qtype = gguf.GGMLQuantizationType[kind]
        i = len(plan)

        def make():
            b = random_blocks(np.random.default_rng([seed, i]), kind, shape)
            return gguf.quants.dequantize(b, qtype).astype(np.float32) if f32 else b
        plan.append((name, list(shape), "F32" if f32 else kind, make))

    for info in man["dense"]["tensors"]:
        name = gguf_name(info["name"])
        if name is None:
            continue
        kind = ggml_kind(info, q4k)
        rows_cols = list(info["shape"])
        if info.get("quant"):  # packed u32 [rows, cols*bits/32]
            rows_cols[-1] = rows_cols[-1] * 32 // info["quant"]["bits"]
        if kind == "F32":
            if not info["name"].endswith("norm.weight"):
                raise ValueError(f"{info['name']}: unexpected f32 tensor")
            plan.append((name, rows_cols, "F32",
                         lambda s=rows_cols: np.ones(s, dtype=np.float32)))
        elif kind in ("BF16", "F16"):
            i = len(plan)

            def make(s=rows_cols, i=i, kind=kind):
                rng = np.random.default_rng([seed, i])
                v = rng.standard_normal(s, dtype=np.float32) * 0.02
                if kind == "F16":
                    return v.astype(np.float16)
                return (v.view(np.uint32) >> 16).astype(np.uint16)
            plan.append((name, rows_cols, kind, make))
        else:
            quantized(name, kind, rows_cols)
    ex = man["experts"]
    bits = ex["bits"]
    kind = ggml_kind({"name": "experts", "quant": {"bits": bits}} if bits != 16
                     else {"name": "experts", "dtype": "bf16"}, q4k)
    if kind == "BF16":
        raise SystemExit("16-bit experts: not mapped (use --bits 4 or 8)")
    for layer in ex["layers"]:
        l = layer["layer"]
        for proj, shape in (("gate", (n_exp, moe_i, h)), ("up", (n_exp, moe_i, h)),
                            ("down", (n_exp, h, moe_i))):
            quantized(f"blk.{l}.ffn_{proj}_exps.weight", kind, shape)

    for name, shape, kind, _ in plan:
        qtype = gguf.GGMLQuantizationType[kind]
        if kind in QK:
            qk, size = QK[kind]
            nbytes = int(np.prod(shape[:-1])) * (shape[-1] // qk) * size
            w.add_tensor_info(name, shape[:-1] + [(shape[-1] // qk) * size], np.uint8, nbytes,
                              raw_dtype=qtype)
        else:
            esize = {"F32": 4, "F16": 2, "BF16": 2}[kind]
            dt = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[kind]
            w.add_tensor_info(name, shape, dt, int(np.prod(shape)) * esize,
                              raw_dtype=None if kind != "BF16" else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    # Generated ahead on every core, written in order; at most `ahead` tensors in memory.
    ahead = max(2, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(ahead) as pool:
        pending = []
        for _, _, _, make in plan:
            pending.append(pool.submit(make))
            if len(pending) > ahead:
                w.write_tensor_data(pending.pop(0).result())
        for f in pending:
            w.write_tensor_data(f.result())
    w.close()
    return os.path.getsize(out_path)


def main():
    import argparse

    ap = argparse.ArgumentParser(description="the GGUF twin of a flashmoe packed model")
    ap.add_argument("model_dir")
    ap.add_argument("out")
    ap.add_argument("llama_src", help="llama.cpp source (its gguf-py is used)")
    ap.add_argument("--q4k", action="store_true")
    ap.add_argument("--f32", action="store_true",
                    help="quantized tensors as F32 of their dequantized values")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    n = write_twin(a.model_dir, a.out + ".partial", a.llama_src, q4k=a.q4k, seed=a.seed,
                   f32=a.f32)
    os.replace(a.out + ".partial", a.out)
    print(f"{a.out}: {n / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
