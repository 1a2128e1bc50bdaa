//! The op-level backend seam (design.md §4): the operations of the forward pass on buffers the
//! backend owns. The model (`crate::model`) is written once against [`Backend`]; a backend
//! supplies operations, never a layer loop.
//!
//! - `cpu.rs`: [`Cpu`], the CPU kernels of `crate::kernels` (host memory, rayon).
//! - `reference.rs`: [`Reference`], the plain twins (f64 loops, the recurrent delta rule).
//!   They define each operation; every backend is checked against them.
//! - `conformance.rs`: one test body, generic over `Backend`, that runs every operation of a
//!   backend against [`Reference`] on random inputs and names the op that disagrees.
//!
//! Rules every implementation keeps (docs/backends.md has the checklist):
//! - Buffers are `f32` element arrays in the backend's memory. An op never reads a buffer back
//!   to the host unless its contract says so ([`Backend::routes_host`], [`Backend::argmax`],
//!   [`Backend::download`]); those are the only host round-trips of a token.
//! - The primitives have no default body. The optional ops (the group at the end of the trait:
//!   `add_rmsnorm`, `gdn_chunked`, `matmul_many`, `fused_*`) have default bodies composing the
//!   primitives, and a backend overrides them to fuse (CUDA's in-projection with its conv
//!   epilogue, the head with its argmax).
//! - Streams, launch order, graph replay and scratch pools are the backend's private business.
//!   An op may return before its work is done as long as later ops see its results.
use std::borrow::Cow;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::experts::ExpertSource;
use crate::weights::Linear;

pub mod compose;
pub mod conformance;
mod cpu;
mod reference;

pub use cpu::Cpu;
pub use reference::Reference;

/// Shapes of a full-attention layer (arch-spec §5).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Leading dims of each head that RoPE rotates (partial rotary).
    pub rotary_dim: usize,
    pub rope_theta: f64,
    /// q_proj rows per head are `[q ‖ gate]` and the output is scaled by sigmoid(gate).
    pub gated: bool,
    /// q/k RMSNorm epsilon.
    pub eps: f32,
}

impl AttnShape {
    /// q_proj output width per token.
    pub fn q_rows(&self) -> usize {
        self.heads * self.head_dim * if self.gated { 2 } else { 1 }
    }
    /// Width of one token's keys (and values).
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    /// Width of one token's attention output (and gate).
    pub fn o_width(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// Shapes of a GatedDeltaNet layer (arch-spec §6).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GdnShape {
    pub nk: usize,
    pub nv: usize,
    pub dk: usize,
    pub dv: usize,
    /// Conv kernel length K (the state holds K-1 rows).
    pub kconv: usize,
}

impl GdnShape {
    /// Channels of `mixed` / `u`: `[q (nk*dk) | k (nk*dk) | v (nv*dv)]`.
    pub fn conv_dim(&self) -> usize {
        2 * self.nk * self.dk + self.nv * self.dv
    }
    pub fn value_dim(&self) -> usize {
        self.nv * self.dv
    }
    /// Elements of the conv state `[K-1, conv_dim]`.
    pub fn conv_state_len(&self) -> usize {
        (self.kconv - 1) * self.conv_dim()
    }
    /// Elements of the recurrent state `[nv, dk, dv]`.
    pub fn state_len(&self) -> usize {
        self.nv * self.dk * self.dv
    }
}

/// Routing of `t` tokens in host memory: `ids [t, k]`, `weights [t, k]`, each token's experts
/// by descending probability.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Routes {
    pub k: usize,
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Routes {
    pub fn tokens(&self) -> usize {
        self.ids.len().checked_div(self.k).unwrap_or(0)
    }
    /// The distinct experts of all tokens, ascending (the order results are summed in).
    pub fn used(&self) -> Vec<usize> {
        let mut u: Vec<usize> = self.ids.iter().map(|&e| e as usize).collect();
        u.sort_unstable();
        u.dedup();
        u
    }
    /// The tokens routed to expert `e`, with their weights.
    pub fn tokens_of(&self, e: usize) -> Vec<(usize, f32)> {
        (0..self.tokens())
            .filter_map(|ti| {
                let r = ti * self.k..(ti + 1) * self.k;
                let j = self.ids[r.clone()].iter().position(|&x| x as usize == e)?;
                Some((ti, self.weights[r.start + j]))
            })
            .collect()
    }
}

/// Where a layer's routed experts come from, for [`Backend::moe_experts`].
#[derive(Clone, Copy)]
pub struct ExpertCall<'a> {
    pub source: &'a dyn ExpertSource,
    pub layer: usize,
    /// A host backend may run experts in parallel (`ForwardOptions::parallel_experts`).
    pub parallel: bool,
}

