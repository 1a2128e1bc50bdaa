//! The flashmoe packed model directory (design.md §2): what the engine streams from.
//!
//! ```text
//! DIR/manifest.json            format version, source config, tensor table, expert layout, crc32s
//! DIR/dense.bin                every non-expert tensor, each at a 64-byte aligned offset (mmap'd)
//! DIR/experts/layer_NNN.bin    every expert of MoE layer NNN at a fixed stride (multiple of 4096);
//!                              one expert = gate, up, down (weight, scales, biases) contiguous
//! DIR/config.json, tokenizer.json, ... copied from the source for the text front ends
//! ```
//!
//! Norms in `dense.bin` are plain weights (y = x̂ · w): zero-centred offsets are folded in when
//! packing, so the packed store has [`SourceLayout::Packed`]. `manifest.json` is written last,
//! through a temporary file and a rename: a directory without it is never a complete model.
//!
//! This module owns the on-disk format (types, validation, opening the dense store). Writing
//! lives in `writer`/`pack`/`synth`, reading experts in `reader`.
mod kept;
mod pack;
mod packer;
mod reader;
mod synth;
mod writer;

pub use pack::{default_dense_bits, pack, PackOptions, PackReport};
pub use packer::{PackPlan, Packer, Unit, UnitDone, UnitInfo};
pub use reader::PackedExperts;
pub use synth::{synth, synth_config, SynthOptions, PRESETS};

pub use writer::{abandon_partial, write_manifest, NoProgress, Progress, TEXT_FILES};

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::buf::Buf;
use crate::config::{ModelConfig, QuantSpec};
use crate::error::{Error, Result};
use crate::experts::ExpertWeights;
use crate::store::{DType, SourceLayout, TensorEntry, TensorStore};
use crate::weights::Linear;

pub const FORMAT: &str = "flashmoe-packed";
/// Version 2 added a crc32 per dense tensor; version 1 models still load (without them).
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format version this build reads.
pub const MIN_FORMAT_VERSION: u32 = 1;
pub const MANIFEST: &str = "manifest.json";
pub const DENSE_FILE: &str = "dense.bin";
/// Alignment of every tensor in `dense.bin` and of every part inside one expert.
pub const DENSE_ALIGN: u64 = 64;
/// Expert stride alignment: O_DIRECT needs block-aligned offsets and lengths.
pub const EXPERT_ALIGN: u64 = 4096;

pub fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// One tensor of `dense.bin`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TensorInfo {
    /// Canonical name (`layers.3.mlp.gate.weight`).
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub offset: u64,
    pub nbytes: u64,
    /// Set on a packed `*.weight` (u32); its `.scales` and `.biases` are separate entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quant: Option<QuantSpec>,
    /// crc32 (IEEE) of the tensor's bytes; absent in format version 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc32: Option<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DenseTable {
    pub file: String,
    pub nbytes: u64,
    pub tensors: Vec<TensorInfo>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Proj {
    Gate,
    Up,
    Down,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Weight,
    Scales,
    Biases,
}

/// One piece of an expert: its place inside the expert's bytes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExpertPart {
    pub proj: Proj,
    pub role: Role,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub offset: u64,
    pub nbytes: u64,
}

/// The experts of one MoE layer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerFile {
    pub layer: usize,
    /// Relative to the model directory.
    pub file: String,
    /// Expected file size: `count * stride`.
    pub nbytes: u64,
    /// crc32 (IEEE) of each expert's `expert_bytes` bytes.
    pub crc32: Vec<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExpertLayout {
    /// 2, 4, 8 (affine) or 16 (bf16/f16/f32 dense).
    pub bits: u32,
    /// Affine group size (0 when `bits == 16`).
    pub group_size: usize,
    /// Experts per layer.
    pub count: usize,
    /// Bytes of one expert (the read size, before rounding for O_DIRECT).
    pub expert_bytes: u64,
    /// Distance between consecutive experts in a layer file (multiple of 4096).
    pub stride: u64,
    pub parts: Vec<ExpertPart>,
    pub layers: Vec<LayerFile>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    /// Where it came from: `{"kind": "hf"|"mlx"|"synth", ...}` (informational).
    pub source: Value,
    /// The source's `config.json`, quantization blocks removed (the tensor table says it).
    pub config: Value,
    pub dense: DenseTable,
    pub experts: ExpertLayout,
}

