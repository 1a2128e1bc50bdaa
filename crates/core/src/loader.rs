//! Opens a model directory of any supported kind (Hugging Face or MLX checkpoint, flashmoe
//! packed model) and builds the [`Model`] with the right ExpertSource.
use std::path::Path;

use crate::config::ModelConfig;
use crate::error::Result;
use crate::experts::StoreExperts;
use crate::model::Model;
use crate::store::TensorStore;

/// How expert bytes are read from a packed model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IoMode {
    /// pread through the OS page cache.
    #[default]
    Cached,
    /// O_DIRECT: every read goes to the disk (cold-cache behaviour, no page-cache pollution).
    Direct,
}

#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    pub io: IoMode,
    /// Verify each expert read against the manifest's checksum.
    pub verify: bool,
    /// Routed experts per token; None keeps the config's.
    pub top_k: Option<usize>,
}

pub fn open_model(dir: &Path, opts: &LoadOptions) -> Result<Model> {
    let mut model = open_checkpoint(dir)?;
    if let Some(k) = opts.top_k {
        model.set_top_k(k)?;
    }
    Ok(model)
}

fn open_checkpoint(dir: &Path) -> Result<Model> {
    let cfg = ModelConfig::from_dir(dir)?;
    let store = TensorStore::open_checkpoint(dir, &cfg)?;
    let experts = StoreExperts::new(&store, &cfg)?;
    Model::load(cfg, &store, Box::new(experts))
}
