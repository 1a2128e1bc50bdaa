//! [`Cuda`]: the GPU as an implementation of core's op-level `Backend` trait, so that the one
//! forward pass of `flashmoe_core::model` runs on it (`Model<Cuda>`). Each primitive maps to
//! the kernels of kernels.cu through the typed launches of ops.rs (and `launch.rs` for the
//! primitives with no launch of their own in ops.rs).
//!
//! Buffers are f32 device allocations with an element count; attention caches keep spare
//! capacity and grow by doubling. Matrices are uploaded once in their stored format. Every op
//! is queued on the device's compute stream; only `download`, `routes_host` and the argmaxes
//! wait for it. The fused ops (fused.rs) run the decode loop's kernels and epilogues. Routed
//! experts go through core's residency tier (`flashmoe_core::residency`) over VRAM slots and a
//! pinned host tier (`slots.rs`) when one is enabled ([`Cuda::load_with`],
//! [`Cuda::enable_residency`]); a bare `Cuda::new` reads them from the call's `ExpertSource`
//! and uploads them per call (`moe.rs`).
use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::CudaContext;
use flashmoe_core::backend::{
    compose, AttnShape, Backend, ExpertCall, ExpertTimes, GdnShape, MoeCall, Routes,
};
use flashmoe_core::cache::CachePolicy;
use flashmoe_core::experts::ExpertSource;
use flashmoe_core::model::{Ffn, Model, SharedExperts};
use flashmoe_core::residency::{first_layout, Residency, TierCell, TierInfo, TierSpec, TierStats};
use flashmoe_core::weights::Linear;
use flashmoe_core::{Error, Result};

use crate::device::{Device, MAXP};
use crate::ops;
use crate::seq::core_error;

mod buf;
mod fused;
mod gemm;
mod launch;
mod layout;
mod mat;
mod moe;
mod options;
mod pool;
mod prefill_mixers;
mod prep;
mod slots;
#[cfg(test)]
mod tests;

use buf::{cache_at, gdn_room, room};
pub use buf::{CudaBuf, CudaRoutes};
pub use mat::CudaMat;
use mat::{group_layout, member, stacked};
pub use options::CudaOptions;
use pool::{Mem, Pool};

/// Contexts of every `Cuda` made in this process, kept alive to its end: a model's buffers
/// and matrices are freed after its backend when they are dropped in field order, and freeing
/// into a released primary context crashed the driver (crates/cuda/NOTES.md, 2026-11-29).
static CONTEXTS: Mutex<Vec<Arc<CudaContext>>> = Mutex::new(Vec::new());

/// The CUDA backend: one device, its compute stream and its compiled kernels, and the
/// routed experts' residency tier when one is enabled.
pub struct Cuda {
    pool: Arc<Pool>,
    /// Code widths of the uploaded `mp` matrices, for producers preparing x (prep.rs).
    widths: prep::Widths,
    tier: TierCell<Cuda>,
    /// The routing's readback in page-locked memory (moe.rs).
    staging: moe::Staging,
    /// The last one-token `routes_host` found its layer resident (routed on the device): the
    /// next one-token routing is not staged for readback (a hint; a wrong guess costs a plain
    /// read).
    routes_resident: AtomicBool,
    dev: Device,
}

fn ce(e: crate::CudaError) -> Error {
    core_error(e)
}

impl Drop for Cuda {
    fn drop(&mut self) {
        // Its fields' device memory, pinned memory and events are freed right after, on this
        // thread: into its context (kept alive in CONTEXTS), made current here.
        let _ = self.dev.bind();
    }
}

