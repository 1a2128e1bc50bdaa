//! [`Cuda`] as a [`SlotBackend`]: core's residency tier (`flashmoe_core::residency`) over
//! VRAM slots in one device slab, laid out as `SlotLayout` says ([gate‖up] w, s, b then
//! down w, s, b), and a middle tier of
//! page-locked host slots of the same layout.
//!
//! - Fills: misses are staged into their host slots on several cores and each copied on the
//!   copy stream as soon as it is staged; a middle-tier hit is one DMA. The copy stream first
//!   waits for the compute stream's earlier work (a slot an earlier batch reads may be the one
//!   refilled), and the compute stream waits for the copies. Host slots are rewritten only
//!   after the previous fill's copies out of them are done.
//! - Batches with the routing on the host: one token runs the experts as one batched gate‖up
//!   launch, SwiGLU and one batched down launch, combined with their
//!   weights; a prompt runs each expert over its gathered tokens and scatters the weighted
//!   rows back.
//! - Resident layers: the router's ids stay on the device; `slot_batch` writes the two
//!   problem batches from them and the layer's slot table, and the indirect matvecs read them
//!   (the all-in-VRAM path), so the token has no host round-trip.
use std::collections::HashMap;

use rayon::prelude::*;

use flashmoe_core::backend::{Backend, MoeCall, Routes};
use flashmoe_core::experts::ExpertWeights;
use flashmoe_core::residency::{Fill, FillFrom, SlotBackend, SlotBatch, SlotLayout, SlotRouting};
use flashmoe_core::{Error, Result};

use super::layout::Layout;
use super::{ce, moe, room, stacked, Cuda, CudaBuf, CudaRoutes};
use crate::device::{DBuf, Event, ExpertBatchArgs, MvBatch, Pinned, MAXP};
use crate::ops::{self, DevMat};

/// Expert slots in VRAM.
pub struct CudaSlots {
    slab: DBuf,
    n: usize,
    /// The slots' layout with the kernels' format.
    lay: Layout,
    /// Published layers, by layer index (looked up once per MoE layer of a token): slot base
    /// per expert on the device (u64, what `slot_batch` reads), and the slots on the host
    /// (for batches that bring the routing to the host).
    tables: Vec<Option<(DBuf, Vec<usize>)>>,
    /// Recorded on the compute stream before a fill's copies, which wait for it.
    before: Event,
    /// Recorded on the copy stream after a fill's copies; the compute stream waits for it.
    copied: Event,
    /// A fill's copies were queued since `copied` was last waited for on the host.
    pending: bool,
}

/// Expert slots in page-locked host memory (the middle tier).
pub struct CudaHostSlots {
    slab: Pinned,
    slot: usize,
}

impl CudaHostSlots {
    fn slot(&self, i: usize) -> Result<&[u8]> {
        let n = self.slab.len() / self.slot.max(1);
        if i >= n {
            return Err(Error::Invalid(format!("host expert slot {i} of {n}")));
        }
        Ok(&self.slab.as_slice()[i * self.slot..(i + 1) * self.slot])
    }
}

impl CudaSlots {
    /// Device address of slot `i`.
    fn base(&self, i: usize, layout: &SlotLayout) -> Result<u64> {
        if i >= self.n {
            return Err(Error::Invalid(format!("expert slot {i} of {}", self.n)));
        }
        Ok(self.slab.ptr() + (i * layout.slot) as u64)
    }

    /// The published table of `layer` (device and host), if it was published.
    fn table(&self, layer: usize) -> Option<&(DBuf, Vec<usize>)> {
        self.tables.get(layer)?.as_ref()
    }

    /// (gate‖up `[2I, H]`, down `[H, I]`) of the expert in slot `i`.
    pub(super) fn mats(&self, i: usize, layout: &SlotLayout) -> Result<(DevMat, DevMat)> {
        Ok(self.lay.mats(self.base(i, layout)?))
    }
}

