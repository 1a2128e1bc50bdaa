//! [`Residency`]: the expert tier over a [`SlotBackend`]'s slots (module docs of
//! `crate::residency`). Per call: the layer's used experts in ascending id, cut into batches of
//! at most `group`; per batch, each expert looked up (a hit, or a slot to fill: from the middle
//! tier when it holds the expert, else read from the `ExpertSource`), the fills handed to the
//! backend in one call, then the batch run over the slots.
use std::time::{Duration, Instant};

use crate::backend::{ExpertCall, ExpertTimes, Routes};
use crate::cache::{key, CachePolicy, Lru};
use crate::error::{Error, Result};
use crate::experts::ExpertSource;

use super::slots::{Group, SlotMap};
use super::{Fill, FillFrom, SlotBackend, SlotBatch, SlotLayout, SlotRouting};

/// Sizes and policy of a tier.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TierSpec {
    /// Experts the backend's slots keep between calls (the policy's capacity).
    pub experts: usize,
    pub policy: CachePolicy,
    /// `static`'s warm-up, in accesses (`crate::cache::warmup_accesses`).
    pub warmup: usize,
    /// Experts the middle tier keeps (LRU), 0 for none; it has `group` more slots when the
    /// backend has one (the staging of one batch's misses, also while every expert fits).
    pub host_experts: usize,
    /// Most experts of one batch (one launch's worth; at least a token's top-k).
    pub group: usize,
}

impl TierSpec {
    /// A tier of at most `budget` bytes of `slot`-byte slots over `layers` MoE layers of
    /// `num_experts`, batches of `group`: the slots hold the policy's experts plus one batch,
    /// so the capacity is what the budget leaves after a batch, at least one batch, at most
    /// every expert. `static`'s warm-up is the default number of tokens at `top_k`.
    #[allow(clippy::too_many_arguments)]
    pub fn within(
        budget: usize,
        slot: usize,
        layers: usize,
        num_experts: usize,
        top_k: usize,
        group: usize,
        policy: CachePolicy,
        host_experts: usize,
    ) -> TierSpec {
        let all = layers * num_experts;
        let experts = (budget / slot.max(1))
            .saturating_sub(group)
            .max(group.min(all))
            .min(all);
        TierSpec {
            experts,
            policy,
            warmup: crate::cache::warmup_accesses(
                crate::cache::DEFAULT_WARMUP_TOKENS,
                top_k,
                layers,
            ),
            host_experts,
            group,
        }
    }
}

/// The slot layout of a model's routed experts: that of expert 0 of its first MoE layer
/// (every routed expert has the same shapes and format). `None` when it has no MoE layer.
pub fn first_layout(source: &dyn ExpertSource, moe_layers: &[usize]) -> Result<Option<SlotLayout>> {
    let Some(&l0) = moe_layers.first() else {
        return Ok(None);
    };
    let first = source.fetch(l0, &[0])?;
    let w = first
        .first()
        .ok_or_else(|| Error::Invalid(format!("layer {l0}: the expert source has no experts")))?;
    Ok(Some(SlotLayout::of(w)?))
}

/// Monotonic counters of a tier (readers take differences).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TierStats {
    /// Routed experts found in the backend's slots (host-routed calls; resident calls are
    /// counted in `resident_calls`).
    pub hits: u64,
    /// Routed experts filled into a slot (from the middle tier or the source).
    pub misses: u64,
    /// Experts the policy evicted from the slots.
    pub evictions: u64,
    /// Misses served by the middle tier (no read).
    pub host_hits: u64,
    /// Bytes filled into slots.
    pub bytes_filled: u64,
    /// Host time reading misses from the `ExpertSource`.
    pub fetch: Duration,
    /// Calls that ran with the routing left where it lives (no host round-trip).
    pub resident_calls: u64,
}

/// The middle tier: its map and the backend's slots.
struct Middle<H> {
    map: SlotMap,
    slots: H,
}

/// Expert residency for one model on one backend (module docs).
pub struct Residency<B: SlotBackend> {
    layout: SlotLayout,
    map: SlotMap,
    slots: B::Slots,
    middle: Option<Middle<B::HostSlots>>,
    group: usize,
    num_experts: usize,
    /// Every MoE layer's experts fit (no eviction can happen).
    all_fit: bool,
    /// Per layer, once offered to the backend: whether it runs [`SlotRouting::Resident`].
    published: Vec<Option<bool>>,
    stats: TierStats,
}