impl Cuda {
    /// Opens CUDA device `ordinal` (compiling the kernels on first use). Fails with
    /// `CudaError::NoDevice` on a machine without a driver or GPU.
    pub fn new(ordinal: usize) -> crate::Result<Cuda> {
        let dev = Device::new(ordinal)?;
        dev.bind()?;
        let mut kept = CONTEXTS.lock().unwrap_or_else(|p| p.into_inner());
        if !kept.iter().any(|c| Arc::ptr_eq(c, &dev.ctx)) {
            kept.push(dev.ctx.clone());
        }
        Ok(Cuda {
            pool: Arc::new(Pool::new(dev.ctx.clone())),
            widths: prep::Widths::default(),
            tier: TierCell::default(),
            staging: moe::Staging::new(&dev)?,
            routes_resident: AtomicBool::new(false),
            dev,
        })
    }

    /// `model` (loaded on the CPU) on CUDA device `ordinal`: its weights uploaded, its experts
    /// read through it (`SharedExperts`) into the residency tier of [`CudaOptions::default`]
    /// (free VRAM less the reserve; LRU).
    pub fn load(model: Arc<Model>, ordinal: usize) -> crate::Result<Model<Cuda>> {
        let opts = CudaOptions {
            device: ordinal,
            ..CudaOptions::default()
        };
        Cuda::load_with(model, &opts, CachePolicy::Lru)
    }

    /// `model` on the device `opts.device`, its routed experts kept in VRAM slots
    /// (`opts.expert_cache_bytes`, or the free VRAM after the dense weights less
    /// `opts.reserve_bytes`) under `policy`, with `opts.host_cache_bytes` of pinned host slots
    /// between them and the model's `ExpertSource`. [`Cuda::preload`] fills them all when
    /// they fit.
    pub fn load_with(
        model: Arc<Model>,
        opts: &CudaOptions,
        policy: CachePolicy,
    ) -> crate::Result<Model<Cuda>> {
        let be = Cuda::new(opts.device)?;
        let m = model.to_backend(be, Box::new(SharedExperts(model.clone())))?;
        let moe = moe_layers(&m);
        if !moe.is_empty() {
            let (e, k) = (m.cfg.num_experts, m.top_k);
            m.be.enable_residency(&*m.experts, &moe, e, k, opts, policy)?;
        }
        Ok(m)
    }

    /// Routes the experts of `moe_layers` (`num_experts` each, `top_k` per token) through a
    /// residency tier sized by `opts` (see [`Cuda::load_with`]); replaces an earlier tier.
    pub fn enable_residency(
        &self,
        source: &dyn ExpertSource,
        moe_layers: &[usize],
        num_experts: usize,
        top_k: usize,
        opts: &CudaOptions,
        policy: CachePolicy,
    ) -> crate::Result<()> {
        let Some(layout) = first_layout(source, moe_layers)? else {
            return Ok(());
        };
        self.dev.bind()?;
        let (free, _) = self.dev.mem_info()?;
        let want = opts
            .expert_cache_bytes
            .unwrap_or_else(|| free.saturating_sub(opts.reserve_bytes));
        // One batch: a token's experts, and up to a launch's worth of a prompt's.
        let group = top_k.max(MAXP).min(num_experts).max(1);
        // At least one expert: the middle tier also stages the misses (pinned memory, one
        // DMA each).
        let host_experts = (opts.host_cache_bytes / layout.slot).max(1);
        let spec = TierSpec::within(
            want,
            layout.slot,
            moe_layers.len(),
            num_experts,
            top_k,
            group,
            policy,
            host_experts,
        );
        let mut tier = self.tier.lock();
        if tier.is_some() {
            // The old tier's memory goes back before the new one is allocated, once no queued
            // work reads it.
            self.dev.sync()?;
            *tier = None;
        }
        *tier = Some(Residency::new(
            self,
            layout,
            &spec,
            moe_layers,
            num_experts,
        )?);
        Ok(())
    }

    /// Fills every routed expert of `m` into VRAM when they all fit ("all in VRAM"): from then
    /// on every MoE layer runs without reading its routing back. Returns whether every layer
    /// is resident.
    pub fn preload(m: &Model<Cuda>) -> crate::Result<bool> {
        m.be.preload_experts(&*m.experts, &moe_layers(m))
    }

