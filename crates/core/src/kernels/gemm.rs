//! Small dense f32 products `C += alpha · A B` on strided row-major views, for the chunked
//! gated delta rule (64×128 by 128×128 and the like: they live in L1/L2, so the cost is
//! loads, not memory bandwidth). A 4-row × 16-column register block keeps 8 vector
//! accumulators while it walks the shared dimension, loading each B row segment once per
//! four rows of A. The plain twin is `gemm_acc_ref`.

#[cfg(target_arch = "x86_64")]
use super::{isa, Isa};

/// A row-major matrix view: element (i, j) at `data[i * stride + j]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub stride: usize,
}

/// `c[i*ldc + j] += alpha * sum_p a(i, p) b(p, j)` for `i < m`, `j < n`, `p < k`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_acc(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: Mat,
    b: Mat,
    c: &mut [f32],
    ldc: usize,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    assert!(a.data.len() >= (m - 1) * a.stride + k, "gemm: a too short");
    assert!(b.data.len() >= (k - 1) * b.stride + n, "gemm: b too short");
    assert!(c.len() >= (m - 1) * ldc + n, "gemm: c too short");
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn avx2(
            m: usize,
            n: usize,
            k: usize,
            alpha: f32,
            a: Mat,
            b: Mat,
            c: &mut [f32],
            ldc: usize,
        ) {
            gemm_body::<true>(m, n, k, alpha, a, b, c, ldc)
        }
        if isa() == Isa::Avx2 {
            // SAFETY: `isa()` detected AVX2 and FMA on this CPU.
            return unsafe { avx2(m, n, k, alpha, a, b, c, ldc) };
        }
    }
    gemm_body::<false>(m, n, k, alpha, a, b, c, ldc)
}

const MR: usize = 4;

/// `a * b + c`, fused where the CPU has FMA (Rust never contracts `a * b + c` on its own).
#[inline(always)]
fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

const NR: usize = 16;

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gemm_body<const FMA: bool>(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: Mat,
    b: Mat,
    c: &mut [f32],
    ldc: usize,
) {
    let mut i = 0;
    while i < m {
        let mr = MR.min(m - i);
        let mut j = 0;
        while j < n {
            let nr = NR.min(n - j);
            if mr == MR && nr == NR {
                let mut acc = [[0f32; NR]; MR];
                for p in 0..k {
                    let brow: &[f32; NR] = b.data[p * b.stride + j..][..NR]
                        .try_into()
                        .expect("NR-wide slice");
                    for (r, accr) in acc.iter_mut().enumerate() {
                        let av = a.data[(i + r) * a.stride + p];
                        for (x, bv) in accr.iter_mut().zip(brow) {
                            *x = fmadd::<FMA>(av, *bv, *x);
                        }
                    }
                }
                for (r, accr) in acc.iter().enumerate() {
                    let crow = &mut c[(i + r) * ldc + j..][..NR];
                    for (cv, x) in crow.iter_mut().zip(accr) {
                        *cv += alpha * x;
                    }
                }
            } else {
                for r in 0..mr {
                    for p in 0..k {
                        let av = alpha * a.data[(i + r) * a.stride + p];
                        let brow = &b.data[p * b.stride + j..][..nr];
                        let crow = &mut c[(i + r) * ldc + j..][..nr];
                        for (cv, bv) in crow.iter_mut().zip(brow) {
                            *cv += av * bv;
                        }
                    }
                }
            }
            j += nr;
        }
        i += mr;
    }
}

/// The plain twin of [`gemm_acc`].
#[allow(clippy::too_many_arguments)]
pub fn gemm_acc_ref(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: Mat,
    b: Mat,
    c: &mut [f32],
    ldc: usize,
) {
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f32;
            for p in 0..k {
                s += a.data[i * a.stride + p] * b.data[p * b.stride + j];
            }
            c[i * ldc + j] += alpha * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_matches_twin() {
        let mut seed = 1u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for &(m, n, k) in &[
            (1, 1, 1),
            (4, 16, 8),
            (7, 37, 13),
            (64, 128, 128),
            (5, 20, 64),
        ] {
            let (lda, ldb, ldc) = (k + 3, n + 5, n + 2);
            let a: Vec<f32> = (0..m * lda).map(|_| rnd()).collect();
            let b: Vec<f32> = (0..k * ldb).map(|_| rnd()).collect();
            let c0: Vec<f32> = (0..m * ldc).map(|_| rnd()).collect();
            let (mut c1, mut c2) = (c0.clone(), c0.clone());
            let (am, bm) = (
                Mat {
                    data: &a,
                    stride: lda,
                },
                Mat {
                    data: &b,
                    stride: ldb,
                },
            );
            gemm_acc(m, n, k, -0.7, am, bm, &mut c1, ldc);
            gemm_acc_ref(m, n, k, -0.7, am, bm, &mut c2, ldc);
            let e = c1
                .iter()
                .zip(&c2)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(e < 1e-4, "{m}x{n}x{k}: off by {e}");
            // Padding columns of c are untouched.
            for i in 0..m {
                assert_eq!(
                    &c1[i * ldc + n..(i + 1) * ldc],
                    &c0[i * ldc + n..(i + 1) * ldc]
                );
            }
        }
    }
}
