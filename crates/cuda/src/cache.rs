//! The VRAM expert cache: fixed-size slots in one device slab, LRU by use. Each slot holds one
//! expert laid out for the batched kernels: [gate w ‖ up w], [gate s ‖ up s], [gate b ‖ up b]
//! (so gate and up are one [2I, H] matrix), then down w, s, b.
//!
//! Owns slot bookkeeping and the staging of expert bytes into pinned memory; never computes.
use std::collections::{BTreeMap, HashMap};

use flashmoe_core::experts::ExpertWeights;

use crate::device::{DBuf, Device, Pinned};
use crate::ops::{linear_bytes, DevMat, Fmt};
use crate::{CudaError, Result};

const ALIGN: usize = 256;

fn up(x: usize) -> usize {
    x.div_ceil(ALIGN) * ALIGN
}

/// Where each part of an expert sits inside a slot.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub fmt: Fmt,
    /// Moe intermediate size and hidden size.
    pub i: usize,
    pub h: usize,
    gu_w: usize,
    gu_s: usize,
    gu_b: usize,
    d_w: usize,
    d_s: usize,
    d_b: usize,
    pub slot: usize,
    /// Bytes actually copied per expert (without padding).
    pub bytes: usize,
}

impl Layout {
    pub fn of(e: &ExpertWeights) -> Result<Layout> {
        let fmt = Fmt::of(&e.gate)?;
        if Fmt::of(&e.up)? != fmt || Fmt::of(&e.down)? != fmt {
            return Err(CudaError::Unsupported(
                "experts whose gate/up/down formats differ".into(),
            ));
        }
        let (i, h) = (e.gate.rows(), e.gate.cols());
        let (gw, gs, _) = fmt.sizes(i, h);
        let (dw, ds, _) = fmt.sizes(h, i);
        let mut o = 0;
        let mut take = |n: usize| {
            let at = o;
            o += up(n);
            at
        };
        let gu_w = take(2 * gw);
        let gu_s = take(2 * gs);
        let gu_b = take(2 * gs);
        let d_w = take(dw);
        let d_s = take(ds);
        let d_b = take(ds);
        Ok(Layout {
            fmt,
            i,
            h,
            gu_w,
            gu_s,
            gu_b,
            d_w,
            d_s,
            d_b,
            slot: o,
            bytes: 2 * gw + 4 * gs + dw + 2 * ds,
        })
    }

    /// The expert's nine byte ranges and their offsets inside a slot.
    pub fn parts<'a>(&self, e: &'a ExpertWeights) -> Result<[(usize, &'a [u8]); 9]> {
        let (gw, gs, gb) = linear_bytes(&e.gate);
        let (uw, us, ub) = linear_bytes(&e.up);
        let (dw, ds, db) = linear_bytes(&e.down);
        let n = gw.len()
            + uw.len()
            + dw.len()
            + ds.len()
            + db.len()
            + gs.len()
            + gb.len()
            + us.len()
            + ub.len();
        if n != self.bytes || gw.len() != uw.len() || gs.len() != us.len() {
            return Err(CudaError::Invalid(
                "expert size differs from the first expert's".into(),
            ));
        }
        Ok([
            (self.gu_w, gw),
            (self.gu_w + gw.len(), uw),
            (self.gu_s, gs),
            (self.gu_s + gs.len(), us),
            (self.gu_b, gb),
            (self.gu_b + gb.len(), ub),
            (self.d_w, dw),
            (self.d_s, ds),
            (self.d_b, db),
        ])
    }

    /// Writes the expert's bytes into `dst` (one slot's worth) in slot layout.
    pub fn stage(&self, e: &ExpertWeights, dst: &mut [u8]) -> Result<()> {
        for (at, b) in self.parts(e)? {
            dst[at..at + b.len()].copy_from_slice(b);
        }
        Ok(())
    }

    /// Offsets inside a slot of gate‖up w, s, b and down w, s, b.
    pub fn offsets(&self) -> [usize; 6] {
        [
            self.gu_w, self.gu_s, self.gu_b, self.d_w, self.d_s, self.d_b,
        ]
    }

    /// (gate‖up [2I, H], down [H, I]) of the expert in the slot at `base`.
    pub fn mats(&self, base: u64) -> (DevMat, DevMat) {
        let o = |x: usize| base + x as u64;
        (
            DevMat {
                fmt: self.fmt,
                rows: 2 * self.i,
                cols: self.h,
                w: o(self.gu_w),
                s: o(self.gu_s),
                b: o(self.gu_b),
            },
            DevMat {
                fmt: self.fmt,
                rows: self.h,
                cols: self.i,
                w: o(self.d_w),
                s: o(self.d_s),
                b: o(self.d_b),
            },
        )
    }
}