    /// [`Cuda::preload`] for experts not of a `Model` (tests): fills every expert of `layers`
    /// from `source` when they all fit; returns whether every layer is resident.
    pub fn preload_experts(
        &self,
        source: &dyn ExpertSource,
        layers: &[usize],
    ) -> crate::Result<bool> {
        let mut tier = self.tier.lock();
        let Some(t) = tier.as_mut() else {
            return Ok(false);
        };
        t.preload(self, source, layers)?;
        Ok(layers.iter().all(|&l| t.layer_resident(l)))
    }

    /// The tier's counters, when one is enabled.
    pub fn tier_stats(&self) -> Option<TierStats> {
        self.tier.stats()
    }

    /// The tier's sizes, when one is enabled.
    pub fn tier_info(&self) -> Option<TierInfo> {
        self.tier.info()
    }

    /// Whether `layer`'s experts are all resident and looked up on the device.
    fn layer_resident(&self, layer: usize) -> bool {
        let tier = self.tier.lock();
        tier.as_ref().is_some_and(|t| t.layer_resident(layer))
    }

    pub fn device(&self) -> &Device {
        &self.dev
    }

    fn bind(&self) -> Result<&Device> {
        self.dev.bind().map_err(ce)?;
        Ok(&self.dev)
    }

    /// Room for `n` elements from the pool (contents undefined).
    fn mem(&self, n: usize) -> Result<Mem> {
        let buf = self.pool.take(&self.dev, n * 4).map_err(ce)?;
        Ok(Mem {
            buf,
            pool: self.pool.clone(),
        })
    }

    /// `n` elements from the pool (contents undefined).
    fn buf(&self, n: usize) -> Result<CudaBuf> {
        Ok(CudaBuf {
            mem: Arc::new(self.mem(n)?),
            off: 0,
            len: n,
            prep: [None, None],
        })
    }

    /// Makes room for `n` elements in `b`, keeping its live ones (capacity doubles).
    fn grow(&self, b: &mut CudaBuf, n: usize) -> Result<()> {
        if b.cap() >= n {
            return Ok(());
        }
        let mem = self.mem(n.max(2 * b.cap()))?;
        if b.len > 0 {
            let c = &self.dev.compute;
            self.dev
                .dtod_async(mem.ptr(), b.ptr(), b.len * 4, c)
                .map_err(ce)?;
        }
        (b.mem, b.off) = (Arc::new(mem), 0);
        b.written();
        Ok(())
    }

    /// `dst[..n] = src[..n]` on the compute stream.
    fn copy(&self, dst: u64, src: u64, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.dev
            .dtod_async(dst, src, n * 4, &self.dev.compute)
            .map_err(ce)
    }
}

impl Backend for Cuda {
    type Buf = CudaBuf;
    type Mat = CudaMat;
    type Routes = CudaRoutes;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn alloc(&self, n: usize) -> Result<CudaBuf> {
        let dev = self.bind()?;
        let b = self.buf(n)?;
        if n > 0 {
            dev.memset_async(b.ptr(), n * 4).map_err(ce)?;
        }
        Ok(b)
    }

    fn scratch(&self, n: usize) -> Result<CudaBuf> {
        // No bind: a pool hit touches no driver state, a miss binds before allocating.
        self.buf(n)
    }

    fn upload(&self, v: &[f32]) -> Result<CudaBuf> {
        let dev = self.bind()?;
        let b = self.buf(v.len())?;
        dev.write_async(b.ptr(), bytemuck::cast_slice(v))
            .map_err(ce)?;
        Ok(b)
    }

    fn download(&self, b: &CudaBuf) -> Result<Vec<f32>> {
        let dev = self.bind()?;
        let mut out = vec![0f32; b.len];
        if b.len > 0 {
            dev.read_f32(b.ptr(), &mut out).map_err(ce)?;
        }
        Ok(out)
    }

    fn buf_len(&self, b: &CudaBuf) -> usize {
        b.len
    }

    fn copy_buf(&self, b: &CudaBuf) -> Result<CudaBuf> {
        self.bind()?;
        let out = self.buf(b.len)?;
        self.copy(out.ptr(), b.ptr(), b.len)?;
        Ok(out)
    }