impl<B: SlotBackend> Residency<B> {
    /// A tier for experts of `layout`: `num_experts` per MoE layer, `moe_layers` of them.
    /// When they all fit in `spec.experts`, the policy is plain LRU (it never evicts; `static`
    /// would keep nothing during its warm-up).
    pub fn new(
        be: &B,
        layout: SlotLayout,
        spec: &TierSpec,
        moe_layers: &[usize],
        num_experts: usize,
    ) -> Result<Self> {
        let group = spec.group.max(1);
        if spec.experts == 0 {
            return Err(Error::Invalid(
                "expert tier with room for no experts".into(),
            ));
        }
        let all = moe_layers.len() * num_experts;
        let all_fit = spec.experts >= all;
        let policy: Box<dyn crate::cache::Policy> = if all_fit {
            Box::new(Lru::new(all))
        } else {
            spec.policy.build(spec.experts, moe_layers, spec.warmup)
        };
        let cap = spec.experts.min(all.max(1));
        // With everything resident the batch slots are never needed beyond the first fills.
        let map = SlotMap::new(policy, cap, group);
        let slots = be.alloc_slots(&layout, map.slots())?;
        let middle = if spec.host_experts > 0 {
            let map = SlotMap::new(
                Box::new(Lru::new(spec.host_experts)),
                spec.host_experts,
                group,
            );
            be.alloc_host_slots(&layout, map.slots())?
                .map(|slots| Middle { map, slots })
        } else {
            None
        };
        Ok(Residency {
            layout,
            map,
            slots,
            middle,
            group,
            num_experts,
            all_fit,
            published: Vec::new(),
            stats: TierStats::default(),
        })
    }

    pub fn layout(&self) -> &SlotLayout {
        &self.layout
    }

    /// Slots in the backend's memory (capacity plus one batch).
    pub fn slots(&self) -> usize {
        self.map.slots()
    }

    /// Slots of the middle tier, if any.
    pub fn host_slots(&self) -> Option<usize> {
        self.middle.as_ref().map(|m| m.map.slots())
    }

    pub fn stats(&self) -> TierStats {
        TierStats {
            evictions: self.map.evictions,
            ..self.stats
        }
    }

    /// Whether every expert of every MoE layer fits.
    pub fn all_fit(&self) -> bool {
        self.all_fit
    }

    /// The layout and the backend's slots when `layer` runs [`SlotRouting::Resident`], for a
    /// backend that fuses more of the MoE block than [`SlotBackend::slot_experts`] (CUDA's
    /// `fused_moe`); counted as a resident call.
    pub fn resident(&mut self, layer: usize) -> Option<(&SlotLayout, &B::Slots)> {
        if !self.layer_resident(layer) {
            return None;
        }
        self.stats.resident_calls += 1;
        Some((&self.layout, &self.slots))
    }

    /// Whether `layer` runs without its routing on the host ([`SlotRouting::Resident`]).
    pub fn layer_resident(&self, layer: usize) -> bool {
        self.published
            .get(layer)
            .copied()
            .flatten()
            .unwrap_or(false)
    }

    /// The slot holding expert `e` of `layer`, if resident (not a use).
    pub fn slot_of(&self, layer: usize, e: usize) -> Option<usize> {
        self.map.slot_of(key(layer, e))
    }

    /// Fills every expert of `moe_layers` when they all fit, and publishes each whole layer to
    /// the backend. Does nothing otherwise.
    pub fn preload(
        &mut self,
        be: &B,
        source: &dyn ExpertSource,
        moe_layers: &[usize],
    ) -> Result<()> {
        if !self.all_fit {
            return Ok(());
        }
        let ids: Vec<usize> = (0..self.num_experts).collect();
        for &l in moe_layers {
            for chunk in ids.chunks(self.group) {
                let mut g = Group::default();
                let slots = self.lookup(be, source, l, chunk, &mut g)?;
                debug_assert_eq!(slots.len(), chunk.len());
                self.map.end(g);
            }
            self.publish(be, l)?;
        }
        Ok(())
    }

    /// Offers a whole layer to the backend for resident batches (once).
    fn publish(&mut self, be: &B, layer: usize) -> Result<()> {
        if !self.all_fit || self.published.get(layer).is_some_and(|p| p.is_some()) {
            return Ok(());
        }
        if self.map.layer_count(layer) < self.num_experts {
            return Ok(());
        }
        let table: Option<Vec<usize>> = (0..self.num_experts)
            .map(|e| self.map.slot_of(key(layer, e)))
            .collect();
        let Some(table) = table else {
            return Ok(());
        };
        let ok = be.publish_resident(&self.layout, &mut self.slots, layer, &table)?;
        if self.published.len() <= layer {
            self.published.resize(layer + 1, None);
        }
        self.published[layer] = Some(ok);
        Ok(())
    }

    /// Slots for `experts` of `layer` (distinct) in the batch `g`, misses filled.
    fn lookup(
        &mut self,
        be: &B,
        source: &dyn ExpertSource,
        layer: usize,
        experts: &[usize],
        g: &mut Group,
    ) -> Result<Vec<usize>> {
        let mut slots = Vec::with_capacity(experts.len());
        let mut missed = Vec::new();
        for &e in experts {
            let a = self.map.access(key(layer, e), g)?;
            slots.push(a.slot);
            if a.hit {
                self.stats.hits += 1;
            } else {
                missed.push((e, a.slot));
            }
        }
        if missed.is_empty() {
            return Ok(slots);
        }
        if let Err(err) = self.fill(be, source, layer, &missed) {
            for &(e, _) in &missed {
                self.map.forget(key(layer, e));
            }
            return Err(err);
        }
        Ok(slots)
    }