impl ExpertLayout {
    /// Parts of one expert with gate/up [inter, hidden] and down [hidden, inter]:
    /// affine (`bits` 2/4/8, scales and biases in `sdtype`) or dense in `sdtype` (`bits` 16).
    pub fn build(
        bits: u32,
        group: usize,
        inter: usize,
        hidden: usize,
        sdtype: DType,
        count: usize,
    ) -> ExpertLayout {
        let mut parts = Vec::new();
        let mut off = 0u64;
        let mut push = |proj, role, dtype: DType, shape: Vec<usize>| {
            let nbytes = (shape.iter().product::<usize>() * dtype.size()) as u64;
            parts.push(ExpertPart {
                proj,
                role,
                dtype,
                shape,
                offset: off,
                nbytes,
            });
            off = align_up(off + nbytes, DENSE_ALIGN);
        };
        for (proj, rows, cols) in [
            (Proj::Gate, inter, hidden),
            (Proj::Up, inter, hidden),
            (Proj::Down, hidden, inter),
        ] {
            if bits == 16 {
                push(proj, Role::Weight, sdtype, vec![rows, cols]);
            } else {
                let b = bits as usize;
                push(proj, Role::Weight, DType::U32, vec![rows, cols * b / 32]);
                push(proj, Role::Scales, sdtype, vec![rows, cols / group]);
                push(proj, Role::Biases, sdtype, vec![rows, cols / group]);
            }
        }
        let last = parts.last().expect("three projections");
        let expert_bytes = last.offset + last.nbytes;
        ExpertLayout {
            bits,
            group_size: if bits == 16 { 0 } else { group },
            count,
            expert_bytes,
            stride: align_up(expert_bytes, EXPERT_ALIGN),
            parts,
            layers: Vec::new(),
        }
    }

    /// Checks bits, group size, scale dtype, count, parts, expert size and stride against the
    /// config and returns the size every layer file must have (`count * stride`).
    fn check(&self, cfg: &ModelConfig) -> std::result::Result<u64, String> {
        let (i, h) = (cfg.moe_intermediate_size, cfg.hidden_size);
        if self.count != cfg.num_experts {
            return Err(format!(
                "count {} but the config has {} experts",
                self.count, cfg.num_experts
            ));
        }
        if !matches!(self.bits, 2 | 4 | 8 | 16) {
            return Err(format!("bits {} (2, 4, 8 or 16)", self.bits));
        }
        if self.bits != 16
            && (!matches!(self.group_size, 32 | 64 | 128)
                || !h.is_multiple_of(self.group_size)
                || !i.is_multiple_of(self.group_size))
        {
            return Err(format!(
                "group_size {} must be 32, 64 or 128 and divide hidden_size {h} and moe_intermediate_size {i}",
                self.group_size
            ));
        }
        let role = if self.bits == 16 {
            Role::Weight
        } else {
            Role::Scales
        };
        match self.part(Proj::Gate, role).map(|p| p.dtype) {
            Some(DType::BF16 | DType::F16 | DType::F32) => {}
            other => return Err(format!("gate {role:?} dtype {other:?} (bf16, f16 or f32)")),
        }
        let want = ExpertLayout::build(self.bits, self.group_size, i, h, self.sdtype(), self.count);
        let same = want.parts.len() == self.parts.len()
            && want.parts.iter().zip(&self.parts).all(|(a, b)| {
                (a.proj, a.role, a.dtype, &a.shape, a.offset, a.nbytes)
                    == (b.proj, b.role, b.dtype, &b.shape, b.offset, b.nbytes)
            });
        if !same || self.expert_bytes != want.expert_bytes {
            return Err(format!(
                "parts do not match the config (moe_intermediate_size {i}, hidden_size {h}, {} bits)",
                self.bits
            ));
        }
        if self.stride < self.expert_bytes || !self.stride.is_multiple_of(EXPERT_ALIGN) {
            return Err(format!(
                "stride {} must be a multiple of {EXPERT_ALIGN} and at least expert_bytes {}",
                self.stride, self.expert_bytes
            ));
        }
        self.stride
            .checked_mul(self.count as u64)
            .ok_or_else(|| format!("{} experts x stride {} overflows", self.count, self.stride))
    }

    pub fn part(&self, proj: Proj, role: Role) -> Option<&ExpertPart> {
        self.parts.iter().find(|p| p.proj == proj && p.role == role)
    }

    /// The scale dtype (affine) or weight dtype (dense) of the parts.
    pub fn sdtype(&self) -> DType {
        let role = if self.bits == 16 {
            Role::Weight
        } else {
            Role::Scales
        };
        self.part(Proj::Gate, role).map_or(DType::BF16, |p| p.dtype)
    }

