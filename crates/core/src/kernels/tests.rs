//! Every fast kernel against its plain twin, on every ISA this CPU has, for every format.

use super::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn isas() -> Vec<Isa> {
    let mut v = vec![Isa::Portable];
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        v.push(Isa::Avx2);
    }
    #[cfg(target_arch = "aarch64")]
    v.push(Isa::Neon);
    v
}

pub(super) fn gauss(rng: &mut StdRng, n: usize) -> Vec<f32> {
    // Box-Muller; rand 0.8 without rand_distr has no normal distribution.
    (0..n)
        .map(|_| {
            let u1: f64 = rng.gen_range(1e-12..1.0);
            let u2: f64 = rng.gen();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        })
        .collect()
}

pub(super) fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt()
}

/// Checks `got` against `want` row by row: `|got - want| <= 1e-5 * |W_r| |x|` (+ a floor).
fn assert_close(what: &str, w: &[f32], cols: usize, x: &[f32], got: &[f32], want: &[f32]) {
    let xn = norm(x);
    let rows = w.len() / cols.max(1);
    for (i, (g, r)) in got.iter().zip(want).enumerate() {
        let row = i % rows.max(1);
        let tol = 1e-5 * norm(&w[row * cols..(row + 1) * cols]) * xn + 1e-6;
        assert!(
            ((g - r) as f64).abs() <= tol,
            "{what}: y[{i}] = {g}, reference {r}, tol {tol}"
        );
    }
}

/// Owns the buffers of a random affine matrix.
pub(super) struct Affine {
    bits: u32,
    group: usize,
    rows: usize,
    cols: usize,
    w: Vec<u32>,
    s32: Vec<f32>,
    b32: Vec<f32>,
    sb: Vec<half::bf16>,
    bb: Vec<half::bf16>,
    sh: Vec<half::f16>,
    bh: Vec<half::f16>,
}

impl Affine {
    pub(super) fn random(
        rng: &mut StdRng,
        bits: u32,
        group: usize,
        rows: usize,
        cols: usize,
    ) -> Self {
        let ng = rows * cols / group;
        let w = (0..rows * cols * bits as usize / 32)
            .map(|_| rng.gen())
            .collect();
        let all_negative = rng.gen_bool(0.3);
        let s32: Vec<f32> = (0..ng)
            .map(|_| {
                let s: f32 = rng.gen_range(0.01..0.1);
                if all_negative || rng.gen_bool(0.5) {
                    -s
                } else {
                    s
                }
            })
            .collect();
        let b32: Vec<f32> = (0..ng).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let sb = s32.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let bb = b32.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let sh = s32.iter().map(|&v| half::f16::from_f32(v)).collect();
        let bh = b32.iter().map(|&v| half::f16::from_f32(v)).collect();
        Affine {
            bits,
            group,
            rows,
            cols,
            w,
            s32,
            b32,
            sb,
            bb,
            sh,
            bh,
        }
    }

    /// The view with scales in dtype `k` (0 bf16, 1 f16, 2 f32; 3 bf16 scales with f32
    /// biases, a mix no converter writes but the kernels accept).
    pub(super) fn view(&self, k: usize) -> WeightView<'_> {
        let (scales, biases) = match k % 4 {
            0 => (Scales::Bf16(&self.sb), Scales::Bf16(&self.bb)),
            1 => (Scales::F16(&self.sh), Scales::F16(&self.bh)),
            3 => (Scales::Bf16(&self.sb), Scales::F32(&self.b32)),
            _ => (Scales::F32(&self.s32), Scales::F32(&self.b32)),
        };
        WeightView::Affine(AffineView {
            bits: self.bits,
            group: self.group,
            rows: self.rows,
            cols: self.cols,
            w: &self.w,
            scales,
            biases,
        })
    }
}

