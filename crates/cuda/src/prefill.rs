//! Prefill on the GPU: a chunk of prompt tokens through each layer together. The mixers
//! (attention, GatedDeltaNet) still step token by token (their state is sequential), but every
//! FFN runs once per chunk: the router and the shared expert as matrix products over all the
//! chunk's rows, and each routed expert fetched once for every token routed to it (gathered
//! rows, a product, a weighted scatter back), as the CPU prefill does. With experts streamed
//! from host memory or disk, that is one read per expert per chunk instead of one per token.
//!
//! A child of model.rs (it uses the model's private layout); owns only the chunk's buffers.
use std::collections::BTreeMap;

use flashmoe_core::model::Logits;

use super::{CudaModel, CudaState, DFfn};
use crate::device::DBuf;
use crate::ops;
use crate::Result;

/// Tokens per chunk: experts are read once per chunk, and the buffers below hold this many rows
/// (about 200 MB of VRAM for the 397B shapes), so a session's default prefill step (1024) is
/// one chunk. A 1024-token prompt with experts in pageable RAM (H200, 8 layers) copied 29 GB
/// in 3.08 s, against 115 GB in 6.33 s with 256-token chunks.
pub(super) const CHUNK: usize = 2048;

/// Device buffers of one chunk, allocated at the first prefill.
pub(super) struct ChunkBufs {
    /// Residual rows [CHUNK, h] and the FFN input rows (post-norm) [CHUNK, h].
    x: DBuf,
    xn: DBuf,
    /// Router logits [CHUNK, router rows] and picks [CHUNK, k].
    rl: DBuf,
    ids: DBuf,
    wts: DBuf,
    /// Per expert of a layer: the rows routed to it and their weights, concatenated.
    rows: DBuf,
    rw: DBuf,
    /// One expert's gathered inputs [CHUNK, h], gate‖up [CHUNK, 2I], hidden [CHUNK, I],
    /// outputs [CHUNK, h].
    g: DBuf,
    gu: DBuf,
    hb: DBuf,
    ye: DBuf,
    /// The shared expert's (or dense FFN's) gate‖up [CHUNK, 2 si], hidden, outputs [CHUNK, h].
    gus: DBuf,
    hs: DBuf,
    ys: DBuf,
}

