//! The online policies of `mod.rs`, each a small exact implementation (no sampling, no
//! approximation), deterministic for a given access sequence: ties go to the oldest entry.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::{key_layer, Policy};

/// Keys in recency order: `touch` makes a key the most recent.
#[derive(Default)]
struct Recency {
    tick: u64,
    at: HashMap<u64, u64>,
    order: BTreeMap<u64, u64>,
}

impl Recency {
    fn touch(&mut self, key: u64) {
        self.tick += 1;
        if let Some(old) = self.at.insert(key, self.tick) {
            self.order.remove(&old);
        }
        self.order.insert(self.tick, key);
    }
    fn remove(&mut self, key: u64) -> bool {
        match self.at.remove(&key) {
            Some(t) => {
                self.order.remove(&t);
                true
            }
            None => false,
        }
    }
    fn pop_oldest(&mut self) -> Option<u64> {
        let (_, k) = self.order.pop_first()?;
        self.at.remove(&k);
        Some(k)
    }
    fn contains(&self, key: u64) -> bool {
        self.at.contains_key(&key)
    }
    fn len(&self) -> usize {
        self.at.len()
    }
}

/// Least recently used.
pub struct Lru {
    cap: usize,
    r: Recency,
}

impl Lru {
    pub fn new(cap: usize) -> Self {
        Lru {
            cap,
            r: Recency::default(),
        }
    }
}

impl Policy for Lru {
    fn access(&mut self, key: u64, evicted: &mut Vec<u64>) -> bool {
        if self.r.contains(key) {
            self.r.touch(key);
            return true;
        }
        if self.cap == 0 {
            return false;
        }
        if self.r.len() >= self.cap {
            evicted.extend(self.r.pop_oldest());
        }
        self.r.touch(key);
        false
    }
    fn resident(&self, key: u64) -> bool {
        self.r.contains(key)
    }
}

/// LFU with dynamic aging: priority = age + uses since admission; evicts the lowest
/// priority (oldest on ties) and raises the age to it.
pub struct Lfu {
    cap: usize,
    age: u64,
    tick: u64,
    /// key -> (priority, last tick, uses)
    at: HashMap<u64, (u64, u64, u64)>,
    order: BTreeSet<(u64, u64, u64)>,
}

impl Lfu {
    pub fn new(cap: usize) -> Self {
        Lfu {
            cap,
            age: 0,
            tick: 0,
            at: HashMap::new(),
            order: BTreeSet::new(),
        }
    }
}

impl Policy for Lfu {
    fn access(&mut self, key: u64, evicted: &mut Vec<u64>) -> bool {
        self.tick += 1;
        if let Some(e) = self.at.get_mut(&key) {
            self.order.remove(&(e.0, e.1, key));
            e.2 += 1;
            e.0 = self.age + e.2;
            e.1 = self.tick;
            self.order.insert((e.0, e.1, key));
            return true;
        }
        if self.cap == 0 {
            return false;
        }
        if self.at.len() >= self.cap {
            if let Some((p, _, k)) = self.order.pop_first() {
                self.at.remove(&k);
                self.age = p;
                evicted.push(k);
            }
        }
        let p = self.age + 1;
        self.at.insert(key, (p, self.tick, 1));
        self.order.insert((p, self.tick, key));
        false
    }
    fn resident(&self, key: u64) -> bool {
        self.at.contains_key(&key)
    }
}

/// Adaptive Replacement Cache (Megiddo & Modha, FAST 2003, Fig. 4), integer target `p`.
pub struct ArcCache {
    c: usize,
    p: usize,
    t1: Recency,
    t2: Recency,
    b1: Recency,
    b2: Recency,
}

impl ArcCache {
    pub fn new(cap: usize) -> Self {
        ArcCache {
            c: cap,
            p: 0,
            t1: Recency::default(),
            t2: Recency::default(),
            b1: Recency::default(),
            b2: Recency::default(),
        }
    }

