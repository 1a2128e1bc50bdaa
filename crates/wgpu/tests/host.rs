//! The host work of a steady-state decode token (`HostCounters`), on the 4-bit golden fixture
//! with every routed expert resident: deterministic counts, printed per token for the record,
//! and the same for every token. The parameter arena is one buffer written at submission, so
//! the buffers a token creates do not depend on the commands per submission (an arena per
//! batch made one more buffer per submission).
mod device;

use std::sync::Arc;

use flashmoe_core::model::Model;
use flashmoe_wgpu::{with_residency, HostCounters, Wgpu};

/// Host counters of each of `n` greedy decode tokens after a warm-up token.
fn per_token(model: &Model<Wgpu>, n: usize) -> Vec<HostCounters> {
    let mut st = model.new_state().expect("state");
    let mut id = model.forward_argmax(&[1], &mut st).expect("warm-up token");
    (0..n)
        .map(|_| {
            let c0 = model.be.host_counters();
            id = model.forward_argmax(&[id], &mut st).expect("token");
            model.be.host_counters().since(&c0)
        })
        .collect()
}

/// The deterministic part of a token's counters (no time).
fn counts(c: &HostCounters) -> [u64; 6] {
    [
        c.dispatches,
        c.transfers,
        c.bind_groups,
        c.buffers,
        c.submissions,
        c.waits,
    ]
}

/// The same op over the same buffers twice: the second creates no bind group (kept from the
/// first) and no buffer, and a token's parameters are written at submission whatever the
/// commands per submission.
#[test]
fn repeated_op_makes_no_bind_group() {
    use flashmoe_core::backend::Backend;
    let Some(be) = device::backend() else { return };
    let x = be.upload(&[1.0, 2.0, 3.0, 4.0]).expect("upload");
    let mut y = be.upload(&[0.5; 4]).expect("upload");
    for batch in [1, 256] {
        be.set_submit_batch(batch).expect("batch");
        be.add(&mut y, &x).expect("add");
        let c0 = be.host_counters();
        be.add(&mut y, &x).expect("add");
        let c = be.host_counters().since(&c0);
        assert_eq!((c.dispatches, c.bind_groups, c.buffers), (1, 0, 0), "{c:?}");
    }
    // 0.5 + 4 additions of x.
    assert_eq!(
        be.download(&y).expect("download"),
        vec![4.5, 8.5, 12.5, 16.5]
    );
}

/// Decode tokens with every expert resident: each token's counts are the same whatever the
/// commands per submission (but the submissions), and a token creates fewer bind groups than
/// it dispatches (only those over buffers made for it).
#[test]
fn steady_token_host_work() {
    let Some(shared) = flashmoe_testdata::shared_dir(env!("CARGO_MANIFEST_DIR")) else {
        return;
    };
    let gdir = shared.join("golden/tiny-a");
    let cpu = Arc::new(
        flashmoe_core::loader::open_model(
            &gdir.join("mlx-4bit"),
            &flashmoe_core::loader::LoadOptions::default(),
        )
        .expect("load model"),
    );
    let Some(be) = device::backend() else { return };
    let on = flashmoe_core::model::upload_to(&cpu, be).expect("upload");
    with_residency(&on, usize::MAX / 2).expect("tier");
    assert!(Wgpu::preload(&on).expect("preload"));
    let mut runs = Vec::new();
    for batch in [1, 8, 256] {
        on.be.set_submit_batch(batch).expect("batch");
        let toks = per_token(&on, 3);
        for c in &toks {
            eprintln!("commands per submission {batch}: {c:?}");
            assert!(c.dispatches > 0 && c.waits <= 1, "{c:?}");
            assert!(c.bind_groups < c.dispatches, "{c:?}");
        }
        // Without the submissions (they follow the batch).
        let mut k: Vec<[u64; 6]> = toks.iter().map(counts).collect();
        k.iter_mut().for_each(|c| c[4] = 0);
        runs.push((batch, k));
    }
    for (batch, k) in &runs[1..] {
        assert_eq!(k, &runs[0].1, "batch {batch} against batch {}", runs[0].0);
    }
}
