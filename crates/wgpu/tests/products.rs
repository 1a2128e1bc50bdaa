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
    products_at(be, t, 1.0)
}

/// [`products`] with x uniform in [-`xmax`, `xmax`].
fn products_at(be: &Wgpu, t: usize, xmax: f32) -> Vec<(Vec<f32>, Vec<String>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(19);
    let mut out = Vec::new();
    for (fmt, rows, cols) in cases() {
        let w = random_linear(&mut rng, rows, cols, fmt);
        let x: Vec<f32> = (0..t * cols).map(|_| rng.gen_range(-xmax..xmax)).collect();
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

/// Relative squared error of the f16 decode form (`fast_half.wgsl`). Its inputs round to f16
/// (x at 2^-12 relative at most; the codes, shifted and scaled by powers of two, exactly) and
/// each product and each of the few sums in f16 before a flush to f32 round at 2^-12 at most,
/// so a product's terms carry independent relative errors of a few times 2^-12 rms, and the
/// NMSE of their sum is of order (3 * 2^-12)^2 ~ 5e-7 (times a small factor where the bias
/// fold cancels part of the sum: the codes are centred, so little). 1e-5 leaves a factor of
/// about 20; a code or x misplaced, a scale or bias misapplied, or an f16 overflow gives
/// errors of order 1.
const HALF_NMSE: f64 = 1e-5;

/// The f16 decode form ([`Form::Half`]) where the device has f16 in shaders, against the
/// one-thread-per-row kernel (its f32 twin agrees with that at [`TWIN_NMSE`]): every case
/// of [`cases`] (2/4/8-bit codes, groups of 32/64/128, bf16/f16/f32 scales, ragged rows) at
/// several widths, rows per lane group, chunks per step and both reductions (8-bit codes in
/// the f32 decode form, see [`Form::Half`]), with x in
/// [-1, 1] and in [-3000, 3000] (the partial sums of codes left in [0, 2^BITS) or merely
/// centred would pass f16's 65504 at the latter: `fast_half.wgsl` scales them into
/// [-1/2, 1/2)). One token runs the f16 kernel (its name ends in the configuration, `_d<span>_h`, and
/// `_g<group>_s<dtype>`);
/// three tokens run the plain f32 kernel at f32 rounding.
#[test]
fn half_form_matches_the_f32_twin() {
    let Some(probe) = device::backend() else {
        return;
    };
    let sg = probe.default_fast().filter(|f| f.subgroup);
    if !device::f16_or_skip(probe) {
        return;
    }
    let Some(twin) = device::backend_with(Some(true), None) else {
        return;
    };
    let xmaxes = [1.0, 3000.0];
    let want1: Vec<_> = xmaxes.map(|m| products_at(&twin, 1, m)).into();
    let want3 = products(&twin, 3);
    drop(twin);
    let (h1, h2, h4) = (
        Form::Half { span: 1 },
        Form::Half { span: 2 },
        Form::Half { span: 4 },
    );
    let wg = device::fast_wg;
    let lean = |f: Fast| Fast { lean: true, ..f };
    let mut variants = vec![
        wg(32, 128, 2, h2),
        wg(16, 64, 4, h1),
        wg(64, 256, 1, h4),
        lean(wg(16, 128, 8, h1)),
    ];
    if let Some(f) = sg {
        variants.extend(
            [(2, h2, true), (8, h2, true), (4, h1, false)].map(|(r, form, lean)| Fast {
                r,
                form,
                lean,
                ..f
            }),
        );
    }
    let mut worst = [0f64; 6];
    for f in variants {
        let Some(be) = device::backend_with(None, Some(f)) else {
            return;
        };
        assert!(be.has_f16());
        for (xi, xmax) in xmaxes.into_iter().enumerate() {
            let got = products_at(&be, 1, xmax);
            for (((fmt, rows, cols), (g, names)), (w, _)) in
                cases().into_iter().zip(got).zip(&want1[xi])
            {
                let Fmt::Affine(bits, group, sd) = fmt else {
                    unreachable!("affine cases only")
                };
                let e = nmse(&g, w);
                let what = format!(
                    "{} {fmt:?} [{rows}x{cols}] |x|<={xmax}: {names:?}",
                    f.spec()
                );
                assert!(g.iter().all(|v| v.is_finite()), "{what}: not finite");
                // 8-bit codes run the f32 decode form (`Fast::for_product`), at f32 rounding.
                let bound = if bits == 8 { TWIN_NMSE } else { HALF_NMSE };
                assert!(e <= bound, "{what}: nmse {e:e}");
                let slot = &mut worst[xi * 3 + bits.trailing_zeros() as usize - 1];
                *slot = slot.max(e);
                // The form's part of the name (few rows may run on other lanes, as above).
                let m = [3, bits, group as u32, sdtype_code(sd)];
                let spec = f.for_product(m, 1).spec();
                assert_eq!(spec.contains("_h"), bits != 8, "{what}");
                let form = spec.find("_d").map_or("", |i| &spec[i..]);
                let key = format!("{form}_g{group}_s{}", sdtype_code(sd));
                let ran: Vec<&String> = names
                    .iter()
                    .filter(|n| n.starts_with("fast_matmul_"))
                    .collect();
                assert_eq!(ran.len(), 1, "{what}");
                assert!(ran[0].ends_with(&key), "{what}");
            }
        }
        for ((g, names), (w, _)) in products(&be, 3).iter().zip(&want3) {
            let e = nmse(g, w);
            assert!(e <= TWIN_NMSE, "{} t=3 {names:?}: nmse {e:e}", f.spec());
        }
    }
    eprintln!("worst nmse (|x|<=1: 2/4/8 bits, |x|<=3000: 2/4/8 bits): {worst:?}");
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
    for form in [
        Form::Plain,
        Form::Decode { span: 2 },
        Form::Half { span: 2 },
    ] {
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
    assert_eq!(
        Fast::from_spec("r2_lg32_wg256_sg_d2_h_lean").map(|f| (f.form, f.lean)),
        Some((Form::Half { span: 2 }, true))
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
        "r2_lg32_wg256_sg_h",
        "r2_lg32_wg256_sg_d2_lean_h",
        "r2_lg32_wg256_sg_d3_h",
    ] {
        assert_eq!(Fast::from_spec(bad), None, "{bad}");
    }
}
