//! The model, written once for every supported family (Qwen3.5-MoE, Qwen3-Next, Qwen3-MoE):
//! the forward pass of arch-spec §3 as one plain loop over layers. Family differences are
//! small named blocks (GdnProj::Fused, attn_output_gate, dense-MLP layers), not copies.
pub mod attention;
pub mod gdn;
pub mod gdn_chunk;
pub mod moe;
pub mod state;

use std::time::{Duration, Instant};

use crate::config::{Arch, LayerKind, ModelConfig};
use crate::error::{Error, Result};
use crate::experts::ExpertSource;
use crate::kernels;
use crate::store::{SourceLayout, TensorStore};
use crate::weights::{load_linear, load_vec, Linear};

use attention::Attention;
use gdn::{GatedDeltaNet, GdnProj};
use moe::{Mlp, Moe};
pub use state::{LayerState, State};

/// The logistic function (output gates, shared-expert gate, GatedDeltaNet beta).
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// y = W x for `t` row vectors x [t, cols] -> [t, rows].
pub fn linear(w: &Linear, x: &[f32], t: usize) -> Vec<f32> {
    let mut y = vec![0f32; t * w.rows()];
    debug_assert_eq!(x.len(), t * w.cols());
    if t == 1 {
        kernels::matvec(&w.view(), x, &mut y);
    } else {
        kernels::matmul(&w.view(), x, t, &mut y);
    }
    y
}

pub enum Mixer {
    Attention(Attention),
    DeltaNet(GatedDeltaNet),
}

#[allow(clippy::large_enum_variant)] // one per layer; boxing buys nothing
pub enum Ffn {
    Moe(Moe),
    Dense(Mlp),
}