/// Whether the one-token indirect matvec (`mvi`/`mpi`/`mt*i` kernels) runs `m`'s shape.
fn indirect_fits(m: &DevMat) -> bool {
    m.fmt
        .kernel(true, m.rows, m.cols)
        .is_ok_and(|(k, _)| k.indirect().is_some())
}

impl Cuda {
    /// Stages `stage` (host slot, expert, device address) into their host slots in parallel,
    /// each copied on the copy stream as soon as it is staged.
    fn stage(
        &self,
        layout: &SlotLayout,
        host: &mut CudaHostSlots,
        stage: &[(usize, &ExpertWeights, u64)],
    ) -> Result<()> {
        let dev = &self.dev;
        let want: HashMap<usize, (&ExpertWeights, u64)> =
            stage.iter().map(|&(hs, w, dst)| (hs, (w, dst))).collect();
        if want.len() != stage.len() {
            return Err(Error::Invalid("one host slot staged twice".into()));
        }
        let slot = host.slot;
        host.slab
            .as_mut_slice()
            .par_chunks_mut(slot)
            .enumerate()
            .filter_map(|(i, buf)| want.get(&i).map(|&(w, dst)| (buf, w, dst)))
            .try_for_each(|(buf, w, dst)| -> Result<()> {
                layout.stage(w, buf)?;
                dev.bind().map_err(ce)?;
                dev.htod_async_bytes(dst, buf, &dev.copy).map_err(ce)
            })
    }

    /// Experts `experts[j]` in slots `ids[j]` over their tokens of `hr` (host routing), added
    /// to `out`.
    #[allow(clippy::too_many_arguments)]
    fn slots_host(
        &self,
        layout: &SlotLayout,
        slots: &CudaSlots,
        hr: &Routes,
        experts: &[usize],
        ids: &[usize],
        x: &CudaBuf,
        out: &mut CudaBuf,
    ) -> Result<()> {
        let dev = &self.dev;
        let (h, i) = (layout.hidden, layout.inter);
        let n = experts.len();
        if n == 0 {
            return Ok(());
        }
        if hr.tokens() == 1 {
            // One token: every expert is one problem of the same two batched launches.
            let (gue, he, ye) = (self.buf(n * 2 * i)?, self.buf(n * i)?, self.buf(n * h)?);
            let (mut gp, mut dp, mut w) = (Vec::new(), Vec::new(), Vec::new());
            for (j, (&e, &s)) in experts.iter().zip(ids).enumerate() {
                let (gu, dn) = slots.mats(s, layout)?;
                gp.push((gu.w, gu.s, gu.b, x.ptr(), gue.at(j * 2 * i)));
                dp.push((dn.w, dn.s, dn.b, he.at(j * i), ye.at(j * h)));
                w.push(hr.tokens_of(e).first().map_or(0.0, |&(_, wt)| wt));
            }
            let (gu0, dn0) = slots.mats(ids[0], layout)?;
            let c = &dev.compute;
            // x as its norm prepared it (prep.rs); SwiGLU prepares each h for the down launch.
            let (pre_gu, pre_dn) = if n <= MAXP {
                (x.prepared_for(&gu0), down_prepared(self, &dn0, i))
            } else {
                (None, None)
            };
            let (gc, gr, dc, dr) = (gu0.cols, gu0.rows, dn0.cols, dn0.rows);
            ops::matvec_batch_prepared(dev, c, &gu0, &gp, 1, gc, gr, pre_gu).map_err(ce)?;
            ops::swiglu(dev, gue.ptr(), he.ptr(), i, n, pre_dn).map_err(ce)?;
            ops::matvec_batch_prepared(dev, c, &dn0, &dp, 1, dc, dr, pre_dn).map_err(ce)?;
            let wb = self.upload(&w)?;
            let (op, yp, wp) = (out.ptr(), ye.ptr(), wb.ptr());
            return ops::moe_combine(dev, op, yp, wp, n, 0, 0, 0, h).map_err(ce);
        }
        // A prompt on the tensor cores: every expert in one launch per product (gemm.rs).
        if self.gemm_experts(layout, slots, hr, experts, ids, x, out)? {
            return Ok(());
        }
        // A prompt: each expert over its tokens, gathered; the weighted rows scattered back
        // (an expert's tokens are distinct rows, so the scatter has no conflicting adds). Every
        // expert's rows and weights go up in one copy (row ids first, then the weights).
        let per: Vec<Vec<(usize, f32)>> = experts.iter().map(|&e| hr.tokens_of(e)).collect();
        let total: usize = per.iter().map(Vec::len).sum();
        let mut meta = Vec::with_capacity(2 * total);
        meta.extend(
            per.iter()
                .flatten()
                .map(|&(ti, _)| f32::from_bits(ti as u32)),
        );
        meta.extend(per.iter().flatten().map(|&(_, w)| w));
        let meta = self.upload(&meta)?;
        let mut off = 0;
        for (toks, &s) in per.iter().zip(ids) {
            let nr = toks.len();
            if nr == 0 {
                continue;
            }
            let (rb, wb) = (meta.view(off, nr), meta.view(total + off, nr));
            off += nr;
            let (gu, dn) = slots.mats(s, layout)?;
            let xg = self.buf(nr * h)?;
            ops::gather_rows(dev, x.ptr(), h, rb.ptr(), nr, h, xg.ptr()).map_err(ce)?;
            let (gue, he, ye) = (self.buf(nr * 2 * i)?, self.buf(nr * i)?, self.buf(nr * h)?);
            let c = &dev.compute;
            let gp = [(gu.w, gu.s, gu.b, xg.ptr(), gue.ptr())];
            ops::matvec_batch(dev, c, &gu, &gp, nr, h, 2 * i).map_err(ce)?;
            ops::swiglu(dev, gue.ptr(), he.ptr(), i, nr, None).map_err(ce)?;
            let dp = [(dn.w, dn.s, dn.b, he.ptr(), ye.ptr())];
            ops::matvec_batch(dev, c, &dn, &dp, nr, i, h).map_err(ce)?;
            let (op, rp, wp, yp) = (out.ptr(), rb.ptr(), wb.ptr(), ye.ptr());
            ops::scatter_add_rows(dev, op, h, rp, wp, nr, h, yp).map_err(ce)?;
        }
        Ok(())
    }

