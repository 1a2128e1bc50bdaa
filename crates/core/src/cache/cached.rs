//! The CPU engine's expert cache (`--expert-cache-gb G --cache-policy P`): experts kept in
//! RAM between tokens by a [`Policy`], in front of any [`ExpertSource`] (a packed model's
//! reads, a checkpoint's mapping). Without it the CPU engine relies on the OS page cache alone.
//! A hit hands out the kept weights (an Arc bump); a miss reads from the source and offers
//! the expert to the policy.
//!
//! Hits are counted in the order `fetch` is called. The CPU backend fetches one layer's experts
//! in ascending id, but in parallel within a batch, so when the cache is nearly full two runs
//! of the same routing can evict differently; `bench decode --replay-trace` fetches serially
//! and matches `trace simulate` exactly.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::error::Result;
use crate::experts::{ExpertCounters, ExpertSource, ExpertWeights};

use super::{key, warmup_accesses, CachePolicy, Policy};

/// An expert cache's size and policy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CacheSpec {
    pub bytes: usize,
    pub policy: CachePolicy,
    /// `static`'s warm-up, in decode tokens.
    pub warmup_tokens: usize,
}

struct Held {
    policy: Box<dyn Policy>,
    weights: HashMap<u64, ExpertWeights>,
    evicted: Vec<u64>,
}

pub struct CachedExperts {
    inner: Box<dyn ExpertSource>,
    held: Mutex<Held>,
    spec: CacheSpec,
    cap: usize,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl CachedExperts {
    /// Caches `inner`'s experts; `moe_layers` and `k` size `layer-lfu`'s shares and `static`'s
    /// warm-up.
    pub fn new(
        inner: Box<dyn ExpertSource>,
        spec: CacheSpec,
        moe_layers: &[usize],
        k: usize,
    ) -> Self {
        let cap = spec.bytes / inner.expert_bytes().max(1);
        let warm = warmup_accesses(spec.warmup_tokens, k, moe_layers.len());
        CachedExperts {
            held: Mutex::new(Held {
                policy: spec.policy.build(cap, moe_layers, warm),
                weights: HashMap::new(),
                evicted: Vec::new(),
            }),
            inner,
            spec,
            cap,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// (hits, misses) so far.
    pub fn hits_misses(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// Experts the cache holds at most.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        // The map and the policy are updated together under the lock; a panic elsewhere
        // cannot leave them half-changed.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn one(&self, layer: usize, e: usize) -> Result<ExpertWeights> {
        let k = key(layer, e);
        {
            let mut h = self.lock();
            let Held {
                policy,
                weights,
                evicted,
            } = &mut *h;
            evicted.clear();
            let hit = policy.access(k, evicted);
            for x in evicted.drain(..) {
                weights.remove(&x);
            }
            if hit {
                if let Some(w) = weights.get(&k) {
                    let w = w.clone();
                    drop(h);
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    let c = self.inner.counters();
                    let b = w.nbytes() as u64;
                    c.fetched.fetch_add(1, Ordering::Relaxed);
                    c.bytes_read.fetch_add(b, Ordering::Relaxed);
                    c.bytes_cached.fetch_add(b, Ordering::Relaxed);
                    return Ok(w);
                }
            }
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let w =
            self.inner
                .fetch(layer, &[e])?
                .pop()
                .ok_or_else(|| crate::error::Error::Expert {
                    layer,
                    expert: e,
                    msg: "expert source returned nothing".into(),
                })?;
        let mut h = self.lock();
        if h.policy.resident(k) {
            h.weights.insert(k, w.clone());
        }
        Ok(w)
    }
}

impl ExpertSource for CachedExperts {
    fn prefetch(&self, layer: usize, experts: &[usize]) {
        let h = self.lock();
        let miss: Vec<usize> = experts
            .iter()
            .copied()
            .filter(|&e| !h.weights.contains_key(&key(layer, e)))
            .collect();
        drop(h);
        if !miss.is_empty() {
            self.inner.prefetch(layer, &miss);
        }
    }
    fn fetch(&self, layer: usize, experts: &[usize]) -> Result<Vec<ExpertWeights>> {
        experts.iter().map(|&e| self.one(layer, e)).collect()
    }
    fn counters(&self) -> &ExpertCounters {
        self.inner.counters()
    }
    fn expert_bytes(&self) -> usize {
        self.inner.expert_bytes()
    }
    fn cache_hits(&self) -> Option<(u64, u64)> {
        Some(self.hits_misses())
    }
    fn describe(&self) -> String {
        format!(
            "{} experts ({:.2} GB) kept in RAM by `{}`, in front of: {}",
            self.cap,
            self.spec.bytes as f64 / 1e9,
            self.spec.policy.name(),
            self.inner.describe()
        )
    }
}
