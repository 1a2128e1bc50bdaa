//! `synth`: a packed model of random weights at a real model's shapes, written directly (no
//! checkpoint in between), for benchmarks and tests where the real weights are not at hand.
//!
//! Weights are drawn so activations stay finite and ordinary: affine codes uniform over their
//! range with per-group scales giving a standard deviation of about 0.02 (bf16 matrices:
//! uniform with the same deviation), norms 1, `A_log = ln U(1, 16)`, `dt_bias = 1`.
//! Experts are generated a small batch at a time and appended to their layer file, so a
//! 397B layer (512 experts, 3.6 GB at 4 bits) never sits in memory. Everything derives from
//! `--seed` per tensor and per expert, so the output does not depend on thread count.
use std::path::{Path, PathBuf};

use half::bf16;
use rayon::prelude::*;
use serde_json::{json, Value};

use crate::config::{Arch, LayerKind, ModelConfig, QuantSpec};
use crate::error::{Error, Result};
use crate::store::DType;

use super::writer::{DenseWriter, LayerWriter, OutDir, Progress};
use super::{ExpertLayout, Manifest, Proj, Role, FORMAT, FORMAT_VERSION};

/// Preset names `synth` knows.
pub const PRESETS: [&str; 6] = [
    "tiny",
    "qwen3.5-397b-a17b",
    "qwen3.5-35b-a3b",
    "qwen3-next-80b-a3b",
    "qwen3-30b-a3b",
    "qwen3-235b-a22b",
];

/// Target standard deviation of random matrix entries.
const STD: f32 = 0.02;
const GROUP: usize = 64;

#[derive(Clone, Debug)]
pub struct SynthOptions {
    pub preset: String,
    /// Keep only the first N layers.
    pub layers: Option<usize>,
    /// Experts per layer instead of the preset's (top-k is capped to it).
    pub experts: Option<usize>,
    /// Expert bits: 2, 4, 8 (affine, group 64) or 16 (bf16).
    pub bits: u32,
    /// Dense matrices: 4 or 8 (affine; router and shared-expert gate at 8) or 16 (bf16).
    pub dense_bits: u32,
    pub seed: u64,
    pub force: bool,
    /// Vocabulary size instead of the preset's (at least the tokenizer's): a model cut to a
    /// few layers keeps a head in proportion (the peer benchmark's GGUF twin uses the same).
    pub vocab: Option<usize>,
    /// Copy this directory's tokenizer and chat template and size the vocabulary to it;
    /// without it a small byte-level tokenizer is written.
    pub tokenizer: Option<PathBuf>,
}

struct Shape {
    arch: &'static str,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv: usize,
    head_dim: usize,
    lk: usize,
    lv: usize,
    lkd: usize,
    lvd: usize,
    experts: usize,
    topk: usize,
    moe_i: usize,
    shared_i: usize,
    vocab: usize,
    theta: f64,
    max_pos: usize,
}

fn preset(name: &str) -> Result<Shape> {
    let q35 = |hidden, layers, heads, lv, experts, topk, moe_i| Shape {
        arch: "qwen3_5_moe",
        hidden,
        layers,
        heads,
        kv: 2,
        head_dim: 256,
        lk: 16,
        lv,
        lkd: 128,
        lvd: 128,
        experts,
        topk,
        moe_i,
        shared_i: moe_i,
        vocab: 248320,
        theta: 1e7,
        max_pos: 262144,
    };
    let q3 = |hidden, layers, heads, moe_i| Shape {
        arch: "qwen3_moe",
        hidden,
        layers,
        heads,
        kv: 4,
        head_dim: 128,
        lk: 0,
        lv: 0,
        lkd: 0,
        lvd: 0,
        experts: 128,
        topk: 8,
        moe_i,
        shared_i: 0,
        vocab: 151936,
        theta: 1e6,
        max_pos: 40960,
    };
    Ok(match name {
        "tiny" => Shape {
            arch: "qwen3_5_moe",
            hidden: 128,
            layers: 4,
            heads: 4,
            kv: 2,
            head_dim: 32,
            lk: 2,
            lv: 4,
            lkd: 32,
            lvd: 32,
            experts: 16,
            topk: 4,
            moe_i: 64,
            shared_i: 128,
            vocab: 320,
            theta: 1e7,
            max_pos: 32768,
        },
        // arch-spec §1.1.
        "qwen3.5-397b-a17b" => q35(4096, 60, 32, 64, 512, 10, 1024),
        "qwen3.5-35b-a3b" => q35(2048, 40, 16, 32, 256, 8, 512),
        // arch-spec §1.2.
        "qwen3-next-80b-a3b" => Shape {
            arch: "qwen3_next",
            vocab: 151936,
            ..q35(2048, 48, 16, 32, 512, 10, 512)
        },
        "qwen3-30b-a3b" => q3(2048, 48, 32, 768),
        "qwen3-235b-a22b" => q3(4096, 94, 64, 1536),
        other => {
            return Err(Error::Invalid(format!(
                "unknown preset `{other}` (known: {})",
                PRESETS.join(", ")
            )))
        }
    })
}

