//! wgpu's side of core's expert residency tier (`flashmoe_core::residency`): slots in device
//! buffers, so that a resident expert is not uploaded again on each use.
//!
//! - [`GSlots`]: slots of one [`SlotLayout`] in slabs, each slab one buffer within the
//!   adapter's binding size (a batch binds one slab as its weights, scales and biases).
//! - `fill_slots`: the expert staged in slot layout on the host and written with
//!   `queue.write_buffer` after the commands recorded so far are submitted (so a slot that an
//!   earlier batch read is refilled only after that batch).
//! - `slot_experts`: a batch as `experts.rs` runs one (gate and up jobs in one dispatch,
//!   SwiGLU, down, the weighted sum), the job table pointing into the slots.
//!
//! - resident layers (every expert in a slot, published by the tier, the slots in one slab):
//!   the job tables are built on the device from the router's ids (`slotjobs.wgsl`), so the
//!   layer reads nothing back (`routes_host` gives `None`).
//!
//! - unified slots (`Wgpu::unified_slots`: unified memory with mappable storage buffers):
//!   the slabs are `STORAGE | MAP_WRITE`, and `fill_slots` maps the span it fills and writes
//!   the expert there, so the buffer the shaders read is the one the host wrote (no staging,
//!   no device copy; the map waits for submitted work, so a slot an earlier batch read is
//!   refilled only after it).
//!
//! No middle tier (a discrete GPU's staging is wgpu's own).
use std::collections::HashMap;

use flashmoe_core::backend::Backend;
use flashmoe_core::cache::CachePolicy;
use flashmoe_core::error::Result;
use flashmoe_core::experts::ExpertSource;
use flashmoe_core::model::{Ffn, Model};
use flashmoe_core::residency::{
    first_layout, Fill, FillFrom, Residency, SlotBackend, SlotBatch, SlotFormat, SlotLayout,
    SlotRouting, TierInfo, TierSpec, TierStats,
};
use flashmoe_core::store::DType;

use crate::device::{grid, Wgpu};
use crate::op_err;
use crate::ops::{GBuf, GRoutes};

/// Slots in device memory: slot `s` is in slab `s / per_slab` at byte `(s % per_slab) * slot`.
pub struct GSlots {
    slabs: Vec<wgpu::Buffer>,
    per_slab: usize,
    slot: usize,
    /// Unified slots: filled through a mapping, not the queue.
    mapped: bool,
    /// Published layers' expert -> slot tables.
    resident: HashMap<usize, wgpu::Buffer>,
}

impl GSlots {
    fn at(&self, s: usize) -> (usize, u64) {
        (s / self.per_slab, ((s % self.per_slab) * self.slot) as u64)
    }
}

/// Format words (`mat.wgsl`'s `M`) of a slot format, and bytes per data unit (a word for
/// affine, an element for dense) and per scale.
fn format_of(f: SlotFormat) -> Result<([u32; 4], usize, usize)> {
    let half = |d: DType| match d {
        DType::F32 => Ok(0),
        DType::BF16 => Ok(1),
        DType::F16 => Ok(2),
        d => Err(op_err("slot_experts", format!("unsupported dtype {d:?}"))),
    };
    Ok(match f {
        SlotFormat::Dense(d) => ([half(d)?, 0, 0, 0], d.size(), 4),
        SlotFormat::Affine {
            bits,
            group,
            sdtype,
        } => ([3, bits, group as u32, half(sdtype)?], 4, sdtype.size()),
    })
}

impl Wgpu {
    /// Routes the experts of `moe_layers` (`num_experts` each, `top_k` per token) through a
    /// residency tier of up to `budget` bytes of device slots under `policy`; replaces an
    /// earlier tier.
    pub fn enable_residency(
        &self,
        source: &dyn ExpertSource,
        moe_layers: &[usize],
        num_experts: usize,
        top_k: usize,
        budget: usize,
        policy: CachePolicy,
    ) -> Result<()> {
        let Some(layout) = first_layout(source, moe_layers)? else {
            return Ok(());
        };
        let group = top_k.clamp(1, num_experts.max(1));
        let spec = TierSpec::within(
            budget,
            layout.slot,
            moe_layers.len(),
            num_experts,
            top_k,
            group,
            policy,
            0,
        );
        let mut tier = self.tier.lock();
        *tier = None;
        *tier = Some(Residency::new(
            self,
            layout,
            &spec,
            moe_layers,
            num_experts,
        )?);
        Ok(())
    }