    fn upload_mat(&self, w: &Linear) -> Result<CudaMat> {
        let dev = self.bind()?;
        let d = ops::upload_rows(dev, &[(w, 0, w.rows())]).map_err(ce)?;
        self.widths.note(&d.m);
        Ok(CudaMat::alone(d))
    }

    fn upload_group(&self, ws: &[&Linear]) -> Result<Vec<CudaMat>> {
        let dev = self.bind()?;
        match group_layout(ws) {
            Some(rows0) => {
                let parts: Vec<_> = ws.iter().map(|w| (*w, 0, w.rows())).collect();
                let whole = Arc::new(ops::upload_rows(dev, &parts).map_err(ce)?);
                self.widths.note(&whole.m);
                Ok(ws
                    .iter()
                    .zip(rows0)
                    .map(|(w, row0)| CudaMat {
                        m: member(&whole.m, row0, w.rows()),
                        whole: whole.clone(),
                        row0,
                    })
                    .collect())
            }
            None => ws.iter().map(|w| self.upload_mat(w)).collect(),
        }
    }

    fn mat_shape(&self, w: &CudaMat) -> (usize, usize) {
        (w.m.rows, w.m.cols)
    }

    fn alloc_routes(&self, t: usize, k: usize) -> Result<CudaRoutes> {
        // router_topk writes both whole; back to back, one read brings both to the host.
        let both = self.scratch(2 * t * k)?;
        Ok(CudaRoutes {
            ids: both.view(0, t * k),
            wts: both.view(t * k, t * k),
            staged: 0,
            t,
            k,
        })
    }

    fn matmul(&self, w: &CudaMat, x: &CudaBuf, t: usize, y: &mut CudaBuf) -> Result<()> {
        let dev = self.bind()?;
        let m = &w.m;
        room("matmul", "x", x, t * m.cols)?;
        room("matmul", "y", y, t * m.rows)?;
        y.written();
        if t > 1 && self.gemm_products(&[m], x.ptr(), t, &[y.ptr()])? {
            return Ok(());
        }
        let pre = x.prepared_for(m).filter(|_| t == 1);
        let p = [(m.w, m.s, m.b, x.ptr(), y.ptr())];
        ops::matvec_batch_prepared(dev, &dev.compute, m, &p, t, m.cols, m.rows, pre).map_err(ce)
    }

    fn embed(&self, table: &CudaMat, ids: &[u32], out: &mut CudaBuf) -> Result<()> {
        out.written();
        let dev = self.bind()?;
        let (rows, h) = (table.m.rows, table.m.cols);
        room("embed", "out", out, ids.len() * h)?;
        for (i, &id) in ids.iter().enumerate() {
            if id as usize >= rows {
                return Err(Error::TokenOutOfRange { id, vocab: rows });
            }
            ops::embed_row(dev, &table.m, id as usize, out.at(i * h)).map_err(ce)?;
        }
        Ok(())
    }

    fn rmsnorm(&self, x: &CudaBuf, w: &CudaBuf, eps: f32, out: &mut CudaBuf) -> Result<()> {
        let dev = self.bind()?;
        let n = w.len;
        let rows = x.len.checked_div(n).unwrap_or(0);
        room("rmsnorm", "out", out, rows * n)?;
        out.written();
        if rows == 0 {
            return Ok(());
        }
        // One row: prepared for the most used width too (the kernel takes one).
        let prep = if rows == 1 {
            self.prep_room(n, 1)?
        } else {
            [None, None]
        };
        let pre = Cuda::prep_args(&prep)[0];
        let (xp, wp, op) = (x.ptr(), w.ptr(), out.ptr());
        ops::rmsnorm_rows(dev, xp, n, wp, op, n, n, rows, eps, pre).map_err(ce)?;
        out.attach(prep);
        Ok(())
    }