    /// One expert's matrices as views into `buf` (`expert_bytes` long, 64-byte aligned parts).
    pub fn view(&self, buf: &Buf) -> ExpertWeights {
        let lin = |proj| -> Linear {
            let w = self.part(proj, Role::Weight).expect("validated layout");
            let rows = w.shape[0];
            let slice = |p: &ExpertPart| buf.slice(p.offset as usize, p.nbytes as usize);
            if self.bits == 16 {
                Linear::Dense {
                    dtype: w.dtype,
                    rows,
                    cols: w.shape[1],
                    data: slice(w),
                }
            } else {
                let s = self.part(proj, Role::Scales).expect("validated layout");
                let b = self.part(proj, Role::Biases).expect("validated layout");
                Linear::Affine {
                    bits: self.bits,
                    group: self.group_size,
                    rows,
                    cols: w.shape[1] * 32 / self.bits as usize,
                    w: slice(w),
                    scales: slice(s),
                    biases: slice(b),
                    sdtype: s.dtype,
                }
            }
        };
        ExpertWeights {
            gate: lin(Proj::Gate),
            up: lin(Proj::Up),
            down: lin(Proj::Down),
        }
    }

    pub fn layer(&self, layer: usize) -> Option<&LayerFile> {
        self.layers.iter().find(|l| l.layer == layer)
    }
}

/// Whether `dir` looks like a packed model (complete or not).
pub fn is_packed_dir(dir: &Path) -> bool {
    dir.join(MANIFEST).exists()
}

/// Whether `dir` holds the remains of a packed model without its manifest (interrupted pack).
/// Where `flashmoe pull` keeps its downloads and progress inside the output directory until
/// the model is complete (removed once `manifest.json` is written).
pub const PULL_STATE_DIR: &str = ".flashmoe-pull";
/// The progress file in [`PULL_STATE_DIR`]; `repo` and `revision` name what is being pulled.
pub const PULL_STATE_FILE: &str = "state.json";

