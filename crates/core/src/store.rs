//! Tensor stores: a table of named tensors backed by mmap'd bytes. Built from Hugging Face or
//! MLX safetensors checkpoints (single file or sharded) or from a packed model's dense file.
//! Names are canonicalised here (`layers.3.mlp.gate.weight`, `embed_tokens.weight`,
//! `lm_head.weight`, ...) so the model code never sees checkpoint prefixes.
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::buf::Buf;
use crate::config::{ModelConfig, QuantSpec};
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DType {
    F32,
    F16,
    BF16,
    U32,
    I64,
    U8,
    Other,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I64 => 8,
            DType::U8 | DType::Other => 1,
        }
    }
    fn from_st(d: safetensors::Dtype) -> DType {
        use safetensors::Dtype as D;
        match d {
            D::F32 => DType::F32,
            D::F16 => DType::F16,
            D::BF16 => DType::BF16,
            D::U32 => DType::U32,
            D::I64 => DType::I64,
            D::U8 => DType::U8,
            _ => DType::Other,
        }
    }
}

/// One tensor: where its bytes are, what they hold, and where it came from (for errors).
#[derive(Clone)]
pub struct TensorEntry {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub buf: Buf,
    /// File the tensor was read from.
    pub file: String,
    /// Name as written in that file.
    pub orig_name: String,
    /// Affine quantization of a `*.weight` stored packed (with `.scales`/`.biases` beside it).
    pub quant: Option<QuantSpec>,
}

/// Layout a checkpoint was written in; decides conventions the loader must undo.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceLayout {
    /// transformers: zero-centred norms stored as w, conv1d [C,1,K].
    HuggingFace,
    /// mlx-lm: norms stored as 1+w, conv1d [C,K,1], affine-packed weights.
    Mlx,
    /// flashmoe packed dense file: canonical, norms already folded to plain weights.
    Packed,
}

pub struct TensorStore {
    pub tensors: HashMap<String, TensorEntry>,
    pub layout: SourceLayout,
    pub dir: PathBuf,
}

/// Maps a checkpoint name to the canonical name; `None` for tensors outside the text model.
pub fn canonical_name(name: &str) -> Option<String> {
    const SKIP: [&str; 5] = [
        "mtp.",
        "model.visual.",
        "visual.",
        "vision_tower.",
        "model.mtp.",
    ];
    if SKIP.iter().any(|p| name.starts_with(p)) {
        return None;
    }
    for p in [
        "model.language_model.",
        "language_model.model.",
        "language_model.",
        "model.",
    ] {
        if let Some(rest) = name.strip_prefix(p) {
            if rest.starts_with("visual.") || rest.starts_with("mtp.") {
                return None;
            }
            return Some(rest.to_string());
        }
    }
    Some(name.to_string())
}

fn map_file(path: &Path) -> Result<Arc<Mmap>> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the file is opened read-only. A truncation while mapped is caught by `mapguard`
    // (checked before each generation; a SIGBUS mid-generation becomes an error).
    let m = Arc::new(unsafe { Mmap::map(&f) }.map_err(|e| Error::io(path, e))?);
    crate::mapguard::register(path, &f, &m);
    Ok(m)
}

/// Reads one safetensors file's header and adds its tensors (canonical names) to `out`.
pub fn add_safetensors_file(
    path: &Path,
    out: &mut HashMap<String, TensorEntry>,
    rename: &dyn Fn(&str) -> Option<String>,
) -> Result<()> {
    let map = map_file(path)?;
    let (n, meta) =
        safetensors::SafeTensors::read_metadata(&map).map_err(|e| Error::Safetensors {
            path: path.to_path_buf(),
            msg: match e {
                safetensors::SafeTensorError::MetadataIncompleteBuffer => {
                    "file size does not match its header (truncated or corrupt download?)"
                        .to_string()
                }
                other => format!("{other:?}"),
            },
        })?;
    let base = 8 + n;
    for (name, info) in meta.tensors() {
        let Some(canon) = rename(&name) else { continue };
        let (s, e) = info.data_offsets;
        out.insert(
            canon,
            TensorEntry {
                dtype: DType::from_st(info.dtype),
                shape: info.shape.clone(),
                buf: Buf::from_map(map.clone(), base + s, e - s),
                file: path.display().to_string(),
                orig_name: name.clone(),
                quant: None,
            },
        );
    }
    Ok(())
}

impl TensorStore {
    /// Opens a Hugging Face or MLX checkpoint directory (single or sharded safetensors).
    pub fn open_checkpoint(dir: &Path, cfg: &ModelConfig) -> Result<Self> {
        let files = checkpoint_files(dir)?;
        let mut tensors = HashMap::new();
        for f in &files {
            add_safetensors_file(f, &mut tensors, &canonical_name)?;
        }
        // MLX converters store conv1d as [C, K, 1]; transformers as [C, 1, K] (arch-spec §11.2).
        let mlx_conv = tensors
            .iter()
            .any(|(k, t)| k.ends_with("conv1d.weight") && t.shape.len() == 3 && t.shape[2] == 1);
        let has_packed = tensors.values().any(|t| t.dtype == DType::U32);
        // mlx-lm and mlx-vlm name Qwen3.5 tensors `language_model.model.…`, transformers
        // `model.language_model.…`: this tells an unquantized MLX conversion without
        // GatedDeltaNet layers (no conv1d to look at) from a Hugging Face one.
        let mlx_names = tensors
            .values()
            .any(|t| t.orig_name.starts_with("language_model.model."));
        let layout = if mlx_conv || has_packed || mlx_names || cfg.quantization.is_some() {
            SourceLayout::Mlx
        } else {
            SourceLayout::HuggingFace
        };
        let mut store = TensorStore {
            tensors,
            layout,
            dir: dir.to_path_buf(),
        };
        store.resolve_quant(cfg)?;
        Ok(store)
    }

