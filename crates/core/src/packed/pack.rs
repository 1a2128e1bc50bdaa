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

use crate::config::{ModelConfig, QuantSpec};
use crate::error::Result;
use crate::experts::ExpertWeights;
use crate::kernels::{self, quantize_affine};
use crate::store::{DType, SourceLayout, TensorEntry, TensorStore};
use crate::weights::{load_matrix, load_vec, Linear};

use super::packer::PackPlan;
use super::writer::{DenseLayout, DenseWriter, OutDir, Progress};
use super::{is_packed_dir, packed_err, ExpertLayout, Proj, Role};

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

pub(crate) fn is_expert_tensor(name: &str) -> bool {
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

/// Copies a raw tensor to its reserved offset in 64 MB pieces (progress moves as it goes).
fn copy_raw(dw: &DenseWriter, off: u64, t: &TensorEntry, prog: &dyn Progress) -> Result<()> {
    for (i, c) in t.buf.bytes().chunks(64 << 20).enumerate() {
        dw.write_at(off + (i as u64) * (64 << 20), c)?;
        prog.advance(c.len() as u64);
    }
    Ok(())
}

/// The dense matrix format asked for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Target {
    Keep,
    Bf16,
    Affine(QuantSpec),
}

/// Reserves the tensors matrix `base.weight` ([rows, cols]) becomes in format `target`.
fn reserve_matrix(
    dl: &mut DenseLayout,
    base: &str,
    rows: usize,
    cols: usize,
    target: Target,
) -> Vec<u64> {
    let weight = format!("{base}.weight");
    match target {
        Target::Keep | Target::Bf16 => vec![dl.reserve(&weight, DType::BF16, &[rows, cols], None)],
        Target::Affine(q) => {
            let wrow = cols * q.bits as usize / 32;
            let srow = cols / q.group_size;
            vec![
                dl.reserve(&weight, DType::U32, &[rows, wrow], Some(q)),
                dl.reserve(&format!("{base}.scales"), DType::BF16, &[rows, srow], None),
                dl.reserve(&format!("{base}.biases"), DType::BF16, &[rows, srow], None),
            ]
        }
    }
}

