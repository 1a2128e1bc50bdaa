//! `pack`: a Hugging Face or MLX checkpoint into a packed model directory, tensor by tensor.
//!
//! Memory stays bounded whatever the model size: the source is mmap'd, a dense matrix is
//! converted in row chunks of at most [`CHUNK_ELEMS`] values, and experts are encoded a few at
//! a time (a small batch per rayon thread) and appended to their layer file.
//!
//! Conversions (exactness first):
//! - MLX affine tensors whose target format equals the source's are copied byte for byte, so a
//!   packed MLX model computes exactly what the checkpoint does.
//! - Otherwise a matrix is dequantized to f32 and quantized with [`kernels::quantize_affine`]
//!   (bf16 scales and biases), or rounded to bf16 for 16 bits.
//! - Dense matrices of a float (Hugging Face) source are quantized by default to the expert bits
//!   (at least 4), as mlx-lm and llama.cpp do: the float path decodes at a third to a half of
//!   the quantized one (issue 20). Router, shared-expert gate and output head keep at least 8
//!   bits (the head's errors reach every logit); norms and vectors stay as they are;
//!   `dense_bits: Some(16)` keeps bf16. An MLX source's dense tensors keep their own format.
//! - Zero-centred norms of a Hugging Face source are written as f32 `1 + w` (plain weights), the
//!   same arithmetic `model::norm` applies at load. MLX norms already hold `1 + w`.
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use rayon::prelude::*;
use serde_json::{json, Value};

use crate::config::{ModelConfig, QuantSpec};
use crate::error::{Error, Result};
use crate::experts::{ExpertSource, ExpertWeights, StoreExperts};
use crate::kernels::{self, quantize_affine};
use crate::model::Model;
use crate::store::{DType, SourceLayout, TensorEntry, TensorStore};
use crate::weights::{load_matrix, load_vec, Linear};

use super::writer::{DenseWriter, LayerWriter, OutDir, Progress};
use super::{
    is_packed_dir, packed_err, strip_quantization, ExpertLayout, Manifest, Proj, Role, FORMAT,
    FORMAT_VERSION,
};

/// Largest number of f32 values converted at once (64 MB).
const CHUNK_ELEMS: usize = 16 << 20;

#[derive(Clone, Debug, Default)]
pub struct PackOptions {
    /// Expert bits (2, 4, 8, or 16 for bf16). None: an MLX source keeps its own, else 4.
    pub bits: Option<u32>,
    /// Affine group size. None: an MLX source keeps its own, else 64.
    pub group_size: Option<usize>,
    /// Dense matrices: 16 = bf16, 8 or 4 = affine (router, shared-expert gate and output head
    /// never below 8 bits). None: an MLX source keeps its own format, a float source follows
    /// the expert bits ([`default_dense_bits`]).
    pub dense_bits: Option<u32>,
    /// Replace an existing `dst`.
    pub force: bool,
}

#[derive(Clone, Debug)]
pub struct PackReport {
    pub dst: PathBuf,
    pub source_kind: &'static str,
    pub expert_bits: u32,
    pub group_size: usize,
    /// Experts copied byte for byte / converted (dequantized and requantized or rounded).
    pub experts_copied: usize,
    pub experts_converted: usize,
    pub dense_bytes: u64,
    pub expert_file_bytes: u64,
    pub text_files: Vec<String>,
}

fn is_expert_tensor(name: &str) -> bool {
    name.contains(".mlp.switch_mlp.") || name.contains(".mlp.experts.")
}

/// Norms that `model::norm` treats as zero-centred (the GatedDeltaNet gated norm is not one).
fn is_offset_norm(name: &str) -> bool {
    name == "norm.weight"
        || [
            ".input_layernorm.weight",
            ".post_attention_layernorm.weight",
            ".q_norm.weight",
            ".k_norm.weight",
        ]
        .iter()
        .any(|s| name.ends_with(s))
}

/// Router and shared-expert gate (MLX keeps them at 8 bits, arch-spec §11.1) and the output
/// head (llama.cpp keeps it at 6 bits or more; 8 is the nearest format here), with the
/// embedding when it is the head too (`tied`).
fn needs_8bit(name: &str, tied: bool) -> bool {
    name.ends_with(".mlp.gate.weight")
        || name.ends_with("shared_expert_gate.weight")
        || name == "lm_head.weight"
        || (tied && name == "embed_tokens.weight")
}

