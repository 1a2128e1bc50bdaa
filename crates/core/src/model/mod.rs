//! The model, written once for every supported family (Qwen3.5-MoE, Qwen3-Next, Qwen3-MoE) and
//! every backend: the forward pass of arch-spec §3 as one plain loop over layers, each step an
//! operation of [`Backend`]. Family differences are resolved at load (the Qwen3-Next
//! in-projection de-interleave, zero-centred norms) or are small named blocks
//! (`attn_output_gate`, dense-MLP layers), not copies. Timers and hidden-state capture are
//! taps (`tap.rs`), not part of the math.
pub mod attention;
mod convert;
pub mod gdn;
pub mod gdn_chunk;
mod load;
pub mod moe;
pub mod state;
pub mod tap;

use std::time::Duration;

use crate::backend::{Backend, Cpu};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::experts::ExpertSource;

use attention::Attention;
pub use convert::{upload_to, SharedExperts};
use gdn::GatedDeltaNet;
use moe::{Mlp, Moe};
pub use state::{LayerState, State};
pub use tap::{NoTap, Standard, Tap, Timing};

pub enum Mixer<B: Backend = Cpu> {
    Attention(Attention<B>),
    DeltaNet(GatedDeltaNet<B>),
}

#[allow(clippy::large_enum_variant)] // one per layer; boxing buys nothing
pub enum Ffn<B: Backend = Cpu> {
    Moe(Moe<B>),
    Dense(Mlp<B>),
}

pub struct Layer<B: Backend = Cpu> {
    /// [H] plain weights (zero-centred offsets folded in at load).
    pub input_norm: B::Buf,
    pub post_norm: B::Buf,
    pub mixer: Mixer<B>,
    pub ffn: Ffn<B>,
}

/// Wall time per phase of one layer, accumulated over a forward call.
#[derive(Clone, Copy, Default, Debug)]
pub struct LayerTimes {
    pub mixer: Duration,
    pub routing: Duration,
    pub shared: Duration,
    pub expert_wait: Duration,
    pub expert_compute: Duration,
    pub combine: Duration,
}

impl LayerTimes {
    pub fn add(&mut self, o: &LayerTimes) {
        self.mixer += o.mixer;
        self.routing += o.routing;
        self.shared += o.shared;
        self.expert_wait += o.expert_wait;
        self.expert_compute += o.expert_compute;
        self.combine += o.combine;
    }
    pub fn total(&self) -> Duration {
        self.mixer
            + self.routing
            + self.shared
            + self.expert_wait
            + self.expert_compute
            + self.combine
    }
}

/// Per-call measurements: one entry per layer, plus embedding and head time.
#[derive(Clone, Default, Debug)]
pub struct ForwardStats {
    pub layers: Vec<LayerTimes>,
    pub embed: Duration,
    pub head: Duration,
}

impl ForwardStats {
    pub fn total_layers(&self) -> LayerTimes {
        let mut t = LayerTimes::default();
        for l in &self.layers {
            t.add(l);
        }
        t
    }
    pub fn add(&mut self, o: &ForwardStats) {
        if self.layers.len() < o.layers.len() {
            self.layers.resize(o.layers.len(), LayerTimes::default());
        }
        for (a, b) in self.layers.iter_mut().zip(&o.layers) {
            a.add(b);
        }
        self.embed += o.embed;
        self.head += o.head;
    }
}

/// Which logits a forward call returns.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Logits {
    All,
    Last,
}

/// Switches for the forward pass's speed features, so `bench` can measure each against its
/// baseline in the same run. None of them changes the result beyond float rounding.
#[derive(Clone, Copy, Debug)]
pub struct ForwardOptions {
    /// Routed experts of one layer computed in parallel, each as its read completes.
    pub parallel_experts: bool,
    /// Chunked gated delta rule (arch-spec §6.6) for prompts; recurrent form when off.
    pub chunked_gdn: bool,
    /// While decoding, queue reads of the next MoE layer's likely experts (its router applied
    /// to this layer's input) as soon as this layer's experts are done. Off unless measured
    /// to win.
    pub prefetch_next: bool,
}

impl Default for ForwardOptions {
    fn default() -> Self {
        ForwardOptions {
            parallel_experts: true,
            chunked_gdn: true,
            prefetch_next: false,
        }
    }
}

