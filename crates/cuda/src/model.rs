//! The forward pass on the GPU: the loop of arch-spec §3 over layers, one token at a time,
//! with every weight of `flashmoe_core::model::Model` except the routed experts uploaded once.
//! Routed experts go through the VRAM cache (cache.rs): the router's top-k ids are copied to
//! the host, misses come from the pinned host tier or are fetched from the model's ExpertSource
//! into it, and are copied on the copy stream while the shared expert runs on the compute
//! stream.
//!
//! Owns the GPU state layout and the order of launches. Never does arithmetic on the host
//! beyond bookkeeping.
use std::ops::Deref;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flashmoe_core::config::ModelConfig;
use flashmoe_core::model::{Ffn, Logits, Mixer, Model};

use crate::cache::{ExpertCache, HostTier, Layout};
use crate::device::{DBuf, Device, Event, ExpertBatchArgs, Pinned, MAXP};
use crate::ops::{self, AttnShape, GdnShape, Prepared, Proj};
use crate::{CudaError, Result};

#[derive(Clone, Debug)]
pub struct CudaOptions {
    pub device: usize,
    /// VRAM for the expert cache; None = free VRAM after the dense weights, less `reserve`.
    pub expert_cache_bytes: Option<usize>,
    pub reserve_bytes: usize,
    /// Page-locked host memory for experts between VRAM and the ExpertSource (LRU); at least
    /// one layer's experts (the staging of its misses).
    pub host_cache_bytes: usize,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            device: 0,
            expert_cache_bytes: None,
            reserve_bytes: 2 << 30,
            host_cache_bytes: 0,
        }
    }
}

/// Monotonic counters (readers take differences).
#[derive(Clone, Copy, Debug, Default)]
pub struct CudaCounters {
    pub tokens: u64,
    pub vram_hits: u64,
    pub misses: u64,
    /// Misses copied straight from registered (pinned) host memory, no staging.
    pub direct: u64,
    /// VRAM misses found in the pinned host tier (one DMA, no read).
    pub ram_hits: u64,
    pub bytes_copied: u64,
    /// Host time reading misses from the ExpertSource into pinned staging.
    pub fetch: Duration,
    /// GPU time of the host-to-device expert copies (copy-stream events).
    pub copy_ms: f64,
    /// GPU time of whole tokens on the compute stream.
    pub compute_ms: f64,
    /// Host time blocked waiting for the router's ids.
    pub router_wait: Duration,
}

enum DMixer {
    Attn {
        /// [qg | k | v] rows.
        qkv: Proj,
        o: Proj,
        qn: DBuf,
        kn: DBuf,
    },
    Gdn {
        /// [mixed (conv_dim) | z (nv*dv) | b (nv) | a (nv)] rows, Qwen3.5 order.
        proj: Proj,
        conv_w: DBuf,
        dt_bias: DBuf,
        neg_a: DBuf,
        norm_w: DBuf,
        out: Proj,
    },
}

enum DFfn {
    Moe {
        /// [router (E) | shared gate (1, if any)] rows.
        router: Proj,
        shared: Option<(Proj, Proj)>,
    },
    Dense {
        gu: Proj,
        down: Proj,
        inter: usize,
    },
}

struct DLayer {
    in_norm: DBuf,
    post_norm: DBuf,
    mixer: DMixer,
    ffn: DFfn,
}

/// Per-sequence state in VRAM.
pub struct CudaState {
    pub pos: usize,
    layers: Vec<DState>,
}

impl CudaState {
    /// Device bytes the state holds (KV capacity included).
    pub fn nbytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l {
                DState::Attn { k, v, .. } => k.len() + v.len(),
                DState::Gdn { conv, s } => conv.len() + s.len(),
            })
            .sum()
    }
}

enum DState {
    Attn { k: DBuf, v: DBuf, cap: usize },
    Gdn { conv: DBuf, s: DBuf },
}

/// Activation scratch, sized once.
struct Scratch {
    x: DBuf,
    xn: DBuf,
    mix: DBuf,
    proj: DBuf,
    q: DBuf,
    o: DBuf,
    u: DBuf,
    y: DBuf,
    rl: DBuf,
    ids: DBuf,
    wts: DBuf,
    gus: DBuf,
    hs: DBuf,
    ys: DBuf,
    gue: DBuf,
    he: DBuf,
    ye: DBuf,
    logits: DBuf,
    ids_host: Pinned,
    /// Logits read back through page-locked memory (one DMA, no driver staging).
    logits_host: Pinned,
    /// Greedy decoding: the argmax token, on the device and read back.
    amax: DBuf,
    amax_host: Pinned,
}

/// What a token computes after its last layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Head {
    None,
    /// The logits, into `s.logits`.
    Logits,
    /// The logits and their argmax key, into `s.amax`.
    Argmax,
}

/// The CPU model a [`CudaModel`] was built from: borrowed (tools, tests, bench) or shared
/// (an engine that owns its backend: [`CudaModel::new_shared`]).
#[derive(Clone)]
pub enum ModelRef<'m> {
    Borrowed(&'m Model),
    Shared(Arc<Model>),
}

impl Deref for ModelRef<'_> {
    type Target = Model;
    fn deref(&self) -> &Model {
        match self {
            ModelRef::Borrowed(m) => m,
            ModelRef::Shared(m) => m,
        }
    }
}

/// How `forward` runs a prompt (several tokens).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PromptPath {
    /// Chunked when experts stream in, token by token when every expert is resident in VRAM:
    /// there the token path's device-side expert lookup beat the chunk path's per-expert
    /// launches (`bench`'s prefill A/B, `prefill.chunked_ms` against `token_path_ms`: 311
    /// against 221 ms for 128 tokens of the 8-layer 397B-shaped model on an H200).
    #[default]
    Auto,
    Chunked,
    TokenByToken,
}