/// The Hugging Face style `config.json` of a preset, cut to `layers` and `experts`.
pub fn synth_config(
    name: &str,
    layers: Option<usize>,
    experts: Option<usize>,
    vocab: Option<usize>,
    eos: &[u32],
) -> Result<Value> {
    let s = preset(name)?;
    let layers = layers.unwrap_or(s.layers);
    let experts = experts.unwrap_or(s.experts);
    if layers == 0 || experts == 0 {
        return Err(Error::Invalid(
            "--layers and --experts must be at least 1".into(),
        ));
    }
    let mut t = json!({
        "model_type": s.arch,
        "hidden_size": s.hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv,
        "head_dim": s.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab.unwrap_or(s.vocab),
        "max_position_embeddings": s.max_pos,
        "tie_word_embeddings": false,
        "attention_bias": false,
        "num_experts": experts,
        "num_experts_per_tok": s.topk.min(experts),
        "moe_intermediate_size": s.moe_i,
        "norm_topk_prob": true,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "eos_token_id": eos,
    });
    let o = t.as_object_mut().expect("object");
    if s.arch == "qwen3_moe" {
        o.insert("rope_theta".into(), json!(s.theta));
        o.insert("intermediate_size".into(), json!(s.moe_i * 8));
        o.insert("use_sliding_window".into(), json!(false));
    } else {
        o.insert("shared_expert_intermediate_size".into(), json!(s.shared_i));
        o.insert("full_attention_interval".into(), json!(4));
        o.insert("linear_num_key_heads".into(), json!(s.lk));
        o.insert("linear_num_value_heads".into(), json!(s.lv));
        o.insert("linear_key_head_dim".into(), json!(s.lkd));
        o.insert("linear_value_head_dim".into(), json!(s.lvd));
        o.insert("linear_conv_kernel_dim".into(), json!(4));
        o.insert(
            "rope_parameters".into(),
            json!({"rope_type": "default", "rope_theta": s.theta, "partial_rotary_factor": 0.25}),
        );
    }
    if s.arch == "qwen3_5_moe" {
        o.insert("model_type".into(), json!("qwen3_5_moe_text"));
        return Ok(json!({
            "model_type": "qwen3_5_moe",
            "architectures": ["Qwen3_5MoeForConditionalGeneration"],
            "text_config": t,
            "tie_word_embeddings": false,
            "synthetic": name,
        }));
    }
    o.insert("synthetic".into(), json!(name));
    Ok(t)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// A Linear weight [rows, cols]; `hi` keeps at least 8 bits (router, shared gate).
    Matrix {
        hi: bool,
    },
    /// Plain norm weight (ones, f32).
    Ones,
    /// conv1d [C, K, 1], bf16.
    Conv,
    ALog,
    DtBias,
}