    /// One token of a published layer: `slot_batch` turns the router's ids (on the device)
    /// into the two problem batches through the layer's slot table `tbl`; no host round-trip.
    fn slots_resident(
        &self,
        layout: &SlotLayout,
        slots: &CudaSlots,
        tbl: u64,
        x: &CudaBuf,
        routes: &CudaRoutes,
        out: &mut CudaBuf,
    ) -> Result<()> {
        let dev = &self.dev;
        let (h, i, k) = (layout.hidden, layout.inter, routes.k);
        let (a, [gue, he, ye, pb]) = self.expert_batch(layout, tbl, x, k)?;
        let psz = std::mem::size_of::<MvBatch>();
        let (gu0, dn0) = slots.mats(0, layout)?;
        ops::slot_batch(dev, routes.ids.ptr(), k, a, pb.ptr()).map_err(ce)?;
        // Right after slot_batch, which wrote the batch it reads.
        // x as its norm prepared it (prep.rs); SwiGLU prepares each h for the down launch.
        let (pre_gu, pre_dn) = if k <= MAXP {
            (x.prepared_for(&gu0), down_prepared(self, &dn0, i))
        } else {
            (None, None)
        };
        ops::matvec_indirect(dev, &gu0, pb.ptr(), k, pre_gu, true).map_err(ce)?;
        ops::swiglu(dev, gue.ptr(), he.ptr(), i, k, pre_dn).map_err(ce)?;
        let pd = pb.ptr() + psz as u64;
        ops::matvec_indirect(dev, &dn0, pd, k, pre_dn, false).map_err(ce)?;
        let (op, yp, wp) = (out.ptr(), ye.ptr(), routes.wts.ptr());
        ops::moe_combine(dev, op, yp, wp, k, 0, 0, 0, h).map_err(ce)
    }
}

