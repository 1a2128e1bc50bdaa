//! Expert residency shared by every backend: routed experts kept in a backend's memory
//! ("slots") between tokens, stacked on the model's [`ExpertSource`](crate::experts::ExpertSource),
//! with an optional middle tier (CUDA: page-locked host memory) between them.
//!
//! The tier ([`Residency`], `tier.rs`) owns everything that is not arithmetic or memory: the
//! lookup of a layer's routed ids, hit/miss/eviction accounting, eviction through a
//! replacement [`Policy`](crate::cache::Policy) (`--cache-policy`, the same implementations
//! `trace simulate` scores), the staging of misses from the `ExpertSource`, and the middle tier.
//! A backend implements [`SlotBackend`], three operations on memory it owns:
//!
//! 1. [`SlotBackend::alloc_slots`]: N slots of one [`SlotLayout`] (CUDA: one device slab).
//! 2. [`SlotBackend::fill_slots`]: copy experts into slots, either from their loaded bytes
//!    ([`FillFrom::Source`], staged through a middle-tier slot when the tier names one) or from
//!    a middle-tier slot ([`FillFrom::Host`]). Copies may be asynchronous: the backend orders
//!    them after every earlier [`SlotBackend::slot_experts`] (a slot freed by one batch may be
//!    refilled for the next) and before every later one.
//! 3. [`SlotBackend::slot_experts`]: the routed experts of one layer over slots (the MoE op
//!    reading slot ids), `out [t, H] (+)= Σ w · down(silu(gate x) * up x)`.
//!
//! When every expert of every MoE layer fits, the tier fills them once
//! ([`Residency::preload`]) and hands each layer's expert→slot table to
//! [`SlotBackend::publish_resident`]; a backend that can look the router's ids up where they
//! live says so, and from then on the layer needs no host round-trip at all
//! (`Backend::routes_host` returns `None`, [`SlotRouting::Resident`]).
//!
//! A unified-memory backend (Apple silicon) can hand the page cache straight to the GPU through
//! the same seam: [`FillFrom::Source`] carries the expert's [`ExpertWeights`], whose
//! [`Buf`](crate::buf::Buf)s are views of the checkpoint's mapping when the source serves it
//! in place (`Buf::is_mapped`). Such a backend's "slot" can be a no-copy wrapper of those pages
//! (Metal's `newBufferWithBytesNoCopy` over the page-aligned range) kept alive by the slot, so
//! a fill is a pointer hand-over and the tier still does the lookup, accounting and eviction
//! (eviction drops the wrapper; the OS keeps the pages as page cache). It declines the middle
//! tier by returning `None` from [`SlotBackend::alloc_host_slots`].
//!
//! `host.rs` is the host-memory implementation (the CPU backend: slots are heap buffers in
//! slot layout, computed on as views), which the tests and the conformance harness drive.
use crate::backend::{Backend, Routes};
use crate::error::Result;
use crate::experts::ExpertWeights;

mod cell;
mod host;
mod layout;
mod slots;
mod tier;

pub use cell::{TierCell, TierInfo};
pub use host::HostSlots;
pub use layout::{linear_bytes, SlotFormat, SlotLayout};
pub use tier::{first_layout, Residency, TierSpec, TierStats};

/// Where one slot's expert comes from, for [`SlotBackend::fill_slots`].
pub enum FillFrom<'a> {
    /// The expert's loaded weights (views of a mapping, a read buffer, ...). With
    /// `host_slot`, the backend stages the bytes there first (in [`SlotLayout`] order) and
    /// copies that slot; the middle tier keeps them for later misses.
    Source {
        weights: &'a ExpertWeights,
        host_slot: Option<usize>,
    },
    /// The middle-tier slot that holds the expert already.
    Host(usize),
}

/// One slot to fill.
pub struct Fill<'a> {
    pub slot: usize,
    pub from: FillFrom<'a>,
}

/// How [`SlotBackend::slot_experts`] finds each token's experts.
#[derive(Clone, Copy)]
pub enum SlotRouting<'a> {
    /// The routing on the host; the batch covers `experts` (ascending, distinct), expert
    /// `experts[j]` in slot `slots[j]`. Tokens' other experts are another batch's.
    Host {
        routes: &'a Routes,
        experts: &'a [usize],
        slots: &'a [usize],
    },
    /// Every expert of the layer is resident and was published
    /// ([`SlotBackend::publish_resident`]): the backend reads the routing where it lives
    /// (its `Routes`) and looks the slots up itself. All of each token's experts.
    Resident,
}

/// One batch of routed experts of a layer.
#[derive(Clone, Copy)]
pub struct SlotBatch<'a> {
    pub layer: usize,
    pub routing: SlotRouting<'a>,
    /// The first batch of the call: `out` is overwritten (zero when the batch is empty), not
    /// added to.
    pub first: bool,
}

/// A backend's memory for resident experts (module docs). Implementations must keep the
/// summation order of `Backend::moe_experts`: per token, experts in ascending id.
pub trait SlotBackend: Backend {
    /// N slots of one layout, in the backend's memory.
    type Slots: Send + Sync;
    /// The middle tier's slots (CUDA: page-locked host memory). `()` when there is none.
    type HostSlots: Send + Sync;

    /// `n` slots of `layout` (contents undefined).
    fn alloc_slots(&self, layout: &SlotLayout, n: usize) -> Result<Self::Slots>;
    /// `n` middle-tier slots of `layout`, or `None` when the backend has no middle tier.
    fn alloc_host_slots(&self, _layout: &SlotLayout, _n: usize) -> Result<Option<Self::HostSlots>> {
        Ok(None)
    }
    /// Fills `fills` (distinct slots). `host` is the middle tier when one was allocated.
    fn fill_slots(
        &self,
        layout: &SlotLayout,
        slots: &mut Self::Slots,
        host: Option<&mut Self::HostSlots>,
        fills: &[Fill<'_>],
    ) -> Result<()>;
    /// Every expert of `layer` is resident for good, expert `e` in slot `table[e]`. Returns
    /// whether the backend can now run [`SlotRouting::Resident`] batches of this layer (look
    /// the routing up without the host); `false` keeps the layer on host routing.
    fn publish_resident(
        &self,
        _layout: &SlotLayout,
        _slots: &mut Self::Slots,
        _layer: usize,
        _table: &[usize],
    ) -> Result<bool> {
        Ok(false)
    }
    /// `out [t, H]` (overwritten when `batch.first`, else added to) `+= Σ w · expert(x)` over
    /// the batch's (token, expert) pairs, the expert's weights read from its slot. `x [t, H]`;
    /// `routes` is the routing in the backend's memory (what [`SlotRouting::Resident`] reads).
    fn slot_experts(
        &self,
        layout: &SlotLayout,
        slots: &Self::Slots,
        batch: &SlotBatch<'_>,
        x: &Self::Buf,
        routes: &Self::Routes,
        out: &mut Self::Buf,
    ) -> Result<()>;
}

#[cfg(test)]
mod tests;