    /// Fills every routed expert of `m` into device slots when they all fit. Returns whether
    /// they did.
    pub fn preload(m: &Model<Wgpu>) -> Result<bool> {
        let moe = moe_layers(m);
        let mut tier = m.be.tier.lock();
        let Some(t) = tier.as_mut() else {
            return Ok(false);
        };
        t.preload(&m.be, &*m.experts, &moe)?;
        Ok(t.all_fit())
    }

    /// The tier's counters, when one is enabled.
    pub fn tier_stats(&self) -> Option<TierStats> {
        self.tier.stats()
    }

    /// The tier's sizes, when one is enabled.
    pub fn tier_info(&self) -> Option<TierInfo> {
        self.tier.info()
    }

    /// Drops the tier: routed experts are uploaded per call again.
    pub fn disable_residency(&self) {
        let mut tier = self.tier.lock();
        *tier = None;
    }
}

/// `m` on wgpu with its routed experts in a tier of `budget` bytes (see
/// [`Wgpu::enable_residency`]), LRU.
pub fn with_residency(m: &Model<Wgpu>, budget: usize) -> Result<()> {
    let moe = moe_layers(m);
    if moe.is_empty() {
        return Ok(());
    }
    m.be.enable_residency(
        &*m.experts,
        &moe,
        m.cfg.num_experts,
        m.top_k,
        budget,
        CachePolicy::Lru,
    )
}

impl SlotBackend for Wgpu {
    type Slots = GSlots;
    type HostSlots = ();