/// Every dense tensor of `cfg` by canonical name (what `Model::load` reads).
fn dense_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<usize>, Kind)> {
    let m = Kind::Matrix { hi: false };
    let h = cfg.hidden_size;
    let mut v = vec![
        (
            "embed_tokens.weight".to_string(),
            vec![cfg.vocab_size, h],
            m,
        ),
        ("lm_head.weight".to_string(), vec![cfg.vocab_size, h], m),
        ("norm.weight".to_string(), vec![h], Kind::Ones),
    ];
    for l in 0..cfg.num_layers {
        let p = format!("layers.{l}");
        let mut add = |n: &str, shape: Vec<usize>, k| v.push((format!("{p}.{n}"), shape, k));
        add("input_layernorm.weight", vec![h], Kind::Ones);
        add("post_attention_layernorm.weight", vec![h], Kind::Ones);
        match cfg.layer_types[l] {
            LayerKind::FullAttention => {
                let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
                let q = nh * hd * if cfg.attn_output_gate { 2 } else { 1 };
                add("self_attn.q_proj.weight", vec![q, h], m);
                add("self_attn.k_proj.weight", vec![nkv * hd, h], m);
                add("self_attn.v_proj.weight", vec![nkv * hd, h], m);
                add("self_attn.o_proj.weight", vec![h, nh * hd], m);
                add("self_attn.q_norm.weight", vec![hd], Kind::Ones);
                add("self_attn.k_norm.weight", vec![hd], Kind::Ones);
            }
            LayerKind::LinearAttention => {
                let (nk, nv) = (cfg.linear_num_key_heads, cfg.linear_num_value_heads);
                let (dk, dv) = (cfg.linear_key_head_dim, cfg.linear_value_head_dim);
                if cfg.arch == Arch::Qwen3Next {
                    let rep = nv / nk;
                    add(
                        "linear_attn.in_proj_qkvz.weight",
                        vec![nk * (2 * dk + 2 * rep * dv), h],
                        m,
                    );
                    add("linear_attn.in_proj_ba.weight", vec![nk * 2 * rep, h], m);
                } else {
                    add(
                        "linear_attn.in_proj_qkv.weight",
                        vec![cfg.gdn_conv_dim(), h],
                        m,
                    );
                    add("linear_attn.in_proj_z.weight", vec![nv * dv, h], m);
                    add("linear_attn.in_proj_b.weight", vec![nv, h], m);
                    add("linear_attn.in_proj_a.weight", vec![nv, h], m);
                }
                let k = cfg.linear_conv_kernel_dim;
                add(
                    "linear_attn.conv1d.weight",
                    vec![cfg.gdn_conv_dim(), k, 1],
                    Kind::Conv,
                );
                add("linear_attn.A_log", vec![nv], Kind::ALog);
                add("linear_attn.dt_bias", vec![nv], Kind::DtBias);
                add("linear_attn.norm.weight", vec![dv], Kind::Ones);
                add("linear_attn.out_proj.weight", vec![h, nv * dv], m);
            }
        }
        if cfg.is_moe_layer(l) {
            add(
                "mlp.gate.weight",
                vec![cfg.num_experts, h],
                Kind::Matrix { hi: true },
            );
            let s = cfg.shared_expert_intermediate_size;
            if s > 0 {
                add("mlp.shared_expert.gate_proj.weight", vec![s, h], m);
                add("mlp.shared_expert.up_proj.weight", vec![s, h], m);
                add("mlp.shared_expert.down_proj.weight", vec![h, s], m);
                add(
                    "mlp.shared_expert_gate.weight",
                    vec![1, h],
                    Kind::Matrix { hi: true },
                );
            }
        } else {
            let i = cfg.intermediate_size;
            add("mlp.gate_proj.weight", vec![i, h], m);
            add("mlp.up_proj.weight", vec![i, h], m);
            add("mlp.down_proj.weight", vec![h, i], m);
        }
    }
    v
}

/// splitmix64: fast, seedable, good enough for weights nobody will train.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, salt: &[u8]) -> Rng {
        let mut s = seed ^ 0x9E37_79B9_7F4A_7C15;
        for &b in salt {
            s = (s ^ b as u64).wrapping_mul(0x100_0000_01B3);
        }
        Rng(s)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn fill_bytes(&mut self, out: &mut [u8]) {
        let mut it = out.chunks_exact_mut(8);
        for c in &mut it {
            c.copy_from_slice(&self.next().to_le_bytes());
        }
        let r = self.next().to_le_bytes();
        let rest = it.into_remainder();
        let n = rest.len();
        rest.copy_from_slice(&r[..n]);
    }
}

/// bf16 values uniform with standard deviation `std` (half-width std·√3).
fn fill_bf16(rng: &mut Rng, out: &mut [u8], std: f32) {
    let a = std * 3f32.sqrt();
    for c in out.chunks_exact_mut(2) {
        c.copy_from_slice(&bf16::from_f32((rng.unit() * 2.0 - 1.0) * a).to_le_bytes());
    }
}

