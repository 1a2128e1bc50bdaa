//! The fast affine products' twins: every [`Form`] of the fast kernels (the plain `fast.wgsl`
//! and the one-token `fast_dec.wgsl` at each chunks-per-step), in both reductions and at
//! several widths and rows per lane group, against the one-thread-per-row kernel (the plain
//! twin) on the same matrices and inputs: 2/4/8-bit codes, groups of 32/64/128, bf16/f16/f32
//! scales, row counts that leave a lane group's rows ragged. Agreement is asked at f32
//! rounding (a form that rounded activations to 16 bits or quantised them would fail), and the
//! traced kernel names show which form ran (decode form for one token, plain for three).
mod device;

use flashmoe_core::backend::conformance::{random_linear, Fmt};
use flashmoe_core::backend::Backend;
use flashmoe_core::store::DType;
use flashmoe_wgpu::{Fast, Form, Wgpu};
use rand::{Rng, SeedableRng};

/// Relative squared error at f32 rounding of sums of a few hundred terms (~1e-14 seen);
/// 16-bit activations would give ~1e-7.
const TWIN_NMSE: f64 = 1e-10;

/// (format, rows, cols): every code width and group with bf16 scales, the other scale dtypes
/// at each width; rows not a multiple of any configuration's rows per workgroup.
fn cases() -> Vec<(Fmt, usize, usize)> {
    let mut v = Vec::new();
    for bits in [2, 4, 8] {
        for group in [32, 64, 128] {
            v.push((Fmt::Affine(bits, group, DType::BF16), 37, 512));
        }
        v.push((Fmt::Affine(bits, 64, DType::F16), 67, 384));
        v.push((Fmt::Affine(bits, 128, DType::F32), 19, 768));
    }
    v.push((Fmt::Affine(4, 64, DType::BF16), 1030, 1024));
    v
}

fn sdtype_code(d: DType) -> u32 {
    match d {
        DType::F32 => 0,
        DType::BF16 => 1,
        _ => 2,
    }
}

