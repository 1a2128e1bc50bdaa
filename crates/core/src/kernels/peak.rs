//! The machine's multiply-add peaks as the products use them, measured (not taken from a data
//! sheet): independent chains of the kernels' own instructions on registers, on every thread of
//! the compute pool at once. `bench prefill` divides a prompt's multiply-adds by these for its
//! compute bound. f32: `vfmadd` (AVX2+FMA) / `fmla` (NEON), 8 / 4 per instruction. int8: what
//! `int8mm`'s tile kernel issues per 4 columns of 8 rows, 32 multiply-adds: `vpdpbusd`
//! (AVX512-VNNI), `vpmaddubsw` + `vpaddw` (AVX2; the widening `vpmaddwd` once per 8 of them is
//! left out), `sdot` x 2 (NEON dot product); the plain code elsewhere.
use std::time::Instant;

/// Independent accumulators per chain set: enough to cover the instructions' latency (4-5
/// cycles) at two per cycle.
const CHAINS: usize = 10;

/// Multiply-adds per second, all threads: (f32, int8) with the kernels `int8mm::Kernel::best`
/// and the f32 products would use.
pub fn peaks() -> (f64, f64) {
    (measure(f32_chains), measure(int8_chains))
}

/// Best of 3 runs of `f` on every thread of the pool at once, in multiply-adds per second.
fn measure(f: fn(usize) -> u64) -> f64 {
    const ITERS: usize = 4_000_000;
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let madds: u64 = rayon::broadcast(|_| f(ITERS)).iter().sum();
        best = best.max(madds as f64 / t.elapsed().as_secs_f64());
    }
    best
}

/// `iters` rounds of `CHAINS` f32 multiply-add instructions; returns the multiply-adds done.
fn f32_chains(iters: usize) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if super::x86::available() {
        // SAFETY: AVX2 and FMA are checked by `available`.
        return unsafe { x86::f32_chains(iters) };
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: NEON is part of every aarch64 Linux target.
    return unsafe { neon::f32_chains(iters) };
    #[allow(unreachable_code)]
    {
        let mut a = [[1f32; 8]; CHAINS];
        for _ in 0..iters {
            for c in a.iter_mut() {
                for v in c.iter_mut() {
                    *v = v.mul_add(0.999_999, 1e-7);
                }
            }
        }
        std::hint::black_box(a);
        (iters * CHAINS * 8) as u64
    }
}

/// `iters` rounds of `CHAINS` int8 steps of 32 multiply-adds; returns the multiply-adds done.
fn int8_chains(iters: usize) -> u64 {
    use super::int8mm::Kernel;
    match Kernel::best() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the kernel's features are those `best` checked.
        Kernel::Vnni => unsafe { x86::vnni_chains(iters) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Kernel::Avx2 => unsafe { x86::maddubs_chains(iters) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        Kernel::Sdot => unsafe { neon::sdot_chains(iters) },
        Kernel::Plain => {
            let w = std::hint::black_box([3u8; 32]);
            let x = std::hint::black_box([-5i8; 32]);
            let mut d = [[0i32; 8]; CHAINS];
            for _ in 0..iters / 8 {
                for c in d.iter_mut() {
                    for (l, v) in c.iter_mut().enumerate() {
                        for k in 0..4 {
                            *v = v.wrapping_add(w[4 * l + k] as i32 * x[4 * l + k] as i32);
                        }
                    }
                }
            }
            std::hint::black_box(d);
            (iters / 8 * CHAINS * 32) as u64
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::CHAINS;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn f32_chains(iters: usize) -> u64 {
        let m = _mm256_set1_ps(0.999_999);
        let c = _mm256_set1_ps(1e-7);
        let mut a = [_mm256_set1_ps(1.0); CHAINS];
        for _ in 0..iters {
            for v in a.iter_mut() {
                *v = _mm256_fmadd_ps(*v, m, c);
            }
        }
        std::hint::black_box(a);
        (iters * CHAINS * 8) as u64
    }

    /// `iters` rounds of `step` on `CHAINS` accumulators, 32 multiply-adds each.
    #[inline(always)]
    unsafe fn int8_steps(iters: usize, step: impl Fn(__m256i, __m256i, __m256i) -> __m256i) -> u64 {
        let w = std::hint::black_box(_mm256_set1_epi8(3));
        let x = std::hint::black_box(_mm256_set1_epi8(-5));
        let mut d = [_mm256_setzero_si256(); CHAINS];
        for _ in 0..iters {
            for v in d.iter_mut() {
                *v = step(*v, w, x);
            }
        }
        std::hint::black_box(d);
        (iters * CHAINS * 32) as u64
    }

    #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
    pub(super) unsafe fn vnni_chains(iters: usize) -> u64 {
        int8_steps(iters, |d, w, x| _mm256_dpbusd_epi32(d, w, x))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn maddubs_chains(iters: usize) -> u64 {
        int8_steps(iters, |d, w, x| {
            _mm256_add_epi16(d, _mm256_maddubs_epi16(w, x))
        })
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::CHAINS;
    use std::arch::aarch64::*;

    #[target_feature(enable = "neon")]
    pub(super) unsafe fn f32_chains(iters: usize) -> u64 {
        let m = vdupq_n_f32(0.999_999);
        let c = vdupq_n_f32(1e-7);
        let mut a = [vdupq_n_f32(1.0); CHAINS];
        for _ in 0..iters {
            for v in a.iter_mut() {
                *v = vfmaq_f32(c, *v, m);
            }
        }
        std::hint::black_box(a);
        (iters * CHAINS * 4) as u64
    }

    #[target_feature(enable = "neon,dotprod")]
    pub(super) unsafe fn sdot_chains(iters: usize) -> u64 {
        let w = std::hint::black_box(vdupq_n_s8(3));
        let x = std::hint::black_box(vdupq_n_s8(-5));
        let mut d = [vdupq_n_s32(0); CHAINS];
        for _ in 0..iters {
            for v in d.iter_mut() {
                *v = crate::kernels::neon_int8mm::sdot(*v, w, x);
            }
        }
        std::hint::black_box(d);
        // Two `sdot`s are one step of 32 (a tile's 8 rows in two registers).
        (iters * CHAINS * 16) as u64
    }
}