    /// REPLACE(x, p): demote T1's or T2's oldest to its ghost list.
    fn replace(&mut self, in_b2: bool, evicted: &mut Vec<u64>) {
        let t1 = self.t1.len();
        if t1 >= 1 && ((in_b2 && t1 == self.p) || t1 > self.p) {
            if let Some(k) = self.t1.pop_oldest() {
                self.b1.touch(k);
                evicted.push(k);
            }
        } else if let Some(k) = self.t2.pop_oldest() {
            self.b2.touch(k);
            evicted.push(k);
        } else if let Some(k) = self.t1.pop_oldest() {
            self.b1.touch(k);
            evicted.push(k);
        }
    }
}

impl Policy for ArcCache {
    fn access(&mut self, x: u64, evicted: &mut Vec<u64>) -> bool {
        if self.t1.remove(x) || self.t2.contains(x) {
            self.t2.touch(x);
            return true;
        }
        if self.c == 0 {
            return false;
        }
        if self.b1.contains(x) {
            let d = (self.b2.len() / self.b1.len()).max(1);
            self.p = (self.p + d).min(self.c);
            self.replace(false, evicted);
            self.b1.remove(x);
            self.t2.touch(x);
            return false;
        }
        if self.b2.contains(x) {
            let d = (self.b1.len() / self.b2.len()).max(1);
            self.p = self.p.saturating_sub(d);
            self.replace(true, evicted);
            self.b2.remove(x);
            self.t2.touch(x);
            return false;
        }
        let l1 = self.t1.len() + self.b1.len();
        let total = l1 + self.t2.len() + self.b2.len();
        if l1 == self.c {
            if self.t1.len() < self.c {
                self.b1.pop_oldest();
                self.replace(false, evicted);
            } else if let Some(k) = self.t1.pop_oldest() {
                evicted.push(k);
            }
        } else if total >= self.c {
            if total == 2 * self.c {
                self.b2.pop_oldest();
            }
            self.replace(false, evicted);
        }
        self.t1.touch(x);
        false
    }
    fn resident(&self, key: u64) -> bool {
        self.t1.contains(key) || self.t2.contains(key)
    }
}

/// An equal share of the capacity per MoE layer (the first `cap % layers` get one more),
/// LFU-DA within each.
pub struct LayerLfu {
    part: HashMap<usize, Lfu>,
}

impl LayerLfu {
    pub fn new(cap: usize, moe_layers: &[usize]) -> Self {
        let n = moe_layers.len().max(1);
        let part = moe_layers
            .iter()
            .enumerate()
            .map(|(i, &l)| (l, Lfu::new(cap / n + usize::from(i < cap % n))))
            .collect();
        LayerLfu { part }
    }
}

impl Policy for LayerLfu {
    fn access(&mut self, key: u64, evicted: &mut Vec<u64>) -> bool {
        let l = key_layer(key);
        // A layer the model did not declare MoE gets no share (misses).
        match self.part.get_mut(&l) {
            Some(p) => p.access(key, evicted),
            None => false,
        }
    }
    fn resident(&self, key: u64) -> bool {
        self.part
            .get(&key_layer(key))
            .is_some_and(|p| p.resident(key))
    }
}

/// Counts the first `warmup` accesses (keeping nothing), then pins the `cap` most used keys
/// (ties to the lower key); a pinned key is loaded on its first use after that.
pub struct Static {
    cap: usize,
    warmup: usize,
    seen: usize,
    counts: HashMap<u64, u64>,
    pinned: Option<HashSet<u64>>,
    loaded: HashSet<u64>,
}

impl Static {
    pub fn new(cap: usize, warmup: usize) -> Self {
        Static {
            cap,
            warmup,
            seen: 0,
            counts: HashMap::new(),
            pinned: None,
            loaded: HashSet::new(),
        }
    }

    fn pin(&mut self) {
        let mut v: Vec<(u64, u64)> = self.counts.drain().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        self.pinned = Some(v.into_iter().take(self.cap).map(|(k, _)| k).collect());
    }
}

impl Policy for Static {
    fn access(&mut self, key: u64, _evicted: &mut Vec<u64>) -> bool {
        if self.pinned.is_none() {
            if self.seen < self.warmup {
                self.seen += 1;
                *self.counts.entry(key).or_default() += 1;
                return false;
            }
            self.pin();
        }
        let pinned = self.pinned.as_ref().is_some_and(|p| p.contains(&key));
        pinned && !self.loaded.insert(key)
    }
    fn resident(&self, key: u64) -> bool {
        self.loaded.contains(&key)
    }
}
