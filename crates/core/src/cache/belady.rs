//! Belady's offline optimum (MIN) for equal-size entries: on a miss with the cache full, drop
//! whichever of the resident keys and the new one is next used farthest in the future (the
//! new one is then not admitted). No online policy can hit more often on the same sequence.
use std::collections::{BTreeSet, HashMap};

/// Hits of the optimal cache of `cap` entries on `seq`.
pub fn belady_hits(seq: &[u64], cap: usize) -> u64 {
    if cap == 0 {
        return 0;
    }
    // next[i]: where seq[i] is used next (usize::MAX: never).
    let mut next = vec![usize::MAX; seq.len()];
    let mut last: HashMap<u64, usize> = HashMap::new();
    for i in (0..seq.len()).rev() {
        if let Some(&j) = last.get(&seq[i]) {
            next[i] = j;
        }
        last.insert(seq[i], i);
    }
    let mut at: HashMap<u64, usize> = HashMap::new();
    let mut by_next: BTreeSet<(usize, u64)> = BTreeSet::new();
    let mut hits = 0;
    for (i, &k) in seq.iter().enumerate() {
        if let Some(n) = at.get_mut(&k) {
            hits += 1;
            by_next.remove(&(*n, k));
            *n = next[i];
            by_next.insert((next[i], k));
            continue;
        }
        if next[i] == usize::MAX {
            continue;
        }
        if at.len() >= cap {
            match by_next.last().copied() {
                Some((far, fk)) if far > next[i] => {
                    by_next.remove(&(far, fk));
                    at.remove(&fk);
                }
                _ => continue,
            }
        }
        at.insert(k, next[i]);
        by_next.insert((next[i], k));
    }
    hits
}