/// For a directory a pull has started but not finished: the command that resumes it.
pub fn incomplete_pull(dir: &Path) -> Option<String> {
    let state = dir.join(PULL_STATE_DIR);
    if is_packed_dir(dir) || !state.is_dir() {
        return None;
    }
    #[derive(Deserialize)]
    struct Head {
        repo: String,
        revision: String,
    }
    let head = std::fs::read(state.join(PULL_STATE_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<Head>(&b).ok());
    Some(match head {
        Some(h) => format!(
            "flashmoe pull {} --revision {} --out {}",
            h.repo,
            h.revision,
            dir.display()
        ),
        None => format!("flashmoe pull REPO_ID --out {}", dir.display()),
    })
}

pub fn is_incomplete_packed_dir(dir: &Path) -> bool {
    !is_packed_dir(dir) && (dir.join(DENSE_FILE).exists() || dir.join("experts").is_dir())
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        if m.format != FORMAT {
            return Err(packed_err(
                &path,
                format!("format is `{}`, not `{FORMAT}`", m.format),
            ));
        }
        if !(MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&m.format_version) {
            return Err(packed_err(
                &path,
                format!(
                    "format_version {} is not supported (this build reads {MIN_FORMAT_VERSION} to {FORMAT_VERSION}); repack the model",
                    m.format_version
                ),
            ));
        }
        Ok(m)
    }

    pub fn model_config(&self, dir: &Path) -> Result<ModelConfig> {
        ModelConfig::from_json(&self.config, &dir.join(MANIFEST))
    }

    /// Whether `dense.bin` carries a crc32 per tensor (format version 2 on).
    pub fn has_dense_checksums(&self) -> bool {
        self.format_version >= 2
    }

    /// Checks every number of the manifest against the others, the config and the files on
    /// disk (names, sizes, shapes, offsets, alignment, counts), so that a damaged or
    /// hand-edited manifest is reported at load time with the field and file, and nothing
    /// later divides by, allocates from or indexes with an unchecked value.
    pub fn validate(&self, dir: &Path, cfg: &ModelConfig) -> Result<()> {
        let mpath = dir.join(MANIFEST);
        let bad = |msg: String| packed_err(&mpath, msg);
        if self.dense.file != DENSE_FILE {
            return Err(bad(format!(
                "dense.file is `{}`, not `{DENSE_FILE}`",
                self.dense.file
            )));
        }
        let dpath = dir.join(DENSE_FILE);
        let dlen = file_len(&dpath)?;
        if dlen < self.dense.nbytes {
            return Err(packed_err(
                &dpath,
                format!(
                    "file is {dlen} bytes, manifest says {} (truncated?)",
                    self.dense.nbytes
                ),
            ));
        }
        for t in &self.dense.tensors {
            self.validate_tensor(t).map_err(|m| {
                bad(format!(
                    "tensor `{}` ({:?} {:?} at offset {}, {} bytes): {m}",
                    t.name, t.dtype, t.shape, t.offset, t.nbytes
                ))
            })?;
        }
        let moe_layers: Vec<usize> = (0..cfg.num_layers)
            .filter(|&l| cfg.is_moe_layer(l))
            .collect();
        if moe_layers.is_empty() {
            return Ok(());
        }
        let x = &self.experts;
        let file_bytes = x.check(cfg).map_err(|m| bad(format!("experts: {m}")))?;
        let mut seen = vec![false; cfg.num_layers];
        for lf in &x.layers {
            if !moe_layers.contains(&lf.layer) || std::mem::replace(&mut seen[lf.layer], true) {
                return Err(bad(format!(
                    "expert file listed for layer {}, which is not a MoE layer of the config or is listed twice",
                    lf.layer
                )));
            }
            if lf.file != layer_file_name(lf.layer) {
                return Err(bad(format!(
                    "layer {}: expert file is `{}`, not `{}`",
                    lf.layer,
                    lf.file,
                    layer_file_name(lf.layer)
                )));
            }
        }
        for &l in &moe_layers {
            let lf = x
                .layer(l)
                .ok_or_else(|| bad(format!("no expert file listed for layer {l}")))?;
            let path = dir.join(&lf.file);
            let len = file_len(&path)?;
            if len != file_bytes || lf.nbytes != file_bytes {
                return Err(packed_err(
                    &path,
                    format!(
                        "layer {l} expert file is {len} bytes, expected {file_bytes} ({} experts x stride {}){}",
                        x.count,
                        x.stride,
                        if len < file_bytes { " (truncated?)" } else { "" }
                    ),
                ));
            }
            if lf.crc32.len() != x.count {
                return Err(bad(format!(
                    "layer {l}: {} checksums for {} experts",
                    lf.crc32.len(),
                    x.count
                )));
            }
        }
        Ok(())
    }

    /// One dense tensor's entry against itself and the dense table.
    fn validate_tensor(&self, t: &TensorInfo) -> std::result::Result<(), String> {
        let n = t
            .shape
            .iter()
            .try_fold(t.dtype.size() as u64, |a, &d| a.checked_mul(d as u64))
            .ok_or("the shape's size overflows")?;
        if n != t.nbytes {
            return Err(format!("the shape and dtype make {n} bytes"));
        }
        let end = t.offset.checked_add(t.nbytes).ok_or("the end overflows")?;
        if end > self.dense.nbytes {
            return Err(format!(
                "it ends past dense.nbytes {} of the table",
                self.dense.nbytes
            ));
        }
        if !t.offset.is_multiple_of(DENSE_ALIGN) {
            return Err(format!("offset is not a multiple of {DENSE_ALIGN}"));
        }
        if let Some(q) = t.quant {
            if t.dtype != DType::U32 || !matches!(q.bits, 2 | 4 | 8) {
                return Err(format!(
                    "quantized as {} bits, which must be 2, 4 or 8 on a U32 tensor",
                    q.bits
                ));
            }
            if !matches!(q.group_size, 32 | 64 | 128) {
                return Err(format!("group_size {} is not 32, 64 or 128", q.group_size));
            }
        }
        if self.has_dense_checksums() && t.crc32.is_none() {
            return Err(format!(
                "no crc32 (format_version {} records one per tensor)",
                self.format_version
            ));
        }
        Ok(())
    }
    /// The dense tensors, mmap'd from `dense.bin`.
    pub fn open_dense(&self, dir: &Path) -> Result<TensorStore> {
        let path = dir.join(&self.dense.file);
        let f = File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: read-only mapping (sizes were validated above); a truncation while mapped is
        // caught by `mapguard` (checked before each generation; a SIGBUS becomes an error).
        let map = Arc::new(unsafe { Mmap::map(&f) }.map_err(|e| Error::io(&path, e))?);
        crate::mapguard::register(&path, &f, &map);
        let mut tensors = HashMap::with_capacity(self.dense.tensors.len());
        for t in &self.dense.tensors {
            if t.offset + t.nbytes > map.len() as u64 {
                return Err(packed_err(
                    &path,
                    format!("tensor `{}` lies past the end of the file", t.name),
                ));
            }
            tensors.insert(
                t.name.clone(),
                TensorEntry {
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    buf: Buf::from_map(map.clone(), t.offset as usize, t.nbytes as usize),
                    file: path.display().to_string(),
                    orig_name: t.name.clone(),
                    quant: t.quant,
                },
            );
        }
        Ok(TensorStore {
            tensors,
            layout: SourceLayout::Packed,
            dir: dir.to_path_buf(),
        })
    }
}