/// One MoE block after the router product, for [`Backend::fused_moe`]: `t` tokens `xn [t, H]`,
/// the router's `logits [t, ne]`, top `k` (renormalised when `renorm`), the shared expert's
/// gate, up and down matrices and its gate's logits `[t]` when the layer has them.
pub struct MoeCall<'a, B: Backend> {
    pub call: ExpertCall<'a>,
    pub xn: &'a B::Buf,
    pub t: usize,
    pub logits: &'a B::Buf,
    pub ne: usize,
    pub k: usize,
    pub renorm: bool,
    pub shared: Option<[&'a B::Mat; 3]>,
    pub shared_gate: Option<&'a B::Buf>,
}

/// Task time [`Backend::moe_experts`] spent waiting for expert bytes and computing, summed over
/// its tasks (in parallel they exceed the wall time; a timer splits wall time by their ratio).
#[derive(Clone, Copy, Default, Debug)]
pub struct ExpertTimes {
    pub wait: Duration,
    pub compute: Duration,
}

/// The operations of the forward pass. Shapes in the docs: `[t, n]` is `t` rows of `n`
/// elements, row-major. "Rows of `w`" means the buffer is cut into rows of `w`'s length.
pub trait Backend: Send + Sync + Sized {
    /// f32 activations or state in the backend's memory.
    type Buf: Send + Sync;
    /// A weight matrix `W [rows, cols]` in the backend's memory, in its stored format.
    type Mat: Send + Sync;
    /// Routing results (ids and weights) in the backend's memory.
    type Routes: Send + Sync;

    /// "cpu", "reference", "cuda", ...
    fn name(&self) -> &'static str;

    // ---- memory -------------------------------------------------------------------------

    /// A zeroed buffer of `n` elements.
    fn alloc(&self, n: usize) -> Result<Self::Buf>;
    /// A buffer of `n` elements for an op to write whole (its contents before that are
    /// undefined): the model's activations. A backend whose `alloc` costs a zeroing pass on
    /// the device (CUDA: a memset, which also ends the overlap of the kernels around it)
    /// hands out recycled memory instead.
    fn scratch(&self, n: usize) -> Result<Self::Buf> {
        self.alloc(n)
    }
    fn upload(&self, v: &[f32]) -> Result<Self::Buf>;
    /// A host copy (tests, taps; never on the token path).
    fn download(&self, b: &Self::Buf) -> Result<Vec<f32>>;
    /// `download`, consuming the buffer (a host backend hands its memory over).
    fn take_host(&self, b: Self::Buf) -> Result<Vec<f32>> {
        self.download(&b)
    }
    fn buf_len(&self, b: &Self::Buf) -> usize;
    /// A copy of `b` (state snapshots).
    fn copy_buf(&self, b: &Self::Buf) -> Result<Self::Buf>;
    fn upload_mat(&self, w: &Linear) -> Result<Self::Mat>;
    /// Matrices of the same input that the model always multiplies together (q|k|v; the
    /// GatedDeltaNet in-projections; router|shared gate; gate|up). A backend may lay them out
    /// as one stacked matrix so that [`Backend::matmul_many`] is one launch.
    fn upload_group(&self, ws: &[&Linear]) -> Result<Vec<Self::Mat>> {
        ws.iter().map(|w| self.upload_mat(w)).collect()
    }
    /// `(rows, cols)`.
    fn mat_shape(&self, w: &Self::Mat) -> (usize, usize);
    /// Room for the routing of `t` tokens, `k` experts each.
    fn alloc_routes(&self, t: usize, k: usize) -> Result<Self::Routes>;

