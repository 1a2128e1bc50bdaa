//! The prompt mixers on the device against their plain twins on random inputs: `attn_prefill`
//! against `attn_decode` once per row (and the gate against `gated_output` after it), and
//! `gdn_rows` against `gdn_step` once per token (the reference backend where `gdn_step` does
//! not take the shape), outputs poisoned with NaN first so an unwritten element fails; and the
//! kernels a prompt launches. Without a GPU each test prints "skipped" and passes.
use flashmoe_core::backend::conformance::nmse;
use flashmoe_core::backend::{AttnShape, Backend, GdnShape, Reference};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::backend::{Cuda, CudaBuf};

fn cuda() -> Option<Cuda> {
    if !crate::device_available() {
        flashmoe_testdata::say_skipped("no CUDA device (CI has no GPU)");
        return None;
    }
    Some(Cuda::new(0).expect("a CUDA device is present but could not be opened"))
}

fn randv(rng: &mut StdRng, n: usize, s: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-s..s)).collect()
}

/// A buffer of `n` NaNs.
fn poisoned(be: &Cuda, n: usize) -> CudaBuf {
    be.upload(&vec![f32::NAN; n]).unwrap()
}

fn attn(heads: usize, kv_heads: usize, head_dim: usize) -> AttnShape {
    AttnShape {
        heads,
        kv_heads,
        head_dim,
        rotary_dim: 16,
        rope_theta: 1e7,
        gated: true,
        eps: 1e-6,
    }
}

/// f32 against f32 in another summation order.
const BOUND: f64 = 1e-10;

#[test]
fn attn_prefill_matches_attn_decode_per_row() {
    let Some(be) = cuda() else { return };
    let mut rng = StdRng::seed_from_u64(18);
    // 397B-like heads (hd 256, GQA 4), the tiny fixture's (hd 48), plain MHA; a prompt from
    // empty, after a prefix, ragged query tiles, a long prefix of many key tiles.
    let cases = [
        (attn(8, 2, 256), 0, 70),
        (attn(8, 2, 256), 37, 33),
        (attn(4, 2, 48), 5, 17),
        (attn(4, 2, 48), 0, 2),
        (attn(4, 4, 64), 300, 20),
    ];
    for (s, pos0, t) in cases {
        let (ow, kvw) = (s.o_width(), s.kv_width());
        let class = format!(
            "hd={} heads={}/{} pos0={pos0} t={t}",
            s.head_dim, s.heads, s.kv_heads
        );
        // Peaked scores (|q| up to 3), so the running max matters.
        let q = be.upload(&randv(&mut rng, t * ow, 3.0)).unwrap();
        let kc = be.upload(&randv(&mut rng, (pos0 + t) * kvw, 1.0)).unwrap();
        let vc = be.upload(&randv(&mut rng, (pos0 + t) * kvw, 1.0)).unwrap();
        let gate = be.upload(&randv(&mut rng, t * ow, 3.0)).unwrap();
        let (mut o1, mut o2) = (poisoned(&be, t * ow), poisoned(&be, t * ow));
        assert!(be
            .attention_prefill(&q, &kc, &vc, None, &s, pos0, t, &mut o1)
            .unwrap());
        be.attention_rows(&q, &kc, &vc, &s, pos0, t, &mut o2)
            .unwrap();
        let (a, b) = (be.download(&o1).unwrap(), be.download(&o2).unwrap());
        let e = nmse(&a, &b);
        assert!(e < BOUND, "{class}: NMSE {e:.3e}");
        let mut o3 = poisoned(&be, t * ow);
        assert!(be
            .attention_prefill(&q, &kc, &vc, Some(&gate), &s, pos0, t, &mut o3)
            .unwrap());
        be.gated_output(&mut o2, &gate).unwrap();
        let (a, b) = (be.download(&o3).unwrap(), be.download(&o2).unwrap());
        let e = nmse(&a, &b);
        assert!(e < BOUND, "{class} gated: NMSE {e:.3e}");
    }
}

fn gdn(nk: usize, nv: usize, dk: usize, dv: usize) -> GdnShape {
    GdnShape {
        nk,
        nv,
        dk,
        dv,
        kconv: 4,
    }
}

