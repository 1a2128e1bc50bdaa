//! The tier on the CPU's host slots: its hits, misses and evictions are the policy's own (a
//! twin policy fed the same accesses agrees), its outputs are the reference's for random
//! routings under every policy, and a failed fill leaves nothing half-resident.
use std::sync::atomic::{AtomicBool, Ordering};

use rand::{rngs::StdRng, Rng, SeedableRng};

use super::*;
use crate::backend::conformance::{nmse, random_experts, random_linear, Fmt, MemExperts};
use crate::backend::{Backend, Cpu, ExpertCall, Reference};
use crate::cache::{key, CachePolicy};
use crate::experts::{ExpertCounters, ExpertSource};
use crate::store::DType;

const E: usize = 12;
const H: usize = 128;
const I: usize = 64;
const LAYERS: [usize; 2] = [1, 3];

fn experts(rng: &mut StdRng, f: Fmt) -> MemExperts {
    random_experts(rng, E, I, H, f)
}

/// `t` tokens routed to `k` distinct experts each, random weights.
fn routing(rng: &mut StdRng, t: usize, k: usize) -> Routes {
    let mut r = Routes {
        k,
        ..Routes::default()
    };
    for _ in 0..t {
        let mut ids: Vec<u32> = Vec::new();
        while ids.len() < k {
            let e = rng.gen_range(0..E as u32);
            if !ids.contains(&e) {
                ids.push(e);
            }
        }
        r.ids.extend(ids);
        r.weights.extend((0..k).map(|_| rng.gen_range(0.0..1.0f32)));
    }
    r
}

fn want(src: &dyn ExpertSource, layer: usize, x: &[f32], r: &Routes) -> Vec<f32> {
    let call = ExpertCall {
        source: src,
        layer,
        parallel: false,
    };
    let mut out = vec![0f32; x.len()];
    Reference
        .moe_experts(call, &x.to_vec(), r, Some(r), &mut out)
        .expect("reference");
    out
}

fn tier(src: &MemExperts, spec: &TierSpec) -> Residency<Cpu> {
    let layout = SlotLayout::of(&src.experts[0]).expect("layout");
    Residency::new(&Cpu, layout, spec, &LAYERS, E).expect("tier")
}

/// The same accesses through a twin of the policy: (hits, evictions).
fn twin(spec: &TierSpec, accesses: &[u64]) -> (u64, u64) {
    let mut p = spec.policy.build(spec.experts, &LAYERS, spec.warmup);
    let (mut hits, mut ev) = (0, Vec::new());
    for &k in accesses {
        hits += p.access(k, &mut ev) as u64;
    }
    (hits, ev.len() as u64)
}

#[test]
fn tier_counts_what_the_policy_counts_and_computes_what_the_reference_does() {
    let mut rng = StdRng::seed_from_u64(18);
    for f in [Fmt::Affine(4, 64, DType::BF16), Fmt::Bf16] {
        let src = experts(&mut rng, f);
        for policy in CachePolicy::ALL {
            let spec = TierSpec {
                experts: 5,
                policy,
                warmup: 12,
                host_experts: 6,
                group: 4,
            };
            let mut t = tier(&src, &spec);
            assert_eq!((t.slots(), t.host_slots()), (9, Some(10)));
            let mut accesses = Vec::new();
            for call in 0..40 {
                let (tokens, k) = if call % 7 == 3 { (5, 3) } else { (1, 3) };
                let layer = LAYERS[call % 2];
                let r = routing(&mut rng, tokens, k);
                // Batches of at most `group` experts, ascending: the order the tier accesses.
                for chunk in r.used().chunks(spec.group) {
                    accesses.extend(chunk.iter().map(|&e| key(layer, e)));
                }
                let x: Vec<f32> = (0..tokens * H).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let call = ExpertCall {
                    source: &src,
                    layer,
                    parallel: false,
                };
                let mut out = vec![f32::NAN; tokens * H];
                t.run(&Cpu, call, &x, &r, Some(&r), &mut out)
                    .expect("tier run");
                let e = nmse(&out, &want(&src, layer, &x, &r));
                assert!(e < 1e-9, "{policy} {f:?}: NMSE {e:e}");
            }
            let s = t.stats();
            let (hits, evictions) = twin(&spec, &accesses);
            assert_eq!(s.hits, hits, "{policy}: hits");
            assert_eq!(s.misses, accesses.len() as u64 - hits, "{policy}: misses");
            assert_eq!(s.evictions, evictions, "{policy}: evictions");
            // `static` pins once and never evicts; the others must have, at 5 of 24.
            let evicts = policy != CachePolicy::Static;
            assert!(
                s.misses > 0 && (s.evictions > 0) == evicts,
                "{policy}: {s:?}"
            );
            assert_eq!(
                s.bytes_filled,
                s.misses * t.layout().bytes as u64,
                "{policy}"
            );
            if policy == CachePolicy::Lru {
                assert!(s.host_hits > 0, "the middle tier served none: {s:?}");
            }
        }
    }
}