pub struct CudaModel<'m> {
    pub model: ModelRef<'m>,
    cfg: ModelConfig,
    embed: Proj,
    lm_head: Proj,
    final_norm: DBuf,
    layers: Vec<DLayer>,
    cache: Option<ExpertCache>,
    s: Scratch,
    ev_ids: Event,
    ev_copy0: Event,
    ev_copy1: Event,
    ev_tok0: Event,
    ev_tok1: Event,
    pub counters: CudaCounters,
    copy_pending: bool,
    /// Bytes of dense weights resident in VRAM.
    pub dense_bytes: usize,
    /// Bytes of dense weights one token reads (all but the embedding table).
    pub dense_touched_bytes: usize,
    /// Host ranges registered as pinned (start, end), sorted; misses inside them skip staging.
    pinned: Vec<(usize, usize)>,
    /// When every expert is in VRAM: slot base per (layer, expert), [layers * E] u64; routed
    /// experts are then found on the device, with no host round trip per layer.
    resident: Option<DBuf>,
    /// Pinned host slots between VRAM and the ExpertSource (with an expert cache).
    host: Option<HostTier>,
    /// Buffers of a prefill chunk, allocated at the first prompt.
    chunk: Option<prefill::ChunkBufs>,
    /// How prompts run (bench A/B; `Auto` elsewhere).
    pub prompt_path: PromptPath,
    /// Two MvBatch (gate‖up, down) written by `router_experts`.
    batch: DBuf,
    /// Last: fields drop in order, and every buffer, event and pinned allocation above must be
    /// freed while the context is alive (dropping the last `Device` of a process releases the
    /// primary context; freeing into it afterwards crashed the driver).
    pub dev: Device,
}

fn f32buf(dev: &Device, v: &[f32]) -> Result<DBuf> {
    dev.upload_f32(v)
}

fn fbytes(n: usize) -> usize {
    n.max(1) * 4
}

impl CudaModel<'static> {
    /// A CUDA model that holds (an Arc of) its CPU model, so it can be kept with no borrow.
    pub fn new_shared(model: Arc<Model>, opts: &CudaOptions) -> Result<CudaModel<'static>> {
        CudaModel::build(ModelRef::Shared(model), opts)
    }
}

