//! The expert caches: VRAM slots in one device slab ([`ExpertCache`]) and, between VRAM and the
//! ExpertSource, slots in page-locked host memory ([`HostTier`]), each LRU by use through one
//! [`SlotLru`]. Every slot holds one expert laid out for the batched kernels: [gate w ‖ up w],
//! [gate s ‖ up s], [gate b ‖ up b] (so gate and up are one [2I, H] matrix), then down w, s, b,
//! so a host slot is copied to a VRAM slot in one DMA.
//!
//! Owns slot bookkeeping and the staging of expert bytes into pinned memory; never computes.
use std::collections::{BTreeMap, HashMap};

use flashmoe_core::experts::ExpertWeights;
use flashmoe_core::residency::SlotLayout;

use crate::device::{DBuf, Device, Pinned};
use crate::ops::{DevMat, Fmt};
use crate::{CudaError, Result};

/// Where each part of an expert sits inside a slot: core's [`SlotLayout`] (the layout of the
/// residency tier's slots too), with the kernels' format and the slot's matrices.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub fmt: Fmt,
    /// Moe intermediate size and hidden size.
    pub i: usize,
    pub h: usize,
    pub slot: usize,
    /// Bytes actually copied per expert (without padding).
    pub bytes: usize,
    tier: SlotLayout,
}

impl Layout {
    pub fn of(e: &ExpertWeights) -> Result<Layout> {
        Layout::from_slot(SlotLayout::of(e)?)
    }

    /// The layout of a residency tier's slots.
    pub fn from_slot(tier: SlotLayout) -> Result<Layout> {
        Ok(Layout {
            fmt: Fmt::of_slot(tier.format)?,
            i: tier.inter,
            h: tier.hidden,
            slot: tier.slot,
            bytes: tier.bytes,
            tier,
        })
    }

    /// The expert's nine byte ranges and their offsets inside a slot.
    pub fn parts<'a>(&self, e: &'a ExpertWeights) -> Result<[(usize, &'a [u8]); 9]> {
        Ok(self.tier.parts(e)?)
    }

    /// Writes the expert's bytes into `dst` (one slot's worth) in slot layout.
    pub fn stage(&self, e: &ExpertWeights, dst: &mut [u8]) -> Result<()> {
        Ok(self.tier.stage(e, dst)?)
    }

    /// Offsets inside a slot of gate‖up w, s, b and down w, s, b.
    pub fn offsets(&self) -> [usize; 6] {
        self.tier.offsets
    }

    /// (gate‖up [2I, H], down [H, I]) of the expert in the slot at `base`.
    pub fn mats(&self, base: u64) -> (DevMat, DevMat) {
        let o = |x: usize| base + self.tier.offsets[x] as u64;
        let m = |rows, cols, j: usize| DevMat {
            fmt: self.fmt,
            rows,
            cols,
            w: o(j),
            s: o(j + 1),
            b: o(j + 2),
        };
        (m(2 * self.i, self.h, 0), m(self.h, self.i, 3))
    }
}

/// LRU assignment of (layer, expert) keys to a fixed number of slots.
pub struct SlotLru {
    pub slots: usize,
    map: HashMap<(usize, usize), usize>,
    owner: Vec<Option<(usize, usize)>>,
    tick_of: Vec<u64>,
    lru: BTreeMap<u64, usize>,
    free: Vec<usize>,
    now: u64,
}

/// The outcome of looking up one layer's experts.
pub struct Lookup {
    /// Slot of each requested expert, in request order.
    pub slots: Vec<usize>,
    /// Indices (into the request) that missed and must be filled into their slot.
    pub missed: Vec<usize>,
}

impl SlotLru {
    pub fn new(slots: usize) -> SlotLru {
        SlotLru {
            slots,
            map: HashMap::new(),
            owner: vec![None; slots],
            tick_of: vec![0; slots],
            lru: BTreeMap::new(),
            free: (0..slots).rev().collect(),
            now: 0,
        }
    }

    fn touch(&mut self, slot: usize) {
        self.now += 1;
        self.lru.remove(&self.tick_of[slot]);
        self.tick_of[slot] = self.now;
        self.lru.insert(self.now, slot);
    }

    /// Assigns a slot to every expert of `layer` in `experts`; none of them is evicted by
    /// another of the same call. `what` names the cache in the error when it has fewer slots
    /// than one call's experts.
    pub fn lookup(&mut self, layer: usize, experts: &[usize], what: &str) -> Result<Lookup> {
        // Refused before anything changes: with no more experts than slots, a slot untouched by
        // this call is always there to evict.
        if experts.len() > self.slots {
            return Err(CudaError::Invalid(format!(
                "{what} of {} slots is smaller than one layer's experts ({})",
                self.slots,
                experts.len()
            )));
        }
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
                    let (t, s) = self
                        .lru
                        .iter()
                        .next()
                        .map(|(&t, &s)| (t, s))
                        .expect("a full cache has a least recent slot");
                    debug_assert!(t < start, "more experts than slots was refused above");
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

    /// The slot holding expert `e` of `layer`, if present (does not count as a use).
    pub fn slot_of(&self, layer: usize, e: usize) -> Option<usize> {
        self.map.get(&(layer, e)).copied()
    }

    /// Forgets an entry whose fill failed, so it is fetched again next time.
    pub fn invalidate(&mut self, layer: usize, e: usize) {
        if let Some(s) = self.map.remove(&(layer, e)) {
            self.owner[s] = None;
            self.lru.remove(&self.tick_of[s]);
            self.free.push(s);
        }
    }
}

/// Expert slots in VRAM.
pub struct ExpertCache {
    pub layout: Layout,
    slab: DBuf,
    pub lru: SlotLru,
}

impl ExpertCache {
    pub fn new(dev: &Device, layout: Layout, slots: usize) -> Result<ExpertCache> {
        Ok(ExpertCache {
            layout,
            slab: dev.alloc(slots * layout.slot)?,
            lru: SlotLru::new(slots),
        })
    }

