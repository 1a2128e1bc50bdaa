//! [`SlotBackend`] for the CPU backend: slots are heap buffers in [`SlotLayout`] order and the
//! experts compute on views of them, so the tier's lookup, eviction and staging and the layout
//! itself are exercised without a device (the tests and the conformance harness). Both tiers
//! are host memory here; the CPU engine itself keeps using `cache::CachedExperts`.
use std::collections::HashMap;
use std::sync::Arc;

use crate::backend::{Backend, Cpu, Routes};
use crate::buf::{AlignedBuf, Buf};
use crate::error::{Error, Result};

use super::{Fill, FillFrom, SlotBackend, SlotBatch, SlotLayout, SlotRouting};

/// Slots in host memory (both tiers of the CPU backend).
pub struct HostSlots {
    slots: Vec<Option<Arc<AlignedBuf>>>,
    /// Published layers' expert → slot tables.
    tables: HashMap<usize, Vec<usize>>,
}

impl HostSlots {
    fn new(n: usize) -> HostSlots {
        HostSlots {
            slots: vec![None; n],
            tables: HashMap::new(),
        }
    }

    fn get(&self, slot: usize) -> Result<&Arc<AlignedBuf>> {
        self.slots
            .get(slot)
            .and_then(|s| s.as_ref())
            .ok_or_else(|| Error::Invalid(format!("host expert slot {slot} is empty")))
    }

    fn put(&mut self, slot: usize, b: Arc<AlignedBuf>) -> Result<()> {
        let n = self.slots.len();
        let s = self
            .slots
            .get_mut(slot)
            .ok_or_else(|| Error::Invalid(format!("host expert slot {slot} of {n}")))?;
        *s = Some(b);
        Ok(())
    }
}

/// Runs the experts `(expert, slot)` over their tokens of `routes`, adding `w · y` to `out`
/// (per token in the order given, ascending id).
fn run(
    layout: &SlotLayout,
    slots: &HostSlots,
    pairs: impl Iterator<Item = (usize, usize)>,
    routes: &Routes,
    x: &[f32],
    out: &mut [f32],
) -> Result<()> {
    let (h, i) = (layout.hidden, layout.inter);
    for (e, slot) in pairs {
        let toks = routes.tokens_of(e);
        if toks.is_empty() {
            continue;
        }
        let nr = toks.len();
        let b = slots.get(slot)?;
        let (gu, down) = layout.linears(&Buf::from_heap(b.clone(), 0, layout.slot));
        let mut xg = Vec::with_capacity(nr * h);
        for &(ti, _) in &toks {
            xg.extend_from_slice(&x[ti * h..][..h]);
        }
        let mut gub = vec![0f32; nr * 2 * i];
        Cpu.matmul(&gu, &xg, nr, &mut gub)?;
        let (mut g, mut u) = (Vec::with_capacity(nr * i), Vec::with_capacity(nr * i));
        for row in gub.chunks(2 * i) {
            g.extend_from_slice(&row[..i]);
            u.extend_from_slice(&row[i..]);
        }
        let mut hd = vec![0f32; nr * i];
        Cpu.swiglu(&g, &u, &mut hd)?;
        let mut y = vec![0f32; nr * h];
        Cpu.matmul(&down, &hd, nr, &mut y)?;
        for (j, &(ti, w)) in toks.iter().enumerate() {
            for (o, v) in out[ti * h..][..h].iter_mut().zip(&y[j * h..][..h]) {
                *o += w * v;
            }
        }
    }
    Ok(())
}

impl SlotBackend for Cpu {
    type Slots = HostSlots;
    type HostSlots = HostSlots;

    fn alloc_slots(&self, _layout: &SlotLayout, n: usize) -> Result<HostSlots> {
        Ok(HostSlots::new(n))
    }

    fn alloc_host_slots(&self, _layout: &SlotLayout, n: usize) -> Result<Option<HostSlots>> {
        Ok(Some(HostSlots::new(n)))
    }

    fn fill_slots(
        &self,
        layout: &SlotLayout,
        slots: &mut HostSlots,
        mut host: Option<&mut HostSlots>,
        fills: &[Fill<'_>],
    ) -> Result<()> {
        for f in fills {
            let b = match &f.from {
                FillFrom::Host(hs) => {
                    let h = host
                        .as_deref()
                        .ok_or_else(|| Error::Invalid("fill from a middle tier of none".into()))?;
                    // A copy, like a device's: the middle-tier slot may be refilled later.
                    Arc::new(AlignedBuf::from_bytes(h.get(*hs)?.as_slice()))
                }
                FillFrom::Source { weights, host_slot } => {
                    let mut b = AlignedBuf::zeroed(layout.slot);
                    layout.stage(weights, b.as_mut_slice())?;
                    let b = Arc::new(b);
                    if let Some(hs) = host_slot {
                        let h = host.as_deref_mut().ok_or_else(|| {
                            Error::Invalid("staging through a middle tier of none".into())
                        })?;
                        h.put(*hs, b.clone())?;
                        Arc::new(AlignedBuf::from_bytes(b.as_slice()))
                    } else {
                        b
                    }
                }
            };
            slots.put(f.slot, b)?;
        }
        Ok(())
    }

    fn publish_resident(
        &self,
        _layout: &SlotLayout,
        slots: &mut HostSlots,
        layer: usize,
        table: &[usize],
    ) -> Result<bool> {
        slots.tables.insert(layer, table.to_vec());
        Ok(true)
    }

    fn slot_experts(
        &self,
        layout: &SlotLayout,
        slots: &HostSlots,
        batch: &SlotBatch<'_>,
        x: &Vec<f32>,
        routes: &Routes,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        if batch.first {
            out.fill(0.0);
        }
        match batch.routing {
            SlotRouting::Host {
                routes: host,
                experts,
                slots: ids,
            } => {
                let pairs = experts.iter().copied().zip(ids.iter().copied());
                run(layout, slots, pairs, host, x, out)
            }
            SlotRouting::Resident => {
                let table = slots.tables.get(&batch.layer).ok_or_else(|| {
                    Error::Invalid(format!("layer {} was not published", batch.layer))
                })?;
                let pairs = routes
                    .used()
                    .into_iter()
                    .map(|e| {
                        let s = table.get(e).copied().ok_or_else(|| Error::Expert {
                            layer: batch.layer,
                            expert: e,
                            msg: format!("routed to, but the layer has {} experts", table.len()),
                        })?;
                        Ok((e, s))
                    })
                    .collect::<Result<Vec<_>>>()?;
                run(layout, slots, pairs.into_iter(), routes, x, out)
            }
        }
    }
}