/// Writes matrix `lin` in format `target` at the offsets [`reserve_matrix`] gave, in row chunks.
fn write_matrix(
    dw: &DenseWriter,
    offs: &[u64],
    lin: &Linear,
    target: Target,
    prog: &dyn Progress,
) -> Result<()> {
    let (rows, cols) = (lin.rows(), lin.cols());
    let chunk = (CHUNK_ELEMS / cols.max(1)).max(1);
    match target {
        Target::Keep | Target::Bf16 => {
            let off = offs[0];
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
            let (ow, os, ob) = (offs[0], offs[1], offs[2]);
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

/// What one dense job does with its source tensors.
#[derive(Clone, Copy, Debug)]
enum DenseAction {
    /// A zero-centred norm of a Hugging Face source, written as f32 `1 + w`.
    FoldNorm,
    /// Each input copied byte for byte to the offset beside it.
    Copy,
    /// Matrix `[rows, cols]` converted to the target format.
    Convert(Target, usize, usize),
}

/// One dense tensor (with the scales and biases that travel with it): the source tensors it
/// reads and the offsets in `dense.bin` it writes, decided before anything is written.
#[derive(Clone, Debug)]
pub(crate) struct DenseJob {
    pub name: String,
    action: DenseAction,
    /// Canonical names of the source tensors read.
    pub inputs: Vec<String>,
    offs: Vec<u64>,
}

/// Lays out every non-expert tensor of `store` in `dl` (name order) and says how each is made.
pub(crate) fn plan_dense(
    store: &TensorStore,
    cfg: &ModelConfig,
    dense_bits: Option<u32>,
    group: usize,
    dl: &mut DenseLayout,
) -> Result<Vec<DenseJob>> {
    let mut names: Vec<&String> = store
        .tensors
        .keys()
        .filter(|n| !is_expert_tensor(n))
        .collect();
    names.sort();
    let mut jobs = Vec::new();
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
        let job = |action, inputs: Vec<String>, offs| DenseJob {
            name: name.clone(),
            action,
            inputs,
            offs,
        };
        let copy = |dl: &mut DenseLayout, n: &str| -> Result<u64> {
            let t = store.get(n)?;
            Ok(dl.reserve(n, t.dtype, &t.shape, t.quant))
        };
        if is_offset_norm(name) {
            if cfg.norm_zero_centered && store.layout == SourceLayout::HuggingFace {
                let off = dl.reserve(name, DType::F32, &t.shape, None);
                jobs.push(job(DenseAction::FoldNorm, vec![name.clone()], vec![off]));
            } else {
                let off = copy(dl, name)?;
                jobs.push(job(DenseAction::Copy, vec![name.clone()], vec![off]));
            }
            continue;
        }
        let is_float = matches!(t.dtype, DType::F32 | DType::F16 | DType::BF16);
        let is_matrix = name.ends_with(".weight")
            && ((is_float && t.shape.len() == 2) || (t.dtype == DType::U32 && t.quant.is_some()));
        if !is_matrix {
            let off = copy(dl, name)?;
            jobs.push(job(DenseAction::Copy, vec![name.clone()], vec![off]));
            continue;
        }
        let rows = t.shape[0];
        let cols = match t.quant {
            Some(q) => t.shape[1] * 32 / q.bits as usize,
            None => t.shape[1],
        };
        // Only the matrix's format is looked at here (a plan's source may not hold its bytes yet).
        let lin = load_matrix(store, name, &[], rows, cols)?;
        let base = name.strip_suffix(".weight").unwrap_or(name);
        let mut inputs = vec![name.clone()];
        if t.quant.is_some() {
            inputs.push(format!("{base}.scales"));
            inputs.push(format!("{base}.biases"));
        }
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
            let offs = inputs
                .iter()
                .map(|n| copy(dl, n))
                .collect::<Result<Vec<u64>>>()?;
            jobs.push(job(DenseAction::Copy, inputs, offs));
        } else {
            let offs = reserve_matrix(dl, base, rows, cols, target);
            jobs.push(job(DenseAction::Convert(target, rows, cols), inputs, offs));
        }
    }
    Ok(jobs)
}

/// Writes one dense job's tensors; its inputs' bytes must be in `store` by now.
pub(crate) fn run_dense(
    store: &TensorStore,
    job: &DenseJob,
    dw: &DenseWriter,
    prog: &dyn Progress,
) -> Result<()> {
    match job.action {
        DenseAction::FoldNorm => {
            let t = store.get(&job.name)?;
            let n: usize = t.shape.iter().product();
            let w: Vec<f32> = load_vec(store, &job.name, n)?
                .iter()
                .map(|v| v + 1.0)
                .collect();
            dw.write_at(job.offs[0], bytemuck::cast_slice(&w))?;
            prog.advance(t.buf.len() as u64);
        }
        DenseAction::Copy => {
            for (n, &off) in job.inputs.iter().zip(&job.offs) {
                copy_raw(dw, off, store.get(n)?, prog)?;
            }
        }
        DenseAction::Convert(target, rows, cols) => {
            let lin = load_matrix(store, &job.name, &[], rows, cols)?;
            write_matrix(dw, &job.offs, &lin, target, prog)?;
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
    let plan = PackPlan::new(src, opts)?;
    let out = OutDir::create(dst, opts.force)?;
    // Refuse up front rather than fail hours into a 200 GB conversion.
    let need = plan.need_bytes();
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
    prog.begin(plan.total_bytes(), "packing");
    let mut packer = plan.start(out.path(), false)?;
    for u in packer.units() {
        packer.run(u.unit, prog)?;
    }
    prog.finish();
    let (manifest, mut report) = packer.finish(src, &src.display().to_string())?;
    report.dst = dst.to_path_buf();
    out.commit(&manifest)?;
    Ok(report)
}