/// Dense-matrix bits when `--dense-bits` is not given: an MLX source (`quantized_source`)
/// keeps its format (None); a float source follows the expert bits, at least 4 (2-bit
/// attention costs more accuracy than the bytes it saves), and 16-bit experts keep dense
/// bf16 too.
pub fn default_dense_bits(expert_bits: u32, quantized_source: bool) -> Option<u32> {
    match expert_bits {
        _ if quantized_source => None,
        16 => Some(16),
        b => Some(b.max(4)),
    }
}

/// f32 values to little-endian bytes of `dtype` (f32, f16 or bf16).
pub(crate) fn floats_to(dtype: DType, v: &[f32]) -> Vec<u8> {
    match dtype {
        DType::F32 => bytemuck::cast_slice(v).to_vec(),
        DType::F16 => v
            .iter()
            .flat_map(|x| f16::from_f32(*x).to_le_bytes())
            .collect(),
        _ => v
            .iter()
            .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
            .collect(),
    }
}

fn bf16_to(dtype: DType, v: &[bf16]) -> Vec<u8> {
    if dtype == DType::BF16 {
        return bytemuck::cast_slice(v).to_vec();
    }
    let f: Vec<f32> = v.iter().map(|x| x.to_f32()).collect();
    floats_to(dtype, &f)
}

/// Copies a raw tensor in 64 MB pieces (progress moves as it goes).
fn copy_raw(dw: &mut DenseWriter, name: &str, t: &TensorEntry, prog: &dyn Progress) -> Result<()> {
    let off = dw.reserve(name, t.dtype, &t.shape, t.quant);
    for (i, c) in t.buf.bytes().chunks(64 << 20).enumerate() {
        dw.write_at(off + (i as u64) * (64 << 20), c)?;
        prog.advance(c.len() as u64);
    }
    Ok(())
}

/// The dense matrix format asked for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    Keep,
    Bf16,
    Affine(QuantSpec),
}

/// Writes matrix `lin` ([rows, cols], named `base.weight`) in format `target`, in row chunks.
fn write_matrix(
    dw: &mut DenseWriter,
    base: &str,
    lin: &Linear,
    target: Target,
    prog: &dyn Progress,
) -> Result<()> {
    let (rows, cols) = (lin.rows(), lin.cols());
    let chunk = (CHUNK_ELEMS / cols.max(1)).max(1);
    let weight = format!("{base}.weight");
    match target {
        Target::Keep | Target::Bf16 => {
            let off = dw.reserve(&weight, DType::BF16, &[rows, cols], None);
            for r0 in (0..rows).step_by(chunk) {
                let n = chunk.min(rows - r0);
                let part = lin.slice_rows(r0, n);
                let bytes = match &part {
                    Linear::Dense {
                        dtype: DType::BF16,
                        data,
                        ..
                    } => data.bytes().to_vec(),
                    _ => floats_to(DType::BF16, &kernels::dequantize(&part.view())),
                };
                dw.write_at(off + (r0 * cols * 2) as u64, &bytes)?;
                prog.advance(part.nbytes() as u64);
            }
        }
        Target::Affine(q) => {
            let (bits, g) = (q.bits as usize, q.group_size);
            let wrow = cols * bits / 32;
            let srow = cols / g;
            let ow = dw.reserve(&weight, DType::U32, &[rows, wrow], Some(q));
            let os = dw.reserve(&format!("{base}.scales"), DType::BF16, &[rows, srow], None);
            let ob = dw.reserve(&format!("{base}.biases"), DType::BF16, &[rows, srow], None);
            for r0 in (0..rows).step_by(chunk) {
                let n = chunk.min(rows - r0);
                let part = lin.slice_rows(r0, n);
                let f = kernels::dequantize(&part.view());
                let (w, s, b) = quantize_affine(&f, n, cols, q.bits, g);
                dw.write_at(ow + (r0 * wrow * 4) as u64, bytemuck::cast_slice(&w))?;
                dw.write_at(os + (r0 * srow * 2) as u64, bytemuck::cast_slice(&s))?;
                dw.write_at(ob + (r0 * srow * 2) as u64, bytemuck::cast_slice(&b))?;
                prog.advance(part.nbytes() as u64);
            }
        }
    }
    Ok(())
}