    // ---- primitives ---------------------------------------------------------------------

    /// `y [t, rows] = x [t, cols] W^T`, f32 accumulation (arch-spec §11.3 for affine).
    fn matmul(&self, w: &Self::Mat, x: &Self::Buf, t: usize, y: &mut Self::Buf) -> Result<()>;
    /// `out [t, cols]`: row `ids[i]` of `table`, dequantised.
    fn embed(&self, table: &Self::Mat, ids: &[u32], out: &mut Self::Buf) -> Result<()>;
    /// Per row of `w`: `out = x / sqrt(mean(x^2) + eps) * w` (plain weight; a zero-centred
    /// `1 + w` is folded in at load).
    fn rmsnorm(&self, x: &Self::Buf, w: &Self::Buf, eps: f32, out: &mut Self::Buf) -> Result<()>;
    /// `x += d`.
    fn add(&self, x: &mut Self::Buf, d: &Self::Buf) -> Result<()>;
    /// `dst [n, width]` = rows `row0..row0+n` of `src [_, width]`.
    fn copy_rows(
        &self,
        src: &Self::Buf,
        width: usize,
        row0: usize,
        n: usize,
        dst: &mut Self::Buf,
    ) -> Result<()>;
    /// Attention input preparation for positions `pos0..pos0+t` (arch-spec §5, §5.1): from
    /// `qg [t, q_rows]` (per head `[q ‖ gate]` when gated) writes `q [t, heads*hd]` RMSNormed
    /// per head with `q_norm` and rotated, and `gate [t, heads*hd]` (empty when not gated);
    /// `k [t, kv_heads*hd]` is normed with `k_norm` and rotated in place. RoPE: NeoX
    /// rotate-half over the first `rotary_dim` dims, `inv_freq[i] = theta^(-2i/rot)`
    /// (text-only MRoPE reduces to this).
    #[allow(clippy::too_many_arguments)]
    fn qk_norm_rope(
        &self,
        qg: &Self::Buf,
        k: &mut Self::Buf,
        q_norm: &Self::Buf,
        k_norm: &Self::Buf,
        s: &AttnShape,
        pos0: usize,
        t: usize,
        q: &mut Self::Buf,
        gate: &mut Self::Buf,
    ) -> Result<()>;
    /// Appends `k, v [t, kv_width]` to the caches `kc, vc [pos0, kv_width]` (which the backend
    /// grows) and writes `o [t, heads*hd]`: causal GQA softmax attention, scale `hd^-0.5`,
    /// query `i` seeing keys `0..=pos0+i`. `t == 1` is decode, `t > 1` prefill.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        kc: &mut Self::Buf,
        vc: &mut Self::Buf,
        s: &AttnShape,
        pos0: usize,
        t: usize,
        o: &mut Self::Buf,
    ) -> Result<()>;
    /// `o *= sigmoid(gate)` (the attention output gate).
    fn gated_output(&self, o: &mut Self::Buf, gate: &Self::Buf) -> Result<()>;
    /// Causal depthwise conv + SiLU (arch-spec §6.3): `u [t, conv_dim]` from
    /// `mixed [t, conv_dim]` after the carried `state [K-1, conv_dim]` (oldest first), weights
    /// `conv_w [conv_dim, K]`; the state becomes the last K-1 inputs.
    fn gdn_conv(
        &self,
        mixed: &Self::Buf,
        state: &mut Self::Buf,
        conv_w: &Self::Buf,
        s: &GdnShape,
        t: usize,
        u: &mut Self::Buf,
    ) -> Result<()>;
    /// The gated delta rule, recurrent form (arch-spec §6.4-6.5): from `u [t, conv_dim]`,
    /// `b, a [t, nv]`, `dt_bias [nv]`, `neg_a [nv]` (= -exp(A_log)) and the fp32
    /// `state [nv, dk, dv]` (updated), writes `o [t, nv*dv]`. l2norm eps 1e-6 inside the
    /// rsqrt, q scaled by `dk^-0.5`, value head `h` reads key head `h / (nv/nk)`.
    #[allow(clippy::too_many_arguments)]
    fn gdn_recurrent(
        &self,
        u: &Self::Buf,
        b: &Self::Buf,
        a: &Self::Buf,
        dt_bias: &Self::Buf,
        neg_a: &Self::Buf,
        state: &mut Self::Buf,
        s: &GdnShape,
        t: usize,
        o: &mut Self::Buf,
    ) -> Result<()>;
    /// Per row of `w` (one value head): `y = rmsnorm(o) * w * silu(z)` (arch-spec §4.2).
    fn gated_rmsnorm(
        &self,
        o: &Self::Buf,
        z: &Self::Buf,
        w: &Self::Buf,
        eps: f32,
        y: &mut Self::Buf,
    ) -> Result<()>;
    /// `out = silu(g) * u`.
    fn swiglu(&self, g: &Self::Buf, u: &Self::Buf, out: &mut Self::Buf) -> Result<()>;
    /// Per token of `logits [t, ne]`: softmax over all `ne`, the top `k` (descending, ties to
    /// the lower id), renormalised over the chosen when `renorm` (arch-spec §7; `--k`).
    fn router_topk(
        &self,
        logits: &Self::Buf,
        ne: usize,
        k: usize,
        renorm: bool,
        out: &mut Self::Routes,
    ) -> Result<()>;
    /// Whether the MoE block queues its shared expert before [`Backend::routes_host`] (default
    /// after, so a host backend starts its expert reads first): for a backend whose
    /// `routes_host` waits for the router only, so the shared expert's work overlaps the round
    /// trip (CUDA).
    fn shared_before_routing(&self) -> bool {
        false
    }
    /// The routing of `layer` on the host, to drive expert reads: the one host round-trip of
    /// an MoE layer. `None` when the backend holds every expert of the layer and needs no ids
    /// on the host (no round-trip at all). A host backend lends its own.
    fn routes_host<'a>(&self, r: &'a Self::Routes, layer: usize)
        -> Result<Option<Cow<'a, Routes>>>;
    /// `out [t, H] = Σ_j w_j · down_j(silu(gate_j x) * up_j x)` over each token's routed
    /// experts, summed in ascending expert id. `host` is what [`Backend::routes_host`] gave;
    /// the experts' bytes come from `call.source` (or from the backend's own residency).
    /// `out` is written whole (the model hands it over from `scratch`, not zeroed).
    fn moe_experts(
        &self,
        call: ExpertCall<'_>,
        x: &Self::Buf,
        routes: &Self::Routes,
        host: Option<&Routes>,
        out: &mut Self::Buf,
    ) -> Result<ExpertTimes>;
    /// Per token: `x += routed + sigmoid(gate) * shared` (gate 1 when absent; shared 0 when
    /// absent). `shared_gate [t]` holds the gate's logits.
    fn moe_combine(
        &self,
        x: &mut Self::Buf,
        routed: &Self::Buf,
        shared: Option<&Self::Buf>,
        shared_gate: Option<&Self::Buf>,
    ) -> Result<()>;
    /// Index of the largest element of `x` (first on ties; NaN never wins), reduced where
    /// `x` lives: one integer (and the value, to check it) crosses to the host.
    /// [`Error::NonFiniteArgmax`] when no element is finite or the largest is infinite, so
    /// that greedy decoding never continues from a NaN model ([`argmax_checked`] on a host).
    fn argmax(&self, x: &Self::Buf) -> Result<u32>;

    // ---- optional and fused operations: default compositions, overridden to fuse --------

    /// `x += d`, then `out = rmsnorm(x)` (the residual join before a norm).
    fn add_rmsnorm(
        &self,
        x: &mut Self::Buf,
        d: &Self::Buf,
        w: &Self::Buf,
        eps: f32,
        out: &mut Self::Buf,
    ) -> Result<()> {
        self.add(x, d)?;
        self.rmsnorm(x, w, eps, out)
    }
    /// [`Backend::gdn_recurrent`]'s contract computed in chunks (arch-spec §6.6), for prefill:
    /// the recurrent form unless the backend has the chunked one (it should: prefill streams
    /// the state once per chunk instead of three times per token).
    #[allow(clippy::too_many_arguments)]
    fn gdn_chunked(
        &self,
        u: &Self::Buf,
        b: &Self::Buf,
        a: &Self::Buf,
        dt_bias: &Self::Buf,
        neg_a: &Self::Buf,
        state: &mut Self::Buf,
        s: &GdnShape,
        t: usize,
        o: &mut Self::Buf,
    ) -> Result<()> {
        self.gdn_recurrent(u, b, a, dt_bias, neg_a, state, s, t, o)
    }
    /// `ys[i] = x W_i^T` for matrices of one [`Backend::upload_group`].
    fn matmul_many(
        &self,
        ws: &[&Self::Mat],
        x: &Self::Buf,
        t: usize,
        ys: &mut [&mut Self::Buf],
    ) -> Result<()> {
        for (w, y) in ws.iter().zip(ys.iter_mut()) {
            self.matmul(w, x, t, y)?;
        }
        Ok(())
    }
    /// Attention from its projections (arch-spec §5): [`Backend::qk_norm_rope`], then
    /// [`Backend::attention`] over the caches, then the output gate when `s.gated`. `k` is
    /// scratch: this body norms and rotates it in place, a fused one may leave it as it was
    /// (only the cache holds the rotated keys). (CUDA writes the cache in its prep kernel and
    /// applies the gate in the attention kernel.)
    #[allow(clippy::too_many_arguments)]
    fn fused_attention(
        &self,
        qg: &Self::Buf,
        k: &mut Self::Buf,
        v: &Self::Buf,
        q_norm: &Self::Buf,
        k_norm: &Self::Buf,
        kc: &mut Self::Buf,
        vc: &mut Self::Buf,
        s: &AttnShape,
        pos0: usize,
        t: usize,
        o: &mut Self::Buf,
    ) -> Result<()> {
        let (qn, kn) = (q_norm, k_norm);
        compose::attention(self, qg, k, v, qn, kn, kc, vc, s, pos0, t, o)
    }
    /// The GatedDeltaNet in-projection and conv (arch-spec §6.1, §6.3): `mixed = x Wqkv^T`
    /// through [`Backend::gdn_conv`] into `u`; `z, b, a` from their matrices. (CUDA runs the
    /// conv in the projection's epilogue.)
    #[allow(clippy::too_many_arguments)]
    fn fused_gdn_in(
        &self,
        w: [&Self::Mat; 4],
        x: &Self::Buf,
        t: usize,
        conv_w: &Self::Buf,
        state: &mut Self::Buf,
        s: &GdnShape,
        u: &mut Self::Buf,
        z: &mut Self::Buf,
        b: &mut Self::Buf,
        a: &mut Self::Buf,
    ) -> Result<()> {
        compose::gdn_in(self, w, x, t, conv_w, state, s, [u, z, b, a])
    }
    /// A SwiGLU MLP: `y [t, H] = down(silu(gate x) * up x)` (shared expert, dense layers).
    fn fused_swiglu_mlp(
        &self,
        gate: &Self::Mat,
        up: &Self::Mat,
        down: &Self::Mat,
        x: &Self::Buf,
        t: usize,
        y: &mut Self::Buf,
    ) -> Result<()> {
        compose::swiglu_mlp(self, [gate, up, down], x, t, y)
    }
    /// Whether [`Backend::fused_moe`] fuses one token's MoE block of `layer` routed to `k`
    /// experts (the block then hands it the router's logits and the shared expert instead of
    /// running them op by op). Default: never.
    fn fuses_moe(&self, _layer: usize, _k: usize) -> bool {
        false
    }
    /// The MoE block after the router product (arch-spec §7): [`Backend::router_topk`] into
    /// `routes`, then `x += Σ_j w_j E_j(xn) + sigmoid(shared_gate) · shared(xn)`, the routed
    /// experts as [`Backend::moe_experts`] sums them. Returns the experts' task times. (CUDA,
    /// for one token with every expert of the layer in VRAM: top-k and the two problem
    /// batches in one kernel, the shared expert one more problem of the routed experts'
    /// batched launches, the combine into `x` in one kernel.)
    fn fused_moe(
        &self,
        m: &MoeCall<'_, Self>,
        routes: &mut Self::Routes,
        x: &mut Self::Buf,
    ) -> Result<ExpertTimes> {
        compose::moe(self, m, routes, x)
    }
    /// Greedy decoding's head: argmax of `rmsnorm(x [H]; norm) W_head^T` (CUDA reduces the
    /// argmax as the head's blocks write their rows).
    fn fused_head_argmax(
        &self,
        x: &Self::Buf,
        norm: &Self::Buf,
        eps: f32,
        head: &Self::Mat,
    ) -> Result<u32> {
        let mut xn = self.scratch(self.buf_len(x))?;
        self.rmsnorm(x, norm, eps, &mut xn)?;
        let mut logits = self.scratch(self.mat_shape(head).0)?;
        self.matmul(head, &xn, 1, &mut logits)?;
        self.argmax(&logits)
    }
}

