//! Writing a packed model directory: the `.partial` directory that becomes the model only once
//! its manifest is in place, the dense file (tensors at aligned offsets, written positionally so
//! a large matrix can be converted in row chunks), and layer files of experts at a fixed stride.
//! Every write error names the file; a failed or dropped writer removes its `.partial` directory.
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::config::QuantSpec;
use crate::error::{Error, Result};
use crate::store::DType;

use super::{
    align_up, packed_err, partial_path, DenseTable, LayerFile, Manifest, TensorInfo, DENSE_ALIGN,
    DENSE_FILE, MANIFEST,
};

/// Progress of a long conversion, in bytes. The CLI draws it as a bar; tests ignore it.
pub trait Progress: Sync {
    /// A new stage of `total` bytes.
    fn begin(&self, total: u64, what: &str);
    fn advance(&self, bytes: u64);
    fn finish(&self);
}

pub struct NoProgress;

impl Progress for NoProgress {
    fn begin(&self, _total: u64, _what: &str) {}
    fn advance(&self, _bytes: u64) {}
    fn finish(&self) {}
}

/// Files a text front end needs, copied from the source model directory when present. The
/// tokenizer loader reads `tokenizer.json.gz` when there is no plain `tokenizer.json` (the
/// shared reference tokenizer is stored that way), so the gzip travels too.
pub const TEXT_FILES: [&str; 12] = [
    "tokenizer.json",
    "tokenizer.json.gz",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "preprocessor_config.json",
];

fn write_err(path: &Path, e: std::io::Error) -> Error {
    let hint = if e.raw_os_error() == Some(libc::ENOSPC) {
        " (disk full)"
    } else {
        ""
    };
    packed_err(path, format!("write failed: {e}{hint}"))
}

/// Held while a finished `DST.partial` replaces `DST` (manifest in, old output out, new one
/// renamed in). An interrupt handler takes it before it removes `DST.partial`, so that it never
/// deletes a directory half-way through replacing the old output, and no commit starts after.
static COMMIT_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// For an interrupt handler: waits out a commit in progress, then removes `DST.partial`.
/// Returns the guard (hold it until the process exits, so no commit starts) and whether a
/// partial directory was there: none means the output was complete before the interrupt.
pub fn abandon_partial(dst: &Path) -> (std::sync::MutexGuard<'static, ()>, bool) {
    let guard = COMMIT_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let partial = partial_path(dst);
    let found = partial.exists();
    // The writer keeps creating files until the process exits, so one pass may meet a
    // directory that is no longer empty.
    for _ in 0..5 {
        if std::fs::remove_dir_all(&partial).is_ok() || !partial.exists() {
            break;
        }
    }
    (guard, found)
}

/// Whether `dir` holds a flashmoe packed model: a `manifest.json` that says so (any format
/// version, so an old model can be replaced by a new one).
fn holds_packed_model(dir: &Path) -> bool {
    #[derive(serde::Deserialize)]
    struct Head {
        format: String,
    }
    std::fs::read(dir.join(MANIFEST))
        .ok()
        .and_then(|b| serde_json::from_slice::<Head>(&b).ok())
        .is_some_and(|h| h.format == super::FORMAT)
}

/// Copies the tokenizer, chat template and generation config files `src` has into `dst`.
pub(crate) fn copy_text_files(src: &Path, dst: &Path) -> Result<Vec<String>> {
    let mut copied = Vec::new();
    for name in TEXT_FILES {
        let from = src.join(name);
        if from.is_file() {
            let to = dst.join(name);
            std::fs::copy(&from, &to).map_err(|e| write_err(&to, e))?;
            copied.push(name.to_string());
        }
    }
    Ok(copied)
}

/// Writes `dir/manifest.json` through a temporary file, fsync and rename: the manifest is what
/// marks a directory complete, so it is never seen half-written.
pub fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<()> {
    let text = serde_json::to_string_pretty(manifest)
        .map_err(|e| Error::Invalid(format!("serialising the manifest: {e}")))?;
    let tmp = dir.join(format!("{MANIFEST}.tmp"));
    let fin = dir.join(MANIFEST);
    {
        let mut f = File::create(&tmp).map_err(|e| write_err(&tmp, e))?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| write_err(&tmp, e))?;
    }
    std::fs::rename(&tmp, &fin).map_err(|e| write_err(&fin, e))
}