/// Writes every non-expert tensor of `store`; returns nothing but the writer's table.
fn pack_dense(
    store: &TensorStore,
    cfg: &ModelConfig,
    dense_bits: Option<u32>,
    group: usize,
    dw: &mut DenseWriter,
    prog: &dyn Progress,
) -> Result<()> {
    let mut names: Vec<&String> = store
        .tensors
        .keys()
        .filter(|n| !is_expert_tensor(n))
        .collect();
    names.sort();
    for name in names {
        let t = &store.tensors[name];
        // Scales and biases travel with their packed weight.
        if let Some(base) = name
            .strip_suffix(".scales")
            .or_else(|| name.strip_suffix(".biases"))
        {
            if store
                .tensors
                .get(&format!("{base}.weight"))
                .is_some_and(|w| w.quant.is_some())
            {
                continue;
            }
        }
        if is_offset_norm(name) {
            if cfg.norm_zero_centered && store.layout == SourceLayout::HuggingFace {
                let n: usize = t.shape.iter().product();
                let w: Vec<f32> = load_vec(store, name, n)?.iter().map(|v| v + 1.0).collect();
                dw.put(name, DType::F32, &t.shape, None, bytemuck::cast_slice(&w))?;
                prog.advance(t.buf.len() as u64);
            } else {
                copy_raw(dw, name, t, prog)?;
            }
            continue;
        }
        let is_float = matches!(t.dtype, DType::F32 | DType::F16 | DType::BF16);
        let is_matrix = name.ends_with(".weight")
            && ((is_float && t.shape.len() == 2) || (t.dtype == DType::U32 && t.quant.is_some()));
        if !is_matrix {
            copy_raw(dw, name, t, prog)?;
            continue;
        }
        let rows = t.shape[0];
        let cols = match t.quant {
            Some(q) => t.shape[1] * 32 / q.bits as usize,
            None => t.shape[1],
        };
        let lin = load_matrix(store, name, &[], rows, cols)?;
        let base = name.strip_suffix(".weight").unwrap_or(name);
        let target = match dense_bits {
            None => Target::Keep,
            Some(16) => Target::Bf16,
            Some(b) => {
                let bits = if needs_8bit(name, cfg.tie_word_embeddings) {
                    b.max(8)
                } else {
                    b
                };
                if cols.is_multiple_of(group) {
                    Target::Affine(QuantSpec {
                        bits,
                        group_size: group,
                    })
                } else {
                    // MLX leaves such a matrix unquantized too (arch-spec §11.1).
                    Target::Bf16
                }
            }
        };
        let unchanged = match (&lin, target) {
            (Linear::Affine { .. }, Target::Keep) => true,
            (Linear::Affine { bits, group, .. }, Target::Affine(q)) => {
                *bits == q.bits && *group == q.group_size
            }
            (Linear::Dense { dtype, .. }, Target::Keep) => *dtype != DType::F32,
            (Linear::Dense { dtype, .. }, Target::Bf16) => *dtype == DType::BF16,
            _ => false,
        };
        if unchanged {
            copy_raw(dw, name, t, prog)?;
            if t.quant.is_some() {
                for suffix in ["scales", "biases"] {
                    let n = format!("{base}.{suffix}");
                    copy_raw(dw, &n, store.get(&n)?, prog)?;
                }
            }
        } else {
            write_matrix(dw, base, &lin, target, prog)?;
        }
    }
    Ok(())
}