/// Runs matvec and matmul on every ISA (serial and forced-parallel) against the twins.
fn check_products(rng: &mut StdRng, what: &str, w: &WeightView) {
    let (rows, cols) = (w.rows(), w.cols());
    let dense = dequantize(w);
    let x = gauss(rng, cols);
    let mut want = vec![0f32; rows];
    matvec_ref(w, &x, &mut want);
    for isa in isas() {
        for par_min in [usize::MAX, 0] {
            let mut got = vec![f32::NAN; rows];
            // The exact kernel: the int8 one has its own bound (`int8_activations_bound`).
            matvec_impl(isa, par_min, ActQuant::Exact, w, &x, &mut got);
            let tag = format!("{what} matvec {isa:?} par_min {par_min}");
            assert_close(&tag, &dense, cols, &x, &got, &want);
        }
    }
    // 2, 3, 6: the per-row kernel (affine on AVX2: the few-input one, as 9); 9, 17, 35: the
    // blocked one with partial input panels.
    for n in [2, 3, 6, 9, 17, 35] {
        let xs = gauss(rng, n * cols);
        let mut want = vec![0f32; n * rows];
        matmul_ref(w, &xs, n, &mut want);
        for isa in isas() {
            for par_min in [usize::MAX, 0] {
                let mut got = vec![f32::NAN; n * rows];
                matmul_with(isa, par_min, w, &xs, n, &mut got);
                let tag = format!("{what} matmul n {n} {isa:?} par_min {par_min}");
                for i in 0..n {
                    let xi = &xs[i * cols..(i + 1) * cols];
                    let (g, r) = (i * rows, (i + 1) * rows);
                    assert_close(&tag, &dense, cols, xi, &got[g..r], &want[g..r]);
                }
            }
        }
    }
}

#[test]
fn affine_products_match_reference() {
    let mut rng = StdRng::seed_from_u64(1);
    let mut k = 0;
    for bits in [2u32, 4, 8] {
        for group in [32usize, 64, 128] {
            // One group, groups that end mid-block (tail path), several whole blocks.
            for ngroups in [1usize, 3, 5, 8] {
                for rows in [1usize, 7, 33] {
                    let a = Affine::random(&mut rng, bits, group, rows, group * ngroups);
                    let what = format!("affine b{bits} g{group} {rows}x{} s{k}", group * ngroups);
                    check_products(&mut rng, &what, &a.view(k));
                    k += 1;
                }
            }
        }
    }
}