    fn add(&self, x: &mut CudaBuf, d: &CudaBuf) -> Result<()> {
        x.written();
        let dev = self.bind()?;
        room("add", "d", d, x.len)?;
        if x.len == 0 {
            return Ok(());
        }
        ops::add_rows_gated(dev, x.ptr(), d.ptr(), 0, 0, 1, x.len).map_err(ce)
    }

    fn copy_rows(
        &self,
        src: &CudaBuf,
        width: usize,
        row0: usize,
        n: usize,
        dst: &mut CudaBuf,
    ) -> Result<()> {
        dst.written();
        self.bind()?;
        room("copy_rows", "src", src, (row0 + n) * width)?;
        room("copy_rows", "dst", dst, n * width)?;
        self.copy(dst.ptr(), src.at(row0 * width), n * width)
    }

    fn qk_norm_rope(
        &self,
        qg: &CudaBuf,
        k: &mut CudaBuf,
        q_norm: &CudaBuf,
        k_norm: &CudaBuf,
        s: &AttnShape,
        pos0: usize,
        t: usize,
        q: &mut CudaBuf,
        gate: &mut CudaBuf,
    ) -> Result<()> {
        k.written();
        q.written();
        gate.written();
        let dev = self.bind()?;
        room("qk_norm_rope", "qg", qg, t * s.q_rows())?;
        room("qk_norm_rope", "k", k, t * s.kv_width())?;
        room("qk_norm_rope", "q", q, t * s.o_width())?;
        if s.gated {
            room("qk_norm_rope", "gate", gate, t * s.o_width())?;
        }
        if t == 0 {
            return Ok(());
        }
        let (qn, kn) = (q_norm.ptr(), k_norm.ptr());
        launch::qk_norm_rope(
            dev,
            s,
            qg.ptr(),
            k.ptr(),
            qn,
            kn,
            pos0,
            t,
            q.ptr(),
            gate.ptr(),
        )
        .map_err(ce)
    }

    fn attention(
        &self,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        kc: &mut CudaBuf,
        vc: &mut CudaBuf,
        s: &AttnShape,
        pos0: usize,
        t: usize,
        o: &mut CudaBuf,
    ) -> Result<()> {
        o.written();
        self.bind()?;
        room("attention", "q", q, t * s.o_width())?;
        room("attention", "o", o, t * s.o_width())?;
        self.append_kv("attention", k, v, kc, vc, s, pos0, t)?;
        // A prompt in one launch (prefill_mixers.rs); one token, or a shape it does not take,
        // one attn_decode per row.
        if t > 1 && self.attention_prefill(q, kc, vc, None, s, pos0, t, o)? {
            return Ok(());
        }
        self.attention_rows(q, kc, vc, s, pos0, t, o)
    }

    fn gated_output(&self, o: &mut CudaBuf, gate: &CudaBuf) -> Result<()> {
        o.written();
        let dev = self.bind()?;
        room("gated_output", "gate", gate, o.len)?;
        if o.len == 0 {
            return Ok(());
        }
        launch::mul_sigmoid(dev, o.ptr(), gate.ptr(), o.len).map_err(ce)
    }

    fn gdn_conv(
        &self,
        mixed: &CudaBuf,
        state: &mut CudaBuf,
        conv_w: &CudaBuf,
        s: &GdnShape,
        t: usize,
        u: &mut CudaBuf,
    ) -> Result<()> {
        state.written();
        u.written();
        let dev = self.bind()?;
        let cd = s.conv_dim();
        room("gdn_conv", "mixed", mixed, t * cd)?;
        room("gdn_conv", "state", state, s.conv_state_len())?;
        room("gdn_conv", "conv_w", conv_w, cd * s.kconv)?;
        room("gdn_conv", "u", u, t * cd)?;
        if t == 0 {
            return Ok(());
        }
        let (m, st, w) = (mixed.ptr(), state.ptr(), conv_w.ptr());
        launch::gdn_conv_rows(dev, m, st, w, cd, s.kconv, t, u.ptr()).map_err(ce)
    }

