//! Test utility: converts a tiny Hugging Face checkpoint into the layout mlx-lm writes
//! (arch-spec §11), and writes beside it a Hugging Face-layout directory holding exactly the
//! values the MLX files represent, in f32 (dequantized matrices, norm offsets undone), so the
//! engine can be run on both and compared with nothing but its own arithmetic in between.
//!
//! What mlx-lm does, per family (its `sanitize` and `quant_predicate`):
//! - `qwen3_5_moe`: `model.language_model.X` -> `language_model.model.X`, `lm_head.weight` ->
//!   `language_model.lm_head.weight`; `experts.gate_up_proj [E,2I,H]` split along axis -2 into
//!   `switch_mlp.{gate,up}_proj.weight`, `experts.down_proj` -> `switch_mlp.down_proj.weight`
//!   (per-expert tensors, mlx-vlm's fallback, are stacked into the same names); vision and MTP
//!   tensors dropped.
//! - `qwen3_next`: keys stay `model.layers…`; per-expert tensors stacked into
//!   `mlp.switch_mlp.{gate,up,down}_proj.weight`; `in_proj_qkvz` / `in_proj_ba` stay fused.
//! - `qwen3_moe`: as `qwen3_next` for the experts; no conv, no shift.
//! - conv1d `[C,1,K]` -> `[C,K,1]`; `input_layernorm`, `post_attention_layernorm`,
//!   `model.norm`, `q_norm`, `k_norm` weights stored as `1+w` (qwen3_5_moe and qwen3_next only:
//!   qwen3_moe's RMSNorm is plain).
//! - every Linear / Embedding / SwitchLinear weight whose last dim is a multiple of the group is
//!   affine-quantized (`.weight` u32, `.scales` / `.biases` bf16); modules ending `mlp.gate`
//!   and `shared_expert_gate` at 8 bits g64, listed by module path in the config's
//!   `quantization` block (duplicated as `quantization_config`).
//! - everything is cast to bf16 except `A_log`, written as f32 as in the shared tiny-a fixture.
//!
//! Quantization here uses `flashmoe_core::kernels::quantize_affine` (MLX's rule); the
//! dequantization of the f32 twin is written out below from the format's definition, not taken
//! from the engine, so that a mistake in the engine's decoding cannot cancel out.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use flashmoe_core::kernels::quantize_affine;
use half::bf16;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Qwen35Moe,
    Qwen3Next,
    Qwen3Moe,
}

impl Family {
    fn of(cfg: &Value) -> Family {
        match cfg["model_type"].as_str().unwrap_or("") {
            "qwen3_5_moe" | "qwen3_5_moe_text" => Family::Qwen35Moe,
            "qwen3_next" => Family::Qwen3Next,
            "qwen3_moe" => Family::Qwen3Moe,
            other => panic!("mlx_convert: unsupported model_type {other:?}"),
        }
    }
    /// Whether mlx-lm stores the decoder norms as 1+w for this family.
    fn shifts_norms(self) -> bool {
        self != Family::Qwen3Moe
    }
}

/// Result of [`convert`]: the MLX directory and its f32 Hugging Face twin.
pub struct Converted {
    pub family: Family,
    pub mlx: PathBuf,
    pub hf_f32: PathBuf,
    /// Number of quantized modules (8-bit overrides included) and of 8-bit overrides.
    pub quantized: usize,
    pub overrides: usize,
}

/// A float tensor in f32 with the dtype it is stored in.
#[derive(Clone)]
struct F {
    shape: Vec<usize>,
    vals: Vec<f32>,
    dtype: Dtype,
}

fn read_f32(t: &safetensors::tensor::TensorView) -> Vec<f32> {
    let d = t.data();
    match t.dtype() {
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        other => panic!("mlx_convert: unexpected dtype {other:?} in a float checkpoint"),
    }
}

fn round_bf16(v: &mut [f32]) {
    for x in v {
        *x = bf16::from_f32(*x).to_f32();
    }
}

/// Where a checkpoint tensor goes in the MLX layout.
#[derive(Clone, Debug, PartialEq)]
enum Slot {
    /// Dropped (vision tower, MTP).
    Drop,
    /// One MLX tensor of the same values.
    Whole(String),
    /// Expert `e` of the stacked tensor `name` ([E, rows, cols]).
    Expert(String, usize),
    /// `experts.gate_up_proj` [E, 2I, H]: first half of axis -2 to `gate`, second to `up`.
    GateUp { gate: String, up: String },
}

