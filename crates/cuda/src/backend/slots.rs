//! [`Cuda`] as a [`SlotBackend`]: core's residency tier (`flashmoe_core::residency`) over
//! VRAM slots in one device slab, laid out as `SlotLayout` says (the layout the old decode
//! loop's cache.rs used: [gate‖up] w, s, b then down w, s, b), and a middle tier of
//! page-locked host slots of the same layout.
//!
//! - Fills: misses are staged into their host slots on several cores and each copied on the
//!   copy stream as soon as it is staged; a middle-tier hit is one DMA. The copy stream first
//!   waits for the compute stream's earlier work (a slot an earlier batch reads may be the one
//!   refilled), and the compute stream waits for the copies. Host slots are rewritten only
//!   after the previous fill's copies out of them are done.
//! - Batches with the routing on the host: one token runs the experts as one batched gate‖up
//!   launch, SwiGLU and one batched down launch (the old loop's `ffn`), combined with their
//!   weights; a prompt runs each expert over its gathered tokens and scatters the weighted
//!   rows back.
//! - Resident layers: the router's ids stay on the device; `slot_batch` writes the two
//!   problem batches from them and the layer's slot table, and the indirect matvecs read them
//!   (the old loop's all-in-VRAM path), so the token has no host round-trip.
use std::collections::HashMap;

use rayon::prelude::*;

use flashmoe_core::backend::{Backend, Routes};
use flashmoe_core::experts::ExpertWeights;
use flashmoe_core::residency::{Fill, FillFrom, SlotBackend, SlotBatch, SlotLayout, SlotRouting};
use flashmoe_core::{Error, Result};

use super::{ce, moe, room, Cuda, CudaBuf, CudaRoutes};
use crate::cache::Layout;
use crate::device::{DBuf, Event, ExpertBatchArgs, MvBatch, Pinned, MAXP};
use crate::ops::{self, DevMat};

/// Expert slots in VRAM.
pub struct CudaSlots {
    slab: DBuf,
    n: usize,
    /// The slots' layout with the kernels' format (the old decode loop's cache uses it too).
    lay: Layout,
    /// Published layers: slot base per expert on the device (u64, what `slot_batch` reads),
    /// and the slots on the host (for batches that bring the routing to the host).
    tables: HashMap<usize, (DBuf, Vec<usize>)>,
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

    /// (gate‖up `[2I, H]`, down `[H, I]`) of the expert in slot `i`.
    fn mats(&self, i: usize, layout: &SlotLayout) -> Result<(DevMat, DevMat)> {
        Ok(self.lay.mats(self.base(i, layout)?))
    }
}

/// Whether the one-token indirect matvec (`mvi`/`mpi`/`mt*i` kernels) runs `m`'s shape.
fn indirect_fits(m: &DevMat) -> bool {
    !m.fmt.kernel(true, m.rows, m.cols).0.ends_with("mvg")
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
            ops::matvec_batch(dev, c, &gu0, &gp, 1, gu0.cols, gu0.rows).map_err(ce)?;
            ops::swiglu(dev, gue.ptr(), he.ptr(), i, n, None).map_err(ce)?;
            ops::matvec_batch(dev, c, &dn0, &dp, 1, dn0.cols, dn0.rows).map_err(ce)?;
            let wb = self.upload(&w)?;
            let (op, yp, wp) = (out.ptr(), ye.ptr(), wb.ptr());
            return ops::moe_combine(dev, op, yp, wp, n, 0, 0, 0, h).map_err(ce);
        }
        // A prompt: each expert over its tokens, gathered; the weighted rows scattered back
        // (an expert's tokens are distinct rows, so the scatter has no conflicting adds).
        for (&e, &s) in experts.iter().zip(ids) {
            let toks = hr.tokens_of(e);
            let nr = toks.len();
            if nr == 0 {
                continue;
            }
            let rows: Vec<f32> = toks
                .iter()
                .map(|&(ti, _)| f32::from_bits(ti as u32))
                .collect();
            let wts: Vec<f32> = toks.iter().map(|&(_, w)| w).collect();
            let (rb, wb) = (self.upload(&rows)?, self.upload(&wts)?);
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
        let (gue, he, ye) = (self.buf(k * 2 * i)?, self.buf(k * i)?, self.buf(k * h)?);
        let psz = std::mem::size_of::<MvBatch>();
        let pb = self.buf((2 * psz).div_ceil(4))?;
        let mut a = ExpertBatchArgs {
            tbl,
            xn: x.ptr(),
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
        let (gu0, dn0) = slots.mats(0, layout)?;
        ops::slot_batch(dev, routes.ids.ptr(), k, a, pb.ptr()).map_err(ce)?;
        // Right after slot_batch, which wrote the batch it reads.
        ops::matvec_indirect(dev, &gu0, pb.ptr(), k, None, true).map_err(ce)?;
        ops::swiglu(dev, gue.ptr(), he.ptr(), i, k, None).map_err(ce)?;
        let pd = pb.ptr() + psz as u64;
        ops::matvec_indirect(dev, &dn0, pd, k, None, false).map_err(ce)?;
        let (op, yp, wp) = (out.ptr(), ye.ptr(), routes.wts.ptr());
        ops::moe_combine(dev, op, yp, wp, k, 0, 0, 0, h).map_err(ce)
    }
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
            tables: HashMap::new(),
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
        // The old loop's bounds for the indirect kernels.
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
        slots.tables.insert(layer, (tbl, table.to_vec()));
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
                let (tbl, table) = slots.tables.get(&batch.layer).ok_or_else(|| {
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