/// Random affine groups: codes uniform in [0, 2^bits), scale s (±25%) and bias −s(2^bits−1)/2
/// so values are centred with standard deviation about `STD`.
fn fill_affine(rng: &mut Rng, bits: u32, w: &mut [u8], scales: &mut [u8], biases: &mut [u8]) {
    rng.fill_bytes(w);
    let n = ((1u32 << bits) - 1) as f32;
    let base = STD / ((n * (n + 2.0)) / 12.0).sqrt();
    for (s, b) in scales.chunks_exact_mut(2).zip(biases.chunks_exact_mut(2)) {
        let sv = base * (0.75 + 0.5 * rng.unit());
        s.copy_from_slice(&bf16::from_f32(sv).to_le_bytes());
        b.copy_from_slice(&bf16::from_f32(-sv * n / 2.0).to_le_bytes());
    }
}

fn tensor_bytes(shape: &[usize], kind: Kind, dense_bits: u32) -> u64 {
    let n: usize = shape.iter().product();
    match kind {
        Kind::Matrix { hi } if dense_bits != 16 && shape[1].is_multiple_of(GROUP) => {
            let bits = if hi { dense_bits.max(8) } else { dense_bits } as usize;
            (n * bits / 8 + 2 * (n / GROUP) * 2) as u64
        }
        Kind::Matrix { .. } | Kind::Conv | Kind::DtBias => 2 * n as u64,
        Kind::Ones | Kind::ALog => 4 * n as u64,
    }
}

fn write_dense(
    dw: &mut DenseWriter,
    cfg: &ModelConfig,
    opts: &SynthOptions,
    prog: &dyn Progress,
) -> Result<()> {
    for (name, shape, kind) in dense_tensors(cfg) {
        let mut rng = Rng::new(opts.seed, name.as_bytes());
        let n: usize = shape.iter().product();
        match kind {
            Kind::Matrix { hi } if opts.dense_bits != 16 && shape[1].is_multiple_of(GROUP) => {
                let bits = if hi {
                    opts.dense_bits.max(8)
                } else {
                    opts.dense_bits
                };
                let (rows, cols) = (shape[0], shape[1]);
                let (wrow, srow) = (cols * bits as usize / 32, cols / GROUP);
                let base = name.strip_suffix(".weight").unwrap_or(&name);
                let q = QuantSpec {
                    bits,
                    group_size: GROUP,
                };
                let ow = dw.reserve(&name, DType::U32, &[rows, wrow], Some(q));
                let os = dw.reserve(&format!("{base}.scales"), DType::BF16, &[rows, srow], None);
                let ob = dw.reserve(&format!("{base}.biases"), DType::BF16, &[rows, srow], None);
                let chunk = ((16 << 20) / cols).max(1);
                for r0 in (0..rows).step_by(chunk) {
                    let r = chunk.min(rows - r0);
                    let mut w = vec![0u8; r * wrow * 4];
                    let mut s = vec![0u8; r * srow * 2];
                    let mut b = vec![0u8; r * srow * 2];
                    fill_affine(&mut rng, bits, &mut w, &mut s, &mut b);
                    dw.write_at(ow + (r0 * wrow * 4) as u64, &w)?;
                    dw.write_at(os + (r0 * srow * 2) as u64, &s)?;
                    dw.write_at(ob + (r0 * srow * 2) as u64, &b)?;
                    prog.advance((w.len() + s.len() + b.len()) as u64);
                }
            }
            Kind::Matrix { .. } | Kind::Conv => {
                let std = if kind == Kind::Conv { 0.3 } else { STD };
                let off = dw.reserve(&name, DType::BF16, &shape, None);
                let chunk = 16 << 20;
                for e0 in (0..n).step_by(chunk) {
                    let mut b = vec![0u8; chunk.min(n - e0) * 2];
                    fill_bf16(&mut rng, &mut b, std);
                    dw.write_at(off + (e0 * 2) as u64, &b)?;
                    prog.advance(b.len() as u64);
                }
            }
            Kind::Ones => {
                dw.put(
                    &name,
                    DType::F32,
                    &shape,
                    None,
                    bytemuck::cast_slice(&vec![1f32; n]),
                )?;
                prog.advance(4 * n as u64);
            }
            Kind::ALog => {
                let v: Vec<f32> = (0..n).map(|_| (1.0 + 15.0 * rng.unit()).ln()).collect();
                dw.put(&name, DType::F32, &shape, None, bytemuck::cast_slice(&v))?;
                prog.advance(4 * n as u64);
            }
            Kind::DtBias => {
                let v = vec![bf16::ONE; n];
                dw.put(&name, DType::BF16, &shape, None, bytemuck::cast_slice(&v))?;
                prog.advance(2 * n as u64);
            }
        }
    }
    Ok(())
}

