//! Unified expert slots (`slots.rs`, issue 19): on unified memory with mappable storage
//! buffers (Apple silicon, lavapipe), slots are the buffers the host writes and shaders read.
//! The slot-batch conformance and the 4-bit golden fixture through a tier that evicts run
//! with unified and with staged (discrete) slots: identical logits, and no fill of a unified
//! slot goes through the queue's staging copy.
mod device;

use flashmoe_core::backend::conformance;
use flashmoe_testdata::golden;
use flashmoe_wgpu::{with_residency, Wgpu};

/// The test adapter when it offers unified slots; on CI (lavapipe, a CPU adapter with
/// `MAPPABLE_PRIMARY_BUFFERS`) it must.
fn unified_backend() -> Option<Wgpu> {
    let be = device::backend()?;
    if be.unified_slots() {
        return Some(be);
    }
    let why = format!("{:?} offers no unified slots", be.adapter());
    if std::env::var("CI").as_deref() == Ok("true") && be.adapter().software {
        panic!("CI=true: lavapipe should offer mappable storage buffers: {why}");
    }
    eprintln!("skipped: {why}");
    None
}

#[test]
fn unified_slots_conform() {
    for unified in [true, false] {
        let Some(be) = unified_backend() else { return };
        be.set_unified_slots(unified).expect("choose slots");
        let r = conformance::run_slots(&be);
        println!("unified {unified}: {}", r.summary());
        assert!(!r.checks.is_empty(), "run_slots checked nothing");
        r.assert_ok();
        let c = be.host_counters();
        if unified {
            assert!(c.slot_maps > 0 && c.slot_copies == 0, "{c:?}");
        } else {
            assert!(c.slot_copies > 0 && c.slot_maps == 0, "{c:?}");
        }
    }
}

/// Prefill + decode of the golden fixture in a tier of one batch's slots (experts evicted
/// and refilled between layers and tokens): the same logits bit for bit with either kind of
/// slot, within the golden tolerance, and the unified tier's fills make no device copy.
#[test]
fn unified_slots_golden_match_staged() {
    let Some((g, cpu)) = device::tiny_4bit() else {
        return;
    };
    let ids = g.ids("mlx4_input_ids");
    let (_, want) = &g.f32s["mlx4_logits"];
    let p = g.prompt_len("mlx4");
    let mut runs = Vec::new();
    for unified in [true, false] {
        let Some(be) = unified_backend() else { return };
        be.set_unified_slots(unified).expect("choose slots");
        let on = flashmoe_core::model::upload_to(&cpu, be).expect("upload");
        with_residency(&on, on.experts.expert_bytes()).expect("tier");
        let before = on.be.host_counters();
        let logits = golden::logits(&on, &ids, p);
        let c = on.be.host_counters().since(&before);
        let st = on.be.tier_stats().expect("stats");
        assert!(st.evictions > 0, "{st:?}");
        let err = flashmoe_testdata::max_abs(&logits, want);
        assert!(err < golden::TOL, "unified {unified}: logits off by {err}");
        if unified {
            assert!(c.slot_maps > 0 && c.slot_copies == 0, "{c:?}");
        } else {
            assert!(c.slot_copies > 0 && c.slot_maps == 0, "{c:?}");
        }
        eprintln!("unified {unified}: max abs err {err:.2e}, {c:?}, {st:?}");
        runs.push(logits);
    }
    assert!(
        runs[0]
            .iter()
            .zip(&runs[1])
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "unified and staged slots gave different logits"
    );
}