fn locate(fam: Family, name: &str) -> Slot {
    let renamed = match fam {
        Family::Qwen35Moe => {
            if name.starts_with("model.visual.") || name.starts_with("mtp.") {
                return Slot::Drop;
            }
            if let Some(rest) = name.strip_prefix("model.language_model.") {
                format!("language_model.model.{rest}")
            } else if name == "lm_head.weight" {
                "language_model.lm_head.weight".to_string()
            } else {
                panic!("mlx_convert: unexpected qwen3_5_moe tensor {name}")
            }
        }
        Family::Qwen3Next | Family::Qwen3Moe => {
            if name.starts_with("mtp.") || name.starts_with("model.mtp.") {
                return Slot::Drop;
            }
            name.to_string()
        }
    };
    if let Some((pre, rest)) = renamed.split_once(".mlp.experts.") {
        if rest == "gate_up_proj" {
            return Slot::GateUp {
                gate: format!("{pre}.mlp.switch_mlp.gate_proj.weight"),
                up: format!("{pre}.mlp.switch_mlp.up_proj.weight"),
            };
        }
        if rest == "down_proj" {
            return Slot::Whole(format!("{pre}.mlp.switch_mlp.down_proj.weight"));
        }
        let (e, proj) = rest
            .split_once('.')
            .unwrap_or_else(|| panic!("mlx_convert: odd expert tensor {name}"));
        let e: usize = e.parse().expect("expert index");
        return Slot::Expert(format!("{pre}.mlp.switch_mlp.{proj}"), e);
    }
    Slot::Whole(renamed)
}

fn is_shifted_norm(fam: Family, mlx_name: &str, ndim: usize) -> bool {
    const KEYS: [&str; 5] = [
        ".input_layernorm.weight",
        ".post_attention_layernorm.weight",
        "model.norm.weight",
        ".q_norm.weight",
        ".k_norm.weight",
    ];
    fam.shifts_norms() && ndim == 1 && KEYS.iter().any(|k| mlx_name.ends_with(k))
}

/// (bits, group) for an MLX module path when quantized with defaults `bits`/`group`, and
/// whether that is a per-module override.
fn quant_for(module: &str, bits: u32, group: usize) -> (u32, usize, bool) {
    if module.ends_with("mlp.gate") || module.ends_with("shared_expert_gate") {
        (8, 64, true)
    } else {
        (bits, group, false)
    }
}

/// `w = scale * q + bias` for every element of `[rows, cols]` packed LSB-first (arch-spec
/// §11.3), written out independently of the engine's kernels.
fn dequant(
    words: &[u32],
    scales: &[bf16],
    biases: &[bf16],
    cols: usize,
    bits: u32,
    group: usize,
) -> Vec<f32> {
    let per_row = cols * bits as usize / 32;
    let rows = words.len() / per_row;
    let mask = (1u32 << bits) - 1;
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for j in 0..cols {
            let bit = j * bits as usize;
            let q = (words[r * per_row + bit / 32] >> (bit % 32)) & mask;
            let g = r * (cols / group) + j / group;
            out.push(scales[g].to_f32() * q as f32 + biases[g].to_f32());
        }
    }
    out
}

fn bytes_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn bytes_bf16(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
        .collect()
}