impl<'m> CudaModel<'m> {
    pub fn new(model: &'m Model, opts: &CudaOptions) -> Result<CudaModel<'m>> {
        CudaModel::build(ModelRef::Borrowed(model), opts)
    }

    fn build(mref: ModelRef<'m>, opts: &CudaOptions) -> Result<CudaModel<'m>> {
        let held = mref.clone();
        let model: &Model = &held;
        let dev = Device::new(opts.device)?;
        dev.bind()?;
        let cfg = model.cfg.clone();
        let h = cfg.hidden_size;
        let mut layers = Vec::with_capacity(model.layers.len());
        let mut max_proj = h;
        let mut max_e = 1;
        let mut max_shared = 1;
        for layer in &model.layers {
            let mixer = match &layer.mixer {
                Mixer::Attention(a) => {
                    let qkv = Proj::whole(&dev, &[&a.q_proj, &a.k_proj, &a.v_proj])?;
                    max_proj = max_proj.max(qkv.rows);
                    DMixer::Attn {
                        qkv,
                        o: Proj::whole(&dev, &[&a.o_proj])?,
                        qn: f32buf(&dev, &a.q_norm)?,
                        kn: f32buf(&dev, &a.k_norm)?,
                    }
                }
                Mixer::DeltaNet(g) => {
                    // Qwen3-Next's interleaved rows were reordered at load (core).
                    let p = &g.proj;
                    let proj = Proj::whole(&dev, &[&p.qkv, &p.z, &p.b, &p.a])?;
                    max_proj = max_proj.max(proj.rows);
                    DMixer::Gdn {
                        proj,
                        conv_w: f32buf(&dev, &g.conv_w)?,
                        dt_bias: f32buf(&dev, &g.dt_bias)?,
                        neg_a: f32buf(&dev, &g.neg_a)?,
                        norm_w: f32buf(&dev, &g.norm_w)?,
                        out: Proj::whole(&dev, &[&g.out_proj])?,
                    }
                }
            };
            let ffn = match &layer.ffn {
                Ffn::Moe(m) => {
                    let router = match &m.shared_gate {
                        Some(sg) => Proj::whole(&dev, &[&m.router, sg])?,
                        None => Proj::whole(&dev, &[&m.router])?,
                    };
                    max_e = max_e.max(router.rows);
                    let shared = match &m.shared {
                        Some(s) => {
                            max_shared = max_shared.max(s.gate.rows());
                            Some((
                                Proj::whole(&dev, &[&s.gate, &s.up])?,
                                Proj::whole(&dev, &[&s.down])?,
                            ))
                        }
                        None => None,
                    };
                    DFfn::Moe { router, shared }
                }
                Ffn::Dense(m) => {
                    max_shared = max_shared.max(m.gate.rows());
                    DFfn::Dense {
                        gu: Proj::whole(&dev, &[&m.gate, &m.up])?,
                        down: Proj::whole(&dev, &[&m.down])?,
                        inter: m.gate.rows(),
                    }
                }
            };
            layers.push(DLayer {
                in_norm: f32buf(&dev, &layer.input_norm)?,
                post_norm: f32buf(&dev, &layer.post_norm)?,
                mixer,
                ffn,
            });
        }
        let embed = Proj::whole(&dev, &[&model.embed])?;
        let embed_bytes = embed.nbytes();
        let lm_head = Proj::whole(&dev, &[&model.lm_head])?;
        let final_norm = f32buf(&dev, &model.final_norm)?;
        let mut dense_bytes = embed.nbytes() + lm_head.nbytes();
        for l in &layers {
            dense_bytes += match &l.mixer {
                DMixer::Attn { qkv, o, .. } => qkv.nbytes() + o.nbytes(),
                DMixer::Gdn { proj, out, .. } => proj.nbytes() + out.nbytes(),
            };
            dense_bytes += match &l.ffn {
                DFfn::Moe { router, shared } => {
                    router.nbytes() + shared.as_ref().map_or(0, |(a, b)| a.nbytes() + b.nbytes())
                }
                DFfn::Dense { gu, down, .. } => gu.nbytes() + down.nbytes(),
            };
        }

        let k = model.top_k.max(1);
        let nh = cfg.num_heads.max(1);
        let cache = match (0..cfg.num_layers).find(|&l| matches!(model.layers[l].ffn, Ffn::Moe(_)))
        {
            Some(l0) => {
                let first = model.experts.fetch(l0, &[0])?;
                let layout = Layout::of(&first[0])?;
                let n_moe = (0..cfg.num_layers)
                    .filter(|&l| matches!(model.layers[l].ffn, Ffn::Moe(_)))
                    .count();
                let all = n_moe * cfg.num_experts;
                let (free, _) = dev.mem_info()?;
                // Activations and state are small next to this; the reserve covers them.
                let want = opts
                    .expert_cache_bytes
                    .unwrap_or_else(|| free.saturating_sub(opts.reserve_bytes));
                let slots = (want / layout.slot).clamp(2 * k, all.max(2 * k));
                Some(ExpertCache::new(&dev, layout, slots)?)
            }
            None => None,
        };
        let (ei, eh) = cache.as_ref().map_or((1, h), |c| (c.layout.i, c.layout.h));
        let nhd = nh * cfg.head_dim;
        let gdn_cd = cfg.gdn_conv_dim();
        let gdn_vd = cfg.linear_num_value_heads * cfg.linear_value_head_dim;
        let s = Scratch {
            x: dev.alloc(fbytes(h))?,
            xn: dev.alloc(fbytes(h))?,
            mix: dev.alloc(fbytes(h))?,
            proj: dev.alloc(fbytes(max_proj))?,
            q: dev.alloc(fbytes(nhd))?,
            o: dev.alloc(fbytes(nhd))?,
            u: dev.alloc(fbytes(gdn_cd))?,
            y: dev.alloc(fbytes(gdn_vd))?,
            rl: dev.alloc(fbytes(max_e))?,
            ids: dev.alloc(fbytes(k))?,
            wts: dev.alloc(fbytes(k))?,
            gus: dev.alloc(fbytes(2 * max_shared))?,
            hs: dev.alloc(fbytes(max_shared))?,
            ys: dev.alloc(fbytes(h))?,
            gue: dev.alloc(fbytes((k + 1) * 2 * ei))?,
            he: dev.alloc(fbytes((k + 1) * ei))?,
            ye: dev.alloc(fbytes((k + 1) * eh))?,
            logits: dev.alloc(fbytes(cfg.vocab_size))?,
            ids_host: dev.pinned(fbytes(k))?,
            logits_host: dev.pinned(fbytes(cfg.vocab_size))?,
            amax: dev.alloc(8)?,
            amax_host: dev.pinned(8)?,
        };
        let batch = dev.alloc(2 * std::mem::size_of::<crate::device::MvBatch>())?;
        let host = match &cache {
            Some(c) => {
                let slots = (opts.host_cache_bytes / c.layout.slot).max(k);
                Some(HostTier::new(&dev, &c.layout, slots)?)
            }
            None => None,
        };
        Ok(CudaModel {
            model: mref,
            cfg,
            embed,
            lm_head,
            final_norm,
            layers,
            cache,
            s,
            ev_ids: dev.event()?,
            ev_copy0: dev.event()?,
            ev_copy1: dev.event()?,
            ev_tok0: dev.event()?,
            ev_tok1: dev.event()?,
            dev,
            counters: CudaCounters::default(),
            copy_pending: false,
            dense_touched_bytes: dense_bytes - embed_bytes,
            pinned: Vec::new(),
            resident: None,
            host,
            chunk: None,
            prompt_path: PromptPath::Auto,
            batch,
            dense_bytes,
        })
    }

    /// Page-locks host memory that outlives this model (e.g. a RAM tier's expert buffers):
    /// misses whose bytes lie inside one registered range are copied to VRAM directly, with no
    /// staging copy. A range sharing pages with an earlier one is not registered (its misses
    /// are staged).
    pub fn pin_host(&mut self, bytes: &'m [u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.dev.bind()?;
        // SAFETY: `bytes` is borrowed for 'm, which outlives self; Drop unregisters it.
        if !unsafe { self.dev.register_host(bytes.as_ptr(), bytes.len())? } {
            // Shares pages with an earlier registration: left to the staging path.
            return Ok(());
        }
        let r = (
            bytes.as_ptr() as usize,
            bytes.as_ptr() as usize + bytes.len(),
        );
        let at = self.pinned.partition_point(|x| x.0 < r.0);
        self.pinned.insert(at, r);
        Ok(())
    }

    pub fn cfg(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Expert cache capacity (slots, bytes) and bytes copied per missed expert.
    /// (slots, bytes) of the pinned host tier.
    pub fn host_info(&self) -> Option<(usize, usize)> {
        self.host.as_ref().map(|h| (h.slots(), h.bytes()))
    }

    pub fn cache_info(&self) -> Option<(usize, usize, usize)> {
        self.cache
            .as_ref()
            .map(|c| (c.slots(), c.bytes(), c.layout.bytes))
    }

    pub fn new_state(&self) -> Result<CudaState> {
        self.dev.bind()?;
        let cfg = &self.cfg;
        let mut layers = Vec::new();
        for l in &self.layers {
            layers.push(match l.mixer {
                DMixer::Attn { .. } => DState::Attn {
                    k: self.dev.alloc(0)?,
                    v: self.dev.alloc(0)?,
                    cap: 0,
                },
                DMixer::Gdn { .. } => DState::Gdn {
                    conv: self.dev.alloc_zeros(fbytes(
                        (cfg.linear_conv_kernel_dim - 1) * cfg.gdn_conv_dim(),
                    ))?,
                    s: self.dev.alloc_zeros(fbytes(
                        cfg.linear_num_value_heads
                            * cfg.linear_key_head_dim
                            * cfg.linear_value_head_dim,
                    ))?,
                },
            });
        }
        Ok(CudaState { pos: 0, layers })
    }

    /// A copy of `st` in new device buffers (device-to-device), for prefix reuse. Attention
    /// layers keep only the live rows (capacity = position; the next token grows them).
    pub fn clone_state(&self, st: &CudaState) -> Result<CudaState> {
        self.dev.bind()?;
        let row = self.cfg.num_kv_heads * self.cfg.head_dim * 4;
        let copy = |dst: &DBuf, src: &DBuf, n: usize| -> Result<()> {
            if n > 0 {
                self.dev
                    .dtod_async(dst.ptr(), src.ptr(), n, &self.dev.compute)?;
            }
            Ok(())
        };
        let mut layers = Vec::with_capacity(st.layers.len());
        for l in &st.layers {
            layers.push(match l {
                DState::Attn { k, v, cap } => {
                    let rows = st.pos.min(*cap);
                    let (nk, nv) = (self.dev.alloc(rows * row)?, self.dev.alloc(rows * row)?);
                    copy(&nk, k, rows * row)?;
                    copy(&nv, v, rows * row)?;
                    DState::Attn {
                        k: nk,
                        v: nv,
                        cap: rows,
                    }
                }
                DState::Gdn { conv, s } => {
                    let (nc, ns) = (self.dev.alloc(conv.len())?, self.dev.alloc(s.len())?);
                    copy(&nc, conv, conv.len())?;
                    copy(&ns, s, s.len())?;
                    DState::Gdn { conv: nc, s: ns }
                }
            });
        }
        self.dev.sync()?;
        Ok(CudaState {
            pos: st.pos,
            layers,
        })
    }

    /// Loads every expert of every MoE layer into the cache (when it fits): "all in VRAM".
    pub fn preload_experts(&mut self) -> Result<()> {
        let n = self.cfg.num_experts;
        let moe: Vec<usize> = (0..self.layers.len())
            .filter(|&l| matches!(self.layers[l].ffn, DFfn::Moe { .. }))
            .collect();
        let k = self.model.top_k.max(1);
        for l in moe {
            for chunk in (0..n).collect::<Vec<_>>().chunks(k) {
                self.load_experts(l, chunk)?;
                self.collect_copy()?;
            }
        }
        self.build_resident()
    }

    /// Switches to device-side expert lookup if every expert of every MoE layer is resident
    /// and the shapes suit the indirect kernels.
    fn build_resident(&mut self) -> Result<()> {
        let Some(cache) = &self.cache else {
            return Ok(());
        };
        let (ne, nl) = (self.cfg.num_experts, self.layers.len());
        let k = self.model.top_k;
        if k > crate::device::MAXP || cache.layout.h > 10240 || cache.layout.i > 10240 {
            return Ok(());
        }
        let mut tbl = vec![0u64; nl * ne];
        for l in 0..nl {
            if !matches!(self.layers[l].ffn, DFfn::Moe { .. }) {
                continue;
            }
            for e in 0..ne {
                match cache.lru.slot_of(l, e) {
                    Some(s) => tbl[l * ne + e] = cache.slot_ptr(s),
                    None => return Ok(()),
                }
            }
        }
        self.dev.sync()?;
        self.resident = Some(self.dev.upload(bytemuck::cast_slice(&tbl))?);
        Ok(())
    }

    /// Whether routed experts are looked up on the device (all resident).
    pub fn all_resident(&self) -> bool {
        self.resident.is_some()
    }

    fn attn_shape(&self) -> AttnShape {
        let c = &self.cfg;
        AttnShape {
            nh: c.num_heads,
            nkv: c.num_kv_heads,
            hd: c.head_dim,
            gated: c.attn_output_gate,
            rot: c.rotary_dim,
            theta: c.rope_theta,
            eps: c.rms_norm_eps,
        }
    }

    fn gdn_shape(&self) -> GdnShape {
        let c = &self.cfg;
        GdnShape {
            nk: c.linear_num_key_heads,
            nv: c.linear_num_value_heads,
            dk: c.linear_key_head_dim,
            dv: c.linear_value_head_dim,
            kconv: c.linear_conv_kernel_dim,
            eps: c.rms_norm_eps,
        }
    }

    /// Runs `tokens` from `state` (advancing it) and returns logits [t, vocab] or [vocab], as
    /// `Model::forward`. Tokens go through the decode path one at a time.
    pub fn forward(
        &mut self,
        tokens: &[u32],
        state: &mut CudaState,
        want: Logits,
    ) -> Result<Vec<f32>> {
        self.check_tokens(tokens, state)?;
        let mut out = Vec::new();
        let chunked = match self.prompt_path {
            PromptPath::Auto => self.resident.is_none(),
            PromptPath::Chunked => true,
            PromptPath::TokenByToken => false,
        };
        if tokens.len() > 1 && self.cache.is_some() && chunked {
            // A prompt: chunks of tokens, each expert read once per chunk (prefill.rs).
            let nc = tokens.len().div_ceil(prefill::CHUNK);
            for (i, chunk) in tokens.chunks(prefill::CHUNK).enumerate() {
                let l = match chunk.len() {
                    1 => self.forward(chunk, state, want)?,
                    _ => self.prefill_chunk(chunk, state, want)?,
                };
                if want == Logits::All || i + 1 == nc {
                    out.extend_from_slice(&l);
                }
            }
            return Ok(out);
        }
        for (i, &id) in tokens.iter().enumerate() {
            let last = i + 1 == tokens.len();
            let need = want == Logits::All || last;
            self.token(id, state, if need { Head::Logits } else { Head::None })?;
            if need {
                self.read_logits(&mut out)?;
            } else {
                self.dev.sync()?;
            }
            self.finish_token()?;
        }
        Ok(out)
    }

    /// Greedy decoding: runs `tokens` and returns the most likely next token (first index on
    /// ties), found on the GPU, so only 8 bytes come back instead of the vocabulary's logits.
    pub fn forward_argmax(&mut self, tokens: &[u32], state: &mut CudaState) -> Result<u32> {
        self.check_tokens(tokens, state)?;
        let mut next = 0;
        for (i, &id) in tokens.iter().enumerate() {
            let last = i + 1 == tokens.len();
            self.token(id, state, if last { Head::Argmax } else { Head::None })?;
            if last {
                let s = &self.s;
                self.dev
                    .dtoh_async(&s.amax_host, s.amax.ptr(), 8, &self.dev.compute)?;
                self.dev.sync()?;
                let b: [u8; 8] = s.amax_host.as_slice()[..8].try_into().expect("8 bytes");
                next = ops::argmax_index(u64::from_le_bytes(b));
            } else {
                self.dev.sync()?;
            }
            self.finish_token()?;
        }
        Ok(next)
    }

    /// One greedy token's launches on the compute stream, nothing read back or waited for
    /// (bench: the same launches captured into a CUDA graph and replayed). Every expert must be
    /// resident (the other paths wait for the router's ids on the host).
    pub fn launch_token(&mut self, id: u32, state: &mut CudaState) -> Result<()> {
        if self.resident.is_none() {
            return Err(CudaError::Invalid(
                "launch_token needs every expert resident".into(),
            ));
        }
        self.check_tokens(&[id], state)?;
        self.token(id, state, Head::Argmax)
    }

    /// Appends `s.logits` (after the compute stream's work) to `out`, through pinned memory.
    fn read_logits(&self, out: &mut Vec<f32>) -> Result<()> {
        let (s, vocab) = (&self.s, self.cfg.vocab_size);
        self.dev
            .dtoh_async(&s.logits_host, s.logits.ptr(), vocab * 4, &self.dev.compute)?;
        self.dev.sync()?;
        out.extend_from_slice(bytemuck::cast_slice::<u8, f32>(
            &s.logits_host.as_slice()[..vocab * 4],
        ));
        Ok(())
    }

    fn check_tokens(&self, tokens: &[u32], state: &CudaState) -> Result<()> {
        self.dev.bind()?;
        if tokens.is_empty() {
            return Err(CudaError::Invalid("forward called with no tokens".into()));
        }
        for &id in tokens {
            if id as usize >= self.cfg.vocab_size {
                return Err(flashmoe_core::Error::TokenOutOfRange {
                    id,
                    vocab: self.cfg.vocab_size,
                }
                .into());
            }
        }
        let len = state.pos + tokens.len();
        if len > self.cfg.max_position_embeddings {
            return Err(flashmoe_core::Error::ContextOverflow {
                len,
                max: self.cfg.max_position_embeddings,
            }
            .into());
        }
        Ok(())
    }

    /// Counters of a token whose launches have completed.
    fn finish_token(&mut self) -> Result<()> {
        self.counters.tokens += 1;
        self.counters.compute_ms += self.dev.elapsed_ms(&self.ev_tok0, &self.ev_tok1)? as f64;
        self.collect_copy()
    }

    /// Makes room in an attention layer's KV cache for position `pos`, keeping the first
    /// `live` rows (the positions already written).
    fn grow_kv(&self, st: &mut DState, live: usize, pos: usize) -> Result<()> {
        if let DState::Attn { k, v, cap } = st {
            if pos < *cap {
                return Ok(());
            }
            let row = self.cfg.num_kv_heads * self.cfg.head_dim * 4;
            let ncap = (*cap * 2)
                .max(256)
                .max(pos + 1)
                .min(self.cfg.max_position_embeddings.max(pos + 1));
            let nk = self.dev.alloc(ncap * row)?;
            let nv = self.dev.alloc(ncap * row)?;
            if *cap > 0 {
                self.dev
                    .dtod_async(nk.ptr(), k.ptr(), live * row, &self.dev.compute)?;
                self.dev
                    .dtod_async(nv.ptr(), v.ptr(), live * row, &self.dev.compute)?;
                self.dev.sync()?;
            }
            *k = nk;
            *v = nv;
            *cap = ncap;
        }
        Ok(())
    }

    /// Layer `l`'s attention or GatedDeltaNet step for the token at `pos` on the residual row
    /// `x` (in VRAM) into `s.mix`, then `xn_out = post-norm(x + mix)`, the FFN's input, also
    /// prepared at `post` for the FFN's first matvecs; `x += mix` here or, with
    /// `Residual::Defer`, in the FFN's final `moe_combine`.
    #[allow(clippy::too_many_arguments)]
    fn mixer(
        &self,
        l: usize,
        lst: &DState,
        pos: usize,
        x: u64,
        xn_out: u64,
        post: [Option<Prepared>; 2],
        res: ops::Residual,
    ) -> Result<()> {
        let h = self.cfg.hidden_size;
        let eps = self.cfg.rms_norm_eps;
        let layer = &self.layers[l];
        let s = &self.s;
        let dev = &self.dev;
        let first = match &layer.mixer {
            DMixer::Attn { qkv, .. } => qkv,
            DMixer::Gdn { proj, .. } => proj,
        };
        let pre = prepared_in(dev, first, 0);
        ops::rmsnorm_rows(
            dev,
            x,
            h,
            layer.in_norm.ptr(),
            s.xn.ptr(),
            h,
            h,
            1,
            eps,
            pre,
        )?;
        match (&layer.mixer, lst) {
            (DMixer::Attn { qkv, o, qn, kn }, DState::Attn { k, v, .. }) => {
                let a = self.attn_shape();
                // attn_decode prepares its output for the o-projection (slot 0 is free once
                // the qkv projection has read it).
                let pre_o =
                    prepared_in(dev, o, 0).filter(|_| a.hd.is_multiple_of(32) && ops::epilogues());
                qkv.run_prepared(dev, s.xn.ptr(), s.proj.ptr(), pre)?;
                ops::attn_prep(
                    dev,
                    &a,
                    s.proj.ptr(),
                    qn.ptr(),
                    kn.ptr(),
                    pos,
                    s.q.ptr(),
                    k.ptr(),
                    v.ptr(),
                )?;
                ops::attn_decode(
                    dev,
                    &a,
                    s.q.ptr(),
                    k.ptr(),
                    v.ptr(),
                    s.proj.ptr(),
                    pos + 1,
                    s.o.ptr(),
                    pre_o,
                )?;
                o.run_prepared(dev, s.o.ptr(), s.mix.ptr(), pre_o)?;
            }
            (
                DMixer::Gdn {
                    proj,
                    conv_w,
                    dt_bias,
                    neg_a,
                    norm_w,
                    out,
                },
                DState::Gdn { conv, s: st },
            ) => {
                let g = self.gdn_shape();
                let cd = g.conv_dim();
                let vd = g.nv * g.dv;
                let p = s.proj.ptr();
                let conv_epi = ops::Epilogue::Conv {
                    state: conv.ptr(),
                    w: conv_w.ptr(),
                    u: s.u.ptr(),
                    cd,
                    k: g.kconv,
                };
                match (proj.single(), pre) {
                    // The in-projection's blocks run the conv of the channels they produce.
                    (Some(m), Some(pr)) if ops::epilogue_fits(&m, pre, &conv_epi) => {
                        ops::matvec_epilogue(dev, &m, s.xn.ptr(), p, pr, conv_epi)?;
                    }
                    _ => {
                        proj.run_prepared(dev, s.xn.ptr(), p, pre)?;
                        ops::gdn_conv(dev, &g, p, conv.ptr(), conv_w.ptr(), s.u.ptr())?;
                    }
                }
                let z = p + (cd * 4) as u64;
                let b = z + (vd * 4) as u64;
                let a = b + (g.nv * 4) as u64;
                let (u, y) = (s.u.ptr(), s.y.ptr());
                ops::gdn_step(dev, &g, u, b, a, dt_bias.ptr(), neg_a.ptr(), st.ptr(), y)?;
                // Slot 0 (the in-projection's x) is free again.
                let pre = prepared_in(dev, out, 0).filter(|_| g.dv.is_multiple_of(32));
                ops::gdn_out_norm(dev, &g, y, z, norm_w.ptr(), pre)?;
                out.run_prepared(dev, y, s.mix.ptr(), pre)?;
            }
            _ => {
                return Err(CudaError::Invalid(format!(
                    "layer {l}: state does not match the layer kind"
                )))
            }
        }
        let (mix, w) = (s.mix.ptr(), layer.post_norm.ptr());
        ops::add_rmsnorm(dev, x, mix, w, xn_out, h, eps, post, res)?;
        Ok(())
    }

    /// Where the post-norm of layer `l` prepares x for its FFN's first matvecs: the router (or
    /// the dense gate‖up) in slot 1, and with every expert resident the experts' gate‖up (one
    /// x for all problems) in slot 2, or slot 1 when it has the router's code width.
    fn ffn_prepared(&self, l: usize) -> [Option<Prepared>; 2] {
        let dev = &self.dev;
        match &self.layers[l].ffn {
            DFfn::Dense { gu, .. } => [prepared_in(dev, gu, 1), None],
            DFfn::Moe { router, .. } => {
                let r = prepared_in(dev, router, 1);
                if self.resident.is_none() {
                    return [r, None];
                }
                let lay = self.cache.as_ref().expect("cache").layout;
                let e = lay.mats(0).0.prepared_bits().map(|bits| Prepared {
                    at: dev.qx_slot(2),
                    bits,
                    qb: 0,
                });
                match (r, e) {
                    (Some(r), Some(e)) if r.bits == e.bits => [Some(r), None],
                    _ => [r, e],
                }
            }
        }
    }

    /// The prepared x the FFN's expert gate‖up launch reads (see `ffn_prepared`).
    fn experts_prepared(post: [Option<Prepared>; 2], bits: Option<u32>) -> Option<Prepared> {
        post.into_iter().flatten().find(|p| Some(p.bits) == bits)
    }

    /// One token through every layer; with `head`, logits into `s.logits`, and with
    /// `Head::Argmax` also their argmax key into `s.amax`.
    fn token(&mut self, id: u32, state: &mut CudaState, head: Head) -> Result<()> {
        let h = self.cfg.hidden_size;
        let eps = self.cfg.rms_norm_eps;
        let pos = state.pos;
        if head == Head::Argmax {
            // Zeroed first, so nothing but kernels runs between the head and its argmax.
            self.dev.memset_async(self.s.amax.ptr(), 8)?;
        }
        self.dev.record(&self.ev_tok0, &self.dev.compute)?;
        ops::embed_row(
            &self.dev,
            &self.embed.mats[0].0.m,
            id as usize,
            self.s.x.ptr(),
        )?;
        for l in 0..self.layers.len() {
            self.grow_kv(&mut state.layers[l], pos, pos)?;
            let post = self.ffn_prepared(l);
            let (x, xn) = (self.s.x.ptr(), self.s.xn.ptr());
            // The mixer's output joins the residual in the FFN's moe_combine.
            let res = ops::Residual::Defer;
            self.mixer(l, &state.layers[l], pos, x, xn, post, res)?;
            self.ffn(l, post)?;
        }
        state.pos += 1;
        let s = &self.s;
        if head != Head::None {
            let pre = prepared_in(&self.dev, &self.lm_head, 0);
            ops::rmsnorm_rows(
                &self.dev,
                s.x.ptr(),
                h,
                self.final_norm.ptr(),
                s.xn.ptr(),
                h,
                h,
                1,
                eps,
                pre,
            )?;
            let (dev, logits, key) = (&self.dev, s.logits.ptr(), s.amax.ptr());
            let epi = ops::Epilogue::Argmax { key };
            match (head, self.lm_head.single(), pre) {
                // The head's blocks reduce their rows' argmax as they write them.
                (Head::Argmax, Some(m), Some(p)) if ops::epilogue_fits(&m, pre, &epi) => {
                    ops::matvec_epilogue(dev, &m, s.xn.ptr(), logits, p, epi)?;
                }
                _ => {
                    self.lm_head.run_prepared(dev, s.xn.ptr(), logits, pre)?;
                    if head == Head::Argmax {
                        ops::argmax_zeroed(dev, logits, self.cfg.vocab_size, key)?;
                    }
                }
            }
        }
        self.dev.record(&self.ev_tok1, &self.dev.compute)?;
        Ok(())
    }

    /// Fetches `experts` of `layer` into the cache (misses only) and returns their slot
    /// pointers; the compute stream waits for the copies.
    fn load_experts(&mut self, layer: usize, experts: &[usize]) -> Result<Vec<u64>> {
        let cache = self
            .cache
            .as_mut()
            .expect("MoE layer without an expert cache");
        let lk = cache.lookup(layer, experts)?;
        let ptrs: Vec<u64> = lk.slots.iter().map(|&s| cache.slot_ptr(s)).collect();
        self.counters.vram_hits += (experts.len() - lk.missed.len()) as u64;
        if lk.missed.is_empty() {
            return Ok(ptrs);
        }
        let ids: Vec<usize> = lk.missed.iter().map(|&j| experts[j]).collect();
        let dsts: Vec<u64> = lk.missed.iter().map(|&j| ptrs[j]).collect();
        let t0 = Instant::now();
        // Host slots are rewritten below: the previous copies out of them must be done (they
        // are, in the forward pass: the compute stream waited for them before producing the
        // router result that led here; the wait makes it local).
        self.collect_copy()?;
        self.dev.record(&self.ev_copy0, &self.dev.copy)?;
        if let Err(e) = self.copy_misses(layer, &ids, &dsts) {
            let cache = self.cache.as_mut().expect("cache");
            let host = self.host.as_mut().expect("host tier");
            for &x in &ids {
                cache.lru.invalidate(layer, x);
                host.lru.invalidate(layer, x);
            }
            return Err(e);
        }
        self.dev.record(&self.ev_copy1, &self.dev.copy)?;
        self.copy_pending = true;
        self.dev.wait(&self.dev.compute, &self.ev_copy1)?;
        self.counters.fetch += t0.elapsed();
        self.counters.misses += ids.len() as u64;
        let lay = self.cache.as_ref().expect("cache").layout;
        self.counters.bytes_copied += (ids.len() * lay.bytes) as u64;
        Ok(ptrs)
    }

    /// Copies experts `ids` of `layer` into the VRAM slots `dsts` on the copy stream: from the
    /// pinned host tier when there, straight from registered page-locked memory when the
    /// source's bytes are in it, else read from the ExpertSource into host-tier slots (on
    /// several cores, each slot's copy starting as soon as it is staged).
    fn copy_misses(&mut self, layer: usize, ids: &[usize], dsts: &[u64]) -> Result<()> {
        let lay = self.cache.as_ref().expect("cache").layout;
        let host = self.host.as_mut().expect("host tier");
        let hl = host.lookup(layer, ids)?;
        let mut fill = vec![false; ids.len()];
        for &n in &hl.missed {
            fill[n] = true;
        }
        for n in (0..ids.len()).filter(|&n| !fill[n]) {
            self.dev
                .htod_async_bytes(dsts[n], host.slot(hl.slots[n]), &self.dev.copy)?;
            self.counters.ram_hits += 1;
        }
        if hl.missed.is_empty() {
            return Ok(());
        }
        let need: Vec<usize> = hl.missed.iter().map(|&n| ids[n]).collect();
        let src = &self.model.experts;
        src.prefetch(layer, &need);
        let ws = src.fetch(layer, &need)?;
        let mut staged = Vec::new();
        for (m, w) in ws.iter().enumerate() {
            let n = hl.missed[m];
            let parts = lay.parts(w)?;
            let pinned = !self.pinned.is_empty()
                && parts
                    .iter()
                    .all(|(_, b)| b.is_empty() || is_pinned(&self.pinned, b));
            if !pinned {
                staged.push((hl.slots[n], w, dsts[n]));
                continue;
            }
            // Already page-locked: no host slot needed.
            host.lru.invalidate(layer, ids[n]);
            self.counters.direct += 1;
            for (at, b) in parts {
                if !b.is_empty() {
                    self.dev
                        .htod_async_bytes(dsts[n] + at as u64, b, &self.dev.copy)?;
                }
            }
        }
        if staged.is_empty() {
            return Ok(());
        }
        use rayon::prelude::*;
        let dev = &self.dev;
        let which: Vec<usize> = staged.iter().map(|x| x.0).collect();
        host.slots_mut(&which)
            .into_par_iter()
            .zip(staged.par_iter())
            .try_for_each(|(buf, &(_, w, dst))| -> Result<()> {
                lay.stage(w, buf)?;
                dev.bind()?;
                dev.htod_async_bytes(dst, buf, &dev.copy)
            })
    }

    /// Layer `l`'s FFN on the post-norm `s.xn`, prepared at `post` (from `ffn_prepared`); adds
    /// its output and the mixer's (`s.mix`, deferred by `mixer`) to the residual `s.x`.
    fn ffn(&mut self, l: usize, post: [Option<Prepared>; 2]) -> Result<()> {
        let h = self.cfg.hidden_size;
        let k = self.model.top_k;
        match &self.layers[l].ffn {
            DFfn::Dense { gu, down, inter } => {
                let s = &self.s;
                gu.run_prepared(&self.dev, s.xn.ptr(), s.gus.ptr(), post[0])?;
                ops::swiglu(&self.dev, s.gus.ptr(), s.hs.ptr(), *inter, 1, None)?;
                down.run(&self.dev, s.hs.ptr(), s.ys.ptr())?;
                let mix = s.mix.ptr();
                ops::moe_combine(&self.dev, s.x.ptr(), 0, 0, 0, s.ys.ptr(), 0, mix, h)?;
                return Ok(());
            }
            DFfn::Moe { router, shared } if self.resident.is_some() => {
                // Every expert is in VRAM: ids stay on the device. The shared expert, when it
                // has the routed experts' shape and format, is one more problem of the same
                // two batched launches.
                let s = &self.s;
                let dev = &self.dev;
                let ne = self.cfg.num_experts;
                let lay = self.cache.as_ref().expect("cache").layout;
                let tbl = self.resident.as_ref().expect("resident").ptr() + (l * ne * 8) as u64;
                let (ei, eh) = (lay.i, lay.h);
                router.run_prepared(dev, s.xn.ptr(), s.rl.ptr(), post[0])?;
                let (gu0, dn0) = lay.mats(0);
                let fused = shared
                    .as_ref()
                    .and_then(|(gu, down)| Some((gu.single()?, down.single()?)))
                    .filter(|(g, d)| g.same_shape(&gu0) && d.same_shape(&dn0) && k < MAXP);
                let mut a = ExpertBatchArgs {
                    tbl,
                    xn: s.xn.ptr(),
                    gue: s.gue.ptr(),
                    he: s.he.ptr(),
                    ye: s.ye.ptr(),
                    i: ei as i32,
                    h: eh as i32,
                    ..Default::default()
                };
                for (o, v) in a.off.iter_mut().zip(lay.offsets()) {
                    *o = v as i64;
                }
                if let Some((g, d)) = fused {
                    a.sh = [g.w, g.s, g.b, d.w, d.s, d.b];
                }
                let pb = self.batch.ptr();
                ops::router_experts(
                    dev,
                    s.rl.ptr(),
                    ne,
                    k,
                    self.cfg.norm_topk_prob,
                    s.ids.ptr(),
                    s.wts.ptr(),
                    a,
                    pb,
                )?;
                let sg = if shared.is_some() && router.rows > ne {
                    s.rl.ptr() + (ne * 4) as u64
                } else {
                    0
                };
                let np = k + fused.is_some() as usize;
                let mut ys = 0;
                if fused.is_some() {
                    ys = s.ye.ptr() + (k * eh * 4) as u64;
                } else if let Some((gu, down)) = shared {
                    let si = gu.rows / 2;
                    gu.run(dev, s.xn.ptr(), s.gus.ptr())?;
                    ops::swiglu(dev, s.gus.ptr(), s.hs.ptr(), si, 1, None)?;
                    down.run(dev, s.hs.ptr(), s.ys.ptr())?;
                    ys = s.ys.ptr();
                }
                let pre_gu = Self::experts_prepared(post, gu0.prepared_bits());
                // Right after router_experts, which wrote the batch it reads.
                ops::matvec_indirect(dev, &gu0, pb, np, pre_gu, true)?;
                // SwiGLU prepares each problem's h for the down launch in the main scratch.
                let pre_dn = dn0.prepared_bits().map(|bits| Prepared {
                    at: dev.qx.ptr(),
                    bits,
                    qb: ops::qx_size(bits, ei),
                });
                ops::swiglu(dev, s.gue.ptr(), s.he.ptr(), ei, np, pre_dn)?;
                let psz = std::mem::size_of::<crate::device::MvBatch>() as u64;
                ops::matvec_indirect(dev, &dn0, pb + psz, np, pre_dn, false)?;
                let mix = s.mix.ptr();
                ops::moe_combine(dev, s.x.ptr(), s.ye.ptr(), s.wts.ptr(), k, ys, sg, mix, h)?;
                self.counters.vram_hits += k as u64;
                return Ok(());
            }
            DFfn::Moe { router, shared } => {
                let s = &self.s;
                let dev = &self.dev;
                let ne = self.cfg.num_experts;
                router.run_prepared(dev, s.xn.ptr(), s.rl.ptr(), post[0])?;
                ops::router_topk(
                    dev,
                    s.rl.ptr(),
                    ne,
                    k,
                    self.cfg.norm_topk_prob,
                    s.ids.ptr(),
                    s.wts.ptr(),
                )?;
                // The ids go to the host (to drive the fetches) while the shared expert runs;
                // ids_host is read only after ev_ids completes.
                dev.dtoh_async(&s.ids_host, s.ids.ptr(), k * 4, &dev.compute)?;
                dev.record(&self.ev_ids, &dev.compute)?;
                if let Some((gu, down)) = shared {
                    let si = gu.rows / 2;
                    gu.run(dev, s.xn.ptr(), s.gus.ptr())?;
                    ops::swiglu(dev, s.gus.ptr(), s.hs.ptr(), si, 1, None)?;
                    down.run(dev, s.hs.ptr(), s.ys.ptr())?;
                }
            }
        }
        let tw = Instant::now();
        self.dev.event_sync(&self.ev_ids)?;
        self.counters.router_wait += tw.elapsed();
        let ids: Vec<usize> = bytemuck::cast_slice::<u8, i32>(&self.s.ids_host.as_slice()[..k * 4])
            .iter()
            .map(|&x| x as usize)
            .collect();
        if ids.iter().any(|&e| e >= self.cfg.num_experts) {
            return Err(CudaError::Invalid(format!(
                "layer {l}: router produced expert ids {ids:?}"
            )));
        }
        let ptrs = self.load_experts(l, &ids)?;
        let lay = self.cache.as_ref().expect("cache").layout;
        let s = &self.s;
        let (ei, eh) = (lay.i, lay.h);
        let mut gu_p = Vec::with_capacity(k);
        let mut dn_p = Vec::with_capacity(k);
        for (j, &p) in ptrs.iter().enumerate() {
            let (gu, dn) = lay.mats(p);
            gu_p.push((
                gu.w,
                gu.s,
                gu.b,
                s.xn.ptr(),
                s.gue.ptr() + (j * 2 * ei * 4) as u64,
            ));
            dn_p.push((
                dn.w,
                dn.s,
                dn.b,
                s.he.ptr() + (j * ei * 4) as u64,
                s.ye.ptr() + (j * eh * 4) as u64,
            ));
        }
        let (gu0, dn0) = lay.mats(ptrs[0]);
        ops::matvec_batch(
            &self.dev,
            &self.dev.compute,
            &gu0,
            &gu_p,
            1,
            gu0.cols,
            gu0.rows,
        )?;
        ops::swiglu(&self.dev, s.gue.ptr(), s.he.ptr(), ei, k, None)?;
        ops::matvec_batch(
            &self.dev,
            &self.dev.compute,
            &dn0,
            &dn_p,
            1,
            dn0.cols,
            dn0.rows,
        )?;
        let (ys, sg) = match &self.layers[l].ffn {
            DFfn::Moe {
                router,
                shared: Some(_),
            } if router.rows > self.cfg.num_experts => {
                (s.ys.ptr(), s.rl.ptr() + (self.cfg.num_experts * 4) as u64)
            }
            DFfn::Moe {
                shared: Some(_), ..
            } => (s.ys.ptr(), 0),
            _ => (0, 0),
        };
        ops::moe_combine(
            &self.dev,
            s.x.ptr(),
            s.ye.ptr(),
            s.wts.ptr(),
            k,
            ys,
            sg,
            s.mix.ptr(),
            h,
        )?;
        Ok(())
    }

    /// Adds the last pending copy's time once it is complete (after a sync).
    fn collect_copy(&mut self) -> Result<()> {
        if self.copy_pending {
            self.dev.event_sync(&self.ev_copy1)?;
            self.counters.copy_ms += self.dev.elapsed_ms(&self.ev_copy0, &self.ev_copy1)? as f64;
            self.copy_pending = false;
        }
        Ok(())
    }
}

/// Whether `b` lies inside one of the sorted `(start, end)` ranges.
/// Where a norm prepares x for `p`'s matvecs: prepared-x slot `slot`, when every matrix of `p`
/// runs the `mp` kernel with one code width.
fn prepared_in(dev: &Device, p: &Proj, slot: usize) -> Option<Prepared> {
    p.prepared_bits().map(|bits| Prepared {
        at: dev.qx_slot(slot),
        bits,
        qb: 0,
    })
}

fn is_pinned(ranges: &[(usize, usize)], b: &[u8]) -> bool {
    let (s, e) = (b.as_ptr() as usize, b.as_ptr() as usize + b.len());
    let at = ranges.partition_point(|x| x.0 <= s);
    at > 0 && ranges[at - 1].1 >= e
}

impl Drop for CudaModel<'_> {
    fn drop(&mut self) {
        // The fields' frees below need the context current on this thread (a server may drop
        // the model on another thread than the one that ran it).
        let _ = self.dev.bind();
        if self.pinned.is_empty() {
            return;
        }
        let _ = self.dev.copy.synchronize();
        for &(p, _) in &self.pinned {
            // SAFETY: registered by pin_host; the copy stream is idle.
            unsafe { self.dev.unregister_host(p as *const u8) };
        }
    }
}

#[path = "prefill.rs"]
mod prefill;