/// y = x W^T of every case for `t` tokens on `be`, and the names of the kernels it ran per case.
fn products(be: &Wgpu, t: usize) -> Vec<(Vec<f32>, Vec<String>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(19);
    let mut out = Vec::new();
    for (fmt, rows, cols) in cases() {
        let w = random_linear(&mut rng, rows, cols, fmt);
        let x: Vec<f32> = (0..t * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let wm = be.upload_mat(&w).expect("upload matrix");
        let xb = be.upload(&x).expect("upload x");
        let mut y = be.alloc(t * rows).expect("alloc");
        be.trace_start().expect("trace");
        be.matmul(&wm, &xb, t, &mut y).expect("matmul");
        let rep = be.trace_finish().expect("trace finish");
        let mut names: Vec<String> = rep.kernels.iter().map(|k| k.kernel.clone()).collect();
        names.extend(rep.untimed.iter().map(|u| u.0.clone()));
        out.push((be.download(&y).expect("download"), names));
    }
    out
}

fn nmse(got: &[f32], want: &[f32]) -> f64 {
    let e: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
        .sum();
    let w: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    e / w.max(1e-30)
}

#[test]
fn fast_forms_match_the_plain_twin() {
    let Some(probe) = device::backend() else {
        return;
    };
    let sg = probe.default_fast().filter(|f| f.subgroup);
    drop(probe);
    let Some(twin) = device::backend_with(Some(true), None) else {
        return;
    };
    let want1 = products(&twin, 1);
    let want3 = products(&twin, 3);
    drop(twin);
    // Each form at a width and rows per lane group, through workgroup memory and (where the
    // adapter has them) subgroup operations.
    let wg = device::fast_wg;
    let (d1, d2, d4) = (
        Form::Decode { span: 1 },
        Form::Decode { span: 2 },
        Form::Decode { span: 4 },
    );
    let lean = |f: Fast| Fast { lean: true, ..f };
    let mut variants = vec![
        wg(32, 128, 2, Form::Plain),
        wg(16, 64, 4, d1),
        wg(32, 128, 2, d2),
        wg(64, 256, 1, d4),
        lean(wg(32, 128, 2, d2)),
        wg(16, 128, 8, d1),
    ];
    match sg {
        Some(f) => variants.extend(
            [
                (1, d2, false),
                (2, d1, false),
                (4, d4, false),
                (2, d2, true),
                (8, d2, true),
            ]
            .map(|(r, form, lean)| Fast { r, form, lean, ..f }),
        ),
        None => eprintln!("no subgroup operations at a fixed size here: those forms not run"),
    }
    for f in variants {
        let Some(be) = device::backend_with(None, Some(f)) else {
            return;
        };
        for (t, want) in [(1, &want1), (3, &want3)] {
            let got = products(&be, t);
            for (((fmt, rows, cols), (g, names)), (w, _)) in cases().into_iter().zip(got).zip(want)
            {
                let e = nmse(&g, w);
                let what = format!("{f:?} {fmt:?} [{rows}x{cols}] t={t}: {names:?}");
                assert!(e <= TWIN_NMSE, "{what}: nmse {e:e}");
                let Fmt::Affine(bits, group, sd) = fmt else {
                    unreachable!("affine cases only")
                };
                // The kernel the form names ran (a one-token product of few rows may run on
                // 64 lanes a row, in the same form): the decode form's one-token products carry
                // their group and scale dtype; three tokens run the plain kernel.
                let tb = if t == 1 { 1 } else { 8 };
                let prefix = format!("fast_matmul_b{bits}_t{tb}_");
                let ran: Vec<&String> = names.iter().filter(|n| n.starts_with(&prefix)).collect();
                assert_eq!(ran.len(), 1, "{what}");
                let decode = t == 1 && f.form != Form::Plain;
                let suffix = format!("_g{group}_s{}", sdtype_code(sd));
                assert_eq!(ran[0].ends_with(&suffix), decode, "{what}");
            }
        }
    }
}

/// Every kernel lean (`set_lean_kernels`) switched on and off in one session: the products
/// after each switch agree with those before (pipelines and kept bind groups of each setting
/// are cached apart, and the arithmetic is the same).
#[test]
fn lean_kernels_switch_within_a_session() {
    let Some(be) = device::backend() else {
        return;
    };
    let before = products(&be, 1);
    for on in [true, false, true] {
        be.set_lean_kernels(on).expect("switch");
        assert_eq!(be.lean_kernels(), on);
        for ((g, _), (w, _)) in products(&be, 1).iter().zip(&before) {
            let e = nmse(g, w);
            assert!(e <= TWIN_NMSE, "lean {on}: nmse {e:e}");
        }
    }
}

/// The configuration word the CLI's `FLASHMOE_WGPU_FAST` takes reads back as written, for
/// both forms; malformed or invalid words are refused.
#[test]
fn spec_round_trips() {
    for form in [Form::Plain, Form::Decode { span: 2 }] {
        for lean in [false, true] {
            let f = Fast {
                lg: 32,
                wgs: 256,
                r: 4,
                subgroup: true,
                form,
                lean,
            };
            assert_eq!(Fast::from_spec(&f.spec()), Some(f), "{}", f.spec());
        }
    }
    assert_eq!(
        Fast::from_spec("r2_lg32_wg256_sg_lean").map(|f| (f.form, f.lean)),
        Some((Form::Plain, true))
    );
    assert_eq!(Fast::from_spec("r8_lg32_wg256_sg_d1").map(|f| f.r), Some(8));
    assert_eq!(
        Fast::from_spec("r2_lg32_wg256_sg_d2").map(|f| f.form),
        Some(Form::Decode { span: 2 })
    );
    for bad in [
        "",
        "r2_lg32_wg256",
        "r3_lg32_wg256_sg",
        "r2_lg32_wg256_sg_d3",
        "r2_lg64_wg32_wg",
        "r2_lg32_wg256_xx",
        "r2_lg32_wg256_sg_lean_d2",
        "r8_lg32_wg256_sg",
    ] {
        assert_eq!(Fast::from_spec(bad), None, "{bad}");
    }
}