fn random_expert(layout: &ExpertLayout, seed: u64, layer: usize, expert: usize) -> Vec<u8> {
    let mut out = vec![0u8; layout.expert_bytes as usize];
    let mut salt = [0u8; 16];
    salt[..8].copy_from_slice(&(layer as u64).to_le_bytes());
    salt[8..].copy_from_slice(&(expert as u64).to_le_bytes());
    let mut rng = Rng::new(seed, &salt);
    for proj in [Proj::Gate, Proj::Up, Proj::Down] {
        let w = layout.part(proj, Role::Weight).expect("weight part");
        let (wo, wn) = (w.offset as usize, w.nbytes as usize);
        if layout.bits == 16 {
            fill_bf16(&mut rng, &mut out[wo..wo + wn], STD);
            continue;
        }
        let s = layout.part(proj, Role::Scales).expect("scales part");
        let b = layout.part(proj, Role::Biases).expect("biases part");
        // Parts are disjoint and ordered weight < scales < biases.
        let (head, rest) = out.split_at_mut(s.offset as usize);
        let (sp, bp) = rest.split_at_mut((b.offset - s.offset) as usize);
        fill_affine(
            &mut rng,
            layout.bits,
            &mut head[wo..wo + wn],
            &mut sp[..s.nbytes as usize],
            &mut bp[..b.nbytes as usize],
        );
    }
    out
}

/// Tokens of [`own_tokenizer`]: 256 bytes and its specials.
const OWN_TOKENS: usize = 256 + 7;

/// A small byte-level BPE tokenizer (256 byte tokens, no merges) with ChatML specials, so a
/// synthetic model takes text. Returns the files and the eos ids.
fn own_tokenizer() -> (Vec<(&'static str, String)>, Vec<u32>) {
    // GPT-2's byte-to-unicode table: printable bytes map to themselves, the rest to U+0100...
    let mut chars = vec!['\0'; 256];
    let mut extra = 0u32;
    for (b, ch) in chars.iter_mut().enumerate() {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
        *ch = if printable {
            char::from_u32(b as u32).unwrap_or('?')
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap_or('?')
        };
    }
    let vocab: serde_json::Map<String, Value> = chars
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), json!(i)))
        .collect();
    let specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<think>",
        "</think>",
        "<tool_call>",
        "</tool_call>",
    ];
    let added: Vec<Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": 256 + i, "content": s, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": i < 3})
        })
        .collect();
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []}
    });
    let template = "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";
    let tcfg = json!({
        "model_max_length": 32768, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": null, "chat_template": template,
        "tokenizer_class": "Qwen2Tokenizer"
    });
    let eos = vec![258u32, 256];
    let gen = json!({"eos_token_id": eos, "do_sample": false});
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();
    (
        vec![
            ("tokenizer.json", pretty(&tok)),
            ("tokenizer_config.json", pretty(&tcfg)),
            ("chat_template.jinja", template.to_string()),
            ("generation_config.json", pretty(&gen)),
        ],
        eos,
    )
}

/// Vocabulary size and eos ids of the `tokenizer.json` in `dir`, or of its gzip
/// `tokenizer.json.gz` when there is no plain file (as the tokenizer loader accepts both).
fn tokenizer_vocab(dir: &Path) -> Result<(usize, Vec<u32>)> {
    let plain = dir.join("tokenizer.json");
    let gz = dir.join("tokenizer.json.gz");
    let (path, text) = if !plain.is_file() && gz.is_file() {
        let f = std::fs::File::open(&gz).map_err(|e| Error::io(&gz, e))?;
        let mut text = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(f), &mut text)
            .map_err(|e| Error::io(&gz, e))?;
        (gz, text)
    } else {
        let text = std::fs::read_to_string(&plain).map_err(|e| Error::io(&plain, e))?;
        (plain, text)
    };
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    let mut max_id = 0u64;
    if let Some(m) = v.pointer("/model/vocab").and_then(Value::as_object) {
        max_id = m.values().filter_map(Value::as_u64).max().unwrap_or(0);
    }
    let mut eos = Vec::new();
    for t in v["added_tokens"].as_array().into_iter().flatten() {
        let id = t["id"].as_u64().unwrap_or(0);
        max_id = max_id.max(id);
        if matches!(t["content"].as_str(), Some("<|im_end|>" | "<|endoftext|>")) {
            eos.push(id as u32);
        }
    }
    Ok((max_id as usize + 1, eos))
}

