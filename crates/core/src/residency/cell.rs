//! A backend's optional residency tier behind one lock ([`TierCell`]): the backend's ops take
//! `&self`, the tier mutates on every call. The accessors every backend reports through
//! (`tier_stats`, `tier_info`) live here once.
use std::sync::{Mutex, MutexGuard};

use super::{Residency, SlotBackend, TierStats};

/// A tier's sizes, as `bench` and the CLI report them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TierInfo {
    /// Slots in the backend's memory (capacity plus one batch) and the bytes of each.
    pub slots: usize,
    pub slot_bytes: usize,
    /// Bytes copied per missed expert.
    pub expert_bytes: usize,
    /// Slots of the middle tier, when it exists.
    pub host_slots: Option<usize>,
    /// Every expert of every MoE layer fits in the slots.
    pub all_fit: bool,
}

impl<B: SlotBackend> Residency<B> {
    pub fn info(&self) -> TierInfo {
        TierInfo {
            slots: self.slots(),
            slot_bytes: self.layout().slot,
            expert_bytes: self.layout().bytes,
            host_slots: self.host_slots(),
            all_fit: self.all_fit(),
        }
    }
}

/// `None` until a backend enables residency.
pub struct TierCell<B: SlotBackend>(Mutex<Option<Residency<B>>>);

impl<B: SlotBackend> Default for TierCell<B> {
    fn default() -> Self {
        TierCell(Mutex::new(None))
    }
}

impl<B: SlotBackend> TierCell<B> {
    /// The tier; a lock poisoned by a panicking holder is taken as it stands, as the backends
    /// did before this type, rather than failing every later call.
    pub fn lock(&self) -> MutexGuard<'_, Option<Residency<B>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The tier's counters, when one is enabled.
    pub fn stats(&self) -> Option<TierStats> {
        self.lock().as_ref().map(|t| t.stats())
    }

    /// The tier's sizes, when one is enabled.
    pub fn info(&self) -> Option<TierInfo> {
        self.lock().as_ref().map(|t| t.info())
    }
}