fn write_st(path: &Path, tensors: &BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>, format: &str) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(k, (d, s, b))| {
            (
                k.clone(),
                TensorView::new(*d, s.clone(), b).expect("tensor view"),
            )
        })
        .collect();
    let meta = HashMap::from([("format".to_string(), format.to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path).expect("write safetensors");
}

/// Converts the checkpoint in `src` into `out/mlx` (mlx-lm layout, `bits`-bit affine with
/// `group`, router and shared-expert gate at 8 bits) and `out/hf-f32` (the same values in the
/// source's own layout and names, f32). `out` is replaced.
pub fn convert(src: &Path, out: &Path, bits: u32, group: usize) -> Converted {
    let _ = std::fs::remove_dir_all(out);
    let (mlx_dir, hf_dir) = (out.join("mlx"), out.join("hf-f32"));
    std::fs::create_dir_all(&mlx_dir).expect("mkdir mlx");
    std::fs::create_dir_all(&hf_dir).expect("mkdir hf-f32");
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).expect("config"))
            .expect("config json");
    let fam = Family::of(&cfg);

    // Source tensors (every *.safetensors file), in f32.
    let mut src_tensors: BTreeMap<String, F> = BTreeMap::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(src)
        .expect("read src")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    for f in &files {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(".safetensors") {
            let bytes = std::fs::read(f).expect("read safetensors");
            let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse safetensors");
            for (k, t) in st.tensors() {
                src_tensors.insert(
                    k,
                    F {
                        shape: t.shape().to_vec(),
                        vals: read_f32(&t),
                        dtype: t.dtype(),
                    },
                );
            }
        } else if name != "config.json" && f.is_file() {
            std::fs::copy(f, mlx_dir.join(name)).expect("copy");
            std::fs::copy(f, hf_dir.join(name)).expect("copy");
        }
    }

    // 1. sanitize: rename, stack / split experts, move conv1d, shift norms, cast.
    let mut mlx: BTreeMap<String, F> = BTreeMap::new();
    let mut stacks: BTreeMap<String, BTreeMap<usize, F>> = BTreeMap::new();
    for (name, t) in &src_tensors {
        match locate(fam, name) {
            Slot::Drop => {}
            Slot::Whole(n) => {
                let mut t = t.clone();
                if n.ends_with("conv1d.weight") && t.shape.len() == 3 && t.shape[2] != 1 {
                    t.shape = vec![t.shape[0], t.shape[2], t.shape[1]];
                }
                if is_shifted_norm(fam, &n, t.shape.len()) {
                    t.vals.iter_mut().for_each(|v| *v += 1.0);
                }
                mlx.insert(n, t);
            }
            Slot::Expert(n, e) => {
                stacks.entry(n).or_default().insert(e, t.clone());
            }
            Slot::GateUp { gate, up } => {
                let (e, two_i, h) = (t.shape[0], t.shape[1], t.shape[2]);
                let i = two_i / 2;
                let (mut g, mut u) = (Vec::new(), Vec::new());
                for x in 0..e {
                    let blk = &t.vals[x * two_i * h..][..two_i * h];
                    g.extend_from_slice(&blk[..i * h]);
                    u.extend_from_slice(&blk[i * h..]);
                }
                for (n, v) in [(gate, g), (up, u)] {
                    mlx.insert(
                        n,
                        F {
                            shape: vec![e, i, h],
                            vals: v,
                            dtype: t.dtype,
                        },
                    );
                }
            }
        }
    }
    for (n, experts) in stacks {
        let first = experts.values().next().expect("an expert");
        let shape = first.shape.clone();
        let mut vals = Vec::new();
        for (want, (e, t)) in experts.iter().enumerate() {
            assert_eq!(*e, want, "mlx_convert: expert {want} of {n} missing");
            assert_eq!(t.shape, shape);
            vals.extend_from_slice(&t.vals);
        }
        let mut s = vec![experts.len()];
        s.extend(shape);
        mlx.insert(
            n,
            F {
                shape: s,
                vals,
                dtype: first.dtype,
            },
        );
    }
    for (n, t) in mlx.iter_mut() {
        t.dtype = if n.ends_with("A_log") {
            Dtype::F32
        } else {
            Dtype::BF16
        };
        if t.dtype == Dtype::BF16 {
            round_bf16(&mut t.vals);
        }
    }

    // 2. quantize; `effective` holds the values every MLX tensor stands for.
    let mut out_mlx: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> = BTreeMap::new();
    let mut effective: HashMap<String, Vec<f32>> = HashMap::new();
    let mut qblock = serde_json::Map::new();
    qblock.insert("group_size".into(), json!(group));
    qblock.insert("bits".into(), json!(bits));
    qblock.insert("mode".into(), json!("affine"));
    let (mut quantized, mut overrides) = (0, 0);
    for (n, t) in &mlx {
        let cols = *t.shape.last().expect("shape");
        let module = n.strip_suffix(".weight").unwrap_or(n);
        let (b, g, is_override) = quant_for(module, bits, group);
        // mlx-lm quantizes a module with `to_quantized` whose last dim divides by the group.
        let quantizable = n.ends_with(".weight")
            && t.shape.len() >= 2
            && !n.contains("conv1d")
            && cols % group == 0
            && cols % g == 0;
        if !quantizable {
            let bytes = match t.dtype {
                Dtype::F32 => bytes_f32(&t.vals),
                _ => bytes_bf16(&t.vals),
            };
            out_mlx.insert(n.clone(), (t.dtype, t.shape.clone(), bytes));
            effective.insert(n.clone(), t.vals.clone());
            continue;
        }
        let rows = t.vals.len() / cols;
        let (w, s, bi) = quantize_affine(&t.vals, rows, cols, b, g);
        let lead = &t.shape[..t.shape.len() - 1];
        let mut ws = lead.to_vec();
        ws.push(cols * b as usize / 32);
        let mut ss = lead.to_vec();
        ss.push(cols / g);
        let sbytes = |v: &[bf16]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        out_mlx.insert(
            n.clone(),
            (
                Dtype::U32,
                ws,
                w.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
        );
        out_mlx.insert(
            format!("{module}.scales"),
            (Dtype::BF16, ss.clone(), sbytes(&s)),
        );
        out_mlx.insert(format!("{module}.biases"), (Dtype::BF16, ss, sbytes(&bi)));
        effective.insert(n.clone(), dequant(&w, &s, &bi, cols, b, g));
        quantized += 1;
        if is_override {
            overrides += 1;
            qblock.insert(module.to_string(), json!({"group_size": g, "bits": b}));
        }
    }
    write_st(&mlx_dir.join("model.safetensors"), &out_mlx, "mlx");
    let mut mcfg = cfg.clone();
    mcfg["quantization"] = Value::Object(qblock.clone());
    mcfg["quantization_config"] = Value::Object(qblock);
    std::fs::write(
        mlx_dir.join("config.json"),
        serde_json::to_string_pretty(&mcfg).expect("json"),
    )
    .expect("write config");

    // 3. the f32 twin in the source's layout: each source tensor's effective values.
    let mut out_hf: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for (name, t) in &src_tensors {
        let n: usize = t.shape.iter().product();
        let vals: Vec<f32> = match locate(fam, name) {
            Slot::Drop => continue,
            Slot::Whole(m) => {
                let mut v = effective[&m].clone();
                if is_shifted_norm(fam, &m, t.shape.len()) {
                    // bf16(1+w) - 1 is exact in f32, and the loader adds the 1 back exactly.
                    v.iter_mut().for_each(|x| *x -= 1.0);
                }
                v
            }
            Slot::Expert(m, e) => effective[&m][e * n..(e + 1) * n].to_vec(),
            Slot::GateUp { gate, up } => {
                let (e, two_i, h) = (t.shape[0], t.shape[1], t.shape[2]);
                let ih = two_i / 2 * h;
                let (g, u) = (&effective[&gate], &effective[&up]);
                (0..e)
                    .flat_map(|x| {
                        g[x * ih..(x + 1) * ih]
                            .iter()
                            .chain(&u[x * ih..(x + 1) * ih])
                            .copied()
                    })
                    .collect()
            }
        };
        assert_eq!(vals.len(), n, "{name}");
        out_hf.insert(
            name.clone(),
            (Dtype::F32, t.shape.clone(), bytes_f32(&vals)),
        );
    }
    write_st(&hf_dir.join("model.safetensors"), &out_hf, "pt");
    std::fs::copy(src.join("config.json"), hf_dir.join("config.json")).expect("copy config");

    Converted {
        family: fam,
        mlx: mlx_dir,
        hf_f32: hf_dir,
        quantized,
        overrides,
    }
}

/// (dtype, shape) of every tensor of a safetensors file, by name.
pub fn header(path: &Path) -> BTreeMap<String, (Dtype, Vec<usize>)> {
    let bytes = std::fs::read(path).expect("read safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse safetensors");
    st.tensors()
        .into_iter()
        .map(|(k, t)| (k, (t.dtype(), t.shape().to_vec())))
        .collect()
}

/// Raw bytes of one tensor of a safetensors file.
pub fn tensor_bytes(path: &Path, name: &str) -> Vec<u8> {
    let bytes = std::fs::read(path).expect("read safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse safetensors");
    st.tensor(name).expect("tensor").data().to_vec()
}
