//! [`CudaSeq`]: the CUDA backend behind `flashmoe_core::session::Session` (and so behind the
//! runtime's engine: `run --prompt`, `chat`, `serve`). Owns its [`CudaModel`] (which holds an
//! `Arc` of the CPU model) and one [`CudaState`]; snapshots are device-to-device copies.
use std::any::Any;
use std::sync::Arc;

use cudarc::driver::CudaContext;
use flashmoe_core::model::{ForwardStats, Logits, Model};
use flashmoe_core::session::{SavedState, SeqBackend};

use crate::model::{CudaModel, CudaOptions, CudaState};
use crate::{CudaError, Result};

/// A sequence on the GPU. Fields drop in order: the state's device buffers go before the model
/// (and its context); `Drop` makes the context current first, since the last owner (a server's
/// worker) may run on another thread than the one that built it.
pub struct CudaSeq {
    state: CudaState,
    /// `reset` was called: the next use starts from a new state (allocated then, so that
    /// `reset` cannot fail).
    fresh: bool,
    model: CudaModel<'static>,
}

/// A saved [`CudaState`]; keeps the context alive and current while its buffers are freed.
struct CudaSaved {
    state: CudaState,
    ctx: Arc<CudaContext>,
}

impl SavedState for CudaSaved {
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Drop for CudaSaved {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
    }
}

impl Drop for CudaSeq {
    fn drop(&mut self) {
        let _ = self.model.dev.bind();
    }
}

/// CUDA errors as the core's: the core's own (context overflow, I/O) pass through.
pub fn core_error(e: CudaError) -> flashmoe_core::Error {
    match e {
        CudaError::Core(c) => c,
        e => flashmoe_core::Error::Invalid(format!("CUDA backend: {e}")),
    }
}

impl CudaSeq {
    /// Uploads `model`'s dense weights and sets up the expert cache on `opts.device`.
    pub fn new(model: Arc<Model>, opts: &CudaOptions) -> Result<CudaSeq> {
        let model = CudaModel::new_shared(model, opts)?;
        let state = model.new_state()?;
        Ok(CudaSeq {
            state,
            fresh: false,
            model,
        })
    }

    pub fn model(&self) -> &CudaModel<'static> {
        &self.model
    }

    fn live(&mut self) -> Result<&mut CudaState> {
        if self.fresh {
            self.state = self.model.new_state()?;
            self.fresh = false;
        }
        Ok(&mut self.state)
    }
}

impl SeqBackend for CudaSeq {
    fn forward_unchecked(
        &mut self,
        tokens: &[u32],
        want: Logits,
        _stats: &mut ForwardStats,
    ) -> flashmoe_core::Result<Vec<f32>> {
        self.live().map_err(core_error)?;
        self.model
            .forward(tokens, &mut self.state, want)
            .map_err(core_error)
    }

    fn pos(&self) -> usize {
        if self.fresh {
            0
        } else {
            self.state.pos
        }
    }

    fn reset(&mut self) {
        self.fresh = true;
    }

    fn save(&self) -> flashmoe_core::Result<Box<dyn SavedState>> {
        let state = if self.fresh {
            self.model.new_state()
        } else {
            self.model.clone_state(&self.state)
        }
        .map_err(core_error)?;
        Ok(Box::new(CudaSaved {
            state,
            ctx: self.model.dev.ctx.clone(),
        }))
    }

    fn restore(&mut self, saved: &dyn SavedState) -> flashmoe_core::Result<()> {
        let s = saved.as_any().downcast_ref::<CudaSaved>().ok_or_else(|| {
            flashmoe_core::Error::Invalid("restoring a state saved by another backend".into())
        })?;
        self.state = self.model.clone_state(&s.state).map_err(core_error)?;
        self.fresh = false;
        Ok(())
    }

    fn state_bytes(&self) -> usize {
        if self.fresh {
            0
        } else {
            self.state.nbytes()
        }
    }

    fn name(&self) -> &'static str {
        "cuda"
    }
}