pub struct Layer {
    /// [H] plain weights (zero-centred offsets folded in at load).
    pub input_norm: Vec<f32>,
    pub post_norm: Vec<f32>,
    pub mixer: Mixer,
    pub ffn: Ffn,
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

pub struct Model {
    pub cfg: ModelConfig,
    /// [vocab, H]
    pub embed: Linear,
    /// [vocab, H] (the embedding when tied)
    pub lm_head: Linear,
    pub final_norm: Vec<f32>,
    pub layers: Vec<Layer>,
    pub experts: Box<dyn ExpertSource>,
    /// Routed experts per token (the config's unless overridden by `--k`).
    pub top_k: usize,
    pub opts: ForwardOptions,
}

fn norm(store: &TensorStore, cfg: &ModelConfig, name: &str, len: usize) -> Result<Vec<f32>> {
    let mut w = load_vec(store, name, len)?;
    // Zero-centred norms (y = x̂(1+w)) are stored as w by transformers and as 1+w by MLX
    // converters (arch-spec §4.1, §11.2); the forward pass always uses a plain weight.
    if cfg.norm_zero_centered && store.layout == SourceLayout::HuggingFace {
        for v in w.iter_mut() {
            *v += 1.0;
        }
    }
    Ok(w)
}

impl Model {
    pub fn load(
        cfg: ModelConfig,
        store: &TensorStore,
        experts: Box<dyn ExpertSource>,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let embed = load_linear(store, "embed_tokens", cfg.vocab_size, h)?;
        let lm_head = if store.has("lm_head.weight") {
            load_linear(store, "lm_head", cfg.vocab_size, h)?
        } else if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            return Err(Error::MissingTensor {
                name: "lm_head.weight".into(),
                where_: store.dir.display().to_string(),
            });
        };
        let final_norm = norm(store, &cfg, "norm.weight", h)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("layers.{l}");
            let mixer = match cfg.layer_types[l] {
                LayerKind::FullAttention => Mixer::Attention(load_attention(store, &cfg, &p)?),
                LayerKind::LinearAttention => Mixer::DeltaNet(load_gdn(store, &cfg, &p)?),
            };
            let ffn = if cfg.is_moe_layer(l) {
                Ffn::Moe(load_moe(store, &cfg, &p, l)?)
            } else {
                let i = cfg.intermediate_size;
                Ffn::Dense(Mlp {
                    gate: load_linear(store, &format!("{p}.mlp.gate_proj"), i, h)?,
                    up: load_linear(store, &format!("{p}.mlp.up_proj"), i, h)?,
                    down: load_linear(store, &format!("{p}.mlp.down_proj"), h, i)?,
                })
            };
            layers.push(Layer {
                input_norm: norm(store, &cfg, &format!("{p}.input_layernorm.weight"), h)?,
                post_norm: norm(
                    store,
                    &cfg,
                    &format!("{p}.post_attention_layernorm.weight"),
                    h,
                )?,
                mixer,
                ffn,
            });
        }
        let top_k = cfg.num_experts_per_tok;
        Ok(Model {
            cfg,
            embed,
            lm_head,
            final_norm,
            layers,
            experts,
            top_k,
            opts: ForwardOptions::default(),
        })
    }

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

    pub fn check_tokens(&self, tokens: &[u32], state: &State) -> Result<()> {
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

    /// Runs `tokens` through the model from `state` (which it advances) and returns logits
    /// [t, vocab] (`Logits::All`) or [vocab] (`Logits::Last`). `hidden`, when given, receives
    /// the embeddings, each layer's output and the final-normed state ([t, H] each).
    pub fn forward(
        &self,
        tokens: &[u32],
        state: &mut State,
        want: Logits,
        stats: &mut ForwardStats,
        mut hidden: Option<&mut Vec<Vec<f32>>>,
    ) -> Result<Vec<f32>> {
        self.check_tokens(tokens, state)?;
        let cfg = &self.cfg;
        let (t, h) = (tokens.len(), cfg.hidden_size);
        if t == 0 {
            return Err(Error::Invalid("forward called with no tokens".into()));
        }
        if stats.layers.len() < cfg.num_layers {
            stats.layers.resize(cfg.num_layers, LayerTimes::default());
        }
        let te = Instant::now();
        let mut x = vec![0f32; t * h];
        for (ti, &id) in tokens.iter().enumerate() {
            self.embed.row_f32(id as usize, &mut x[ti * h..][..h]);
        }
        stats.embed += te.elapsed();
        if let Some(hs) = hidden.as_deref_mut() {
            hs.push(x.clone());
        }
        let pos0 = state.pos;
        let mut xn = vec![0f32; t * h];
        for (l, layer) in self.layers.iter().enumerate() {
            let mut lt = LayerTimes::default();
            let tm = Instant::now();
            for (xr, nr) in x.chunks(h).zip(xn.chunks_mut(h)) {
                kernels::rmsnorm(xr, &layer.input_norm, cfg.rms_norm_eps, false, nr);
            }
            let mix = match (&layer.mixer, &mut state.layers[l]) {
                (Mixer::Attention(a), LayerState::Attn { k, v }) => {
                    a.forward(cfg, &xn, t, pos0, k, v)
                }
                (Mixer::DeltaNet(g), LayerState::Gdn { conv, s }) => {
                    g.forward_with(cfg, &xn, t, conv, s, self.opts.chunked_gdn)
                }
                _ => {
                    return Err(Error::Invalid(format!(
                        "layer {l}: state does not match the layer kind"
                    )))
                }
            };
            for (a, b) in x.iter_mut().zip(&mix) {
                *a += b;
            }
            for (xr, nr) in x.chunks(h).zip(xn.chunks_mut(h)) {
                kernels::rmsnorm(xr, &layer.post_norm, cfg.rms_norm_eps, false, nr);
            }
            lt.mixer += tm.elapsed();
            let ff = match &layer.ffn {
                Ffn::Moe(m) => m.forward_with(
                    &xn,
                    t,
                    h,
                    self.top_k,
                    cfg.norm_topk_prob,
                    self.experts.as_ref(),
                    self.opts.parallel_experts,
                    &mut lt,
                )?,
                Ffn::Dense(m) => {
                    let td = Instant::now();
                    let y = m.forward(&xn, t);
                    lt.shared += td.elapsed();
                    y
                }
            };
            if self.opts.prefetch_next && t == 1 {
                let tp = Instant::now();
                if let Some(Ffn::Moe(next)) = self.layers.get(l + 1).map(|n| &n.ffn) {
                    let guess = next.predict(&xn, self.top_k);
                    self.experts.prefetch(l + 1, &guess);
                }
                lt.routing += tp.elapsed();
            }
            for (a, b) in x.iter_mut().zip(&ff) {
                *a += b;
            }
            stats.layers[l].add(&lt);
            if let Some(hs) = hidden.as_deref_mut() {
                if l + 1 < cfg.num_layers {
                    hs.push(x.clone());
                }
            }
        }
        state.pos += t;
        let th = Instant::now();
        let rows: Vec<usize> = match want {
            Logits::All => (0..t).collect(),
            Logits::Last => vec![t - 1],
        };
        let mut normed = vec![0f32; rows.len() * h];
        for (j, &r) in rows.iter().enumerate() {
            kernels::rmsnorm(
                &x[r * h..][..h],
                &self.final_norm,
                cfg.rms_norm_eps,
                false,
                &mut normed[j * h..][..h],
            );
        }
        if let Some(hs) = hidden {
            let mut all = vec![0f32; t * h];
            for (xr, nr) in x.chunks(h).zip(all.chunks_mut(h)) {
                kernels::rmsnorm(xr, &self.final_norm, cfg.rms_norm_eps, false, nr);
            }
            hs.push(all);
        }
        let logits = linear(&self.lm_head, &normed, rows.len());
        stats.head += th.elapsed();
        Ok(logits)
    }
}

