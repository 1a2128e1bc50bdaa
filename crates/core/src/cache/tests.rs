//! Each policy against hit sequences worked out by hand from its definition, and Belady's
//! optimum against a brute-force search over every admission/eviction choice.
use rand::{Rng, SeedableRng};

use super::*;

const A: u64 = 1;
const B: u64 = 2;
const C: u64 = 3;

fn hits(p: &mut dyn Policy, seq: &[u64]) -> Vec<bool> {
    let mut ev = Vec::new();
    seq.iter().map(|&k| p.access(k, &mut ev)).collect()
}

const F: bool = false;
const T: bool = true;

#[test]
fn lru_by_hand() {
    // [A] [A B] [B A] [A C] [C B] [B A] [A C]
    assert_eq!(
        hits(&mut Lru::new(2), &[A, B, A, C, B, A, C]),
        [F, F, T, F, F, F, F]
    );
    // A stays hot but is the oldest when C comes.
    assert_eq!(
        hits(&mut Lru::new(2), &[A, A, A, B, C, A]),
        [F, T, T, F, F, F]
    );
    assert_eq!(hits(&mut Lru::new(0), &[A, A]), [F, F]);
}

#[test]
fn lfu_aging_by_hand() {
    // A reaches priority 3; B (1) goes when C comes (age 1, C gets 2); A still hits.
    assert_eq!(
        hits(&mut Lfu::new(2), &[A, A, A, B, C, A]),
        [F, T, T, F, F, T]
    );
    // Aging: after A (2) and C (age 1 + 1 = 2) tie, the older (A) goes; age climbs to 2
    // and 3 so the newcomers B, A, C each outrank the survivor.
    assert_eq!(
        hits(&mut Lfu::new(2), &[A, B, A, C, B, A, C]),
        [F, F, T, F, F, F, F]
    );
}

#[test]
fn arc_by_hand() {
    // A, A, A: T2 = [A]. B: T1 = [B]. C: REPLACE moves B to B1 (p = 0 < |T1|); T1 = [C].
    // A hits in T2. B (ghost in B1): p = 1, REPLACE demotes T2's A to B2, B to T2.
    // A (ghost in B2): p = 0, REPLACE demotes T1's C to B1, A to T2 = [B, A].
    // C (ghost in B1): p = 1, T1 empty so T2's B goes to B2; T2 = [A, C].
    let mut arc = ArcCache::new(2);
    assert_eq!(
        hits(&mut arc, &[A, A, A, B, C, A, B, A, C]),
        [F, T, T, F, F, T, F, F, F]
    );
    assert!(arc.resident(A) && arc.resident(C) && !arc.resident(B));
    // LRU on the same sequence differs at positions 6 and 8.
    assert_eq!(
        hits(&mut Lru::new(2), &[A, A, A, B, C, A, B, A, C]),
        [F, T, T, F, F, F, F, T, F]
    );
}

#[test]
fn layer_lfu_by_hand() {
    let (a0, b0, a1) = (key(0, 1), key(0, 2), key(1, 1));
    // One slot per layer: layer 0's churn cannot evict layer 1's expert.
    let seq = [a0, a1, b0, a0, a1];
    assert_eq!(hits(&mut LayerLfu::new(2, &[0, 1]), &seq), [F, F, F, F, T]);
    assert_eq!(hits(&mut Lru::new(2), &seq), [F, F, F, F, F]);
}

#[test]
fn static_by_hand() {
    // Warm-up A B A pins A (2 uses); B never hits; A loads on its next use, then hits.
    let mut s = Static::new(1, 3);
    assert_eq!(hits(&mut s, &[A, B, A, B, A, A]), [F, F, F, F, F, T]);
    assert!(s.resident(A) && !s.resident(B));
}

#[test]
fn belady_by_hand() {
    // C is never used again: not admitted, so A and B both hit.
    assert_eq!(belady_hits(&[A, B, C, A, B], 2), 2);
    assert_eq!(belady_hits(&[A, B, C, A, B], 0), 0);
    // Evicts B (next use farthest) for C.
    assert_eq!(belady_hits(&[A, B, C, A, C, B], 2), 2);
}

/// The most hits any choice of admissions and evictions gets.
fn brute(seq: &[u64], cap: usize, cache: &mut Vec<u64>) -> u64 {
    let Some((&k, rest)) = seq.split_first() else {
        return 0;
    };
    if cache.contains(&k) {
        return 1 + brute(rest, cap, cache);
    }
    let mut best = brute(rest, cap, cache);
    if cache.len() < cap {
        cache.push(k);
        best = best.max(brute(rest, cap, cache));
        cache.pop();
    } else {
        for i in 0..cache.len() {
            let old = std::mem::replace(&mut cache[i], k);
            best = best.max(brute(rest, cap, cache));
            cache[i] = old;
        }
    }
    best
}

#[test]
fn belady_matches_brute_force() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(22);
    for _ in 0..300 {
        let n = rng.gen_range(1..=11);
        let keys = rng.gen_range(1..=5);
        let cap = rng.gen_range(0..=3);
        let seq: Vec<u64> = (0..n).map(|_| rng.gen_range(0..keys)).collect();
        let opt = brute(&seq, cap, &mut Vec::new());
        assert_eq!(belady_hits(&seq, cap), opt, "{seq:?} cap {cap}");
        // And no online policy beats it.
        for p in CachePolicy::ALL {
            let got = hits(&mut *p.build(cap, &[0], 2), &seq);
            let h = got.iter().filter(|&&x| x).count() as u64;
            assert!(h <= opt, "{} beat Belady on {seq:?} cap {cap}", p.name());
        }
    }
}

#[test]
fn resident_agrees_with_evictions() {
    // What a tier keeps must follow `resident` and `evicted` exactly: replay a random
    // sequence, tracking a set from the reports, and compare.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let seq: Vec<u64> = (0..400)
        .map(|_| key(rng.gen_range(0..3), rng.gen_range(0..6)))
        .collect();
    for p in CachePolicy::ALL {
        let mut pol = p.build(5, &[0, 1, 2], 40);
        let mut held = std::collections::HashSet::new();
        let mut ev = Vec::new();
        for &k in &seq {
            ev.clear();
            let hit = pol.access(k, &mut ev);
            assert_eq!(hit, held.contains(&k), "{}", p.name());
            for x in &ev {
                assert!(held.remove(x), "{} evicted {x} it did not hold", p.name());
            }
            if pol.resident(k) {
                held.insert(k);
            }
            assert!(held.len() <= 5, "{} holds {} > 5", p.name(), held.len());
        }
    }
}
