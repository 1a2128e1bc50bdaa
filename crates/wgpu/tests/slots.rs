//! Core's residency tier over wgpu device slots (`slots.rs`): the slot-batch op against the
//! reference (conformance `run_slots`: 4-bit and bf16 slots, the adapter's default products
//! and the fast ones), and sessions of the 4-bit golden fixture whose routed experts sit in
//! slots, every expert preloaded and in a tier of one batch (evictions).
mod device;

use flashmoe_core::backend::conformance;
use flashmoe_testdata::golden;
use flashmoe_wgpu::{with_residency, Wgpu};

#[test]
fn wgpu_slots_conform() {
    let Some(probe) = device::backend() else {
        return;
    };
    let fast = probe.default_fast();
    drop(probe);
    for f in [None, fast] {
        let Some(be) = device::backend_with(None, f) else {
            return;
        };
        eprintln!("product kernels: {:?}", be.products());
        let r = conformance::run_slots(&be);
        println!("{}", r.summary());
        assert!(!r.checks.is_empty(), "run_slots checked nothing");
        assert!(
            r.checks
                .iter()
                .any(|c| c.class.contains("resident routing")),
            "no layer ran on device-side lookup"
        );
        r.assert_ok();
    }
}

/// The 4-bit golden fixture with its routed experts in slots: every expert preloaded (one
/// prompt and prefill + decode against the golden logits), and a tier of one batch's slots
/// (prefill + decode: experts evicted and refilled between layers and tokens).
#[test]
fn golden_logits_through_the_tier() {
    let Some((g, cpu)) = device::tiny_4bit() else {
        return;
    };
    let ids = g.ids("mlx4_input_ids");
    let (_, want) = &g.f32s["mlx4_logits"];
    let p = g.prompt_len("mlx4");
    for all in [true, false] {
        let Some(be) = device::backend() else { return };
        let on = flashmoe_core::model::upload_to(&cpu, be).expect("upload");
        let budget = if all {
            usize::MAX / 2
        } else {
            on.experts.expert_bytes()
        };
        with_residency(&on, budget).expect("tier");
        assert_eq!(on.be.tier_info().expect("a tier").all_fit, all);
        if all {
            assert!(Wgpu::preload(&on).expect("preload"));
            let full = golden::logits(&on, &ids, ids.len());
            let err = flashmoe_testdata::max_abs(&full, want);
            assert!(
                err < golden::TOL,
                "all resident, one prompt: logits off by {err}"
            );
        }
        let stepped = golden::logits(&on, &ids, p);
        let err = flashmoe_testdata::max_abs(&stepped, want);
        assert!(
            err < golden::TOL,
            "all resident {all}: prefill {p} + decode off by {err}"
        );
        let st = on.be.tier_stats().expect("stats");
        // All resident: each expert filled once, then every layer
        // looked up on the device (no routing read back).
        if all {
            assert!(st.evictions == 0 && st.resident_calls > 0, "{st:?}");
        } else {
            assert!(st.evictions > 0, "{st:?}");
        }
        eprintln!("all resident {all}: max abs err {err:.2e}, {st:?}");
    }
}
