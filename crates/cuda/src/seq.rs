//! [`CudaSeq`]: the CUDA backend behind `flashmoe_core::session::Session` (and so behind the
//! runtime's engine: `run --prompt`, `chat`, `serve`, and the CLI's token commands). It is
//! core's [`ModelSeq`] on [`Cuda`]: the one forward pass of `flashmoe_core::model` over the
//! backend's ops, routed experts through the residency tier sized by [`CudaOptions`];
//! snapshots are device-to-device copies of the state.
use std::sync::Arc;

use flashmoe_core::cache::CachePolicy;
use flashmoe_core::model::Model;
use flashmoe_core::model_seq::ModelSeq;

use crate::{Cuda, CudaError, CudaOptions, Result};

/// A sequence on the GPU.
pub type CudaSeq = ModelSeq<Cuda>;

/// A sequence over `model` on `opts.device`: its dense weights uploaded, its routed experts
/// kept in VRAM slots (and `opts.host_cache_bytes` of pinned host slots) under LRU.
pub fn open(model: Arc<Model>, opts: &CudaOptions) -> Result<CudaSeq> {
    let m = Cuda::load_with(model, opts, CachePolicy::Lru)?;
    Ok(ModelSeq::new(Arc::new(m)))
}

/// CUDA errors as the core's: the core's own (context overflow, I/O) pass through.
pub fn core_error(e: CudaError) -> flashmoe_core::Error {
    match e {
        CudaError::Core(c) => c,
        e => flashmoe_core::Error::Invalid(format!("CUDA backend: {e}")),
    }
}