impl Cuda {
    /// [`Backend::fused_moe`] for one token of a published layer (the all-in-VRAM MoE
    /// block): `router_experts` (top-k, and the two problem batches from the
    /// layer's slot table), the shared expert as problem K of the experts' two batched
    /// launches when it has their shape and format (else on its own first), and one
    /// `moe_combine` adding the weighted experts and the gated shared expert to `x`.
    pub(super) fn moe_resident(
        &self,
        layout: &SlotLayout,
        slots: &CudaSlots,
        m: &MoeCall<'_, Cuda>,
        routes: &mut CudaRoutes,
        x: &mut CudaBuf,
    ) -> Result<()> {
        let dev = self.bind()?;
        let (h, i, k, ne) = (layout.hidden, layout.inter, m.k, m.ne);
        let (tbl, _) = slots.table(m.call.layer).ok_or_else(|| {
            Error::Invalid(format!(
                "cuda fused_moe: layer {} was not published",
                m.call.layer
            ))
        })?;
        if k == 0 || k > ne {
            return Err(Error::Invalid(format!(
                "cuda fused_moe: top {k} of {ne} experts"
            )));
        }
        room("fused_moe", "logits", m.logits, ne)?;
        room("fused_moe", "xn", m.xn, h)?;
        room("fused_moe", "x", x, h)?;
        if routes.ids.len < k {
            *routes = self.alloc_routes(1, k)?;
        }
        (routes.t, routes.k, routes.staged) = (1, k, 0);
        let (gu0, dn0) = slots.mats(0, layout)?;
        // The shared expert as one more problem when it has the experts' shape and format.
        let batched = match m.shared {
            Some([g, u, d]) if k < MAXP => stacked(&[g, u])
                .copied()
                .filter(|gu| gu.same_shape(&gu0) && d.m.same_shape(&dn0))
                .map(|gu| (gu, d.m)),
            _ => None,
        };
        // Otherwise on its own, first (the indirect launches follow the batch writer).
        let mut own = None;
        if let (Some([g, u, d]), None) = (m.shared, batched) {
            let mut ys = self.scratch(h)?;
            self.fused_swiglu_mlp(g, u, d, m.xn, 1, &mut ys)?;
            own = Some(ys);
        }
        let np = k + batched.is_some() as usize;
        let (mut a, [gue, he, ye, pb]) = self.expert_batch(layout, tbl.ptr(), m.xn, np)?;
        let psz = std::mem::size_of::<MvBatch>();
        if let Some((g, d)) = batched {
            a.sh = [g.w, g.s, g.b, d.w, d.s, d.b];
        }
        let (lg, ids, wts) = (m.logits.ptr(), routes.ids.ptr(), routes.wts.ptr());
        ops::router_experts(dev, lg, ne, k, m.renorm, ids, wts, a, pb.ptr()).map_err(ce)?;
        // Right after router_experts, which wrote the batch it reads.
        // xn as its norm prepared it (prep.rs); SwiGLU prepares each h for the down launch.
        let (pre_gu, pre_dn) = (m.xn.prepared_for(&gu0), down_prepared(self, &dn0, i));
        ops::matvec_indirect(dev, &gu0, pb.ptr(), np, pre_gu, true).map_err(ce)?;
        ops::swiglu(dev, gue.ptr(), he.ptr(), i, np, pre_dn).map_err(ce)?;
        let pd = pb.ptr() + psz as u64;
        ops::matvec_indirect(dev, &dn0, pd, np, pre_dn, false).map_err(ce)?;
        let ys = match (&own, batched) {
            (Some(b), _) => b.ptr(),
            (None, Some(_)) => ye.at(k * h),
            (None, None) => 0,
        };
        let sg = m.shared_gate.map_or(0, |g| g.ptr());
        let (xp, yp) = (x.ptr(), ye.ptr());
        ops::moe_combine(dev, xp, yp, wts, k, ys, sg, 0, h).map_err(ce)
    }
}