/// Encodes one expert into `out` (`layout.expert_bytes`); returns whether it was a plain copy.
pub(crate) fn encode_expert(layout: &ExpertLayout, w: &ExpertWeights, out: &mut [u8]) -> bool {
    let mut copied = true;
    for (proj, lin) in [
        (Proj::Gate, &w.gate),
        (Proj::Up, &w.up),
        (Proj::Down, &w.down),
    ] {
        let wp = layout.part(proj, Role::Weight).expect("layout has weights");
        let put = |out: &mut [u8], p: &super::ExpertPart, b: &[u8]| {
            out[p.offset as usize..][..p.nbytes as usize].copy_from_slice(b);
        };
        if layout.bits == 16 {
            match lin {
                Linear::Dense { dtype, data, .. } if *dtype == wp.dtype => {
                    put(out, wp, data.bytes())
                }
                _ => {
                    copied = false;
                    put(
                        out,
                        wp,
                        &floats_to(wp.dtype, &kernels::dequantize(&lin.view())),
                    );
                }
            }
            continue;
        }
        let sp = layout.part(proj, Role::Scales).expect("affine layout");
        let bp = layout.part(proj, Role::Biases).expect("affine layout");
        match lin {
            Linear::Affine {
                bits,
                group,
                w,
                scales,
                biases,
                sdtype,
                ..
            } if *bits == layout.bits && *group == layout.group_size && *sdtype == sp.dtype => {
                put(out, wp, w.bytes());
                put(out, sp, scales.bytes());
                put(out, bp, biases.bytes());
            }
            _ => {
                copied = false;
                let f = kernels::dequantize(&lin.view());
                let (q, s, b) =
                    quantize_affine(&f, lin.rows(), lin.cols(), layout.bits, layout.group_size);
                put(out, wp, bytemuck::cast_slice(&q));
                put(out, sp, &bf16_to(sp.dtype, &s));
                put(out, bp, &bf16_to(bp.dtype, &b));
            }
        }
    }
    copied
}

