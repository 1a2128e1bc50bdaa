//! Opens a model directory of any supported kind (Hugging Face or MLX checkpoint, flashmoe
//! packed model) and builds the [`Model`] with the right ExpertSource.
use std::path::Path;

use crate::backend::{Backend, Cpu};
use crate::cache::CachedExperts;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::experts::{ExpertSource, StoreExperts};
use crate::model::Model;
use crate::packed::{self, Manifest, PackedExperts};
use crate::store::TensorStore;

/// How expert bytes are read from a packed model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IoMode {
    /// Through the OS page cache: experts wholly resident are used in place from the file's
    /// mapping, the others are read with pread.
    #[default]
    Cached,
    /// pread through the page cache for every expert, resident or not (a copy per read): what
    /// `Cached` did before it mapped resident experts, kept so `bench decode` can compare.
    Pread,
    /// O_DIRECT: every read goes to the disk (cold-cache behaviour, no page-cache pollution).
    Direct,
    /// As `Cached`, but a resident expert stays mapped after use (like llama.cpp's mmap): no
    /// page-table work per token once an expert has been mapped, and a resident set that grows
    /// with the experts touched (the page cache holds them either way; under memory pressure the
    /// kernel unmaps and evicts them). For machines whose RAM holds the experts in use.
    Mapped,
}

#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    pub io: IoMode,
    /// Verify each expert read against the manifest's checksum, and every dense tensor once
    /// at load (packed format version 2 on; see [`packed::verify_note`] for older models).
    pub verify: bool,
    /// Routed experts per token; None keeps the config's.
    pub top_k: Option<usize>,
    /// A RAM expert cache in front of the expert source (`--expert-cache-gb`).
    pub expert_cache: Option<crate::cache::CacheSpec>,
}

pub fn open_model(dir: &Path, opts: &LoadOptions) -> Result<Model> {
    open_model_on(Cpu, dir, opts)
}

/// [`open_model`] with the dense weights in `be`'s memory.
pub fn open_model_on<B: Backend>(be: B, dir: &Path, opts: &LoadOptions) -> Result<Model<B>> {
    if !dir.is_dir() {
        return Err(Error::config(
            dir,
            if dir.exists() {
                "not a directory (--model takes a model directory)"
            } else {
                "model directory not found"
            },
        ));
    }
    let mut model = if packed::is_packed_dir(dir) {
        open_packed(be, dir, opts)?
    } else if let Some(resume) = packed::incomplete_pull(dir) {
        return Err(Error::Packed {
            path: dir.join(packed::MANIFEST),
            msg: format!(
                "missing: this model's pull is incomplete (interrupted download or packing); \
                 resume it with `{resume}` (it continues where it stopped)"
            ),
        });
    } else if packed::is_incomplete_packed_dir(dir) {
        return Err(Error::Packed {
            path: dir.join(packed::MANIFEST),
            msg: "missing: this packed model is incomplete (interrupted pack?); pack it again"
                .into(),
        });
    } else if dir.is_dir() && !dir.join("config.json").exists() {
        return Err(Error::config(
            dir,
            "not a model directory: no manifest.json (flashmoe packed model) and no config.json (checkpoint)",
        ));
    } else {
        open_checkpoint(be, dir, opts)?
    };
    if let Some(k) = opts.top_k {
        model.set_top_k(k)?;
    }
    Ok(model)
}

fn open_checkpoint<B: Backend>(be: B, dir: &Path, opts: &LoadOptions) -> Result<Model<B>> {
    let cfg = ModelConfig::from_dir(dir)?;
    let store = TensorStore::open_checkpoint(dir, &cfg)?;
    let experts = with_cache(Box::new(StoreExperts::new(&store, &cfg)?), &cfg, opts);
    Model::load_on(be, cfg, &store, experts)
}

/// `experts` behind the RAM cache `opts` asks for, if any.
fn with_cache(
    experts: Box<dyn ExpertSource>,
    cfg: &ModelConfig,
    opts: &LoadOptions,
) -> Box<dyn ExpertSource> {
    match opts.expert_cache {
        Some(spec) => {
            let moe: Vec<usize> = (0..cfg.num_layers)
                .filter(|&l| cfg.is_moe_layer(l))
                .collect();
            let k = opts.top_k.unwrap_or(cfg.num_experts_per_tok);
            Box::new(CachedExperts::new(experts, spec, &moe, k))
        }
        None => experts,
    }
}

/// A flashmoe packed model: dense tensors mmap'd from `dense.bin`, experts read by
/// [`PackedExperts`]. The manifest is checked against the files before anything is built.
fn open_packed<B: Backend>(be: B, dir: &Path, opts: &LoadOptions) -> Result<Model<B>> {
    let man = Manifest::read(dir)?;
    let cfg = man.model_config(dir)?;
    man.validate(dir, &cfg)?;
    let store = man.open_dense(dir)?;
    if opts.verify {
        man.verify_dense(dir, &store)?;
    }
    let k = opts.top_k.unwrap_or(cfg.num_experts_per_tok);
    let experts = PackedExperts::open(dir, &man, cfg.num_layers, k, opts.io, opts.verify, 0)?;
    let experts = with_cache(Box::new(experts), &cfg, opts);
    Model::load_on(be, cfg, &store, experts)
}