    fn gdn_recurrent(
        &self,
        u: &CudaBuf,
        b: &CudaBuf,
        a: &CudaBuf,
        dt_bias: &CudaBuf,
        neg_a: &CudaBuf,
        state: &mut CudaBuf,
        s: &GdnShape,
        t: usize,
        o: &mut CudaBuf,
    ) -> Result<()> {
        state.written();
        o.written();
        let dev = self.bind()?;
        let (cd, nv, vd) = (s.conv_dim(), s.nv, s.value_dim());
        gdn_room("gdn_recurrent", [u, b, a, dt_bias, neg_a], state, o, s, t)?;
        let g = gdn_shape(s, 0.0);
        for i in 0..t {
            // gdn_step reads the state before its dependent-launch wait: the kernel before it
            // must not be the step that writes it (the first step follows other kernels).
            if i > 0 {
                dev.fence().map_err(ce)?;
            }
            let (ui, bi, ai, oi) = (u.at(i * cd), b.at(i * nv), a.at(i * nv), o.at(i * vd));
            let (dt, na) = (dt_bias.ptr(), neg_a.ptr());
            ops::gdn_step(dev, &g, ui, bi, ai, dt, na, state.ptr(), oi).map_err(ce)?;
        }
        Ok(())
    }

    fn gdn_chunked(
        &self,
        u: &CudaBuf,
        b: &CudaBuf,
        a: &CudaBuf,
        dt_bias: &CudaBuf,
        neg_a: &CudaBuf,
        state: &mut CudaBuf,
        s: &GdnShape,
        t: usize,
        o: &mut CudaBuf,
    ) -> Result<()> {
        // The whole prompt in one launch (prefill_mixers.rs), else one gdn_step per token.
        if self.gdn_prompt(u, b, a, dt_bias, neg_a, state, s, t, o)? {
            return Ok(());
        }
        self.gdn_recurrent(u, b, a, dt_bias, neg_a, state, s, t, o)
    }

    fn gated_rmsnorm(
        &self,
        o: &CudaBuf,
        z: &CudaBuf,
        w: &CudaBuf,
        eps: f32,
        y: &mut CudaBuf,
    ) -> Result<()> {
        y.written();
        let dev = self.bind()?;
        let dv = w.len;
        let rows = o.len.checked_div(dv).unwrap_or(0);
        room("gated_rmsnorm", "z", z, rows * dv)?;
        room("gated_rmsnorm", "y", y, rows * dv)?;
        if rows == 0 {
            return Ok(());
        }
        // Prepared for the out-projection (one token's heads are one row of its input).
        let prep = if dv.is_multiple_of(32) {
            self.prep_room(rows * dv, 1)?
        } else {
            [None, None]
        };
        let pre = Cuda::prep_args(&prep)[0];
        let (op, zp, wp, yp) = (o.ptr(), z.ptr(), w.ptr(), y.ptr());
        launch::gated_rmsnorm_rows(dev, op, zp, wp, dv, rows, eps, yp, pre).map_err(ce)?;
        y.attach(prep);
        Ok(())
    }

    fn swiglu(&self, g: &CudaBuf, u: &CudaBuf, out: &mut CudaBuf) -> Result<()> {
        out.written();
        let dev = self.bind()?;
        room("swiglu", "u", u, g.len)?;
        room("swiglu", "out", out, g.len)?;
        if g.len == 0 {
            return Ok(());
        }
        launch::silu_mul(dev, g.ptr(), u.ptr(), out.ptr(), g.len).map_err(ce)
    }

    fn router_topk(
        &self,
        logits: &CudaBuf,
        ne: usize,
        k: usize,
        renorm: bool,
        out: &mut CudaRoutes,
    ) -> Result<()> {
        moe::router_topk(self, logits, ne, k, renorm, out)
    }

    fn shared_before_routing(&self) -> bool {
        true
    }