#[test]
fn gdn_rows_matches_gdn_step_per_token() {
    let Some(be) = cuda() else { return };
    let mut rng = StdRng::seed_from_u64(6);
    // 397B-like heads (dk = dv = 128, rows 32 a part), the tiny fixture's (24 x 32), a ragged
    // column block (dv 48), a chunk boundary inside the prompt (t > 32); dk 192 (8 parts a
    // column) is past gdn_step and is checked against the reference backend.
    let cases = [
        (gdn(2, 4, 128, 128), 100),
        (gdn(2, 6, 24, 32), 37),
        (gdn(2, 4, 64, 48), 5),
        (gdn(1, 2, 192, 64), 40),
    ];
    for (g, t) in cases {
        let class = format!("dk={} dv={} nv={} t={t}", g.dk, g.dv, g.nv);
        let u = randv(&mut rng, t * g.conv_dim(), 1.0);
        let (b, a) = (
            randv(&mut rng, t * g.nv, 2.0),
            randv(&mut rng, t * g.nv, 2.0),
        );
        let dt = randv(&mut rng, g.nv, 1.0);
        let na: Vec<f32> = randv(&mut rng, g.nv, 1.0)
            .iter()
            .map(|v| -v.exp())
            .collect();
        let st = randv(&mut rng, g.state_len(), 0.5);
        let up = |v: &[f32]| be.upload(v).unwrap();
        let (ub, bb, ab, dtb, nab) = (up(&u), up(&b), up(&a), up(&dt), up(&na));
        let (mut s1, mut o1) = (up(&st), poisoned(&be, t * g.value_dim()));
        assert!(be
            .gdn_prompt(&ub, &bb, &ab, &dtb, &nab, &mut s1, &g, t, &mut o1)
            .unwrap());
        let (o1, s1) = (be.download(&o1).unwrap(), be.download(&s1).unwrap());
        let (o2, s2) = if g.dk <= 128 {
            let (mut s2, mut o2) = (up(&st), poisoned(&be, t * g.value_dim()));
            be.gdn_recurrent(&ub, &bb, &ab, &dtb, &nab, &mut s2, &g, t, &mut o2)
                .unwrap();
            (be.download(&o2).unwrap(), be.download(&s2).unwrap())
        } else {
            let (mut s2, mut o2) = (st.clone(), vec![0f32; t * g.value_dim()]);
            Reference
                .gdn_recurrent(&u, &b, &a, &dt, &na, &mut s2, &g, t, &mut o2)
                .unwrap();
            (o2, s2)
        };
        let bound = if g.dk <= 128 { BOUND } else { 1e-9 };
        let (eo, es) = (nmse(&o1, &o2), nmse(&s1, &s2));
        assert!(eo < bound, "{class} out: NMSE {eo:.3e}");
        assert!(es < bound, "{class} state: NMSE {es:.3e}");
    }
}

/// A prompt's attention and delta rule are one launch each: `attn_prefill` (the gate in it)
/// and one `gdn_rows`, no per-token `attn_decode`, `mul_sigmoid` or `gdn_step`.
#[test]
fn a_prompt_launches_one_kernel_per_mixer() {
    let Some(be) = cuda() else { return };
    let dev = be.device();
    let names = |f: &mut dyn FnMut()| dev.launched_by(f).expect("trace");
    let count = |n: &[String], p: &dyn Fn(&str) -> bool| n.iter().filter(|k| p(k)).count();
    let mut rng = StdRng::seed_from_u64(9);
    let (s, t) = (attn(4, 2, 64), 40);
    let qg = be.upload(&randv(&mut rng, t * s.q_rows(), 1.0)).unwrap();
    let mut k = be.upload(&randv(&mut rng, t * s.kv_width(), 1.0)).unwrap();
    let v = be.upload(&randv(&mut rng, t * s.kv_width(), 1.0)).unwrap();
    let norm = be.upload(&vec![1.0; s.head_dim]).unwrap();
    let (mut kc, mut vc) = (be.alloc(0).unwrap(), be.alloc(0).unwrap());
    let mut o = be.alloc(t * s.o_width()).unwrap();
    let n = names(&mut || {
        be.fused_attention(
            &qg, &mut k, &v, &norm, &norm, &mut kc, &mut vc, &s, 0, t, &mut o,
        )
        .unwrap()
    });
    assert_eq!(count(&n, &|k| k == "attn_prefill"), 1, "{n:?}");
    assert_eq!(
        count(&n, &|k| k == "attn_decode" || k == "mul_sigmoid"),
        0,
        "{n:?}"
    );

    let g = gdn(2, 4, 128, 128);
    let u = be.upload(&randv(&mut rng, t * g.conv_dim(), 1.0)).unwrap();
    let ba = be.upload(&randv(&mut rng, t * g.nv, 1.0)).unwrap();
    let hv = be.upload(&randv(&mut rng, g.nv, 1.0)).unwrap();
    let mut st = be.alloc(g.state_len()).unwrap();
    let mut o = be.alloc(t * g.value_dim()).unwrap();
    let n = names(&mut || {
        be.gdn_chunked(&u, &ba, &ba, &hv, &hv, &mut st, &g, t, &mut o)
            .unwrap()
    });
    assert_eq!(count(&n, &|k| k.starts_with("gdn_rows")), 1, "{n:?}");
    assert_eq!(count(&n, &|k| k.starts_with("gdn_step")), 0, "{n:?}");
}

/// Device time of `f` (after one warm-up run): the mean of 5 runs between two events, ms.
fn time_ms(be: &Cuda, f: &mut dyn FnMut()) -> f64 {
    let dev = be.device();
    f();
    let (a, b) = (dev.event().unwrap(), dev.event().unwrap());
    dev.record(&a, &dev.compute).unwrap();
    for _ in 0..5 {
        f();
    }
    dev.record(&b, &dev.compute).unwrap();
    dev.event_sync(&b).unwrap();
    dev.elapsed_ms(&a, &b).unwrap() as f64 / 5.0
}