/// The directory being written: `DST.partial`, renamed to `DST` by [`OutDir::commit`].
pub(crate) struct OutDir {
    dst: PathBuf,
    partial: PathBuf,
    committed: bool,
}

impl OutDir {
    /// Refuses an existing `dst` that is not an empty directory, unless `force` and it holds a
    /// packed model (which the new one replaces once complete): `--force` never deletes a
    /// directory of something else (a checkpoint, a home directory given by mistake).
    /// Clears a stale `.partial`.
    pub fn create(dst: &Path, force: bool) -> Result<OutDir> {
        if dst.exists() {
            if !dst.is_dir() {
                return Err(packed_err(
                    dst,
                    "exists and is not a directory; choose another output or remove it",
                ));
            }
            let empty = std::fs::read_dir(dst).is_ok_and(|mut d| d.next().is_none());
            let packed = holds_packed_model(dst);
            if packed && !force {
                return Err(packed_err(
                    dst,
                    "already holds a packed model; pass --force to overwrite it",
                ));
            }
            if !empty && !packed {
                return Err(packed_err(
                    dst,
                    format!(
                        "exists, is not empty and holds no flashmoe packed model (no valid {MANIFEST}): \
                         pack replaces only a packed model, even with --force; choose another output \
                         or remove it yourself"
                    ),
                ));
            }
        }
        let partial = partial_path(dst);
        if partial.exists() {
            std::fs::remove_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;
        }
        let experts = partial.join("experts");
        std::fs::create_dir_all(&experts).map_err(|e| write_err(&experts, e))?;
        Ok(OutDir {
            dst: dst.to_path_buf(),
            partial,
            committed: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.partial
    }

    /// Writes a whole small file into the directory.
    pub fn write_file(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let p = self.partial.join(name);
        std::fs::write(&p, bytes).map_err(|e| write_err(&p, e))
    }

    /// Copies the tokenizer, chat template and generation config files `src` has.
    pub fn copy_text_files(&self, src: &Path) -> Result<Vec<String>> {
        copy_text_files(src, &self.partial)
    }

    /// Writes the manifest (temp file + fsync + rename: last, so it marks completeness) and
    /// renames the directory to its final name, replacing an old `dst` (checked in `create`).
    pub fn commit(mut self, manifest: &Manifest) -> Result<PathBuf> {
        let _commit = COMMIT_LOCK
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        write_manifest(&self.partial, manifest)?;
        if self.dst.exists() {
            std::fs::remove_dir_all(&self.dst).map_err(|e| Error::io(&self.dst, e))?;
        }
        std::fs::rename(&self.partial, &self.dst).map_err(|e| Error::io(&self.dst, e))?;
        self.committed = true;
        Ok(self.dst.clone())
    }
}

impl Drop for OutDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.partial);
        }
    }
}

/// The table of `dense.bin` being laid out: each tensor's offset, decided before (or while)
/// its bytes are written. A plan can lay out the whole table before the file exists, so that
/// tensors can be written in any order (as a download delivers them) at fixed offsets.
#[derive(Default)]
pub(crate) struct DenseLayout {
    end: u64,
    tensors: Vec<TensorInfo>,
}

impl DenseLayout {
    /// Adds a tensor to the table and returns its offset.
    pub fn reserve(
        &mut self,
        name: &str,
        dtype: DType,
        shape: &[usize],
        quant: Option<QuantSpec>,
    ) -> u64 {
        let nbytes = (shape.iter().product::<usize>() * dtype.size()) as u64;
        let offset = align_up(self.end, DENSE_ALIGN);
        self.end = offset + nbytes;
        self.tensors.push(TensorInfo {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
            offset,
            nbytes,
            quant,
            crc32: None,
        });
        offset
    }

    /// Bytes of the file once padded.
    pub fn nbytes(&self) -> u64 {
        align_up(self.end, DENSE_ALIGN)
    }
}

/// `dense.bin`: tensors at 64-byte aligned offsets, written with positional writes.
pub(crate) struct DenseWriter {
    file: File,
    path: PathBuf,
    layout: DenseLayout,
}

impl DenseWriter {
    pub fn create(dir: &Path) -> Result<DenseWriter> {
        Self::with_layout(dir, DenseLayout::default(), true)
    }