    fn alloc_slots(&self, layout: &SlotLayout, n: usize) -> Result<GSlots> {
        let max = self.max_binding() as usize;
        if layout.slot > max {
            return Err(op_err(
                "alloc_slots",
                format!(
                    "an expert slot of {} bytes exceeds the adapter's binding size {max}",
                    layout.slot
                ),
            ));
        }
        let per_slab = (max / layout.slot).max(1);
        let mapped = self.unified_slots();
        let mut slabs = Vec::new();
        let mut left = n;
        while left > 0 {
            let k = left.min(per_slab);
            let bytes = (k * layout.slot) as u64;
            slabs.push(if mapped {
                self.count_buffer();
                self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("unified slots"),
                    size: bytes.max(16).next_multiple_of(4),
                    usage: crate::device::USAGE | wgpu::BufferUsages::MAP_WRITE,
                    mapped_at_creation: false,
                })
            } else {
                self.buffer(bytes)
            });
            left -= k;
        }
        Ok(GSlots {
            slabs,
            per_slab,
            slot: layout.slot,
            mapped,
            resident: HashMap::new(),
        })
    }

    fn fill_slots(
        &self,
        layout: &SlotLayout,
        slots: &mut GSlots,
        _host: Option<&mut ()>,
        fills: &[Fill<'_>],
    ) -> Result<()> {
        // Earlier batches (recorded, not yet submitted) may read the slots being refilled:
        // submit them first; a queue write lands after what was submitted.
        self.flush()?;
        if slots.mapped {
            return self.fill_mapped(layout, slots, fills);
        }
        let size = wgpu::BufferSize::new(layout.slot as u64)
            .ok_or_else(|| op_err("fill_slots", "empty slot layout"))?;
        for f in fills {
            let FillFrom::Source { weights, .. } = &f.from else {
                return Err(op_err("fill_slots", "wgpu has no middle tier"));
            };
            let (slab, off) = slots.at(f.slot);
            let buf = slots
                .slabs
                .get(slab)
                .ok_or_else(|| op_err("fill_slots", format!("slot {} of none", f.slot)))?;
            // The parts straight into the queue's staging memory (one copy on the host).
            let mut view = self
                .queue
                .write_buffer_with(buf, off, size)
                .ok_or_else(|| op_err("fill_slots", format!("slot {}: no staging", f.slot)))?;
            for (at, bytes) in layout.parts(weights)? {
                view.slice(at..at + bytes.len()).copy_from_slice(bytes);
            }
            self.count_slot_fill(false);
        }
        Ok(())
    }

    /// Takes a layer for device-side lookup when its slots are all in one slab (one binding
    /// for every job of a batch) and slot offsets fit the job tables' words.
    fn publish_resident(
        &self,
        _layout: &SlotLayout,
        slots: &mut GSlots,
        layer: usize,
        table: &[usize],
    ) -> Result<bool> {
        if slots.slabs.len() != 1 || slots.slabs[0].size() > u32::MAX as u64 {
            return Ok(false);
        }
        let t: Vec<u32> = table.iter().map(|&s| s as u32).collect();
        slots
            .resident
            .insert(layer, self.buffer_with(bytemuck::cast_slice(&t)));
        Ok(true)
    }

    fn slot_experts(
        &self,
        layout: &SlotLayout,
        slots: &GSlots,
        batch: &SlotBatch<'_>,
        x: &GBuf,
        groutes: &GRoutes,
        out: &mut GBuf,
    ) -> Result<()> {
        let op = "slot_experts";
        let SlotRouting::Host {
            routes,
            experts,
            slots: sl,
        } = batch.routing
        else {
            return self.resident_batch(layout, slots, batch, x, groutes, out);
        };
        let (t, k) = (routes.tokens(), routes.k);
        let (h, inter) = (layout.hidden, layout.inter);
        if x.len < t * h || out.len < t * h {
            return Err(op_err(
                op,
                format!("x {} / out {} of {t} tokens of {h}", x.len, out.len),
            ));
        }
        // (token, index in `experts`, weight), tokens in order, each token's ascending.
        let mut pairs: Vec<(usize, usize, f32)> = Vec::new();
        let mut per_token = vec![0usize; t];
        for (ti, count) in per_token.iter_mut().enumerate() {
            let mut r: Vec<(u32, f32)> = (0..k)
                .map(|j| (routes.ids[ti * k + j], routes.weights[ti * k + j]))
                .collect();
            r.sort_by_key(|e| e.0);
            for (e, wt) in r {
                if let Ok(j) = experts.binary_search(&(e as usize)) {
                    pairs.push((ti, j, wt));
                    *count += 1;
                }
            }
        }
        let np = pairs.len();
        if np == 0 {
            if batch.first {
                self.clear(&out.buf, (t * h * 4) as u64)?;
            }
            return Ok(());
        }
        let (m, unit, ssz) = format_of(layout.format)?;
        let o = layout.offsets;
        let (gw, gs, _) = layout.format.sizes(inter, h);
        // Jobs (wbase units, sbase elements, xrow, yrow) per slab.
        let nslab = slots.slabs.len();
        let mut gate_up: Vec<Vec<u32>> = vec![Vec::new(); nslab];
        let mut down: Vec<Vec<u32>> = vec![Vec::new(); nslab];
        for (p, &(ti, j, _)) in pairs.iter().enumerate() {
            let (slab, base) = slots.at(sl[j]);
            let base = base as usize;
            let (w0, s0) = ((base + o[0]) / unit, (base + o[1]) / ssz);
            // The up matrix is the second half of gate‖up: I rows further on.
            let (wu, su) = ((base + o[0] + gw) / unit, (base + o[1] + gs) / ssz);
            gate_up[slab].extend([w0, s0, ti, p].map(|v| v as u32));
            gate_up[slab].extend([wu, su, ti, np + p].map(|v| v as u32));
            down[slab].extend([(base + o[3]) / unit, (base + o[4]) / ssz, p, p].map(|v| v as u32));
        }
        let bd_gu = ((o[2] - o[1]) / ssz) as u32;
        let bd_d = ((o[5] - o[4]) / ssz) as u32;
        // One batched product per slab that holds any of the jobs (4 words each).
        let per_slab = |jobs_by_slab: &[Vec<u32>], rows, cols, bd, x: &wgpu::Buffer, y| {
            for (slab, jobs) in jobs_by_slab.iter().enumerate() {
                if jobs.is_empty() {
                    continue;
                }
                let jb = self.buffer_with(bytemuck::cast_slice(jobs));
                let s = &slots.slabs[slab];
                self.batch(
                    m,
                    rows,
                    cols,
                    jobs.len() / 4,
                    [s, s, s],
                    bd,
                    x,
                    y,
                    &jb,
                    true,
                )?;
            }
            Ok::<(), flashmoe_core::Error>(())
        };
        let gu = self.buffer((2 * np * inter * 4) as u64);
        per_slab(&gate_up, inter, h, bd_gu, &x.buf, &gu)?;
        let hid = self.swiglu_pairs(np, inter, &gu)?;
        let d = self.buffer((np * h * 4) as u64);
        per_slab(&down, h, inter, bd_d, &hid.buf, &d)?;
        // Each token's pairs, padded to the most any token has with weight 0 (adds nothing).
        let kmax = per_token.iter().copied().max().unwrap_or(1).max(1);
        let mut table = vec![0u32; t * kmax * 2];
        let mut fill = vec![0usize; t];
        for (p, &(ti, _, wt)) in pairs.iter().enumerate() {
            let at = (ti * kmax + fill[ti]) * 2;
            table[at] = p as u32;
            table[at + 1] = wt.to_bits();
            fill[ti] += 1;
        }
        let tb = self.buffer_with(bytemuck::cast_slice(&table));
        self.esum(&d, &tb, h, kmax, t, out, !batch.first)
    }
}