/// Packs the checkpoint at `src` into `dst` (see the module docs).
pub fn pack(src: &Path, dst: &Path, opts: &PackOptions, prog: &dyn Progress) -> Result<PackReport> {
    if is_packed_dir(src) {
        return Err(packed_err(src, "is already a packed model"));
    }
    // With --force the finished model replaces DST wholesale: a DST that is the source or one of
    // its ancestors would take the checkpoint being packed (and whatever sits beside it) with it.
    if let (Ok(s), Ok(d)) = (src.canonicalize(), dst.canonicalize()) {
        if s.starts_with(&d) {
            return Err(packed_err(
                dst,
                format!(
                    "is or contains the source checkpoint {}; choose an output directory outside it",
                    src.display()
                ),
            ));
        }
    }
    let cfg_path = src.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let raw: Value = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: cfg_path.clone(),
        msg: e.to_string(),
    })?;
    let cfg = ModelConfig::from_json(&raw, &cfg_path)?;
    let store = TensorStore::open_checkpoint(src, &cfg)?;
    let experts = StoreExperts::new(&store, &cfg)?;
    // Every check loading makes (each tensor's dtype and shape against the config) before
    // anything is written: a checkpoint `run` would refuse is refused in seconds, not after
    // hours of conversion. Loading views the mapped checkpoint; it copies nothing large.
    Model::load(
        cfg.clone(),
        &store,
        Box::new(StoreExperts::new(&store, &cfg)?),
    )?;
    let moe_layers: Vec<usize> = (0..cfg.num_layers)
        .filter(|&l| cfg.is_moe_layer(l))
        .collect();
    let kind = match store.layout {
        SourceLayout::Mlx => "mlx",
        _ => "hf",
    };

    // The source's expert format decides the defaults and whether bytes can be copied.
    let first = match moe_layers.first() {
        Some(&l) => Some(experts.fetch(l, &[0])?.remove(0)),
        None => None,
    };
    let (src_bits, src_group, src_sdtype) = match first.as_ref().map(|e| &e.gate) {
        Some(Linear::Affine {
            bits,
            group,
            sdtype,
            ..
        }) => (Some(*bits), Some(*group), *sdtype),
        Some(Linear::Dense { dtype, .. }) if *dtype != DType::F32 => (None, None, *dtype),
        _ => (None, None, DType::BF16),
    };
    let bits = opts.bits.or(src_bits).unwrap_or(4);
    let group = opts.group_size.or(src_group).unwrap_or(64);
    if !matches!(bits, 2 | 4 | 8 | 16) {
        return Err(Error::Invalid(format!("--bits {bits}: use 2, 4, 8 or 16")));
    }
    if !matches!(group, 32 | 64 | 128) {
        return Err(Error::Invalid(format!(
            "--group-size {group}: use 32, 64 or 128"
        )));
    }
    if let Some(d) = opts.dense_bits {
        if !matches!(d, 4 | 8 | 16) {
            return Err(Error::Invalid(format!("--dense-bits {d}: use 4, 8 or 16")));
        }
    }
    let dense_bits = opts
        .dense_bits
        .or_else(|| default_dense_bits(bits, store.layout == SourceLayout::Mlx));
    let (h, i) = (cfg.hidden_size, cfg.moe_intermediate_size);
    if bits != 16 {
        // Quantised rows must be whole groups: name the dimension that is not.
        for (name, n) in [("hidden_size", h), ("moe_intermediate_size", i)] {
            if n % group != 0 {
                return Err(Error::Invalid(format!(
                    "group size {group} does not divide {name} {n}: choose a --group-size that \
                     divides both hidden_size {h} and moe_intermediate_size {i}"
                )));
            }
        }
    }
    let same_format = src_bits == Some(bits) && src_group == Some(group);
    let sdtype = if (bits == 16 && src_bits.is_none()) || same_format {
        src_sdtype
    } else {
        DType::BF16
    };
    let mut layout = ExpertLayout::build(bits, group, i, h, sdtype, cfg.num_experts);

    let out = OutDir::create(dst, opts.force)?;
    let total: u64 = store.tensors.values().map(|t| t.buf.len() as u64).sum();
    // Refuse up front rather than fail hours into a 200 GB conversion: experts at the output
    // stride, dense tensors at most their source size.
    let n_experts = moe_layers.len() as u64 * cfg.num_experts as u64;
    let need =
        n_experts * layout.stride + total.saturating_sub(n_experts * experts.expert_bytes() as u64);
    if let Some(free) = super::free_bytes(out.path()) {
        if need > free {
            return Err(packed_err(
                dst,
                format!(
                    "needs about {} but the filesystem has {} free",
                    super::human_bytes(need),
                    super::human_bytes(free)
                ),
            ));
        }
    }
    prog.begin(total, "packing");

    let mut dw = DenseWriter::create(out.path())?;
    let dense_group = opts.group_size.unwrap_or(64);
    pack_dense(&store, &cfg, dense_bits, dense_group, &mut dw, prog)?;
    let dense = dw.finish()?;

    let (mut copied, mut converted) = (0usize, 0usize);
    let batch = rayon::current_num_threads().max(1) * 2;
    let ids: Vec<usize> = (0..cfg.num_experts).collect();
    for &l in &moe_layers {
        let mut lw = LayerWriter::create(out.path(), l, layout.stride, layout.expert_bytes)?;
        for chunk in ids.chunks(batch) {
            let ws = experts.fetch(l, chunk)?;
            let enc: Vec<(Vec<u8>, bool, usize)> = ws
                .par_iter()
                .map(|w| {
                    let mut buf = vec![0u8; layout.expert_bytes as usize];
                    let c = encode_expert(&layout, w, &mut buf);
                    (buf, c, w.nbytes())
                })
                .collect();
            for (buf, c, n) in enc {
                lw.push(&buf)?;
                if c {
                    copied += 1;
                } else {
                    converted += 1;
                }
                prog.advance(n as u64);
            }
        }
        layout.layers.push(lw.finish()?);
    }
    prog.finish();

    let text_files = out.copy_text_files(src)?;
    let config = strip_quantization(&raw);
    let pretty = serde_json::to_vec_pretty(&config)
        .map_err(|e| Error::Invalid(format!("serialising config.json: {e}")))?;
    out.write_file("config.json", &pretty)?;
    let manifest = Manifest {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        source: json!({
            "kind": kind,
            "path": src.display().to_string(),
            "expert_bits": src_bits.unwrap_or(16),
            "expert_group_size": src_group,
            "dense_bits": dense_bits,
        }),
        config,
        dense,
        experts: layout,
    };
    let report = PackReport {
        dst: dst.to_path_buf(),
        source_kind: kind,
        expert_bits: bits,
        group_size: group,
        experts_copied: copied,
        experts_converted: converted,
        dense_bytes: manifest.dense.nbytes,
        expert_file_bytes: manifest.experts.layers.iter().map(|l| l.nbytes).sum(),
        text_files,
    };
    out.commit(&manifest)?;
    Ok(report)
}
