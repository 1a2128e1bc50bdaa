//! Expert-cache replacement policies, one implementation shared by the engine's expert cache
//! (`cached.rs`, `--expert-cache-gb` with `--cache-policy`), any other tier that holds experts
//! (a tier keeps a `Box<dyn Policy>` and its own bytes), and `flashmoe trace simulate`, so that
//! a simulated hit is the hit the engine would count. Every entry is one routed expert (all the
//! same size), keyed by [`key`]; capacity is in experts.
//!
//! - `lru`: least recently used.
//! - `lfu`: least frequently used with dynamic aging (LFU-DA: priority = age + uses, the age
//!   rising to each evicted priority), so that once-hot experts do not stay forever.
//! - `arc`: Adaptive Replacement Cache (Megiddo & Modha 2003): recency and frequency lists
//!   with ghost lists steering the split.
//! - `layer-lfu`: an equal share of the capacity per MoE layer, LFU-DA within each layer (a
//!   layer with bursty routing cannot take another layer's hot experts).
//! - `static`: counts the first `warmup` accesses, then pins the most used experts (loaded on
//!   their next use) and never changes them; nothing is kept during the warm-up.
//!
//! Belady's offline optimum (`belady.rs`) is the upper bound the simulation reports beside them.
mod belady;
mod cached;
mod policies;

pub use belady::belady_hits;
pub use cached::{CacheSpec, CachedExperts};
pub use policies::{ArcCache, LayerLfu, Lfu, Lru, Static};

/// The key of expert `expert` of layer `layer`.
pub fn key(layer: usize, expert: usize) -> u64 {
    ((layer as u64) << 32) | expert as u64
}

/// The layer of a [`key`].
pub fn key_layer(k: u64) -> usize {
    (k >> 32) as usize
}

/// A replacement policy over equal-size entries.
pub trait Policy: Send {
    /// One access of `key`: `true` on a hit. On a miss the policy may admit `key`; every key
    /// that stops being resident because of this access is pushed to `evicted`.
    fn access(&mut self, key: u64, evicted: &mut Vec<u64>) -> bool;
    /// Whether `key` is resident now.
    fn resident(&self, key: u64) -> bool;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CachePolicy {
    Lru,
    Lfu,
    Arc,
    LayerLfu,
    Static,
}

/// The engine's default (`--cache-policy`), chosen by `flashmoe trace simulate`: over the
/// traces available when it was set (greedy decoding of the three tiny golden models and of
/// two `flashmoe synth` models, at 10/25/50/75% of all experts), ARC had the smallest mean and
/// largest-case shortfall from the best policy of each case (3.9 and 11.3 points of hit rate,
/// against LRU's 4.5 and 26.4: a global LRU smaller than one token's experts over all layers
/// thrashes on the layer-by-layer scan). None of those models is trained, so this is
/// provisional: re-run the simulation on a real model's traces (README, routing traces).
pub const DEFAULT_POLICY: CachePolicy = CachePolicy::Arc;

/// Tokens of accesses `static` counts before it pins, unless told otherwise.
pub const DEFAULT_WARMUP_TOKENS: usize = 64;

impl CachePolicy {
    pub const ALL: [CachePolicy; 5] = [
        CachePolicy::Lru,
        CachePolicy::Lfu,
        CachePolicy::Arc,
        CachePolicy::LayerLfu,
        CachePolicy::Static,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CachePolicy::Lru => "lru",
            CachePolicy::Lfu => "lfu",
            CachePolicy::Arc => "arc",
            CachePolicy::LayerLfu => "layer-lfu",
            CachePolicy::Static => "static",
        }
    }

    pub fn parse(s: &str) -> Option<CachePolicy> {
        Self::ALL.into_iter().find(|p| p.name() == s)
    }

    /// The policy over `cap` experts. `moe_layers` are the model's MoE layer indices
    /// (`layer-lfu` splits by them); `warmup` is `static`'s warm-up in accesses
    /// ([`warmup_accesses`]).
    pub fn build(self, cap: usize, moe_layers: &[usize], warmup: usize) -> Box<dyn Policy> {
        match self {
            CachePolicy::Lru => Box::new(Lru::new(cap)),
            CachePolicy::Lfu => Box::new(Lfu::new(cap)),
            CachePolicy::Arc => Box::new(ArcCache::new(cap)),
            CachePolicy::LayerLfu => Box::new(LayerLfu::new(cap, moe_layers)),
            CachePolicy::Static => Box::new(Static::new(cap, warmup)),
        }
    }
}

/// `static`'s warm-up in accesses for `tokens` decode tokens: each reads K experts per MoE
/// layer. The engine and the simulation both convert with this, so they pin at the same access.
pub fn warmup_accesses(tokens: usize, k: usize, moe_layers: usize) -> usize {
    tokens * k * moe_layers
}

#[cfg(test)]
mod tests;

impl Default for CachePolicy {
    fn default() -> Self {
        DEFAULT_POLICY
    }
}

impl std::fmt::Display for CachePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