/// Writes a random packed model to `out`; returns its manifest.
pub fn synth(out: &Path, opts: &SynthOptions, prog: &dyn Progress) -> Result<Manifest> {
    if !matches!(opts.bits, 2 | 4 | 8 | 16) || !matches!(opts.dense_bits, 4 | 8 | 16) {
        return Err(Error::Invalid(format!(
            "--bits {} / --dense-bits {}: use 2, 4, 8 or 16 / 4, 8 or 16",
            opts.bits, opts.dense_bits
        )));
    }
    let s = preset(&opts.preset)?;
    let (vocab, eos, tok_files, tok_n) = match &opts.tokenizer {
        Some(dir) => {
            let (n, eos) = tokenizer_vocab(dir)?;
            let vocab = if s.vocab >= n {
                s.vocab
            } else {
                n.div_ceil(64) * 64
            };
            (vocab, eos, None, n)
        }
        None => {
            let (files, eos) = own_tokenizer();
            (s.vocab, eos, Some(files), OWN_TOKENS)
        }
    };
    let vocab = match opts.vocab {
        Some(v) if v < tok_n => {
            return Err(Error::Invalid(format!(
                "--vocab {v} is smaller than the tokenizer's {tok_n} tokens"
            )))
        }
        Some(v) => v,
        None => vocab,
    };
    let config = synth_config(&opts.preset, opts.layers, opts.experts, Some(vocab), &eos)?;
    let cfg = ModelConfig::from_json(&config, Path::new("<synth config>"))?;
    let (h, i) = (cfg.hidden_size, cfg.moe_intermediate_size);
    let mut layout = ExpertLayout::build(opts.bits, GROUP, i, h, DType::BF16, cfg.num_experts);
    let moe_layers: Vec<usize> = (0..cfg.num_layers)
        .filter(|&l| cfg.is_moe_layer(l))
        .collect();
    let dense_total: u64 = dense_tensors(&cfg)
        .iter()
        .map(|(_, sh, k)| tensor_bytes(sh, *k, opts.dense_bits))
        .sum();
    let expert_total = moe_layers.len() as u64 * layout.count as u64 * layout.stride;

    let dir = OutDir::create(out, opts.force)?;
    if let Some(free) = super::free_bytes(dir.path()) {
        let need = dense_total + expert_total;
        if need > free {
            return Err(super::packed_err(
                dir.path(),
                format!(
                    "needs {} but the filesystem has {} free; use --layers or --experts to cut it",
                    super::human_bytes(need),
                    super::human_bytes(free)
                ),
            ));
        }
    }
    prog.begin(dense_total + expert_total, "synth");
    let mut dw = DenseWriter::create(dir.path())?;
    write_dense(&mut dw, &cfg, opts, prog)?;
    let dense = dw.finish()?;

    let batch = rayon::current_num_threads().max(1) * 2;
    let ids: Vec<usize> = (0..cfg.num_experts).collect();
    for &l in &moe_layers {
        let mut lw = LayerWriter::create(dir.path(), l, layout.stride, layout.expert_bytes)?;
        for chunk in ids.chunks(batch) {
            let bufs: Vec<Vec<u8>> = chunk
                .par_iter()
                .map(|&e| random_expert(&layout, opts.seed, l, e))
                .collect();
            for b in bufs {
                lw.push(&b)?;
                prog.advance(layout.stride);
            }
        }
        layout.layers.push(lw.finish()?);
    }
    prog.finish();

    match (&opts.tokenizer, tok_files) {
        (Some(src), _) => {
            dir.copy_text_files(src)?;
        }
        (None, Some(files)) => {
            for (name, text) in files {
                dir.write_file(name, text.as_bytes())?;
            }
        }
        (None, None) => {}
    }
    let pretty = serde_json::to_vec_pretty(&config)
        .map_err(|e| Error::Invalid(format!("serialising config.json: {e}")))?;
    dir.write_file("config.json", &pretty)?;
    let manifest = Manifest {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        source: json!({"kind": "synth", "preset": opts.preset, "seed": opts.seed,
                       "dense_bits": opts.dense_bits}),
        config,
        dense,
        experts: layout,
    };
    dir.commit(&manifest)?;
    Ok(manifest)
}