fn load_attention(store: &TensorStore, cfg: &ModelConfig, p: &str) -> Result<Attention> {
    let (h, nh, nkv, hd) = (
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
    );
    let qrows = nh * hd * if cfg.attn_output_gate { 2 } else { 1 };
    let a = format!("{p}.self_attn");
    Ok(Attention {
        q_proj: load_linear(store, &format!("{a}.q_proj"), qrows, h)?,
        k_proj: load_linear(store, &format!("{a}.k_proj"), nkv * hd, h)?,
        v_proj: load_linear(store, &format!("{a}.v_proj"), nkv * hd, h)?,
        o_proj: load_linear(store, &format!("{a}.o_proj"), h, nh * hd)?,
        q_norm: norm(store, cfg, &format!("{a}.q_norm.weight"), hd)?,
        k_norm: norm(store, cfg, &format!("{a}.k_norm.weight"), hd)?,
    })
}

fn load_gdn(store: &TensorStore, cfg: &ModelConfig, p: &str) -> Result<GatedDeltaNet> {
    let h = cfg.hidden_size;
    let (nk, nv) = (cfg.linear_num_key_heads, cfg.linear_num_value_heads);
    let (dk, dv) = (cfg.linear_key_head_dim, cfg.linear_value_head_dim);
    let g = format!("{p}.linear_attn");
    let proj = if cfg.arch == Arch::Qwen3Next || store.has(&format!("{g}.in_proj_qkvz.weight")) {
        let rep = nv / nk;
        GdnProj::Fused {
            qkvz: load_linear(
                store,
                &format!("{g}.in_proj_qkvz"),
                nk * (2 * dk + 2 * rep * dv),
                h,
            )?,
            ba: load_linear(store, &format!("{g}.in_proj_ba"), nk * 2 * rep, h)?,
        }
    } else {
        GdnProj::Separate {
            qkv: load_linear(store, &format!("{g}.in_proj_qkv"), cfg.gdn_conv_dim(), h)?,
            z: load_linear(store, &format!("{g}.in_proj_z"), nv * dv, h)?,
            b: load_linear(store, &format!("{g}.in_proj_b"), nv, h)?,
            a: load_linear(store, &format!("{g}.in_proj_a"), nv, h)?,
        }
    };
    let kk = cfg.linear_conv_kernel_dim;
    // [C,1,K] (HF) and [C,K,1] (MLX) have the same memory order: c*K + j.
    let conv_w = load_vec(
        store,
        &format!("{g}.conv1d.weight"),
        cfg.gdn_conv_dim() * kk,
    )?;
    let a_log = load_vec(store, &format!("{g}.A_log"), nv)?;
    Ok(GatedDeltaNet {
        proj,
        conv_w,
        dt_bias: load_vec(store, &format!("{g}.dt_bias"), nv)?,
        neg_a: a_log.iter().map(|a| -a.exp()).collect(),
        norm_w: load_vec(store, &format!("{g}.norm.weight"), dv)?,
        out_proj: load_linear(store, &format!("{g}.out_proj"), h, nv * dv)?,
    })
}

fn load_moe(store: &TensorStore, cfg: &ModelConfig, p: &str, layer: usize) -> Result<Moe> {
    let h = cfg.hidden_size;
    let m = format!("{p}.mlp");
    let (shared, shared_gate) = if cfg.shared_expert_intermediate_size > 0 {
        let s = cfg.shared_expert_intermediate_size;
        (
            Some(Mlp {
                gate: load_linear(store, &format!("{m}.shared_expert.gate_proj"), s, h)?,
                up: load_linear(store, &format!("{m}.shared_expert.up_proj"), s, h)?,
                down: load_linear(store, &format!("{m}.shared_expert.down_proj"), h, s)?,
            }),
            Some(load_linear(
                store,
                &format!("{m}.shared_expert_gate"),
                1,
                h,
            )?),
        )
    } else {
        (None, None)
    };
    Ok(Moe {
        router: load_linear(store, &format!("{m}.gate"), cfg.num_experts, h)?,
        shared,
        shared_gate,
        layer,
    })
}