#[test]
fn all_experts_resident_run_without_host_routing() {
    let mut rng = StdRng::seed_from_u64(7);
    let src = experts(&mut rng, Fmt::Affine(8, 32, DType::BF16));
    let spec = TierSpec {
        experts: LAYERS.len() * E,
        policy: CachePolicy::Static,
        warmup: 1000,
        host_experts: 4,
        group: 5,
    };
    let mut t = tier(&src, &spec);
    // The middle tier stages the fills even when every expert fits.
    assert!(t.all_fit() && t.host_slots() == Some(4 + 5));
    assert!(!t.layer_resident(LAYERS[0]));
    t.preload(&Cpu, &src, &LAYERS).expect("preload");
    assert!(LAYERS.iter().all(|&l| t.layer_resident(l)));
    assert_eq!(t.stats().misses, (LAYERS.len() * E) as u64);
    for tokens in [1, 4] {
        let r = routing(&mut rng, tokens, 4);
        let x: Vec<f32> = (0..tokens * H).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let call = ExpertCall {
            source: &src,
            layer: LAYERS[1],
            parallel: false,
        };
        let mut out = vec![f32::NAN; tokens * H];
        t.run(&Cpu, call, &x, &r, None, &mut out)
            .expect("resident run");
        let e = nmse(&out, &want(&src, LAYERS[1], &x, &r));
        assert!(e < 1e-9, "NMSE {e:e}");
    }
    let s = t.stats();
    assert_eq!(
        (s.misses, s.evictions, s.resident_calls),
        ((LAYERS.len() * E) as u64, 0, 2)
    );
    // A layer that is not resident refuses to run without the routing.
    let call = ExpertCall {
        source: &src,
        layer: 0,
        parallel: false,
    };
    let r = routing(&mut rng, 1, 2);
    let mut out = vec![0f32; H];
    let e = t.run(&Cpu, call, &vec![0.0; H], &r, None, &mut out);
    assert!(e.is_err_and(|e| e.to_string().contains("layer 0")));
}

/// Fails every fetch while `fail` is set.
struct Flaky<'a> {
    inner: &'a MemExperts,
    fail: AtomicBool,
}

impl ExpertSource for Flaky<'_> {
    fn fetch(&self, layer: usize, ids: &[usize]) -> Result<Vec<ExpertWeights>> {
        if self.fail.load(Ordering::Relaxed) {
            return Err(crate::error::Error::Expert {
                layer,
                expert: ids[0],
                msg: "read failed".into(),
            });
        }
        self.inner.fetch(layer, ids)
    }
    fn counters(&self) -> &ExpertCounters {
        self.inner.counters()
    }
    fn expert_bytes(&self) -> usize {
        self.inner.expert_bytes()
    }
    fn describe(&self) -> String {
        "flaky".into()
    }
}

/// A failed read leaves no slot claiming the expert: the next call reads it again and computes
/// the right result (a slot kept after a failed fill would hold another expert's bytes).
#[test]
fn failed_fill_is_not_resident() {
    let mut rng = StdRng::seed_from_u64(3);
    let src = experts(&mut rng, Fmt::Affine(4, 64, DType::BF16));
    let flaky = Flaky {
        inner: &src,
        fail: AtomicBool::new(false),
    };
    let spec = TierSpec {
        experts: 3,
        policy: CachePolicy::Lru,
        warmup: 0,
        host_experts: 0,
        group: 3,
    };
    let mut t = tier(&src, &spec);
    let x: Vec<f32> = (0..H).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let call = ExpertCall {
        source: &flaky,
        layer: 1,
        parallel: false,
    };
    let mut out = vec![0f32; H];
    // Fill slots with experts 0..3, then evict them all through a failing read of 3..6.
    let first = Routes {
        k: 3,
        ids: vec![0, 1, 2],
        weights: vec![0.5, 0.3, 0.2],
    };
    t.run(&Cpu, call, &x, &first, Some(&first), &mut out)
        .expect("fill");
    flaky.fail.store(true, Ordering::Relaxed);
    let second = Routes {
        k: 3,
        ids: vec![3, 4, 5],
        weights: vec![0.5, 0.3, 0.2],
    };
    assert!(t
        .run(&Cpu, call, &x, &second, Some(&second), &mut out)
        .is_err());
    assert_eq!(t.slot_of(1, 3), None, "a failed fill stayed resident");
    flaky.fail.store(false, Ordering::Relaxed);
    t.run(&Cpu, call, &x, &second, Some(&second), &mut out)
        .expect("refill");
    let e = nmse(&out, &want(&src, 1, &x, &second));
    assert!(e < 1e-9, "NMSE {e:e}");
}

#[test]
fn layout_refuses_experts_of_another_shape() {
    let mut rng = StdRng::seed_from_u64(1);
    let src = experts(&mut rng, Fmt::Affine(4, 64, DType::BF16));
    let l = SlotLayout::of(&src.experts[0]).expect("layout");
    assert_eq!(l.offsets.iter().filter(|&&o| o % 256 != 0).count(), 0);
    assert!(l.slot >= l.bytes);
    let other = experts(&mut rng, Fmt::Bf16);
    let e = l.parts(&other.experts[0]).expect_err("mismatch refused");
    assert!(e.to_string().contains("expert"), "{e}");
    let mut wrong = src.experts[0].clone();
    wrong.down = random_linear(&mut rng, H, I, Fmt::Affine(8, 64, DType::BF16));
    assert!(SlotLayout::of(&wrong).is_err());
}

/// The budget keeps one batch of slots for staging: capacity is what is left, at least one
/// batch and at most every expert (CUDA and wgpu size their tiers through this one rule).
#[test]
fn tier_spec_within_budget() {
    let spec = |budget| TierSpec::within(budget, 100, 2, 8, 2, 4, CachePolicy::Lru, 0).experts;
    assert_eq!(spec(1000), 6); // 10 slots, 4 kept for a batch
    assert_eq!(spec(100), 4); // less than a batch: one batch anyway
    assert_eq!(spec(1_000_000), 16); // never more than 2 layers x 8 experts
}
