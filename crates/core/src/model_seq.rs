//! [`ModelSeq`]: one sequence of the forward pass written once (`Model<B>`) on any op-level
//! backend, behind [`SeqBackend`], so a backend needs no session code of its own. Snapshots
//! are [`State::copy_on`] copies in the backend's memory.
use std::any::Any;
use std::sync::Arc;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::{ForwardStats, Logits, Model, State};
use crate::session::{SavedState, SeqBackend};

/// A sequence on backend `B`. The state is allocated at the first use after `reset` (so that
/// `reset` cannot fail).
pub struct ModelSeq<B: Backend> {
    /// None: fresh (position 0).
    state: Option<State<B>>,
    model: Arc<Model<B>>,
}

/// A saved [`State`] of a [`ModelSeq`] (None: a fresh one).
struct Saved<B: Backend>(Option<State<B>>);

impl<B: Backend + 'static> SavedState for Saved<B> {
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl<B: Backend> ModelSeq<B> {
    pub fn new(model: Arc<Model<B>>) -> Self {
        ModelSeq { state: None, model }
    }

    pub fn model(&self) -> &Model<B> {
        &self.model
    }

    fn copy(&self, s: &Option<State<B>>) -> Result<Option<State<B>>> {
        s.as_ref().map(|s| s.copy_on(&self.model.be)).transpose()
    }

    /// The model and the live state, allocated at the first use after `reset`.
    fn live(&mut self) -> Result<(&Model<B>, &mut State<B>)> {
        let st = match self.state.take() {
            Some(s) => s,
            None => self.model.new_state()?,
        };
        Ok((&self.model, self.state.insert(st)))
    }
}

impl<B: Backend + 'static> SeqBackend for ModelSeq<B> {
    fn forward_unchecked(
        &mut self,
        tokens: &[u32],
        want: Logits,
        stats: &mut ForwardStats,
    ) -> Result<Vec<f32>> {
        let (model, st) = self.live()?;
        model.forward(tokens, st, want, stats, None)
    }

    fn forward_argmax(&mut self, tokens: &[u32]) -> Result<u32> {
        let (model, st) = self.live()?;
        model.forward_argmax(tokens, st)
    }

    fn pos(&self) -> usize {
        self.state.as_ref().map_or(0, |s| s.pos)
    }

    fn reset(&mut self) {
        self.state = None;
    }

    fn save(&self) -> Result<Box<dyn SavedState>> {
        Ok(Box::new(Saved(self.copy(&self.state)?)))
    }

    fn restore(&mut self, saved: &dyn SavedState) -> Result<()> {
        let s = saved
            .as_any()
            .downcast_ref::<Saved<B>>()
            .ok_or_else(|| Error::Invalid("restoring a state saved by another backend".into()))?;
        self.state = self.copy(&s.0)?;
        Ok(())
    }

    fn state_bytes(&self) -> usize {
        self.state
            .as_ref()
            .map_or(0, |s| s.nbytes_on(&self.model.be))
    }

    fn name(&self) -> &'static str {
        self.model.be.name()
    }
}