    fn routes_host<'a>(&self, r: &'a CudaRoutes, layer: usize) -> Result<Option<Cow<'a, Routes>>> {
        // A token of a resident layer: `slot_batch` reads the ids where they are.
        if r.t == 1 && r.k <= MAXP && self.layer_resident(layer) {
            self.routes_resident.store(true, Ordering::Relaxed);
            return Ok(None);
        }
        if r.t == 1 {
            self.routes_resident.store(false, Ordering::Relaxed);
        }
        moe::routes_host(self, r).map(|r| Some(Cow::Owned(r)))
    }

    fn moe_experts(
        &self,
        call: ExpertCall<'_>,
        x: &CudaBuf,
        routes: &CudaRoutes,
        host: Option<&Routes>,
        out: &mut CudaBuf,
    ) -> Result<ExpertTimes> {
        out.written();
        let mut tier = self.tier.lock();
        let Some(t) = tier.as_mut() else {
            drop(tier);
            return moe::experts(self, call, x, routes, host, out);
        };
        let owned;
        let host = match host {
            None if !t.layer_resident(call.layer) => {
                owned = moe::routes_host(self, routes)?;
                Some(&owned)
            }
            h => h,
        };
        t.run(self, call, x, routes, host, out)
    }

    fn moe_combine(
        &self,
        x: &mut CudaBuf,
        routed: &CudaBuf,
        shared: Option<&CudaBuf>,
        shared_gate: Option<&CudaBuf>,
    ) -> Result<()> {
        x.written();
        moe::combine(self, x, routed, shared, shared_gate)
    }

    fn fuses_moe(&self, layer: usize, k: usize) -> bool {
        k < MAXP && self.layer_resident(layer)
    }

    fn fused_moe(
        &self,
        m: &MoeCall<'_, Cuda>,
        routes: &mut CudaRoutes,
        x: &mut CudaBuf,
    ) -> Result<ExpertTimes> {
        x.written();
        if m.t == 1 && m.k < MAXP {
            let t0 = Instant::now();
            let mut tier = self.tier.lock();
            if let Some((layout, slots)) = tier.as_mut().and_then(|t| t.resident(m.call.layer)) {
                self.routes_resident.store(true, Ordering::Relaxed);
                self.moe_resident(layout, slots, m, routes, x)?;
                return Ok(ExpertTimes {
                    wait: Duration::ZERO,
                    compute: t0.elapsed(),
                });
            }
        }
        compose::moe(self, m, routes, x)
    }

    fn argmax(&self, x: &CudaBuf) -> Result<u32> {
        let dev = self.bind()?;
        if x.len == 0 {
            return Ok(0);
        }
        let key = self.buf(2)?;
        ops::argmax(dev, x.ptr(), x.len, key.ptr()).map_err(ce)?;
        fused::read_key(self, &key)
    }

    fn add_rmsnorm(
        &self,
        x: &mut CudaBuf,
        d: &CudaBuf,
        w: &CudaBuf,
        eps: f32,
        out: &mut CudaBuf,
    ) -> Result<()> {
        // One row (decode): one kernel updates x and norms it.
        if x.len != w.len || x.len == 0 {
            self.add(x, d)?;
            return self.rmsnorm(x, w, eps, out);
        }
        let dev = self.bind()?;
        room("add_rmsnorm", "d", d, x.len)?;
        room("add_rmsnorm", "out", out, x.len)?;
        let n = x.len;
        // Updating x in place limits the kernel to one block (the others would read the sum).
        // Where x is a whole allocation nobody else holds, the sum goes to a fresh buffer that
        // then becomes x, and the norm runs on several blocks: 4.3 us less per call on an H100
        // at hidden 4096 (the kernel trace of crates/cuda/results/ab-decode-h100-2026-12-07-*).
        // (A norm of one block, a small model's, updates x in place as before.)
        let sole = x.off == 0 && Arc::strong_count(&x.mem) == 1 && ops::norm_blocks(n) > 1;
        let fresh = if sole { Some(self.buf(n)?) } else { None };
        let res = fresh
            .as_ref()
            .map_or(ops::Residual::Update, |y| ops::Residual::Into(y.ptr()));
        x.written();
        out.written();
        let prep = self.prep_room(n, 2)?;
        let pre = Cuda::prep_args(&prep);
        let (xp, dp, wp, op) = (x.ptr(), d.ptr(), w.ptr(), out.ptr());
        ops::add_rmsnorm(dev, xp, dp, wp, op, n, eps, pre, res).map_err(ce)?;
        out.attach(prep);
        if let Some(y) = fresh {
            // The old x goes back to the pool; the compute stream orders its reuse after this
            // kernel's reads.
            *x = y;
        }
        Ok(())
    }

    fn matmul_many(
        &self,
        ws: &[&CudaMat],
        x: &CudaBuf,
        t: usize,
        ys: &mut [&mut CudaBuf],
    ) -> Result<()> {
        fused::matmul_many(self, ws, x, t, ys)
    }

    fn fused_attention(
        &self,
        qg: &CudaBuf,
        k: &mut CudaBuf,
        v: &CudaBuf,
        q_norm: &CudaBuf,
        k_norm: &CudaBuf,
        kc: &mut CudaBuf,
        vc: &mut CudaBuf,
        s: &AttnShape,
        pos0: usize,
        t: usize,
        o: &mut CudaBuf,
    ) -> Result<()> {
        k.written();
        kc.written();
        vc.written();
        o.written();
        let qkv = [qg, &*k, v];
        if fused::attention(self, qkv, q_norm, k_norm, kc, vc, s, pos0, t, o)?.is_some() {
            return Ok(());
        }
        let (qn, kn) = (q_norm, k_norm);
        if self.fused_attention_prompt(qg, k, v, qn, kn, kc, vc, s, pos0, t, o)? {
            return Ok(());
        }
        let (qn, kn) = (q_norm, k_norm);
        compose::attention(self, qg, k, v, qn, kn, kc, vc, s, pos0, t, o)
    }

    fn fused_gdn_in(
        &self,
        w: [&CudaMat; 4],
        x: &CudaBuf,
        t: usize,
        conv_w: &CudaBuf,
        state: &mut CudaBuf,
        s: &GdnShape,
        u: &mut CudaBuf,
        z: &mut CudaBuf,
        b: &mut CudaBuf,
        a: &mut CudaBuf,
    ) -> Result<()> {
        state.written();
        u.written();
        z.written();
        b.written();
        a.written();
        let outs = [&mut *u, &mut *z, &mut *b, &mut *a];
        if fused::gdn_in(self, w, x, t, conv_w, state, s, outs)?.is_some() {
            return Ok(());
        }
        compose::gdn_in(self, w, x, t, conv_w, state, s, [u, z, b, a])
    }

    fn fused_swiglu_mlp(
        &self,
        gate: &CudaMat,
        up: &CudaMat,
        down: &CudaMat,
        x: &CudaBuf,
        t: usize,
        y: &mut CudaBuf,
    ) -> Result<()> {
        y.written();
        if fused::swiglu_mlp(self, [gate, up, down], x, t, y)?.is_some() {
            return Ok(());
        }
        compose::swiglu_mlp(self, [gate, up, down], x, t, y)
    }

    fn fused_head_argmax(
        &self,
        x: &CudaBuf,
        norm: &CudaBuf,
        eps: f32,
        head: &CudaMat,
    ) -> Result<u32> {
        fused::head_argmax(self, x, norm, eps, head)
    }
}

/// The MoE layers of `m`.
fn moe_layers(m: &Model<Cuda>) -> Vec<usize> {
    (0..m.layers.len())
        .filter(|&l| matches!(m.layers[l].ffn, Ffn::Moe(_)))
        .collect()
}

/// ops.rs's shape of a GatedDeltaNet layer.
fn gdn_shape(s: &GdnShape, eps: f32) -> ops::GdnShape {
    ops::GdnShape {
        nk: s.nk,
        nv: s.nv,
        dk: s.dk,
        dv: s.dv,
        kconv: s.kconv,
        eps,
    }
}
