//! The experts `--io cached` keeps mapped between tokens: a bounded set of [`MapLease`]s by
//! (layer, expert), least recently used evicted first. A warm token's experts are then served
//! by cloning a lease, as `--io mapped` serves them, instead of each one's pages being mapped in
//! (`MADV_POPULATE_READ`) when fetched and dropped from the page tables (`MADV_DONTNEED`) when
//! the model lets go: that page-table work was ~25% of a warm token (issue 20). The bound keeps
//! what `cached` promises over `mapped`: the resident set does not grow with every expert ever
//! touched. An evicted lease unmaps its pages when its last view drops.
use std::collections::HashMap;
use std::sync::Arc;

use crate::buf::MapLease;

/// Kept leases; `limit` of them at most.
pub(crate) struct Kept {
    leases: HashMap<(usize, usize), (Arc<MapLease>, u64)>,
    /// Incremented per use: a lease's stamp says when it was last used.
    clock: u64,
    limit: usize,
}

impl Kept {
    pub fn new(limit: usize) -> Self {
        Kept {
            leases: HashMap::new(),
            clock: 0,
            limit,
        }
    }

    /// The lease of `key`, marked as just used.
    pub fn get(&mut self, key: (usize, usize)) -> Option<Arc<MapLease>> {
        self.clock += 1;
        let clock = self.clock;
        self.leases.get_mut(&key).map(|(l, stamp)| {
            *stamp = clock;
            l.clone()
        })
    }

    /// Keeps `lease` for `key` (replacing one a concurrent read kept first), evicting the least
    /// recently used beyond the limit.
    pub fn insert(&mut self, key: (usize, usize), lease: Arc<MapLease>) {
        if self.limit == 0 {
            return;
        }
        self.clock += 1;
        self.leases.insert(key, (lease, self.clock));
        // One over the limit at most: a linear scan per insert, and inserts are the misses.
        self.evict_to_limit();
    }

    /// Forgets `key` (its pages left the page cache: it is read again when back).
    pub fn remove(&mut self, key: (usize, usize)) {
        self.leases.remove(&key);
    }

    fn evict_to_limit(&mut self) {
        while self.leases.len() > self.limit {
            let oldest = self
                .leases
                .iter()
                .min_by_key(|(_, (_, stamp))| *stamp)
                .map(|(k, _)| *k);
            match oldest {
                Some(k) => self.leases.remove(&k),
                None => break,
            };
        }
    }

    pub fn len(&self) -> usize {
        self.leases.len()
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn contains(&self, key: (usize, usize)) -> bool {
        self.leases.contains_key(&key)
    }

    /// Sets the limit, evicting down to it at once.
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
        if limit == 0 {
            self.leases.clear();
        }
        self.evict_to_limit();
    }
}

/// Experts kept mapped by default: as many as fill half the memory available when the model
/// opens (those pages are in the page cache anyway while the experts are warm: mapping them
/// costs page tables, 8 bytes per 4 KiB page, and resident-set accounting, not memory), and at
/// least two tokens' worth (`2 * top_k` per MoE layer) so one token's experts never evict each
/// other.
pub(crate) fn default_limit(expert_bytes: usize, top_k: usize, moe_layers: usize) -> usize {
    let avail = crate::os::mem_available().unwrap_or(0) as usize;
    (avail / 2 / expert_bytes.max(1)).max(2 * top_k * moe_layers)
}