    /// Opens `dense.bin` in `dir` for a table laid out already. `truncate: false` keeps what
    /// an interrupted run wrote (a resumed pull rewrites only the tensors it had not finished).
    pub fn with_layout(dir: &Path, layout: DenseLayout, truncate: bool) -> Result<DenseWriter> {
        let path = dir.join(DENSE_FILE);
        // Read and write: `finish` reads the tensors back for their checksums.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(truncate)
            .open(&path)
            .map_err(|e| write_err(&path, e))?;
        Ok(DenseWriter { file, path, layout })
    }

    /// Adds a tensor to the table and returns its offset; its bytes come with `write_at`.
    pub fn reserve(
        &mut self,
        name: &str,
        dtype: DType,
        shape: &[usize],
        quant: Option<QuantSpec>,
    ) -> u64 {
        self.layout.reserve(name, dtype, shape, quant)
    }

    /// Flushes what was written to the disk (before a resumable run records it as done).
    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| write_err(&self.path, e))
    }

    pub fn write_at(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all_at(bytes, offset)
            .map_err(|e| write_err(&self.path, e))
    }

    /// Reserves and writes a whole tensor.
    pub fn put(
        &mut self,
        name: &str,
        dtype: DType,
        shape: &[usize],
        quant: Option<QuantSpec>,
        bytes: &[u8],
    ) -> Result<()> {
        let off = self.reserve(name, dtype, shape, quant);
        debug_assert_eq!(
            self.layout.tensors.last().map(|t| t.nbytes),
            Some(bytes.len() as u64)
        );
        self.write_at(off, bytes)
    }

    /// Pads the file, syncs it and records each tensor's crc32, computed from the file as
    /// written (tensors are written in pieces, in any order): what `--verify` will compare.
    pub fn finish(mut self) -> Result<DenseTable> {
        let nbytes = self.layout.nbytes();
        self.file
            .set_len(nbytes)
            .and_then(|_| self.file.sync_all())
            .map_err(|e| write_err(&self.path, e))?;
        let mut buf = vec![0u8; 16 << 20];
        for t in &mut self.layout.tensors {
            let mut h = crc32fast::Hasher::new();
            let mut off = t.offset;
            while off < t.offset + t.nbytes {
                let n = buf.len().min((t.offset + t.nbytes - off) as usize);
                self.file.read_exact_at(&mut buf[..n], off).map_err(|e| {
                    packed_err(&self.path, format!("reading back for checksums: {e}"))
                })?;
                h.update(&buf[..n]);
                off += n as u64;
            }
            t.crc32 = Some(h.finalize());
        }
        Ok(DenseTable {
            file: DENSE_FILE.to_string(),
            nbytes,
            tensors: self.layout.tensors,
        })
    }
}

/// One layer's expert file: experts appended in id order, each padded to the stride.
pub(crate) struct LayerWriter {
    out: BufWriter<File>,
    path: PathBuf,
    rel: String,
    layer: usize,
    stride: u64,
    expert_bytes: u64,
    crcs: Vec<u32>,
}

impl LayerWriter {
    pub fn create(dir: &Path, layer: usize, stride: u64, expert_bytes: u64) -> Result<LayerWriter> {
        let rel = super::layer_file_name(layer);
        let path = dir.join(&rel);
        let f = File::create(&path).map_err(|e| write_err(&path, e))?;
        Ok(LayerWriter {
            out: BufWriter::with_capacity(1 << 20, f),
            path,
            rel,
            layer,
            stride,
            expert_bytes,
            crcs: Vec::new(),
        })
    }

    /// Appends one expert (`expert_bytes` bytes; the stride padding is added here).
    pub fn push(&mut self, expert: &[u8]) -> Result<()> {
        assert_eq!(expert.len() as u64, self.expert_bytes, "expert size");
        self.crcs.push(crc32fast::hash(expert));
        let pad = vec![0u8; (self.stride - self.expert_bytes) as usize];
        self.out
            .write_all(expert)
            .and_then(|_| self.out.write_all(&pad))
            .map_err(|e| write_err(&self.path, e))
    }

    pub fn finish(self) -> Result<LayerFile> {
        let path = self.path;
        let f = self
            .out
            .into_inner()
            .map_err(|e| write_err(&path, e.into_error()))?;
        f.sync_all().map_err(|e| write_err(&path, e))?;
        Ok(LayerFile {
            layer: self.layer,
            file: self.rel,
            nbytes: self.crcs.len() as u64 * self.stride,
            crc32: self.crcs,
        })
    }
}