/// The mixers of one 397B-shaped layer over a 512-token prompt, timed (`FLASHMOE_PROBE=1`):
/// attention in one launch and one `attn_decode` per row; the delta rule with 4, 8 and 16
/// parts a column (each first checked against the default's output and state) and one
/// `gdn_step` per token. Prints the times; asserts only agreement.
#[test]
fn probe_mixer_times() {
    if std::env::var("FLASHMOE_PROBE").map_or(true, |v| v != "1") {
        flashmoe_testdata::say_skipped("a timing probe (FLASHMOE_PROBE=1 runs it on a device)");
        return;
    }
    let Some(be) = cuda() else { return };
    let mut rng = StdRng::seed_from_u64(512);
    let t = 512;
    let s = AttnShape {
        heads: 32,
        kv_heads: 2,
        head_dim: 256,
        rotary_dim: 64,
        rope_theta: 1e7,
        gated: true,
        eps: 1e-6,
    };
    let q = be.upload(&randv(&mut rng, t * s.o_width(), 1.0)).unwrap();
    let kc = be.upload(&randv(&mut rng, t * s.kv_width(), 1.0)).unwrap();
    let vc = be.upload(&randv(&mut rng, t * s.kv_width(), 1.0)).unwrap();
    let mut o = be.alloc(t * s.o_width()).unwrap();
    let one = time_ms(&be, &mut || {
        be.attention_prefill(&q, &kc, &vc, None, &s, 0, t, &mut o)
            .unwrap();
    });
    let rows = time_ms(&be, &mut || {
        be.attention_rows(&q, &kc, &vc, &s, 0, t, &mut o).unwrap();
    });
    println!("probe attention 32x256 (GQA 16) t={t}: attn_prefill {one:.3} ms, attn_decode per row {rows:.3} ms");

    let g = gdn(16, 64, 128, 128);
    let up = |v: &[f32]| be.upload(v).unwrap();
    let u = up(&randv(&mut rng, t * g.conv_dim(), 1.0));
    let (b, a) = (
        up(&randv(&mut rng, t * g.nv, 2.0)),
        up(&randv(&mut rng, t * g.nv, 2.0)),
    );
    let dt = up(&randv(&mut rng, g.nv, 1.0));
    let na = up(&randv(&mut rng, g.nv, 1.0)
        .iter()
        .map(|v| -v.exp())
        .collect::<Vec<_>>());
    let st = randv(&mut rng, g.state_len(), 0.5);
    let ins = [&u, &b, &a, &dt, &na];
    let run = |k, st0: &[f32]| {
        let (mut s1, mut o1) = (up(st0), poisoned(&be, t * g.value_dim()));
        assert!(be.gdn_prompt_with(k, ins, &mut s1, &g, t, &mut o1).unwrap());
        (be.download(&o1).unwrap(), be.download(&s1).unwrap())
    };
    let (o4, s4) = run(super::gdn_kernel(g.dk), &st);
    let mut line = format!("probe gdn 64 heads 128x128 t={t}:");
    for parts in [4, 8, 16] {
        let k = super::gdn_kernel_parts(g.dk, parts);
        let (op, sp) = run(k, &st);
        let (eo, es) = (nmse(&op, &o4), nmse(&sp, &s4));
        assert!(
            eo < BOUND && es < BOUND,
            "parts {parts}: NMSE {eo:.1e} {es:.1e}"
        );
        let mut s1 = up(&st);
        let mut o1 = be.alloc(t * g.value_dim()).unwrap();
        let ms = time_ms(&be, &mut || {
            be.gdn_prompt_with(k, ins, &mut s1, &g, t, &mut o1).unwrap();
        });
        line += &format!(" P={parts} {ms:.3} ms;");
    }
    let mut s1 = up(&st);
    let mut o1 = be.alloc(t * g.value_dim()).unwrap();
    let ms = time_ms(&be, &mut || {
        be.gdn_recurrent(&u, &b, &a, &dt, &na, &mut s1, &g, t, &mut o1)
            .unwrap();
    });
    println!("{line} gdn_step per token {ms:.3} ms");
}

#[test]
fn gdn_kernel_covers_dk_with_the_fewest_rows_a_part() {
    use super::{gdn_kernel, gdn_kernel_parts};
    use crate::kernel::Kernel;
    assert_eq!(gdn_kernel(24), Some((Kernel::GdnRows8, 4, 8)));
    assert_eq!(gdn_kernel(64), Some((Kernel::GdnRows16, 4, 16)));
    assert_eq!(gdn_kernel(128), Some((Kernel::GdnRows32, 4, 32)));
    assert_eq!(gdn_kernel(192), Some((Kernel::GdnRows32, 8, 32)));
    assert_eq!(gdn_kernel(0), None);
    assert_eq!(gdn_kernel(257), None);
    assert_eq!(gdn_kernel_parts(128, 8), Some((Kernel::GdnRows16, 8, 16)));
    assert_eq!(gdn_kernel_parts(128, 16), Some((Kernel::GdnRows8, 16, 8)));
    assert_eq!(gdn_kernel_parts(128, 2), None, "64 rows a part: no kernel");
    assert_eq!(gdn_kernel_parts(128, 6), None, "not a power of two");
}