    /// Fills `quant` on every packed `*.weight` from the config's quantization block (with
    /// per-module overrides), checking it against the scales' shape.
    fn resolve_quant(&mut self, cfg: &ModelConfig) -> Result<()> {
        let names: Vec<String> = self
            .tensors
            .iter()
            .filter(|(k, t)| k.ends_with(".weight") && t.dtype == DType::U32)
            .map(|(k, _)| k.clone())
            .collect();
        for name in names {
            let prefix = &name[..name.len() - ".weight".len()];
            let scales = self.get(&format!("{prefix}.scales"))?.clone();
            let w = &self.tensors[&name];
            let module = w
                .orig_name
                .strip_suffix(".weight")
                .unwrap_or(&w.orig_name)
                .to_string();
            let q = cfg.quantization.as_ref();
            let spec = match q.and_then(|q| q.overrides.get(&module)) {
                Some(Some(s)) => Some(*s),
                Some(None) => None,
                None => q.and_then(|q| q.default),
            };
            let packed_cols = *w.shape.last().unwrap_or(&0);
            let groups = *scales.shape.last().unwrap_or(&0);
            // Trust the config, but fall back to the unique (bits, group) consistent with the
            // shapes: packed_cols*32/bits == groups*group_size.
            let fits = |s: &QuantSpec| packed_cols * 32 / s.bits as usize == groups * s.group_size;
            let spec = match spec.filter(fits) {
                Some(s) => s,
                None => {
                    let cands: Vec<QuantSpec> = [4u32, 8, 2]
                        .iter()
                        .flat_map(|&bits| {
                            [64usize, 32, 128]
                                .iter()
                                .map(move |&group_size| QuantSpec { bits, group_size })
                        })
                        .filter(fits)
                        .collect();
                    match cands.first() {
                        Some(s) if spec.is_none() || cands.len() == 1 => *s,
                        _ => {
                            return Err(Error::BadTensor {
                                name: w.orig_name.clone(),
                                file: w.file.clone(),
                                expected: format!("quantization {spec:?} from config.json"),
                                found: format!(
                                    "packed width {packed_cols} with {groups} scale groups"
                                ),
                            })
                        }
                    }
                }
            };
            self.tensors.get_mut(&name).expect("present").quant = Some(spec);
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Result<&TensorEntry> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            where_: self.dir.display().to_string(),
        })
    }
    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// Lists the safetensors files of a checkpoint: those named by `model.safetensors.index.json`,
/// else every `*.safetensors` in the directory.
pub fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Err(Error::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found"),
        ));
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: index.clone(),
            msg: e.to_string(),
        })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::config(&index, "no `weight_map` object"))?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|f| f.as_str().map(String::from))
            .collect();
        files.sort();
        files.dedup();
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        for p in &paths {
            if !p.exists() {
                return Err(Error::io(
                    p,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "shard listed in model.safetensors.index.json is missing",
                    ),
                ));
            }
        }
        return Ok(paths);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::io(
            dir,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no *.safetensors files (and no model.safetensors.index.json) in the model directory",
            ),
        ));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-layer full-attention Qwen3.5 config: no GatedDeltaNet, so no conv1d.
    fn attention_only() -> ModelConfig {
        let v = serde_json::json!({
            "model_type": "qwen3_5_moe", "text_config": {
                "model_type": "qwen3_5_moe_text", "vocab_size": 8, "hidden_size": 8,
                "num_hidden_layers": 1, "num_attention_heads": 1, "head_dim": 8,
                "layer_types": ["full_attention"], "num_experts": 2, "num_experts_per_tok": 1,
                "moe_intermediate_size": 8, "shared_expert_intermediate_size": 8}});
        ModelConfig::from_json(&v, Path::new("config.json")).unwrap()
    }

    fn layout_of(name: &str, tensor: &str) -> SourceLayout {
        let dir =
            std::env::temp_dir().join(format!("flashmoe-layout-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data = vec![0u8; 16];
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![8], &data).unwrap();
        safetensors::serialize_to_file([(tensor, view)], None, &dir.join("model.safetensors"))
            .unwrap();
        let layout = TensorStore::open_checkpoint(&dir, &attention_only())
            .unwrap()
            .layout;
        std::fs::remove_dir_all(&dir).unwrap();
        layout
    }

    #[test]
    fn unquantized_mlx_names_without_conv_are_mlx_layout() {
        // Read as Hugging Face, its norms (stored 1+w by the MLX converters) got a second +1.
        assert_eq!(
            layout_of("mlx", "language_model.model.norm.weight"),
            SourceLayout::Mlx
        );
        assert_eq!(
            layout_of("hf", "model.language_model.norm.weight"),
            SourceLayout::HuggingFace
        );
    }
}