/// What `--verify` checked of a packed model's dense weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenseVerified {
    /// Every dense tensor matched its crc32.
    All(usize),
    /// The model predates dense checksums (format version 1): nothing could be checked.
    NoChecksums,
}

/// What `--verify` cannot check in the model at `dir`, if anything: a checkpoint has no
/// checksums at all, and a packed model of format version 1 none for its dense weights (its
/// experts are still verified). None for a current packed model (or one that will not load).
pub fn verify_note(dir: &Path) -> Option<String> {
    if !is_packed_dir(dir) {
        return dir.join("config.json").is_file().then(|| {
            format!(
                "{}: a checkpoint has no checksums: --verify checks packed models only",
                dir.display()
            )
        });
    }
    let m = Manifest::read(dir).ok()?;
    (!m.has_dense_checksums()).then(|| {
        format!(
            "{}: packed with format version {}, which records no checksums for {}: --verify \
             checks the experts only (pack the model again to check the dense weights too)",
            dir.display(),
            m.format_version,
            m.dense.file
        )
    })
}

impl Manifest {
    /// Checks every dense tensor of `store` (opened by [`Manifest::open_dense`]) against its
    /// crc32: one pass over `dense.bin`, for `--verify`. A mismatch names the tensor.
    pub fn verify_dense(&self, dir: &Path, store: &TensorStore) -> Result<DenseVerified> {
        if !self.has_dense_checksums() {
            return Ok(DenseVerified::NoChecksums);
        }
        let path = dir.join(&self.dense.file);
        for t in &self.dense.tensors {
            let (Some(want), Some(e)) = (t.crc32, store.tensors.get(&t.name)) else {
                continue;
            };
            let crc = crc32fast::hash(e.buf.bytes());
            if crc != want {
                return Err(packed_err(
                    &path,
                    format!(
                        "checksum mismatch in tensor `{}` at offset {}: crc32 {crc:08x}, manifest says {want:08x} (corrupted file?)",
                        t.name, t.offset
                    ),
                ));
            }
        }
        Ok(DenseVerified::All(self.dense.tensors.len()))
    }
}

pub(crate) fn packed_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Packed {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// The size of a model file, which must be a regular file (a directory's "size" would be
/// reported as a truncated file).
fn file_len(path: &Path) -> Result<u64> {
    let m = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if m.is_dir() {
        return Err(packed_err(path, "is a directory, not a file of the model"));
    }
    if !m.is_file() {
        return Err(packed_err(path, "is not a regular file"));
    }
    Ok(m.len())
}

/// `experts/layer_NNN.bin`.
pub fn layer_file_name(layer: usize) -> String {
    format!("experts/layer_{layer:03}.bin")
}

/// The `.partial` sibling a pack writes into before renaming it to `dst`.
pub fn partial_path(dst: &Path) -> PathBuf {
    let mut s = dst.as_os_str().to_os_string();
    s.push(".partial");
    PathBuf::from(s)
}

/// Removes MLX quantization blocks from a config (root and `text_config`): in a packed model
/// the tensor table carries each tensor's quantization.
pub fn strip_quantization(cfg: &Value) -> Value {
    let mut v = cfg.clone();
    if let Value::Object(o) = &mut v {
        o.remove("quantization");
        o.remove("quantization_config");
        if let Some(Value::Object(t)) = o.get_mut("text_config") {
            t.remove("quantization");
            t.remove("quantization_config");
        }
    }
    v
}

/// Free bytes on the filesystem holding `dir`, if it can be asked.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs is plain old data; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid out-parameter.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Bytes for messages: GB above one GB, else MB.
pub fn human_bytes(b: u64) -> String {
    if b >= 1_000_000_000 {
        format!("{:.2} GB", b as f64 / 1e9)
    } else {
        format!("{:.2} MB", b as f64 / 1e6)
    }
}