pub struct ExpertCache {
    pub layout: Layout,
    slab: DBuf,
    pub slots: usize,
    map: HashMap<(usize, usize), usize>,
    owner: Vec<Option<(usize, usize)>>,
    tick_of: Vec<u64>,
    lru: BTreeMap<u64, usize>,
    free: Vec<usize>,
    now: u64,
    /// Pinned staging for one layer's misses.
    pub staging: Pinned,
    pub staging_slots: usize,
}

/// The outcome of looking up one layer's experts.
pub struct Lookup {
    /// Slot of each requested expert, in request order.
    pub slots: Vec<usize>,
    /// Indices (into the request) that missed and must be copied into their slot.
    pub missed: Vec<usize>,
}

impl ExpertCache {
    pub fn new(
        dev: &Device,
        layout: Layout,
        slots: usize,
        staging_slots: usize,
    ) -> Result<ExpertCache> {
        let slab = dev.alloc(slots * layout.slot)?;
        let staging = dev.pinned(staging_slots * layout.slot)?;
        Ok(ExpertCache {
            layout,
            slab,
            slots,
            map: HashMap::new(),
            owner: vec![None; slots],
            tick_of: vec![0; slots],
            lru: BTreeMap::new(),
            free: (0..slots).rev().collect(),
            now: 0,
            staging,
            staging_slots,
        })
    }

    pub fn slot_ptr(&self, slot: usize) -> u64 {
        self.slab.ptr() + (slot * self.layout.slot) as u64
    }

    pub fn bytes(&self) -> usize {
        self.slab.len()
    }

    fn touch(&mut self, slot: usize) {
        self.now += 1;
        self.lru.remove(&self.tick_of[slot]);
        self.tick_of[slot] = self.now;
        self.lru.insert(self.now, slot);
    }

    /// Assigns a slot to every expert of `layer` in `experts`; none of them is evicted by
    /// another of the same call.
    pub fn lookup(&mut self, layer: usize, experts: &[usize]) -> Result<Lookup> {
        let start = self.now + 1;
        let mut slots = Vec::with_capacity(experts.len());
        let mut missed = Vec::new();
        for (j, &e) in experts.iter().enumerate() {
            if let Some(&s) = self.map.get(&(layer, e)) {
                self.touch(s);
                slots.push(s);
                continue;
            }
            let s = match self.free.pop() {
                Some(s) => s,
                None => {
                    let (&t, &s) = self.lru.iter().next().expect("cache has slots");
                    if t >= start {
                        return Err(CudaError::Invalid(format!(
                            "expert cache of {} slots is smaller than one layer's experts",
                            self.slots
                        )));
                    }
                    if let Some(k) = self.owner[s].take() {
                        self.map.remove(&k);
                    }
                    s
                }
            };
            self.owner[s] = Some((layer, e));
            self.map.insert((layer, e), s);
            self.touch(s);
            slots.push(s);
            missed.push(j);
        }
        Ok(Lookup { slots, missed })
    }

    /// The slot holding expert `e` of `layer`, if resident (does not count as a use).
    pub fn slot_of(&self, layer: usize, e: usize) -> Option<usize> {
        self.map.get(&(layer, e)).copied()
    }

    /// Forgets an entry whose copy failed, so it is fetched again next time.
    pub fn invalidate(&mut self, layer: usize, e: usize) {
        if let Some(s) = self.map.remove(&(layer, e)) {
            self.owner[s] = None;
            self.lru.remove(&self.tick_of[s]);
            self.free.push(s);
        }
    }
}