/// The model on backend `B` (the CPU unless named): weights in `B`'s memory, routed experts
/// behind the [`ExpertSource`].
pub struct Model<B: Backend = Cpu> {
    pub be: B,
    pub cfg: ModelConfig,
    /// [vocab, H]
    pub embed: B::Mat,
    /// [vocab, H] (the embedding when tied)
    pub lm_head: B::Mat,
    /// [H]
    pub final_norm: B::Buf,
    pub layers: Vec<Layer<B>>,
    pub experts: Box<dyn ExpertSource>,
    /// Routed experts per token (the config's unless overridden by `--k`).
    pub top_k: usize,
    pub opts: ForwardOptions,
}

impl<B: Backend> Model<B> {
    /// Sets the number of routed experts per token (renormalised over the chosen).
    pub fn set_top_k(&mut self, k: usize) -> Result<()> {
        if k == 0 || k > self.cfg.num_experts {
            return Err(Error::Invalid(format!(
                "--k {k} must be between 1 and the model's {} experts",
                self.cfg.num_experts
            )));
        }
        self.top_k = k;
        Ok(())
    }

    pub fn check_tokens(&self, tokens: &[u32], state: &State<B>) -> Result<()> {
        self.check_tokens_at(tokens, state.pos)
    }

    /// [`Model::check_tokens`] for a state (on any backend) that has consumed `pos` tokens.
    pub fn check_tokens_at(&self, tokens: &[u32], pos: usize) -> Result<()> {
        for &id in tokens {
            if id as usize >= self.cfg.vocab_size {
                return Err(Error::TokenOutOfRange {
                    id,
                    vocab: self.cfg.vocab_size,
                });
            }
        }
        let len = pos + tokens.len();
        if len > self.cfg.max_position_embeddings {
            return Err(Error::ContextOverflow {
                len,
                max: self.cfg.max_position_embeddings,
            });
        }
        Ok(())
    }

    /// A fresh state in the backend's memory.
    pub fn new_state(&self) -> Result<State<B>> {
        State::new_on(&self.be, &self.cfg)
    }

    /// Runs `tokens` through the model from `state` (which it advances) and returns logits
    /// [t, vocab] (`Logits::All`) or [vocab] (`Logits::Last`). `hidden`, when given, receives
    /// the embeddings, each layer's output and the final-normed state ([t, H] each).
    pub fn forward(
        &self,
        tokens: &[u32],
        state: &mut State<B>,
        want: Logits,
        stats: &mut ForwardStats,
        hidden: Option<&mut Vec<Vec<f32>>>,
    ) -> Result<Vec<f32>> {
        let tap = Standard::new(stats, hidden, self.cfg.num_layers);
        match crate::trace::active() {
            Some(rec) => rec.run(self, state.pos, tokens.len(), tap, |tap| {
                self.forward_tapped(tokens, state, want, tap)
            }),
            None => self.forward_tapped(tokens, state, want, &mut { tap }),
        }
    }

    /// The forward pass (arch-spec §3), calling `tap` at each named point (`tap.rs`).
    pub fn forward_tapped(
        &self,
        tokens: &[u32],
        state: &mut State<B>,
        want: Logits,
        tap: &mut impl Tap<B>,
    ) -> Result<Vec<f32>> {
        let (be, cfg) = (&self.be, &self.cfg);
        let (t, h, eps) = (tokens.len(), cfg.hidden_size, cfg.rms_norm_eps);
        let (x, mut xn) = self.layers_pass(tokens, state, tap)?;
        if tap.wants("result_norm") {
            be.rmsnorm(&x, &self.final_norm, eps, &mut xn)?;
            tap.tap(be, "result_norm", None, Some(&xn))?;
        }
        // logits = RMSNorm(h; norm) @ lm_head^T, for the rows wanted.
        let rows = match want {
            Logits::All => t,
            Logits::Last => 1,
        };
        let last = if rows < t { self.last_row(&x, t)? } else { x };
        let mut normed = be.scratch(rows * h)?;
        be.rmsnorm(&last, &self.final_norm, eps, &mut normed)?;
        let mut logits = be.scratch(rows * cfg.vocab_size)?;
        be.matmul(&self.lm_head, &normed, rows, &mut logits)?;
        tap.tap(be, "result_output", None, Some(&logits))?;
        be.take_host(logits)
    }

