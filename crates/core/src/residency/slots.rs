//! One tier's bookkeeping: which expert key sits in which slot, under a replacement
//! [`Policy`]. The policy decides residency over `cap` experts; the map owns `cap + group`
//! slots, the extra `group` holding experts a batch needs that the policy did not admit (or
//! evicted within the batch) until the batch is done.
//!
//! Why `cap + group` always suffices: during a batch, slots in use are those of resident keys
//! (at most `cap`, and one fewer while a newly admitted key waits for its slot) plus the
//! batch's transient ones (at most one per expert of the batch before it).
use std::collections::HashMap;

use crate::cache::{key_layer, Policy};
use crate::error::{Error, Result};

/// The slots one batch holds: the keys it uses, and the slots to free when it is done.
#[derive(Default)]
pub(crate) struct Group {
    keys: Vec<u64>,
    transient: Vec<usize>,
}

/// The outcome of one access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Assigned {
    pub slot: usize,
    /// The slot already holds the expert.
    pub hit: bool,
}

pub(crate) struct SlotMap {
    policy: Box<dyn Policy>,
    slot_of: HashMap<u64, usize>,
    free: Vec<usize>,
    slots: usize,
    evicted: Vec<u64>,
    /// Resident keys per layer (a layer is whole when it reaches the expert count).
    per_layer: Vec<usize>,
    /// Keys dropped because the policy evicted them.
    pub evictions: u64,
}

impl SlotMap {
    pub fn new(policy: Box<dyn Policy>, cap: usize, group: usize) -> SlotMap {
        let slots = cap + group;
        SlotMap {
            policy,
            slot_of: HashMap::new(),
            free: (0..slots).rev().collect(),
            slots,
            evicted: Vec::new(),
            per_layer: Vec::new(),
            evictions: 0,
        }
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Resident experts of `layer`.
    pub fn layer_count(&self, layer: usize) -> usize {
        self.per_layer.get(layer).copied().unwrap_or(0)
    }

    /// The slot of `key` when resident (not a use).
    pub fn slot_of(&self, key: u64) -> Option<usize> {
        self.slot_of.get(&key).copied()
    }

    fn count(&mut self, key: u64, up: bool) {
        let l = key_layer(key);
        if self.per_layer.len() <= l {
            self.per_layer.resize(l + 1, 0);
        }
        if up {
            self.per_layer[l] += 1;
        } else {
            self.per_layer[l] -= 1;
        }
    }

    fn drop_key(&mut self, key: u64) -> Option<usize> {
        let s = self.slot_of.remove(&key)?;
        self.count(key, false);
        Some(s)
    }

    /// One use of `key` by the batch `g` (keys of one batch are distinct): its slot, and
    /// whether the slot holds it already. A miss's slot must be filled before the batch runs.
    pub fn access(&mut self, key: u64, g: &mut Group) -> Result<Assigned> {
        let mut evicted = std::mem::take(&mut self.evicted);
        evicted.clear();
        self.policy.access(key, &mut evicted);
        for &x in &evicted {
            if let Some(s) = self.drop_key(x) {
                self.evictions += 1;
                // A slot this batch reads stays put until the batch is done.
                if g.keys.contains(&x) {
                    g.transient.push(s);
                } else {
                    self.free.push(s);
                }
            }
        }
        self.evicted = evicted;
        let keep = self.policy.resident(key);
        g.keys.push(key);
        if let Some(s) = self.slot_of(key) {
            if !keep {
                self.drop_key(key);
                g.transient.push(s);
            }
            return Ok(Assigned { slot: s, hit: true });
        }
        let s = self.free.pop().ok_or_else(|| {
            Error::Invalid(format!(
                "expert tier of {} slots: no free slot (a policy kept more than its capacity)",
                self.slots
            ))
        })?;
        if keep {
            self.slot_of.insert(key, s);
            self.count(key, true);
        } else {
            g.transient.push(s);
        }
        Ok(Assigned {
            slot: s,
            hit: false,
        })
    }

    /// Forgets `key` (its fill failed): the next use misses and fills it again.
    pub fn forget(&mut self, key: u64) {
        if let Some(s) = self.drop_key(key) {
            self.free.push(s);
        }
    }

    /// The batch is done: its transient slots are free again.
    pub fn end(&mut self, g: Group) {
        self.free.extend(g.transient);
    }
}
