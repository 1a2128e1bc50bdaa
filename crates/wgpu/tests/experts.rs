//! A prompt whose routed (token, expert) pairs exceed one grid dimension (65,535 workgroups):
//! the expert batch is split over several dispatches, on the per-call upload and on a resident
//! tier (device-side lookup, twice as many gate and up jobs). Before the split, both failed
//! with "grid exceeds the adapter's workgroups per dimension".
mod device;

use flashmoe_core::backend::conformance::{random_linear, Fmt, MemExperts};
use flashmoe_core::backend::{Backend, ExpertCall, Reference, Routes};
use flashmoe_core::cache::CachePolicy;
use flashmoe_core::experts::{ExpertCounters, ExpertWeights};
use flashmoe_core::residency::{Residency, SlotLayout, TierSpec};
use flashmoe_core::store::DType;
use rand::{Rng, SeedableRng};

#[test]
fn expert_batch_beyond_one_grid_dimension() {
    let Some(be) = device::backend() else {
        return;
    };
    let (h, inter, e, k) = (32, 32, 16, 10);
    let most = 65535;
    let t = most / k + 7;
    let mut rng = rand::rngs::StdRng::seed_from_u64(19);
    let f = Fmt::Affine(4, 32, DType::BF16);
    let src = MemExperts {
        experts: (0..e)
            .map(|_| ExpertWeights {
                gate: random_linear(&mut rng, inter, h, f),
                up: random_linear(&mut rng, inter, h, f),
                down: random_linear(&mut rng, h, inter, f),
            })
            .collect(),
        counters: ExpertCounters::default(),
    };
    let x: Vec<f32> = (0..t * h).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let lg: Vec<f32> = (0..t * e).map(|_| rng.gen_range(-3.0..3.0)).collect();
    let mut routes = Routes::default();
    Reference
        .router_topk(&lg, e, k, true, &mut routes)
        .expect("routes");
    let call = ExpertCall {
        source: &src,
        layer: 0,
        parallel: false,
    };
    let mut want = vec![0f32; t * h];
    Reference
        .moe_experts(call, &x, &routes, Some(&routes), &mut want)
        .expect("reference");
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    let check = |got: Vec<f32>, what: &str| {
        let err = flashmoe_testdata::max_abs(&got, &want);
        assert!(err < 1e-4 * scale, "{what}: off by {err} (scale {scale})");
    };
    let (xb, lgb) = (be.upload(&x).expect("x"), be.upload(&lg).expect("lg"));
    let mut rb = be.alloc_routes(t, k).expect("routes");
    be.router_topk(&lgb, e, k, true, &mut rb).expect("topk");

    let mut out = be.alloc(t * h).expect("out");
    be.moe_experts(call, &xb, &rb, Some(&routes), &mut out)
        .expect("per-call batch");
    check(be.download(&out).expect("down"), "per-call upload");

    let layout = SlotLayout::of(&src.experts[0]).expect("layout");
    let spec = TierSpec {
        experts: e,
        policy: CachePolicy::Lru,
        warmup: 0,
        host_experts: 0,
        group: k,
    };
    let mut tier = Residency::new(&be, layout, &spec, &[0], e).expect("tier");
    tier.preload(&be, &src, &[0]).expect("preload");
    assert!(
        tier.layer_resident(0),
        "the layer is looked up on the device"
    );
    let mut out = be.alloc(t * h).expect("out");
    tier.run(&be, call, &xb, &rb, None, &mut out)
        .expect("resident batch");
    check(be.download(&out).expect("down"), "resident tier");
}