    /// Greedy decoding's step: `tokens` through the model, then the argmax of the last
    /// position's logits, reduced where they live (only the id reaches the host).
    pub fn forward_argmax(&self, tokens: &[u32], state: &mut State<B>) -> Result<u32> {
        let (x, _) = match crate::trace::active() {
            Some(rec) => rec.run(self, state.pos, tokens.len(), NoTap, |tap| {
                self.layers_pass(tokens, state, tap)
            })?,
            None => self.layers_pass(tokens, state, &mut NoTap)?,
        };
        // One token: its row is the whole of x (no copy).
        let last = match tokens.len() {
            1 => x,
            t => self.last_row(&x, t)?,
        };
        let eps = self.cfg.rms_norm_eps;
        self.be
            .fused_head_argmax(&last, &self.final_norm, eps, &self.lm_head)
            .map_err(|e| match e {
                Error::NonFiniteArgmax { .. } => Error::NonFiniteArgmax { pos: state.pos - 1 },
                e => e,
            })
    }

    /// A copy of row `t - 1` of `x [t, H]`.
    fn last_row(&self, x: &B::Buf, t: usize) -> Result<B::Buf> {
        let h = self.cfg.hidden_size;
        let mut r = self.be.scratch(h)?;
        self.be.copy_rows(x, h, t - 1, 1, &mut r)?;
        Ok(r)
    }

    /// Embedding and every layer; returns the residual stream `x [t, H]` and a scratch
    /// buffer of the same size. Advances `state`.
    fn layers_pass(
        &self,
        tokens: &[u32],
        state: &mut State<B>,
        tap: &mut impl Tap<B>,
    ) -> Result<(B::Buf, B::Buf)> {
        self.check_tokens(tokens, state)?;
        let (be, cfg) = (&self.be, &self.cfg);
        let (t, h, eps) = (tokens.len(), cfg.hidden_size, cfg.rms_norm_eps);
        if t == 0 {
            return Err(Error::Invalid("forward called with no tokens".into()));
        }
        if state.layers.len() != self.layers.len() {
            return Err(Error::Invalid(format!(
                "state of {} layers for a model of {}",
                state.layers.len(),
                self.layers.len()
            )));
        }
        let pos0 = state.pos;
        // h = embed_tokens[t]                                  x, xn, mix: [t, H]
        let mut x = be.scratch(t * h)?;
        be.embed(&self.embed, tokens, &mut x)?;
        tap.tap(be, "embed", None, Some(&x))?;
        let mut xn = be.scratch(t * h)?;
        let mut mix = be.scratch(t * h)?;
        for (l, (layer, st)) in self.layers.iter().zip(state.layers.iter_mut()).enumerate() {
            // x = RMSNorm(h; input_layernorm); x = mixer(x)
            be.rmsnorm(&x, &layer.input_norm, eps, &mut xn)?;
            match (&layer.mixer, st) {
                (Mixer::Attention(a), LayerState::Attn { k, v }) => {
                    a.run(be, cfg, &xn, t, pos0, k, v, &mut mix)?
                }
                (Mixer::DeltaNet(g), LayerState::Gdn { conv, s }) => {
                    g.run(be, cfg, &xn, t, conv, s, self.opts.chunked_gdn, &mut mix)?
                }
                _ => {
                    return Err(Error::Invalid(format!(
                        "layer {l}: state does not match the layer kind"
                    )))
                }
            }
            tap.tap(be, "mixer_out", Some(l), Some(&mix))?;
            // h = h + x; x = RMSNorm(h; post_attention_layernorm)
            be.add_rmsnorm(&mut x, &mix, &layer.post_norm, eps, &mut xn)?;
            tap.tap(be, "ffn_inp", Some(l), Some(&xn))?;
            // h = h + ffn(x)
            match &layer.ffn {
                Ffn::Moe(m) => {
                    let src = self.experts.as_ref();
                    let route = (self.top_k, cfg.norm_topk_prob);
                    let par = self.opts.parallel_experts;
                    m.run(be, &xn, t, route, src, par, &mut x, l, tap)?
                }
                Ffn::Dense(m) => {
                    m.run(be, &xn, t, &mut mix)?;
                    tap.tap(be, "ffn_out", Some(l), Some(&mix))?;
                    be.add(&mut x, &mix)?;
                }
            }
            if self.opts.prefetch_next && t == 1 {
                if let Some(Ffn::Moe(next)) = self.layers.get(l + 1).map(|n| &n.ffn) {
                    let guess = next.predict(be, &xn, self.top_k)?;
                    self.experts.prefetch(l + 1, &guess);
                }
                tap.tap(be, "prefetch_next", Some(l), None)?;
            }
            tap.tap(be, "layer_out", Some(l), Some(&x))?;
        }
        state.pos += t;
        Ok((x, xn))
    }
}
