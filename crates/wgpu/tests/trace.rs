//! GPU-side timing (`timing.rs`) and dispatches sharing one compute pass, on the 4-bit golden
//! fixture with every routed expert resident: a traced token accounts for every command it
//! records (per kernel, the launches the host counted), the products carry their weight
//! bytes, and a token's logits are the same bits whether dispatches share a pass or not.
mod device;

use std::sync::Arc;

use flashmoe_core::model::{ForwardStats, Logits, Model};
use flashmoe_wgpu::{with_residency, HostCounters, TraceReport, Wgpu};

fn model() -> Option<Model<Wgpu>> {
    let shared = flashmoe_testdata::shared_dir(env!("CARGO_MANIFEST_DIR"))?;
    let cpu = Arc::new(
        flashmoe_core::loader::open_model(
            &shared.join("golden/tiny-a/mlx-4bit"),
            &flashmoe_core::loader::LoadOptions::default(),
        )
        .expect("load model"),
    );
    let be = device::backend()?;
    let on = flashmoe_core::model::upload_to(&cpu, be).expect("upload");
    with_residency(&on, usize::MAX / 2).expect("tier");
    assert!(Wgpu::preload(&on).expect("preload"));
    Some(on)
}

/// A second decode token (after a warm-up one) traced, with the host's counts over it.
fn traced_token(m: &Model<Wgpu>) -> (TraceReport, HostCounters) {
    let mut st = m.new_state().expect("state");
    let id = m.forward_argmax(&[1], &mut st).expect("warm-up");
    m.be.trace_start().expect("trace");
    let c0 = m.be.host_counters();
    m.forward_argmax(&[id], &mut st).expect("token");
    let c = m.be.host_counters().since(&c0);
    (m.be.trace_finish().expect("finish"), c)
}

/// One traced decode token: the launches per kernel add up to the dispatches and transfers
/// the host counted; with timestamps every dispatch is timed and the products read weights.
#[test]
fn traced_token_accounts_for_every_command() {
    let Some(m) = model() else { return };
    for one in [false, true] {
        m.be.set_one_pass(one).expect("one pass");
        let (rep, c) = traced_token(&m);
        let timed: u64 = rep.kernels.iter().map(|k| k.launches).sum();
        let untimed: u64 = rep.untimed.iter().map(|u| u.1).sum();
        eprintln!(
            "one pass {one}: timestamps {:?}, {timed} timed, {untimed} untimed, span {:.1} us, sum {:.1} us",
            rep.unavailable, rep.span_us, rep.sum_us
        );
        for line in flashmoe_wgpu::trace_table(&rep.json(0.0)) {
            eprintln!("  {line}");
        }
        // The read-back's copy is recorded by the token, the timestamps' resolve after it.
        assert_eq!(timed + untimed, c.dispatches + c.transfers, "{c:?} {rep:?}");
        match &rep.unavailable {
            None => {
                let dispatched: u64 = rep
                    .kernels
                    .iter()
                    .filter(|k| !["copy", "clear"].contains(&k.kernel.as_str()))
                    .map(|k| k.launches)
                    .sum();
                assert_eq!(dispatched, c.dispatches, "every dispatch timed: {rep:?}");
                assert!(rep.sum_us > 0.0 && rep.span_us > 0.0, "{rep:?}");
                let products: u64 = rep
                    .kernels
                    .iter()
                    .filter(|k| k.kernel.contains("mat") || k.kernel.contains("expert"))
                    .map(|k| k.weight_bytes)
                    .sum();
                assert!(products > 0, "products carry weight bytes: {rep:?}");
            }
            Some(why) => {
                assert!(why.contains("TIMESTAMP"), "{why}");
                assert!(rep.kernels.is_empty());
            }
        }
    }
}

/// Without timestamps (turned off, as on an adapter that has none) a trace still counts
/// every command, times none, and says why; its table says so too.
#[test]
fn a_trace_without_timestamps_says_so() {
    let Some(mut m) = model() else { return };
    let had = m.be.timestamps();
    m.be.set_timestamps(false);
    assert!(!m.be.timestamps());
    let (rep, c) = traced_token(&m);
    assert!(rep.kernels.is_empty() && rep.sum_us == 0.0, "{rep:?}");
    let untimed: u64 = rep.untimed.iter().map(|u| u.1).sum();
    assert_eq!(untimed, c.dispatches + c.transfers, "{rep:?}");
    let why = rep.unavailable.clone().expect("a reason");
    assert!(why.contains("TIMESTAMP_QUERY"), "{why}");
    let table = flashmoe_wgpu::trace_table(&rep.json(1.0)).join("\n");
    assert!(table.contains("no GPU timestamps"), "{table}");
    m.be.set_timestamps(true);
    assert_eq!(m.be.timestamps(), had);
}

/// Prefill of three tokens and two decode tokens give the same logits, bit for bit, with
/// dispatches in one pass each and sharing a pass (wgpu puts the same barriers between
/// dependent dispatches inside a pass as between passes).
#[test]
fn one_pass_gives_the_same_logits() {
    let Some(m) = model() else { return };
    let mut runs = Vec::new();
    for one in [false, true] {
        m.be.set_one_pass(one).expect("one pass");
        let mut st = m.new_state().expect("state");
        let mut stats = ForwardStats::default();
        let mut all = m
            .forward(&[1, 5, 9], &mut st, Logits::Last, &mut stats, None)
            .expect("prefill");
        for id in [3, 7] {
            all.extend(
                m.forward(&[id], &mut st, Logits::Last, &mut stats, None)
                    .expect("decode"),
            );
        }
        runs.push(all);
    }
    assert!(runs[0].iter().all(|x| x.is_finite()));
    assert_eq!(
        runs[0].iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        runs[1].iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
}