    pub fn slots(&self) -> usize {
        self.lru.slots
    }

    pub fn slot_ptr(&self, slot: usize) -> u64 {
        self.slab.ptr() + (slot * self.layout.slot) as u64
    }

    pub fn bytes(&self) -> usize {
        self.slab.len()
    }

    pub fn lookup(&mut self, layer: usize, experts: &[usize]) -> Result<Lookup> {
        self.lru.lookup(layer, experts, "VRAM expert cache")
    }
}

/// Expert slots in page-locked host memory: the ExpertSource's misses are staged here, and a
/// later VRAM miss of an expert still here is one DMA with no read and no staging copy. With
/// as many slots as one layer's experts it is only the staging buffer.
pub struct HostTier {
    slab: Pinned,
    slot: usize,
    pub lru: SlotLru,
}

impl HostTier {
    pub fn new(dev: &Device, layout: &Layout, slots: usize) -> Result<HostTier> {
        Ok(HostTier {
            slab: dev.pinned(slots * layout.slot)?,
            slot: layout.slot,
            lru: SlotLru::new(slots),
        })
    }

    pub fn slots(&self) -> usize {
        self.lru.slots
    }

    pub fn bytes(&self) -> usize {
        self.slab.len()
    }

    pub fn lookup(&mut self, layer: usize, experts: &[usize]) -> Result<Lookup> {
        self.lru.lookup(layer, experts, "pinned host expert cache")
    }

    /// Slot `i`'s bytes.
    pub fn slot(&self, i: usize) -> &[u8] {
        &self.slab.as_slice()[i * self.slot..(i + 1) * self.slot]
    }

    /// The slots `which` (distinct), mutably, in that order: split off the slab in slot order,
    /// so the cost follows the slots asked for, not the tier's size.
    pub fn slots_mut(&mut self, which: &[usize]) -> Vec<&mut [u8]> {
        let mut order: Vec<usize> = (0..which.len()).collect();
        order.sort_by_key(|&j| which[j]);
        let mut out: Vec<Option<&mut [u8]>> = which.iter().map(|_| None).collect();
        let mut rest = self.slab.as_mut_slice();
        let mut next = 0;
        for j in order {
            let i = which[j];
            assert!(i >= next, "host slots asked for twice");
            let tail = std::mem::take(&mut rest);
            let (slot, tail) = tail[(i - next) * self.slot..].split_at_mut(self.slot);
            out[j] = Some(slot);
            rest = tail;
            next = i + 1;
        }
        out.into_iter()
            .map(|s| s.expect("every slot split off"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::SlotLru;

    #[test]
    fn slot_lru_hits_evicts_least_recent_and_refuses_an_oversized_call() {
        let mut c = SlotLru::new(3);
        let a = c.lookup(0, &[5, 6], "cache").unwrap();
        assert_eq!(a.missed, vec![0, 1]);
        // 5 is used again, so 6 is now the least recent.
        let b = c.lookup(0, &[5], "cache").unwrap();
        assert!(b.missed.is_empty());
        assert_eq!(b.slots, vec![a.slots[0]]);
        let d = c.lookup(1, &[5, 7], "cache").unwrap();
        assert_eq!(d.missed, vec![0, 1], "layer 1's expert 5 is another key");
        // Three slots held by (0,5), (1,5), (1,7); (0,6) was evicted for one of them.
        assert_eq!(c.slot_of(0, 6), None);
        assert!(c.slot_of(0, 5).is_some());
        // A call never evicts its own entries: four experts do not fit three slots, and the
        // refusal leaves the cache as it was.
        let e = c
            .lookup(2, &[1, 2, 3, 4], "test cache")
            .err()
            .expect("too small");
        assert!(e.to_string().contains("test cache of 3 slots"), "{e}");
        assert!(c.slot_of(0, 5).is_some() && c.slot_of(1, 7).is_some());
        assert_eq!(c.slot_of(2, 1), None);
        // A forgotten entry misses again and its slot is reused first.
        let mut c = SlotLru::new(2);
        let s = c.lookup(0, &[1, 2], "cache").unwrap().slots;
        c.invalidate(0, 1);
        assert_eq!(c.slot_of(0, 1), None);
        let again = c.lookup(0, &[1], "cache").unwrap();
        assert_eq!((again.missed, again.slots), (vec![0], vec![s[0]]));
    }
}
