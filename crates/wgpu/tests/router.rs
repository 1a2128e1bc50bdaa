//! `router_topk` against the reference where the conformance harness does not reach: 512
//! experts (eight logits per thread of the workgroup-per-token kernel), logits repeated so that
//! the top k holds ties (to the lower id), 2,048 experts (the most), and more tokens than one
//! grid row's 32,768 workgroups; `argmax` over a head's 248,320 logits, which its first
//! dispatch splits into slices of 4,096: the maximum in a late slice, ties across slices (the
//! lower index), NaNs, all NaN (an error on both, as no value is finite).
mod device;

use flashmoe_core::backend::{Backend, Reference, Routes};
use rand::{Rng, SeedableRng};

fn check(be: &flashmoe_wgpu::Wgpu, ne: usize, k: usize, t: usize, ties: bool) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(ne as u64 * 31 + k as u64);
    let lg: Vec<f32> = (0..t * ne)
        .map(|_| {
            let v: f32 = rng.gen_range(-4.0..4.0);
            // A handful of distinct values: every pick is among equals.
            if ties {
                (v * 2.0).round() / 2.0
            } else {
                v
            }
        })
        .collect();
    let mut want = Routes::default();
    Reference
        .router_topk(&lg, ne, k, true, &mut want)
        .expect("reference");
    let lb = be.upload(&lg).expect("upload");
    let mut rb = be.alloc_routes(t, k).expect("routes");
    be.router_topk(&lb, ne, k, true, &mut rb).expect("topk");
    // No tier here: the routing is read back.
    let got = be
        .routes_host(&rb, 0)
        .expect("routes")
        .expect("read back")
        .into_owned();
    assert_eq!(got.ids, want.ids, "ne {ne} k {k} t {t} ties {ties}: ids");
    let err = flashmoe_testdata::max_abs(&got.weights, &want.weights);
    assert!(err < 1e-5, "ne {ne} k {k} t {t}: weights off by {err}");
}

#[test]
fn topk_many_experts_and_ties() {
    let Some(be) = device::backend() else { return };
    for (ne, k, t, ties) in [
        (512, 10, 5, false),
        (512, 10, 5, true),
        (2048, 64, 2, true),
        (100, 7, 3, false),
        (16, 4, 32768 + 5, false),
    ] {
        check(&be, ne, k, t, ties);
    }
}

#[test]
fn argmax_across_slices() {
    let Some(be) = device::backend() else { return };
    let n = 248_320;
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let base: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let mut cases: Vec<(&str, Vec<f32>)> = Vec::new();
    let mut late = base.clone();
    late[n - 3] = 7.0;
    cases.push(("maximum in the last slice", late));
    let mut tie = base.clone();
    for i in [4096 * 9 + 17, 4096 * 3 + 5, 4096 * 50] {
        tie[i] = 9.0;
    }
    cases.push(("ties across slices", tie));
    let mut nan = base.clone();
    for i in (0..n).step_by(997) {
        nan[i] = f32::NAN;
    }
    nan[4096 * 20] = 8.0;
    nan[4096 * 20 - 1] = f32::NAN;
    cases.push(("NaNs never win", nan));
    cases.push(("all NaN", vec![f32::NAN; 5000]));
    cases.push(("one value", vec![-2.0]));
    // No finite largest value: an error on both, never an id.
    for (name, x) in cases {
        let want = Reference.argmax(&x).ok();
        let got = be.argmax(&be.upload(&x).expect("upload")).ok();
        assert_eq!(got, want, "{name}");
    }
}