impl Cuda {
    /// The arguments of a kernel writing the two problem batches of `np` experts over `xn`
    /// from slot table `tbl`, and the buffers they name: gate‖up outputs, h, the experts'
    /// outputs `[np, H]`, the two batches.
    fn expert_batch(
        &self,
        layout: &SlotLayout,
        tbl: u64,
        xn: &CudaBuf,
        np: usize,
    ) -> Result<(ExpertBatchArgs, [CudaBuf; 4])> {
        let (h, i) = (layout.hidden, layout.inter);
        let (gue, he, ye) = (self.buf(np * 2 * i)?, self.buf(np * i)?, self.buf(np * h)?);
        let pb = self.buf((2 * std::mem::size_of::<MvBatch>()).div_ceil(4))?;
        let mut a = ExpertBatchArgs {
            tbl,
            xn: xn.ptr(),
            gue: gue.ptr(),
            he: he.ptr(),
            ye: ye.ptr(),
            i: i as i32,
            h: h as i32,
            ..Default::default()
        };
        for (o, &v) in a.off.iter_mut().zip(&layout.offsets) {
            *o = v as i64;
        }
        Ok((a, [gue, he, ye, pb]))
    }
}

/// Where SwiGLU prepares each problem's h for the experts' down launch (`mp` kernel): the
/// device's prepared-x scratch, one h of `inter` per problem.
fn down_prepared(be: &Cuda, dn: &DevMat, inter: usize) -> Option<ops::Prepared> {
    let bits = dn.prepared_bits().filter(|_| ops::epilogues())?;
    Some(ops::Prepared {
        at: be.dev.qx.ptr(),
        bits,
        qb: ops::qx_size(bits, inter),
    })
}

impl SlotBackend for Cuda {
    type Slots = CudaSlots;
    type HostSlots = CudaHostSlots;

    fn alloc_slots(&self, layout: &SlotLayout, n: usize) -> Result<CudaSlots> {
        let dev = self.bind()?;
        Ok(CudaSlots {
            slab: dev.alloc(n * layout.slot).map_err(ce)?,
            n,
            lay: Layout::from_slot(*layout).map_err(ce)?,
            tables: Vec::new(),
            before: dev.event().map_err(ce)?,
            copied: dev.event().map_err(ce)?,
            pending: false,
        })
    }

    fn alloc_host_slots(&self, layout: &SlotLayout, n: usize) -> Result<Option<CudaHostSlots>> {
        let dev = self.bind()?;
        Ok(Some(CudaHostSlots {
            slab: dev.pinned(n * layout.slot).map_err(ce)?,
            slot: layout.slot,
        }))
    }

