//! [`WgpuSeq`]: one sequence on the wgpu backend for the CLI and the server, a
//! [`SeqBackend`] over [`Model<Wgpu>`] and its [`State<Wgpu>`] (as `CpuBackend` in core).
use std::any::Any;
use std::sync::Arc;

use flashmoe_core::error::{Error, Result};
use flashmoe_core::model::{ForwardStats, Logits, Model, State};
use flashmoe_core::session::{SavedState, SeqBackend};

use crate::device::Wgpu;

/// A sequence's forward pass on a wgpu device.
pub struct WgpuSeq {
    model: Arc<Model<Wgpu>>,
    state: State<Wgpu>,
}

struct Saved(State<Wgpu>);

impl SavedState for Saved {
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl WgpuSeq {
    pub fn new(model: Arc<Model<Wgpu>>) -> Result<Self> {
        let state = State::new_on(&model.be, &model.cfg)?;
        Ok(WgpuSeq { model, state })
    }
}

impl SeqBackend for WgpuSeq {
    fn forward_unchecked(
        &mut self,
        tokens: &[u32],
        want: Logits,
        stats: &mut ForwardStats,
    ) -> Result<Vec<f32>> {
        self.model
            .forward(tokens, &mut self.state, want, stats, None)
    }
    fn pos(&self) -> usize {
        self.state.pos
    }
    fn reset(&mut self) {
        if let Ok(s) = State::new_on(&self.model.be, &self.model.cfg) {
            self.state = s;
        }
    }
    fn save(&self) -> Result<Box<dyn SavedState>> {
        Ok(Box::new(Saved(self.state.copy_on(&self.model.be)?)))
    }
    fn restore(&mut self, saved: &dyn SavedState) -> Result<()> {
        let s = saved
            .as_any()
            .downcast_ref::<Saved>()
            .ok_or_else(|| Error::Invalid("restoring a state saved by another backend".into()))?;
        self.state = s.0.copy_on(&self.model.be)?;
        Ok(())
    }
    fn state_bytes(&self) -> usize {
        self.state.nbytes_on(&self.model.be)
    }
    fn name(&self) -> &'static str {
        "wgpu"
    }
}