impl Wgpu {
    /// `fill_slots` on unified slots: per slab, the span covering its fills mapped for
    /// writing (the map completes once the submitted work that reads the slab has), each
    /// expert written into its slot, and the slab unmapped before anything records a use.
    fn fill_mapped(&self, layout: &SlotLayout, slots: &GSlots, fills: &[Fill<'_>]) -> Result<()> {
        let op = "fill_slots";
        // Per slab: the byte span its fills cover, widened to the mapping alignments.
        let mut spans: HashMap<usize, (u64, u64)> = HashMap::new();
        for f in fills {
            let (slab, off) = slots.at(f.slot);
            let buf = slots
                .slabs
                .get(slab)
                .ok_or_else(|| op_err(op, format!("slot {} of none", f.slot)))?;
            let lo = off / wgpu::MAP_ALIGNMENT * wgpu::MAP_ALIGNMENT;
            let hi = (off + layout.slot as u64)
                .next_multiple_of(wgpu::COPY_BUFFER_ALIGNMENT)
                .min(buf.size());
            let e = spans.entry(slab).or_insert((lo, hi));
            *e = (e.0.min(lo), e.1.max(hi));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        for (&slab, &(lo, hi)) in &spans {
            let tx = tx.clone();
            slots.slabs[slab].map_async(wgpu::MapMode::Write, lo..hi, move |r| {
                let _ = tx.send((slab, r));
            });
        }
        drop(tx);
        self.wait()?;
        for (slab, r) in rx.iter() {
            r.map_err(|e| op_err(op, format!("mapping slab {slab}: {e}")))?;
        }
        // One view per slab, every fill of the slab written through it.
        let mut failed = None;
        for (&slab, &(lo, hi)) in &spans {
            let written = slots.slabs[slab]
                .get_mapped_range_mut(lo..hi)
                .map_err(|e| op_err(op, format!("slab {slab}: {e:?}")))
                .and_then(|mut view| {
                    for f in fills.iter().filter(|f| slots.at(f.slot).0 == slab) {
                        let FillFrom::Source { weights, .. } = &f.from else {
                            return Err(op_err(op, "wgpu has no middle tier"));
                        };
                        let at = (slots.at(f.slot).1 - lo) as usize;
                        for (p, bytes) in layout.parts(weights)? {
                            view.slice(at + p..at + p + bytes.len())
                                .copy_from_slice(bytes);
                        }
                        self.count_slot_fill(true);
                    }
                    Ok(())
                });
            if let Err(e) = written {
                failed = Some(e);
                break;
            }
        }
        // Unmapped even after a failure: a mapped slab cannot be bound.
        for &slab in spans.keys() {
            slots.slabs[slab].unmap();
        }
        failed.map_or(Ok(()), Err)
    }
}

/// The layers of `m` with routed experts.
fn moe_layers(m: &Model<Wgpu>) -> Vec<usize> {
    (0..m.layers.len())
        .filter(|&l| matches!(m.layers[l].ffn, Ffn::Moe(_)))
        .collect()
}

/// Most experts per token of a resident batch (`slotjobs.wgsl`'s KMAX).
const KMAX: usize = 64;

impl Wgpu {
    /// A resident layer's batch: every (token, expert) pair of `routes`, the job tables built
    /// on the device from the ids and the layer's published table.
    fn resident_batch(
        &self,
        layout: &SlotLayout,
        slots: &GSlots,
        batch: &SlotBatch<'_>,
        x: &GBuf,
        routes: &GRoutes,
        out: &mut GBuf,
    ) -> Result<()> {
        let op = "slot_experts";
        let table = slots
            .resident
            .get(&batch.layer)
            .ok_or_else(|| op_err(op, format!("layer {} was not published", batch.layer)))?;
        let (t, k) = (routes.t, routes.k);
        let (h, inter) = (layout.hidden, layout.inter);
        if k > KMAX || x.len < t * h || out.len < t * h {
            return Err(op_err(
                op,
                format!("{t} tokens of {k} experts, x {} / out {}", x.len, out.len),
            ));
        }
        let np = t * k;
        if np == 0 {
            return self.clear(&out.buf, (t * h * 4) as u64);
        }
        let (m, unit, ssz) = format_of(layout.format)?;
        let o = layout.offsets;
        let (gw, gs, _) = layout.format.sizes(inter, h);
        // Pooled and written whole (see `swiglu_pairs`): the same sizes every token, so no
        // buffer per layer.
        let jg = self.scratch(2 * np * 4)?;
        let jd = self.scratch(np * 4)?;
        let tb = self.scratch(np * 2)?;
        // A thread per (token, expert) pair.
        let (g, gx) = grid(np.div_ceil(64));
        let words = [
            t,
            k,
            unit,
            ssz,
            layout.slot,
            o[0],
            o[1],
            o[3],
            o[4],
            gw,
            gs,
            gx as usize,
        ];
        self.dispatch(
            "slotjobs",
            &words.map(|v| v as u32),
            &[
                (1, &routes.ids),
                (2, &routes.weights),
                (3, table),
                (4, &jg.buf),
                (5, &jd.buf),
                (6, &tb.buf),
            ],
            g,
        )?;
        let s = &slots.slabs[0];
        let bd_gu = ((o[2] - o[1]) / ssz) as u32;
        let bd_d = ((o[5] - o[4]) / ssz) as u32;
        let gu = self.scratch(2 * np * inter)?;
        // Weight bytes of one gate (or up, or down) matrix with its scales and biases.
        let per = (gw + 2 * gs) as u64;
        self.note_bytes(2 * np as u64 * per);
        self.batch(
            m,
            inter,
            h,
            2 * np,
            [s, s, s],
            bd_gu,
            &x.buf,
            &gu.buf,
            &jg.buf,
            true,
        )?;
        let hid = self.swiglu_pairs(np, inter, &gu.buf)?;
        let d = self.scratch(np * h)?;
        self.note_bytes(np as u64 * per);
        self.batch(
            m,
            h,
            inter,
            np,
            [s, s, s],
            bd_d,
            &hid.buf,
            &d.buf,
            &jd.buf,
            true,
        )?;
        self.esum(&d.buf, &tb.buf, h, k, t, out, !batch.first)
    }

    /// Whether `layer`'s experts are all in slots and looked up on the device.
    pub(crate) fn layer_resident(&self, layer: usize) -> bool {
        let tier = self.tier.lock();
        tier.as_ref().is_some_and(|t| t.layer_resident(layer))
    }
}