#[test]
fn blocked_matmul_several_row_blocks_and_column_slices() {
    // 100 rows: two full 48-row blocks and a partial one of 4 (a partial 6-row tile);
    // 640 columns: two 256-column slices and a 128 one.
    let mut rng = StdRng::seed_from_u64(8);
    let mut k = 0;
    for bits in [2u32, 4, 8] {
        for group in [32usize, 64, 128] {
            let a = Affine::random(&mut rng, bits, group, 100, 640);
            let w = a.view(k);
            k += 1;
            // 16 + 16 + 8: three panels (column slices, not whole rows), the last a full 6x8 tile.
            let n = 40;
            let xs = gauss(&mut rng, n * 640);
            let mut want = vec![0f32; n * 100];
            matmul_ref(&w, &xs, n, &mut want);
            let dense = dequantize(&w);
            for isa in isas() {
                for par_min in [usize::MAX, 0] {
                    let mut got = vec![f32::NAN; n * 100];
                    matmul_with(isa, par_min, &w, &xs, n, &mut got);
                    let tag = format!("b{bits} g{group} 100x640 n{n} {isa:?} par_min {par_min}");
                    for i in 0..n {
                        let xi = &xs[i * 640..(i + 1) * 640];
                        let (g, r) = (i * 100, (i + 1) * 100);
                        assert_close(&tag, &dense, 640, xi, &got[g..r], &want[g..r]);
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn few_input_matmul_every_count_slices_and_row_blocks() {
    if !x86::available() {
        return;
    }
    // 37 rows: two full 16-row blocks and a partial one. 800 or 832 columns: several column
    // slices for every input count and width (each 16 KiB of inputs), and a tail past the last
    // whole block for 4-bit codes at group 32 (800 = 12.5 blocks of 64) and 2-bit ones (6.25
    // and 6.5 blocks of 128).
    let mut rng = StdRng::seed_from_u64(9);
    let mut k = 0;
    for bits in [2u32, 4, 8] {
        for group in [32usize, 64] {
            let (rows, cols) = (37, if group == 32 { 800 } else { 832 });
            let a = Affine::random(&mut rng, bits, group, rows, cols);
            let w = a.view(k);
            k += 1;
            let dense = dequantize(&w);
            for n in 2..=x86::FEW_MAX {
                let xs = gauss(&mut rng, n * cols);
                let mut want = vec![0f32; n * rows];
                matmul_ref(&w, &xs, n, &mut want);
                for par_min in [usize::MAX, 0] {
                    let mut got = vec![f32::NAN; n * rows];
                    matmul_impl(Isa::Avx2, par_min, Many::Few, &w, &xs, n, &mut got);
                    let tag = format!("few b{bits} g{group} n{n} par_min {par_min}");
                    for i in 0..n {
                        let xi = &xs[i * cols..(i + 1) * cols];
                        let (g, r) = (i * rows, (i + 1) * rows);
                        assert_close(&tag, &dense, cols, xi, &got[g..r], &want[g..r]);
                    }
                }
            }
        }
    }
}

/// The exact affine matvec scales `x` by powers of two for the AVX2 kernel (`CodeRead`);
/// products of `x` near either end of f32's range still match the plain twin, to the same
/// relative bound (no floor), on every ISA.
#[test]
fn affine_matvec_x_across_f32_range() {
    let mut rng = StdRng::seed_from_u64(12);
    for bits in [2u32, 4, 8] {
        let a = Affine::random(&mut rng, bits, 64, 9, 640);
        let w = a.view(0);
        let dense = dequantize(&w);
        for f in [
            2f32.powi(-120),
            2f32.powi(-60),
            2f32.powi(40),
            2f32.powi(100),
        ] {
            let x: Vec<f32> = gauss(&mut rng, 640).iter().map(|v| v * f).collect();
            let mut want = vec![0f32; 9];
            matvec_ref(&w, &x, &mut want);
            let xn = norm(&x);
            for isa in isas() {
                let mut got = vec![f32::NAN; 9];
                matvec_impl(isa, usize::MAX, ActQuant::Exact, &w, &x, &mut got);
                for r in 0..9 {
                    let tol = 1e-5 * norm(&dense[r * 640..(r + 1) * 640]) * xn;
                    let d = (got[r] as f64 - want[r] as f64).abs();
                    assert!(
                        d <= tol,
                        "b{bits} x*{f:e} {isa:?} y[{r}] = {}, reference {}, tol {tol}",
                        got[r],
                        want[r]
                    );
                }
            }
        }
    }
}

/// The AVX2 preparation of `x` for the exact affine kernel gives exactly the plain twin's
/// `xt`, `xsum` and `unscale`, including tails, zero, tiny (the f64 fallback) and non-finite `x`.
#[cfg(target_arch = "x86_64")]
#[test]
fn affine_prep_matches_plain_twin() {
    if !x86::available() {
        flashmoe_testdata::say_skipped("no AVX2/FMA/F16C");
        return;
    }
    let mut rng = StdRng::seed_from_u64(13);
    let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits());
    for bits in [2u32, 4, 8] {
        for group in [32usize, 64, 128] {
            for cols in [group, 96.max(group), 320.max(group), 1024] {
                if cols % group != 0 {
                    continue;
                }
                let base = gauss(&mut rng, cols);
                let mut variants: Vec<Vec<f32>> = [1.0, 0.0, 1e-38, 1e-30, 3e30]
                    .iter()
                    .map(|f| base.iter().map(|v| v * f).collect())
                    .collect();
                let mut nonfinite = base.clone();
                nonfinite[3] = f32::INFINITY;
                nonfinite[cols - 1] = f32::NAN;
                variants.push(nonfinite);
                for x in &variants {
                    let want = lanes::AffinePrep::new(bits, group, x, x86::code_read(bits));
                    let got = x86::affine_prep(bits, group, x);
                    let tag = format!("b{bits} g{group} cols {cols} x[0] {}", x[0]);
                    assert_eq!(got.read, want.read, "{tag}");
                    assert!(same(&got.xt, &want.xt), "{tag}: xt");
                    assert!(same(&got.xsum, &want.xsum), "{tag}: xsum");
                    assert_eq!(got.unscale, want.unscale, "{tag}: unscale");
                }
            }
        }
    }
}

#[test]
fn dense_products_match_reference() {
    let mut rng = StdRng::seed_from_u64(2);
    for (rows, cols) in [(1, 1), (7, 33), (33, 100), (5, 257), (300, 512)] {
        let f = gauss(&mut rng, rows * cols);
        let b: Vec<_> = f.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let h: Vec<_> = f.iter().map(|&v| half::f16::from_f32(v)).collect();
        let data = &f;
        check_products(&mut rng, "f32", &WeightView::F32 { rows, cols, data });
        let data = &b;
        check_products(&mut rng, "bf16", &WeightView::Bf16 { rows, cols, data });
        let data = &h;
        check_products(&mut rng, "f16", &WeightView::F16 { rows, cols, data });
    }
}

/// The AVX2 affine kernel with codes read both ways (as f32 bits, and masked in place and
/// converted) for every width, whichever this CPU's `code_read` picks, against the reference.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_affine_both_code_readings() {
    if !x86::available() {
        flashmoe_testdata::say_skipped("no AVX2+FMA on this CPU");
        return;
    }
    let mut rng = StdRng::seed_from_u64(9);
    for bits in [2u32, 4, 8] {
        let a = Affine::random(&mut rng, bits, 64, 37, 512);
        let w = a.view(0);
        let WeightView::Affine(v) = &w else {
            unreachable!()
        };
        let x = gauss(&mut rng, 512);
        let mut want = vec![0f32; 37];
        matvec_ref(&w, &x, &mut want);
        for read in [lanes::CodeRead::F32Bits, lanes::CodeRead::InPlace] {
            let prep = x86::affine_prep_read(bits, 64, &x, read);
            assert_eq!(
                prep.xt,
                lanes::AffinePrep::new(bits, 64, &x, read).xt,
                "b{bits} {read:?}: vectorised preparation"
            );
            let mut got = vec![0f32; 37];
            x86::affine_rows(v, &prep, 0, &mut got);
            let tag = format!("avx2 b{bits} {read:?}");
            assert_close(&tag, &dequantize(&w), 512, &x, &got, &want);
        }
    }
}

#[test]
fn large_affine_parallel_default_dispatch() {
    let mut rng = StdRng::seed_from_u64(3);
    let a = Affine::random(&mut rng, 4, 64, 301, 1024);
    let w = a.view(0);
    let x = gauss(&mut rng, 1024);
    let (mut got, mut want) = (vec![0f32; 301], vec![0f32; 301]);
    matvec(&w, &x, &mut got);
    matvec_ref(&w, &x, &mut want);
    assert_close("default matvec", &dequantize(&w), 1024, &x, &got, &want);
}

fn rms(a: &[f32], b: &[f32]) -> f64 {
    let s: f64 = a.iter().zip(b).map(|(p, q)| ((p - q) as f64).powi(2)).sum();
    (s / a.len() as f64).sqrt()
}

#[test]
fn quantize_round_trip_and_error_vs_minmax() {
    let mut rng = StdRng::seed_from_u64(4);
    let (rows, cols) = (64, 1024);
    let w = gauss(&mut rng, rows * cols);
    for bits in [2u32, 4, 8] {
        for group in [32usize, 64, 128] {
            let mut errs = [0f64; 2];
            for (m, q) in [quantize_affine, quantize_minmax].iter().enumerate() {
                let (qw, s, b) = q(&w, rows, cols, bits, group);
                let view = AffineView {
                    bits,
                    group,
                    rows,
                    cols,
                    w: &qw,
                    scales: Scales::Bf16(&s),
                    biases: Scales::Bf16(&b),
                };
                let d = dequantize(&WeightView::Affine(view));
                // Per element: half a step of rounding, at most one step lost to MLX's
                // snapping of the edge, and bf16 rounding of scale * q and of the bias.
                for (j, (dv, wv)) in d.iter().zip(&w).enumerate() {
                    let st = s[j / group].to_f32().abs();
                    assert!((dv - wv).abs() <= 3.0 * st, "b{bits} g{group} m{m} [{j}]");
                }
                errs[m] = rms(&d, &w);
            }
            eprintln!(
                "rms error b{bits} g{group}: affine(MLX) {:.5}  minmax {:.5}",
                errs[0], errs[1]
            );
            // On Gaussian data MLX's snapping of the edge to the grid costs little; allow 5%.
            assert!(errs[0] <= errs[1] * 1.05, "b{bits} g{group}: {errs:?}");
        }
    }
}

#[test]
fn quantize_affine_follows_mlx_rule() {
    // Group of 32 from -1 to 0.5: |min| > |max|, so edge = min and scale > 0;
    // q0 = round(-1 / (1.5 / 15)) = -10, scale = 0.1, bias = -1, and 0.0 is code 10.
    let mut w: Vec<f32> = (0..32).map(|i| -1.0 + 1.5 * i as f32 / 31.0).collect();
    w[5] = 0.0;
    let (q, s, b) = quantize_affine(&w, 1, 32, 4, 32);
    assert_eq!(b[0].to_f32(), -1.0);
    assert!((s[0].to_f32() - 0.1).abs() < 1e-3);
    assert_eq!((q[0] >> 20) & 15, 10, "0.0 maps to -q0");
    // Mirror image: |max| > |min| gives a negative scale and bias = max.
    let neg: Vec<f32> = w.iter().map(|v| -v).collect();
    let (_, s, b) = quantize_affine(&neg, 1, 32, 4, 32);
    assert!(s[0].to_f32() < 0.0 && b[0].to_f32() == 1.0);
}

#[test]
fn dequantize_row_matches_dequantize() {
    let mut rng = StdRng::seed_from_u64(5);
    let a = Affine::random(&mut rng, 2, 32, 3, 96);
    let WeightView::Affine(v) = a.view(2) else {
        unreachable!()
    };
    let all = dequantize(&WeightView::Affine(v));
    let mut row = vec![0f32; 96];
    dequantize_row(&v, 2, &mut row);
    assert_eq!(&row[..], &all[192..288]);
    // Element 17 of row 2: word 2 * 6 + 1, bits 2..4.
    let q = (a.w[13] >> 2) & 3;
    assert_eq!(row[17], a.s32[6] * q as f32 + a.b32[6]);
}

#[test]
fn elementwise_match_plain_twins() {
    let mut rng = StdRng::seed_from_u64(6);
    for n in [0usize, 1, 7, 8, 33, 1000] {
        let x: Vec<f32> = gauss(&mut rng, n).iter().map(|v| v * 4.0).collect();
        let w = gauss(&mut rng, n);
        let xd: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let close = |what: &str, got: &[f32], want: &[f64], tol: f64| {
            for (i, (g, r)) in got.iter().zip(want).enumerate() {
                let err = (*g as f64 - r).abs();
                assert!(
                    err <= tol * r.abs().max(1.0),
                    "{what} n{n} [{i}]: {g} vs {r}"
                );
            }
        };
        // dot, axpy
        let want: f64 = xd.iter().zip(&w).map(|(a, &b)| a * b as f64).sum();
        let tol = 1e-5 * norm(&x) * norm(&w) + 1e-6;
        assert!((dot(&x, &w) as f64 - want).abs() <= tol, "dot n{n}");
        let mut y = w.clone();
        axpy(0.5, &x, &mut y);
        let want: Vec<f64> = xd
            .iter()
            .zip(&w)
            .map(|(a, &b)| b as f64 + 0.5 * a)
            .collect();
        close("axpy", &y, &want, 1e-6);
        // rmsnorm, both weight conventions
        for add_one in [false, true] {
            let mut out = vec![0f32; n];
            rmsnorm(&x, &w, 1e-6, add_one, &mut out);
            let ms = xd.iter().map(|v| v * v).sum::<f64>() / n.max(1) as f64;
            let inv = 1.0 / (ms + 1e-6).sqrt();
            let off = if add_one { 1.0 } else { 0.0 };
            let want: Vec<f64> = xd
                .iter()
                .zip(&w)
                .map(|(v, &g)| v * inv * (g as f64 + off))
                .collect();
            close("rmsnorm", &out, &want, 1e-5);
        }
        // silu, swiglu
        let sig = |v: f64| v / (1.0 + (-v).exp());
        let mut out = vec![0f32; n];
        silu(&x, &mut out);
        close(
            "silu",
            &out,
            &xd.iter().map(|&v| sig(v)).collect::<Vec<_>>(),
            1e-6,
        );
        swiglu(&x, &w, &mut out);
        let want: Vec<f64> = xd
            .iter()
            .zip(&w)
            .map(|(&g, &u)| sig(g) * u as f64)
            .collect();
        close("swiglu", &out, &want, 1e-6);
        // softmax
        let mut p = x.clone();
        softmax_inplace(&mut p);
        let max = xd.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = xd.iter().map(|v| (v - max).exp()).sum();
        let want: Vec<f64> = xd.iter().map(|v| (v - max).exp() / sum).collect();
        close("softmax", &p, &want, 1e-6);
        // top_k against a full sort
        let mut q: Vec<f32> = x.iter().map(|v| (v * 2.0).round()).collect(); // many ties
        if n > 3 {
            q[2] = f32::NAN;
        }
        for k in [0, 1, 4, 10, n + 1] {
            let mut idx: Vec<usize> = (0..n).collect();
            let key = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { v };
            // partial_cmp, not total_cmp: -0.0 and 0.0 are a tie.
            let cmp = |a: f32, b: f32| a.partial_cmp(&b).expect("no NaN after key");
            idx.sort_by(|&a, &b| cmp(key(q[b]), key(q[a])).then(a.cmp(&b)));
            let got: Vec<usize> = top_k(&q, k).iter().map(|e| e.0).collect();
            assert_eq!(got, idx[..k.min(n)].to_vec(), "top_k n{n} k{k}");
        }
    }
    // exp at the clamp edges and beyond stays finite and monotone.
    let mut e = vec![-100.0, -87.0, 0.0, 88.0, 100.0];
    silu(&e.clone(), &mut e);
    assert!(e.iter().all(|v| v.is_finite()));
}

/// The int8-activation matvec (`ActQuant::Int8`) against the plain twin, on every ISA, and
/// the AVX2 kernel against its portable twin. Each element of `x` is off by at most
/// `unit_g / 2 = max|x_g| / 254`, and every weight `w_j` (bias included: the bias term takes
/// the quantised sum) meets the same rounded element, so row `r` is off by at most
/// `Σ_j |w_j| unit_g / 2` plus f32 rounding, bounded here by the exact kernels'
/// `1e-5 |W_r| |x|` (+ floor). Both ISAs prepare the same `x_q` and compute the same integers;
/// only the order of their f32 sums differs.
#[test]
fn int8_activations_bound() {
    let mut rng = StdRng::seed_from_u64(11);
    for bits in [2u32, 4] {
        for group in [32usize, 64, 128] {
            // 96, 160, 320 leave a tail past the last whole block (64 or 128 elements) for some
            // formats; 1024 is whole blocks only.
            for cols in [group, 96.max(group), 160.max(group), 320.max(group), 1024] {
                if cols % group != 0 {
                    continue;
                }
                let rows = 37;
                let a = Affine::random(&mut rng, bits, group, rows, cols);
                for k in 0..4 {
                    let w = a.view(k);
                    let dense = dequantize(&w);
                    let mut x = gauss(&mut rng, cols);
                    // One group of zeros and one of large values, to reach both ends of sx_g.
                    x[..group].fill(0.0);
                    if cols > group {
                        for v in &mut x[group..2 * group] {
                            *v *= 1e3;
                        }
                    }
                    let portable = int8::Int8Prep::new(bits, group, &x).expect("finite x");
                    #[cfg(target_arch = "x86_64")]
                    if x86::available() {
                        let avx2 = x86::int8_prep(bits, group, &x).expect("finite x");
                        assert!(avx2 == portable, "b{bits} g{group} c{cols}: preps differ");
                    }
                    let mut want = vec![0f32; rows];
                    matvec_ref(&w, &x, &mut want);
                    let xn = norm(&x);
                    let mut first: Option<Vec<f32>> = None;
                    for isa in isas() {
                        for par_min in [usize::MAX, 0] {
                            let mut got = vec![f32::NAN; rows];
                            matvec_impl(isa, par_min, ActQuant::Int8, &w, &x, &mut got);
                            let tag = format!("b{bits} g{group} c{cols} k{k} {isa:?} {par_min}");
                            for r in 0..rows {
                                let wr = &dense[r * cols..(r + 1) * cols];
                                let qb: f64 = wr
                                    .iter()
                                    .enumerate()
                                    .map(|(j, w)| {
                                        w.abs() as f64 * portable.unit[j / group] as f64 / 2.0
                                    })
                                    .sum();
                                let fl = 1e-5 * norm(wr) * xn + 1e-6;
                                let err = ((got[r] - want[r]) as f64).abs();
                                assert!(
                                    err <= qb + fl,
                                    "{tag} row {r}: {} vs {}, bound {qb} + {fl}",
                                    got[r],
                                    want[r]
                                );
                            }
                            // Same integers on every ISA: only f32 summation order differs.
                            match &first {
                                None => first = Some(got),
                                Some(f) => {
                                    for r in 0..rows {
                                        let wr = &dense[r * cols..(r + 1) * cols];
                                        let tol = 1e-6 * norm(wr) * xn + 1e-6;
                                        let d = ((got[r] - f[r]) as f64).abs();
                                        assert!(d <= tol, "{tag} row {r}: {} vs {}", got[r], f[r]);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    // A non-finite x falls back to the exact kernel, which propagates it; so do 8-bit weights.
    let a = Affine::random(&mut rng, 4, 64, 4, 128);
    let mut x = gauss(&mut rng, 128);
    for bad in [f32::NAN, f32::INFINITY] {
        x[5] = bad;
        for isa in isas() {
            let mut got = vec![0f32; 4];
            matvec_impl(isa, usize::MAX, ActQuant::Int8, &a.view(0), &x, &mut got);
            assert!(got.iter().all(|v| !v.is_finite()), "{isa:?} {bad}: {got:?}");
        }
    }
    let a = Affine::random(&mut rng, 8, 64, 5, 256);
    let x = gauss(&mut rng, 256);
    let (mut got, mut want) = (vec![0f32; 5], vec![0f32; 5]);
    for isa in isas() {
        matvec_impl(isa, usize::MAX, ActQuant::Int8, &a.view(1), &x, &mut got);
        matvec_impl(isa, usize::MAX, ActQuant::Exact, &a.view(1), &x, &mut want);
        assert_eq!(got, want, "8-bit weights stay on the exact kernel");
    }
}

/// The AVX2 widening of scales and biases (decode kernel) gives exactly `to_f32_into`'s values.
#[cfg(target_arch = "x86_64")]
#[test]
fn widen_scales_matches_plain_twin() {
    if !x86::available() {
        flashmoe_testdata::say_skipped("no AVX2/FMA/F16C");
        return;
    }
    let mut rng = StdRng::seed_from_u64(9);
    let v = gauss(&mut rng, 53);
    let b: Vec<half::bf16> = v.iter().map(|x| half::bf16::from_f32(*x)).collect();
    let h: Vec<half::f16> = v.iter().map(|x| half::f16::from_f32(*x)).collect();
    for s in [Scales::Bf16(&b), Scales::F16(&h), Scales::F32(&v)] {
        for (start, n) in [(0, 0), (0, 7), (0, 8), (3, 17), (5, 48), (0, 53)] {
            let mut want = vec![0f32; n];
            let mut got = vec![1f32; n];
            s.to_f32_into(start, &mut want);
            x86::widen_checked(&s, start, &mut got);
            let same = want
                .iter()
                .zip(&got)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "start {start} n {n}: {got:?} vs {want:?}");
        }
    }
}

/// A panic in a chunk run by a pool helper reaches the caller of `for_row_chunks` (the caller
/// waits for the helpers' chunks by spinning; a panicking chunk must still end that wait).
#[test]
fn row_chunks_pass_on_a_helpers_panic() {
    if rayon::current_num_threads() < 2 {
        flashmoe_testdata::say_skipped("one rayon thread: no helpers");
        return;
    }
    let mut y = vec![0f32; 64];
    let helper_came = std::sync::atomic::AtomicBool::new(false);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for_row_chunks(0, 1, 64, 1, &mut y, |r0, yc| {
            // The caller (not a pool thread) holds its first chunk until a helper has claimed
            // one (a fixed 50 ms sleep was not always enough on a loaded machine); helpers
            // panic.
            if rayon::current_thread_index().is_some() {
                helper_came.store(true, std::sync::atomic::Ordering::SeqCst);
                panic!("helper chunk at row {r0}");
            }
            if r0 == 0 {
                // Bounded so that a pool that never helps fails the assertion below instead
                // of hanging.
                let t0 = std::time::Instant::now();
                while !helper_came.load(std::sync::atomic::Ordering::SeqCst)
                    && t0.elapsed() < std::time::Duration::from_secs(60)
                {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            yc.fill(1.0);
        })
    }));
    assert!(r.is_err(), "the helper's panic was lost");
    // Without a panic every row is written once.
    let mut y = vec![0f32; 1000];
    for_row_chunks(0, 1, 1000, 1, &mut y, |r0, yc| {
        for (i, v) in yc.iter_mut().enumerate() {
            *v += (r0 + i) as f32;
        }
    });
    assert!(y.iter().enumerate().all(|(i, v)| *v == i as f32));
}