impl CudaModel<'_> {
    fn chunk_bufs(&mut self) -> Result<()> {
        if self.chunk.is_some() {
            return Ok(());
        }
        let c = CHUNK;
        let h = self.cfg.hidden_size;
        let k = self.model.top_k.max(1);
        let (mut max_e, mut max_si) = (1, 1);
        for l in &self.layers {
            match &l.ffn {
                DFfn::Moe { router, shared } => {
                    max_e = max_e.max(router.rows);
                    if let Some((gu, _)) = shared {
                        max_si = max_si.max(gu.rows / 2);
                    }
                }
                DFfn::Dense { inter, .. } => max_si = max_si.max(*inter),
            }
        }
        let ei = self.cache.as_ref().map_or(1, |c| c.layout.i);
        let dev = &self.dev;
        let f = |n: usize| dev.alloc(n * 4);
        self.chunk = Some(ChunkBufs {
            x: f(c * h)?,
            xn: f(c * h)?,
            rl: f(c * max_e)?,
            ids: f(c * k)?,
            wts: f(c * k)?,
            rows: f(c * k)?,
            rw: f(c * k)?,
            g: f(c * h)?,
            gu: f(c * 2 * ei)?,
            hb: f(c * ei)?,
            ye: f(c * h)?,
            gus: f(c * 2 * max_si)?,
            hs: f(c * max_si)?,
            ys: f(c * h)?,
        });
        Ok(())
    }

    /// Runs `tokens` (at most [`CHUNK`], at least 2) and returns the logits `want` asks for:
    /// every row's, or the last row's.
    pub(super) fn prefill_chunk(
        &mut self,
        tokens: &[u32],
        state: &mut CudaState,
        want: Logits,
    ) -> Result<Vec<f32>> {
        debug_assert!(tokens.len() <= CHUNK);
        self.chunk_bufs()?;
        let n = tokens.len();
        let h = self.cfg.hidden_size;
        let hb = (h * 4) as u64;
        let pos = state.pos;
        self.dev.record(&self.ev_tok0, &self.dev.compute)?;
        let (x, xn) = {
            let c = self.chunk.as_ref().expect("chunk buffers");
            (c.x.ptr(), c.xn.ptr())
        };
        for (t, &id) in tokens.iter().enumerate() {
            ops::embed_row(
                &self.dev,
                &self.embed.mats[0].0.m,
                id as usize,
                x + t as u64 * hb,
            )?;
        }
        for l in 0..self.layers.len() {
            self.grow_kv(&mut state.layers[l], pos, pos + n - 1)?;
            for t in 0..n {
                let r = t as u64 * hb;
                let res = ops::Residual::Update;
                self.mixer(
                    l,
                    &state.layers[l],
                    pos + t,
                    x + r,
                    xn + r,
                    [None, None],
                    res,
                )?;
            }
            self.ffn_rows(l, n)?;
        }
        state.pos += n;
        // Logits: the final norm and the head for the rows asked for, one row at a time
        // through the decode path's buffers.
        let vocab = self.cfg.vocab_size;
        let first = if want == Logits::All { 0 } else { n - 1 };
        let mut out = Vec::with_capacity((n - first) * vocab);
        for t in first..n {
            let r = t as u64 * hb;
            let s = &self.s;
            ops::rmsnorm_rows(
                &self.dev,
                x + r,
                h,
                self.final_norm.ptr(),
                s.xn.ptr(),
                h,
                h,
                1,
                self.cfg.rms_norm_eps,
                None,
            )?;
            self.lm_head.run(&self.dev, s.xn.ptr(), s.logits.ptr())?;
            if t + 1 == n {
                self.dev.record(&self.ev_tok1, &self.dev.compute)?;
            }
            self.read_logits(&mut out)?;
        }
        self.counters.tokens += n as u64;
        self.counters.compute_ms += self.dev.elapsed_ms(&self.ev_tok0, &self.ev_tok1)? as f64;
        self.collect_copy()?;
        Ok(out)
    }

    /// Layer `l`'s FFN over the chunk's `n` rows: x[t] += FFN(xn[t]).
    fn ffn_rows(&mut self, l: usize, n: usize) -> Result<()> {
        let h = self.cfg.hidden_size;
        let c = self.chunk.as_ref().expect("chunk buffers");
        let (x, xn) = (c.x.ptr(), c.xn.ptr());
        let dev = &self.dev;
        let (router, shared) = match &self.layers[l].ffn {
            DFfn::Dense { gu, down, inter } => {
                gu.run_rows(dev, xn, h, c.gus.ptr(), n)?;
                ops::swiglu(dev, c.gus.ptr(), c.hs.ptr(), *inter, n, None)?;
                down.run_rows(dev, c.hs.ptr(), *inter, c.ys.ptr(), n)?;
                return ops::add_rows_gated(dev, x, c.ys.ptr(), 0, 0, n, h);
            }
            DFfn::Moe { router, shared } => (router, shared),
        };
        let ne = self.cfg.num_experts;
        let k = self.model.top_k;
        router.run_rows(dev, xn, h, c.rl.ptr(), n)?;
        ops::router_topk_rows(
            dev,
            c.rl.ptr(),
            router.rows,
            ne,
            k,
            self.cfg.norm_topk_prob,
            c.ids.ptr(),
            c.wts.ptr(),
            n,
        )?;
        // The shared expert over every row, queued before the host waits for the picks.
        if let Some((gu, down)) = shared {
            let si = gu.rows / 2;
            gu.run_rows(dev, xn, h, c.gus.ptr(), n)?;
            ops::swiglu(dev, c.gus.ptr(), c.hs.ptr(), si, n, None)?;
            down.run_rows(dev, c.hs.ptr(), si, c.ys.ptr(), n)?;
            let sg = if router.rows > ne {
                c.rl.ptr() + (ne * 4) as u64
            } else {
                0
            };
            ops::add_rows_gated(dev, x, c.ys.ptr(), sg, router.rows, n, h)?;
        }
        let mut idf = vec![0f32; n * k];
        let mut wts = vec![0f32; n * k];
        dev.read_f32(c.ids.ptr(), &mut idf)?;
        dev.read_f32(c.wts.ptr(), &mut wts)?;
        // Rows routed to each expert, in token order; experts in id order.
        let mut by_expert: BTreeMap<usize, (Vec<i32>, Vec<f32>)> = BTreeMap::new();
        for (j, (f, w)) in idf.iter().zip(&wts).enumerate() {
            let e = f.to_bits() as usize;
            if e >= ne {
                return Err(crate::CudaError::Invalid(format!(
                    "router picked expert {e} of {ne}"
                )));
            }
            let ent = by_expert.entry(e).or_default();
            ent.0.push((j / k) as i32);
            ent.1.push(*w);
        }
        let experts: Vec<usize> = by_expert.keys().copied().collect();
        let (mut rows, mut rw, mut at) = (Vec::new(), Vec::new(), Vec::new());
        for (r, w) in by_expert.values() {
            at.push(rows.len());
            rows.extend_from_slice(r);
            rw.extend_from_slice(w);
        }
        dev.write(c.rows.ptr(), bytemuck::cast_slice(&rows))?;
        dev.write(c.rw.ptr(), bytemuck::cast_slice(&rw))?;
        // Experts k at a time (the host tier holds at least k); a group's VRAM slots may be
        // reused by the next group's misses, so the compute stream finishes a group first.
        let group = k.max(1);
        for (gi, ids) in experts.chunks(group).enumerate() {
            if gi > 0 {
                self.dev.sync()?;
            }
            let ptrs = self.load_experts(l, ids)?;
            let lay = self.cache.as_ref().expect("cache").layout;
            let c = self.chunk.as_ref().expect("chunk buffers");
            let dev = &self.dev;
            for (j, (&e, &p)) in ids.iter().zip(&ptrs).enumerate() {
                let nr = by_expert[&e].0.len();
                let o = (at[gi * group + j] * 4) as u64;
                let (gu, dn) = lay.mats(p);
                ops::gather_rows(dev, xn, h, c.rows.ptr() + o, nr, h, c.g.ptr())?;
                let pg = [(gu.w, gu.s, gu.b, c.g.ptr(), c.gu.ptr())];
                ops::matvec_batch(dev, &dev.compute, &gu, &pg, nr, h, gu.rows)?;
                ops::swiglu(dev, c.gu.ptr(), c.hb.ptr(), lay.i, nr, None)?;
                let pd = [(dn.w, dn.s, dn.b, c.hb.ptr(), c.ye.ptr())];
                ops::matvec_batch(dev, &dev.compute, &dn, &pd, nr, lay.i, h)?;
                ops::scatter_add_rows(
                    dev,
                    x,
                    h,
                    c.rows.ptr() + o,
                    c.rw.ptr() + o,
                    nr,
                    h,
                    c.ye.ptr(),
                )?;
            }
        }
        Ok(())
    }
}
