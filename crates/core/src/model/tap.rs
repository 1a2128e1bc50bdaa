//! Named intermediates of the forward pass (llama.cpp's `cb(cur, "ffn_norm", il)`): the model
//! calls [`Tap::tap`] at each named point with the tensor produced there, and whoever registered
//! the tap decides what to do (time the phase that just ended, read the hidden state back, do
//! nothing). Timers and hidden-state capture live here, not in the math.
//!
//! Points, in order (`layer` is `None` outside the layer loop):
//! - `embed` (x after the embedding), then per layer:
//! - `mixer_out` (attention or GatedDeltaNet output), `ffn_inp` (post-norm of the residual),
//! - MoE: `routes` (router, top-k, host routing, first reads queued; just before it, when
//!   [`Tap::wants`] `routing`, [`Tap::routing`] gets the routing itself), `shared_out`,
//!   `experts_out` (routed sum); dense: `ffn_out`; `prefetch_next` (when that option runs),
//! - `layer_out` (the residual stream after the layer),
//! - `result_norm` (every row final-normed; only computed when [`Tap::wants`] it),
//!   `result_output` (the logits).
use std::time::Instant;

use crate::backend::{Backend, ExpertTimes, Routes};
use crate::error::Result;

use super::{ForwardStats, LayerTimes};

/// A callback at the named points of the forward pass.
pub trait Tap<B: Backend> {
    /// `x` is the tensor produced at `name` (rows of the model's width unless the name says
    /// otherwise), in the backend's memory: read it back only if it is wanted.
    fn tap(
        &mut self,
        be: &B,
        name: &'static str,
        layer: Option<usize>,
        x: Option<&B::Buf>,
    ) -> Result<()>;
    /// Whether the model should compute a tensor that only taps use (`result_norm`). A tap
    /// that reads `routing`, `shared_out` or `experts_out` must want them: without, a backend
    /// that fuses the MoE block (`Backend::fused_moe`) passes `experts_out` without a tensor.
    fn wants(&self, _name: &'static str) -> bool {
        false
    }
    /// How the routed experts of `layer` split their task time (see [`ExpertTimes`]).
    fn expert_times(&mut self, _layer: usize, _t: ExpertTimes) {}
    /// MoE layer `layer`'s routing (`--trace-routing`); called only when the tap
    /// [`Tap::wants`] `routing`, so that nobody else pays for it.
    fn routing(&mut self, _be: &B, _layer: usize, _r: &Routing<'_, B>) -> Result<()> {
        Ok(())
    }
}

/// What [`Tap::routing`] sees of one MoE layer's routing of `tokens` tokens.
pub struct Routing<'a, B: Backend> {
    /// The router's input `[tokens, H]` (the post-attention norm of the residual).
    pub input: &'a B::Buf,
    pub tokens: usize,
    /// Each token's experts and weights on the host (`None` when the backend kept them).
    pub routes: Option<&'a Routes>,
    /// The shared-expert gate's logits `[tokens]`, when the model has one.
    pub shared_gate: Option<&'a B::Buf>,
}

/// A tap that does nothing.
pub struct NoTap;

impl<B: Backend> Tap<B> for NoTap {
    fn tap(&mut self, _: &B, _: &'static str, _: Option<usize>, _: Option<&B::Buf>) -> Result<()> {
        Ok(())
    }
}

/// Wall time per phase into [`ForwardStats`] (`--timing`, `bench`): each point closes the
/// phase since the previous one.
pub struct Timing<'a> {
    stats: &'a mut ForwardStats,
    last: Instant,
    experts: ExpertTimes,
}

impl<'a> Timing<'a> {
    /// Starts the clock; `layers` sizes the per-layer table.
    pub fn new(stats: &'a mut ForwardStats, layers: usize) -> Self {
        if stats.layers.len() < layers {
            stats.layers.resize(layers, LayerTimes::default());
        }
        Timing {
            stats,
            last: Instant::now(),
            experts: ExpertTimes::default(),
        }
    }

    fn mark(&mut self, name: &'static str, layer: Option<usize>) {
        let now = Instant::now();
        let dt = now - self.last;
        self.last = now;
        let Some(l) = layer else {
            match name {
                "embed" => self.stats.embed += dt,
                _ => self.stats.head += dt,
            }
            return;
        };
        let lt = &mut self.stats.layers[l];
        match name {
            "mixer_out" | "ffn_inp" => lt.mixer += dt,
            "routes" | "prefetch_next" => lt.routing += dt,
            "shared_out" | "ffn_out" => lt.shared += dt,
            "experts_out" => {
                // Wall time of the experts, split between waiting and computing in the
                // proportion their tasks spent on each.
                let (w, c) = (self.experts.wait, self.experts.compute);
                let busy = (w + c).as_secs_f64();
                let wf = if busy > 0.0 {
                    w.as_secs_f64() / busy
                } else {
                    0.0
                };
                lt.expert_wait += dt.mul_f64(wf);
                lt.expert_compute += dt.mul_f64(1.0 - wf);
            }
            _ => lt.combine += dt,
        }
    }
}

impl<B: Backend> Tap<B> for Timing<'_> {
    fn tap(
        &mut self,
        _: &B,
        name: &'static str,
        layer: Option<usize>,
        _: Option<&B::Buf>,
    ) -> Result<()> {
        self.mark(name, layer);
        Ok(())
    }
    fn expert_times(&mut self, _layer: usize, t: ExpertTimes) {
        self.experts = t;
    }
}

/// Timing plus, when `hidden` is given, the hidden states transformers reports: the
/// embeddings, each layer's output but the last, and the final-normed state ([t, H] each).
pub struct Standard<'a> {
    pub timing: Timing<'a>,
    pub hidden: Option<&'a mut Vec<Vec<f32>>>,
    layers: usize,
}

impl<'a> Standard<'a> {
    pub fn new(
        stats: &'a mut ForwardStats,
        hidden: Option<&'a mut Vec<Vec<f32>>>,
        layers: usize,
    ) -> Self {
        Standard {
            timing: Timing::new(stats, layers),
            hidden,
            layers,
        }
    }
}

impl<B: Backend> Tap<B> for Standard<'_> {
    fn tap(
        &mut self,
        be: &B,
        name: &'static str,
        layer: Option<usize>,
        x: Option<&B::Buf>,
    ) -> Result<()> {
        self.timing.mark(name, layer);
        if let (Some(hs), Some(x)) = (self.hidden.as_deref_mut(), x) {
            let keep = match (name, layer) {
                ("embed", None) | ("result_norm", None) => true,
                ("layer_out", Some(l)) => l + 1 < self.layers,
                _ => false,
            };
            if keep {
                hs.push(be.download(x)?);
                // The read-back is the caller's, not the next phase's.
                self.timing.last = Instant::now();
            }
        }
        Ok(())
    }
    fn wants(&self, name: &'static str) -> bool {
        name == "result_norm" && self.hidden.is_some()
    }
    fn expert_times(&mut self, layer: usize, t: ExpertTimes) {
        <Timing as Tap<B>>::expert_times(&mut self.timing, layer, t)
    }
}