/// The memory half of a backend whose buffers are host `Vec<f32>`, whose matrices are the
/// loaded [`Linear`]s and whose routing is [`Routes`] (the CPU and the reference).
macro_rules! host_memory {
    () => {
        type Buf = Vec<f32>;
        type Mat = Linear;
        type Routes = Routes;

        fn alloc(&self, n: usize) -> Result<Vec<f32>> {
            Ok(vec![0f32; n])
        }
        fn upload(&self, v: &[f32]) -> Result<Vec<f32>> {
            Ok(v.to_vec())
        }
        fn download(&self, b: &Vec<f32>) -> Result<Vec<f32>> {
            Ok(b.clone())
        }
        fn take_host(&self, b: Vec<f32>) -> Result<Vec<f32>> {
            Ok(b)
        }
        fn buf_len(&self, b: &Vec<f32>) -> usize {
            b.len()
        }
        fn copy_buf(&self, b: &Vec<f32>) -> Result<Vec<f32>> {
            Ok(b.clone())
        }
        fn upload_mat(&self, w: &Linear) -> Result<Linear> {
            Ok(w.clone())
        }
        fn mat_shape(&self, w: &Linear) -> (usize, usize) {
            (w.rows(), w.cols())
        }
        fn alloc_routes(&self, t: usize, k: usize) -> Result<Routes> {
            Ok(Routes {
                k,
                ids: vec![0; t * k],
                weights: vec![0.0; t * k],
            })
        }
        fn routes_host<'a>(&self, r: &'a Routes, _layer: usize) -> Result<Option<Cow<'a, Routes>>> {
            Ok(Some(Cow::Borrowed(r)))
        }
    };
}
use host_memory;

/// The first index of the largest value of a host slice and that value (NaN never wins);
/// `None` when every value is NaN or there is none.
pub fn host_argmax(x: &[f32]) -> Option<(usize, f32)> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in x.iter().enumerate() {
        if !v.is_nan() && best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best
}

/// [`Backend::argmax`] of a host slice: [`host_argmax`]'s index, or
/// [`Error::NonFiniteArgmax`] when its value is not finite or there is none.
pub fn argmax_checked(x: &[f32]) -> Result<u32> {
    match host_argmax(x) {
        Some((i, v)) if v.is_finite() => Ok(i as u32),
        _ => Err(Error::NonFiniteArgmax { pos: 0 }),
    }
}