    fn fill_slots(
        &self,
        layout: &SlotLayout,
        slots: &mut CudaSlots,
        host: Option<&mut CudaHostSlots>,
        fills: &[Fill<'_>],
    ) -> Result<()> {
        let dev = self.bind()?;
        if fills.is_empty() {
            return Ok(());
        }
        // The copies start after the batches queued before them (one may read a slot that is
        // refilled here).
        dev.record(&slots.before, &dev.compute).map_err(ce)?;
        dev.wait(&dev.copy, &slots.before).map_err(ce)?;
        let mut staged = Vec::new();
        for f in fills {
            let dst = slots.base(f.slot, layout)?;
            match f.from {
                FillFrom::Host(hs) => {
                    let h = host
                        .as_deref()
                        .ok_or_else(|| Error::Invalid("fill from a middle tier of none".into()))?;
                    dev.htod_async_bytes(dst, h.slot(hs)?, &dev.copy)
                        .map_err(ce)?;
                }
                FillFrom::Source {
                    weights,
                    host_slot: Some(hs),
                } => staged.push((hs, weights, dst)),
                FillFrom::Source {
                    weights,
                    host_slot: None,
                } => {
                    // No middle tier (a tier made with none): through pageable memory, in
                    // order on the compute stream.
                    let mut b = vec![0u8; layout.slot];
                    layout.stage(weights, &mut b)?;
                    dev.write_async(dst, &b).map_err(ce)?;
                }
            }
        }
        if !staged.is_empty() {
            let h = host.ok_or_else(|| Error::Invalid("staging through no middle tier".into()))?;
            // Host slots are rewritten: the copies out of them queued by earlier fills must
            // be done.
            if slots.pending {
                dev.event_sync(&slots.copied).map_err(ce)?;
            }
            self.stage(layout, h, &staged)?;
        }
        dev.record(&slots.copied, &dev.copy).map_err(ce)?;
        slots.pending = true;
        dev.wait(&dev.compute, &slots.copied).map_err(ce)
    }

    fn publish_resident(
        &self,
        layout: &SlotLayout,
        slots: &mut CudaSlots,
        layer: usize,
        table: &[usize],
    ) -> Result<bool> {
        let dev = self.bind()?;
        let (gu0, dn0) = slots.mats(0, layout)?;
        // The indirect kernels' bounds.
        let fits = layout.hidden <= 10240
            && layout.inter <= 10240
            && indirect_fits(&gu0)
            && indirect_fits(&dn0);
        if !fits {
            return Ok(false);
        }
        let bases = table
            .iter()
            .map(|&s| slots.base(s, layout))
            .collect::<Result<Vec<u64>>>()?;
        // After the fills queued so far (the upload is synchronous).
        dev.sync().map_err(ce)?;
        let tbl = dev.upload(bytemuck::cast_slice(&bases)).map_err(ce)?;
        if slots.tables.len() <= layer {
            slots.tables.resize_with(layer + 1, || None);
        }
        slots.tables[layer] = Some((tbl, table.to_vec()));
        Ok(true)
    }

    fn slot_experts(
        &self,
        layout: &SlotLayout,
        slots: &CudaSlots,
        batch: &SlotBatch<'_>,
        x: &CudaBuf,
        routes: &CudaRoutes,
        out: &mut CudaBuf,
    ) -> Result<()> {
        let dev = self.bind()?;
        let h = layout.hidden;
        let t = match batch.routing {
            SlotRouting::Host { routes: hr, .. } => hr.tokens(),
            SlotRouting::Resident => routes.t,
        };
        room("slot_experts", "x", x, t * h)?;
        room("slot_experts", "out", out, t * h)?;
        if batch.first && t * h > 0 {
            dev.memset_async(out.ptr(), t * h * 4).map_err(ce)?;
        }
        match batch.routing {
            SlotRouting::Host {
                routes: hr,
                experts,
                slots: ids,
            } => self.slots_host(layout, slots, hr, experts, ids, x, out),
            SlotRouting::Resident => {
                let (tbl, table) = slots.table(batch.layer).ok_or_else(|| {
                    Error::Invalid(format!(
                        "cuda slot_experts: layer {} was not published",
                        batch.layer
                    ))
                })?;
                if t == 1 && routes.k <= MAXP {
                    return self.slots_resident(layout, slots, tbl.ptr(), x, routes, out);
                }
                // A prompt (or more experts than one launch): the routing comes to the host,
                // the slots from the layer's table.
                let hr = moe::routes_host(self, routes)?;
                let used = hr.used();
                let ids = used
                    .iter()
                    .map(|&e| {
                        table.get(e).copied().ok_or_else(|| Error::Expert {
                            layer: batch.layer,
                            expert: e,
                            msg: format!("routed to, but the layer has {} experts", table.len()),
                        })
                    })
                    .collect::<Result<Vec<usize>>>()?;
                self.slots_host(layout, slots, &hr, &used, &ids, x, out)
            }
        }
    }
}