    /// Fills the slots of `missed` (expert, slot): from the middle tier when it has them, the
    /// rest read from `source` (staged through the middle tier when there is one).
    fn fill(
        &mut self,
        be: &B,
        source: &dyn ExpertSource,
        layer: usize,
        missed: &[(usize, usize)],
    ) -> Result<()> {
        self.stats.misses += missed.len() as u64;
        self.stats.bytes_filled += (missed.len() * self.layout.bytes) as u64;
        // (expert, device slot, middle slot or none): read from the source.
        let mut read: Vec<(usize, usize, Option<usize>)> = Vec::new();
        let mut from_host: Vec<Fill<'_>> = Vec::new();
        let mut hg = Group::default();
        for &(e, slot) in missed {
            match self.middle.as_mut() {
                Some(m) => {
                    let a = m.map.access(key(layer, e), &mut hg)?;
                    if a.hit {
                        self.stats.host_hits += 1;
                        from_host.push(Fill {
                            slot,
                            from: FillFrom::Host(a.slot),
                        });
                    } else {
                        read.push((e, slot, Some(a.slot)));
                    }
                }
                None => read.push((e, slot, None)),
            }
        }
        let ids: Vec<usize> = read.iter().map(|r| r.0).collect();
        let t0 = Instant::now();
        let ws = if ids.is_empty() {
            Vec::new()
        } else {
            source.prefetch(layer, &ids);
            source.fetch(layer, &ids)?
        };
        self.stats.fetch += t0.elapsed();
        if ws.len() != ids.len() {
            return Err(Error::Expert {
                layer,
                expert: ids.first().copied().unwrap_or(0),
                msg: format!(
                    "expert source returned {} of {} experts",
                    ws.len(),
                    ids.len()
                ),
            });
        }
        let mut fills = from_host;
        for (&(_, slot, host_slot), w) in read.iter().zip(&ws) {
            fills.push(Fill {
                slot,
                from: FillFrom::Source {
                    weights: w,
                    host_slot,
                },
            });
        }
        let host = self.middle.as_mut().map(|m| &mut m.slots);
        let r = be.fill_slots(&self.layout, &mut self.slots, host, &fills);
        if let Some(m) = self.middle.as_mut() {
            if r.is_err() {
                for &(e, _, hs) in &read {
                    if hs.is_some() {
                        m.map.forget(key(layer, e));
                    }
                }
            }
            m.map.end(hg);
        }
        r
    }

    /// `Backend::moe_experts` through the tier: `out [t, H] = Σ w · expert(x)` over each
    /// token's routed experts of `call.layer`. `host` is the routing on the host, `None` only
    /// for a [`Self::layer_resident`] layer.
    pub fn run(
        &mut self,
        be: &B,
        call: ExpertCall<'_>,
        x: &B::Buf,
        routes: &B::Routes,
        host: Option<&Routes>,
        out: &mut B::Buf,
    ) -> Result<ExpertTimes> {
        let layer = call.layer;
        let t0 = Instant::now();
        let fetch0 = self.stats.fetch;
        let Some(host) = host else {
            if !self.layer_resident(layer) {
                return Err(Error::Invalid(format!(
                    "layer {layer}: routed experts without host routing, but the layer is not \
                     resident"
                )));
            }
            self.stats.resident_calls += 1;
            let batch = SlotBatch {
                layer,
                routing: SlotRouting::Resident,
                first: true,
            };
            be.slot_experts(&self.layout, &self.slots, &batch, x, routes, out)?;
            return Ok(ExpertTimes {
                wait: Duration::ZERO,
                compute: t0.elapsed(),
            });
        };
        let used = host.used();
        if let Some(&e) = used.iter().find(|&&e| e >= self.num_experts) {
            return Err(Error::Expert {
                layer,
                expert: e,
                msg: format!("routed to, but the layer has {} experts", self.num_experts),
            });
        }
        if used.is_empty() {
            let batch = SlotBatch {
                layer,
                routing: SlotRouting::Host {
                    routes: host,
                    experts: &[],
                    slots: &[],
                },
                first: true,
            };
            be.slot_experts(&self.layout, &self.slots, &batch, x, routes, out)?;
        }
        for (bi, chunk) in used.chunks(self.group).enumerate() {
            let mut g = Group::default();
            let slots = match self.lookup(be, call.source, layer, chunk, &mut g) {
                Ok(s) => s,
                Err(e) => {
                    self.map.end(g);
                    return Err(e);
                }
            };
            let batch = SlotBatch {
                layer,
                routing: SlotRouting::Host {
                    routes: host,
                    experts: chunk,
                    slots: &slots,
                },
                first: bi == 0,
            };
            let r = be.slot_experts(&self.layout, &self.slots, &batch, x, routes, out);
            self.map.end(g);
            r?;
        }
        self.publish(be, layer)?;
        let wait = self.stats.fetch - fetch0;
        Ok(ExpertTimes {
            wait,
            compute: t0.elapsed().saturating_sub(wait),
        })
    }
}
