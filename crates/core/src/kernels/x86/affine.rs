//! The exact affine matvec on AVX2 (`y = W x`, W 2/4/8-bit MLX affine, f32 arithmetic) and
//! its once-per-product preparation of `x`. How it reads codes, and why `x` is scaled by powers
//! of two for it, is `lanes::CodeRead`; the portable twin is `lanes::affine_rows`, the plain
//! one `reference::matvec_ref`.
//!
//! Owns these two kernels only; the helpers they share with the other AVX2 kernels (`hsum`,
//! `widen`, the `FIT` cases) stay in `x86.rs`.

use super::super::lanes::{self, AffinePrep, CodeRead};
use super::super::AffineView;
use super::{
    available, dot8_avx2, hsum, lane_group_index, widen, BLOCK_SPANS_GROUPS, GROUP_SPANS_BLOCKS,
    ONE_GROUP, PF_BYTES,
};
use std::arch::x86_64::*;

/// How `affine_rows` reads `bits`-bit codes. 4- and 8-bit on AMD: as f32 bits, which saves
/// the 8 `cvtdq2ps` of every 64 weights (4-bit 128x4096 on one core of the 2-core EPYC, from
/// L2: 2.9 ns per 64 weights against 4.4 converting them, same process). 2-bit, and every
/// width elsewhere: masked in place and converted. Read as f32 bits, 2-bit codes were slower
/// (3.7 against 4.8 GB/s, one core, 256x4096): a denormal operand of `vmulps`/`vfmadd` costs
/// this CPU time in some mixes (2x in a probe of 2-bit blocks), and a 2-bit block has twice
/// the denormal operands per byte. Intel cores may take a microcode assist on denormal
/// operands (up to ~100x slower); none was at hand to measure, so they keep the conversion.
pub(crate) fn code_read(bits: u32) -> CodeRead {
    if bits != 2 && is_amd() {
        CodeRead::F32Bits
    } else {
        CodeRead::InPlace
    }
}

/// Whether the CPU's vendor is AMD (CPUID leaf 0).
fn is_amd() -> bool {
    static AMD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AMD.get_or_init(|| {
        // CPUID leaf 0 (the vendor string) exists on every x86-64 CPU.
        let r = __cpuid(0);
        let mut v = [0u8; 12];
        v[..4].copy_from_slice(&r.ebx.to_le_bytes());
        v[4..8].copy_from_slice(&r.edx.to_le_bytes());
        v[8..].copy_from_slice(&r.ecx.to_le_bytes());
        &v == b"AuthenticAMD"
    })
}

/// True while the MXCSR leaves denormal inputs alone (DAZ clear): `affine_rows` reads codes
/// as denormal f32s (`CodeRead::F32Bits`), which DAZ would read as zero. Rust never sets DAZ;
/// a library that did would send affine products to the portable kernel.
pub(crate) fn denormal_inputs() -> bool {
    let mut csr = 0u32;
    // SAFETY: `stmxcsr` stores the 4-byte MXCSR at the address given, a live local.
    unsafe {
        std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack, preserves_flags));
    }
    csr & (1 << 6) == 0
}

/// `lanes::AffinePrep::new(bits, group, x, code_read(bits))` vectorised: the same `xt`,
/// `xsum` and `unscale` bit for bit (the tests compare them). Once per product, but serial
/// before the rows are shared out: the scalar permutation took ~5 us for 4096 columns, a few
/// percent of an expert's product on 2 threads.
pub(crate) fn affine_prep(bits: u32, group: usize, x: &[f32]) -> AffinePrep {
    affine_prep_read(bits, group, x, code_read(bits))
}

/// As `affine_prep`, for codes read as `read` (tests run both readings on every machine).
pub(crate) fn affine_prep_read(bits: u32, group: usize, x: &[f32], read: CodeRead) -> AffinePrep {
    assert!(
        read != CodeRead::Converted,
        "the AVX2 kernel masks codes in place"
    );
    assert!(available());
    assert!(matches!(bits, 2 | 4 | 8) && group.is_multiple_of(32) && x.len().is_multiple_of(group));
    // SAFETY: features checked; every load and store below stays inside `x`, `xt` (both
    // `x.len()`) and whole 8-float chunks of the groups, which `x.len()` is a multiple of.
    unsafe { affine_prep_avx2(bits, group, x, read) }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn affine_prep_avx2(bits: u32, group: usize, x: &[f32], read: CodeRead) -> AffinePrep {
    let n = x.len();
    let xp = x.as_ptr();
    // Σx per group as `lanes::sum8` adds it: 8 strided sums, then lane by lane.
    let mut xsum = Vec::with_capacity(n / group);
    let absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let inf = _mm256_set1_ps(f32::INFINITY);
    let mut mx = _mm256_setzero_ps();
    for g in 0..n / group {
        let mut acc = _mm256_setzero_ps();
        for j in (0..group).step_by(8) {
            let v = _mm256_loadu_ps(xp.add(g * group + j));
            acc = _mm256_add_ps(acc, v);
            let a = _mm256_and_ps(v, absmask);
            // NaN and infinities compare false: left out of the maximum.
            let finite = _mm256_cmp_ps::<_CMP_LT_OQ>(a, inf);
            mx = _mm256_max_ps(mx, _mm256_and_ps(a, finite));
        }
        let mut l = [0f32; 8];
        _mm256_storeu_ps(l.as_mut_ptr(), acc);
        xsum.push(l.iter().sum::<f32>());
    }
    let mut l = [0f32; 8];
    _mm256_storeu_ps(l.as_mut_ptr(), mx);
    let m = l.iter().fold(0f32, |a, &b| a.max(b));
    let pw = 32 / bits as usize;
    let (f64s, unscale) = lanes::read_factors(read, bits, lanes::read_exponent(read, m));
    // Factors outside f32's normal range (x near the bottom of f32's range): the plain twin.
    if !f64s
        .iter()
        .all(|&v| (f32::MIN_POSITIVE as f64..=2f64.powi(127)).contains(&v))
    {
        return AffinePrep::new(bits, group, x, read);
    }
    let mut f = [_mm256_setzero_ps(); 16];
    for (fk, &v) in f.iter_mut().zip(&f64s) {
        *fk = _mm256_set1_ps(v as f32);
    }
    let be = lanes::block_elems(bits);
    let nb = n / be;
    let mut xt = lanes::LineAligned::zeroed(n);
    let op = xt.as_mut_ptr();
    for b in 0..nb {
        let (src, dst) = (xp.add(b * be), op.add(b * be));
        // Block word `l` holds elements `l pw .. (l + 1) pw`: slice `k` is column `k` of the
        // 8 x pw matrix whose row `l` starts at `src + l pw`.
        match pw {
            4 => {
                let mut r = [_mm256_setzero_ps(); 4];
                for (l, rl) in r.iter_mut().enumerate() {
                    let lo = _mm_loadu_ps(src.add(l * 4));
                    let hi = _mm_loadu_ps(src.add((l + 4) * 4));
                    *rl = _mm256_set_m128(hi, lo);
                }
                let t0 = _mm256_unpacklo_ps(r[0], r[1]);
                let t1 = _mm256_unpackhi_ps(r[0], r[1]);
                let t2 = _mm256_unpacklo_ps(r[2], r[3]);
                let t3 = _mm256_unpackhi_ps(r[2], r[3]);
                let cols = [
                    _mm256_shuffle_ps::<0x44>(t0, t2),
                    _mm256_shuffle_ps::<0xEE>(t0, t2),
                    _mm256_shuffle_ps::<0x44>(t1, t3),
                    _mm256_shuffle_ps::<0xEE>(t1, t3),
                ];
                for (k, c) in cols.iter().enumerate() {
                    _mm256_storeu_ps(dst.add(8 * k), _mm256_mul_ps(*c, f[k]));
                }
            }
            _ => {
                for h in 0..pw / 8 {
                    let cols = transpose8(src.add(8 * h), pw);
                    for (k, c) in cols.iter().enumerate() {
                        let kk = 8 * h + k;
                        _mm256_storeu_ps(dst.add(8 * kk), _mm256_mul_ps(*c, f[kk]));
                    }
                }
            }
        }
    }
    xt[nb * be..].copy_from_slice(&x[nb * be..]);
    AffinePrep {
        xt,
        xsum,
        read,
        unscale,
    }
}

/// Columns 0..8 of the 8 x 8 floats whose row `l` is `p[l stride .. l stride + 8]`. Loops,
/// not `array::from_fn`: closures do not inherit the caller's target features.
#[inline(always)]
unsafe fn transpose8(p: *const f32, stride: usize) -> [__m256; 8] {
    let mut r = [_mm256_setzero_ps(); 8];
    for (l, rl) in r.iter_mut().enumerate() {
        *rl = _mm256_loadu_ps(p.add(l * stride));
    }
    // For rows 4q..4q + 4: t[4q] = lo(r0, r1), t[4q + 1] = hi(r0, r1), t[4q + 2] = lo(r2, r3),
    // t[4q + 3] = hi(r2, r3); tt[4q + c] then holds columns c and c + 4 of those rows.
    let mut t = [_mm256_setzero_ps(); 8];
    let mut tt = [_mm256_setzero_ps(); 8];
    for q in [0, 4] {
        t[q] = _mm256_unpacklo_ps(r[q], r[q + 1]);
        t[q + 1] = _mm256_unpackhi_ps(r[q], r[q + 1]);
        t[q + 2] = _mm256_unpacklo_ps(r[q + 2], r[q + 3]);
        t[q + 3] = _mm256_unpackhi_ps(r[q + 2], r[q + 3]);
        tt[q] = _mm256_shuffle_ps::<0x44>(t[q], t[q + 2]);
        tt[q + 1] = _mm256_shuffle_ps::<0xEE>(t[q], t[q + 2]);
        tt[q + 2] = _mm256_shuffle_ps::<0x44>(t[q + 1], t[q + 3]);
        tt[q + 3] = _mm256_shuffle_ps::<0xEE>(t[q + 1], t[q + 3]);
    }
    let mut cols = [_mm256_setzero_ps(); 8];
    for k in 0..4 {
        cols[k] = _mm256_permute2f128_ps::<0x20>(tt[k], tt[k + 4]);
        cols[k + 4] = _mm256_permute2f128_ps::<0x31>(tt[k], tt[k + 4]);
    }
    cols
}

/// `y[i] = row (r0 + i) · x` for an affine matrix.
pub(crate) fn affine_rows(a: &AffineView, prep: &AffinePrep, r0: usize, y: &mut [f32]) {
    assert!(available());
    assert!((r0 + y.len()) <= a.rows && prep.xt.len() == a.cols);
    assert_eq!(prep.xsum.len(), a.groups_per_row());
    let f32_bits = match prep.read {
        CodeRead::F32Bits => true,
        CodeRead::InPlace => false,
        CodeRead::Converted => panic!("the AVX2 kernel masks codes in place; x must be scaled"),
    };
    // SAFETY: the CPU features were checked above, and the row range and `x` length match the
    // view that `AffineView::check` validated, which is what the body's loads rely on.
    unsafe {
        match (a.bits, f32_bits) {
            (2, false) => affine_rows_avx2::<2, 30, false>(a, prep, r0, y),
            (2, true) => affine_rows_avx2::<2, 30, true>(a, prep, r0, y),
            (4, false) => affine_rows_avx2::<4, 28, false>(a, prep, r0, y),
            (4, true) => affine_rows_avx2::<4, 28, true>(a, prep, r0, y),
            (8, false) => affine_rows_avx2::<8, 24, false>(a, prep, r0, y),
            (8, true) => affine_rows_avx2::<8, 24, true>(a, prep, r0, y),
            (b, _) => unreachable!("bits {b} rejected by AffineView::check"),
        }
    }
}

/// `LAST` is `32 - BITS`, the shift that brings the top code down (a const expression of `BITS`
/// cannot be a const argument on stable Rust). `F32B`: codes read as `CodeRead::F32Bits`, else
/// `CodeRead::InPlace`.
#[target_feature(enable = "avx2,fma,f16c,bmi2")]
unsafe fn affine_rows_avx2<const BITS: i32, const LAST: i32, const F32B: bool>(
    a: &AffineView,
    prep: &AffinePrep,
    r0: usize,
    y: &mut [f32],
) {
    let lanes::BlockGeom {
        ng,
        wpr,
        pw,
        e,
        nb,
        lpg,
    } = lanes::BlockGeom::new(a, BITS as usize);
    let idx = lane_group_index(lpg);
    let mask = (1u32 << BITS) - 1;
    // Groups are powers of two: a shift, not a division per block (see `ONE_GROUP`).
    let fshift = a.group.trailing_zeros().abs_diff(e.trailing_zeros());
    // The in-place masks `mask << BITS k` (`lanes::read_pos`). Built from an opaque value so
    // LLVM keeps them in registers instead of re-loading each from the constant pool every
    // block (the loads, not the arithmetic, were the bottleneck).
    let mut masks = [_mm256_setzero_si256(); 16];
    let mut m = std::hint::black_box(_mm256_set1_epi32(mask as i32));
    let in_place = if F32B { 24 / BITS as usize } else { pw - 1 };
    for mk in masks.iter_mut().take(in_place) {
        *mk = m;
        m = _mm256_slli_epi32::<BITS>(m);
    }
    let mut sbuf = vec![0f32; ng + 8];
    let mut bbuf = vec![0f32; ng];
    let xp = prep.xt.as_ptr();
    for (i, yi) in y.iter_mut().enumerate() {
        let row = r0 + i;
        widen(&a.scales, row * ng, &mut sbuf[..ng]);
        widen(&a.biases, row * ng, &mut bbuf);
        let wrow = &a.w[row * wpr..(row + 1) * wpr];
        let wp = wrow.as_ptr();
        let sp = sbuf.as_ptr();
        // How blocks meet groups is known per call, not per block.
        let acc = match a.group.cmp(&e) {
            std::cmp::Ordering::Equal => {
                row_blocks::<BITS, LAST, ONE_GROUP, F32B>(wp, xp, sp, nb, &masks, fshift, idx)
            }
            std::cmp::Ordering::Greater => row_blocks::<BITS, LAST, GROUP_SPANS_BLOCKS, F32B>(
                wp, xp, sp, nb, &masks, fshift, idx,
            ),
            std::cmp::Ordering::Less => row_blocks::<BITS, LAST, BLOCK_SPANS_GROUPS, F32B>(
                wp, xp, sp, nb, &masks, fshift, idx,
            ),
        };
        let mut tail = 0f32;
        for j in nb * e..a.cols {
            // Past the last whole block `xt` is in natural order and unscaled.
            let q = (wrow[j * BITS as usize / 32] >> ((j * BITS as usize) % 32)) & mask;
            tail += q as f32 * prep.xt[j] * sbuf[j / a.group];
        }
        // A power of two: exact.
        let blocks = (hsum(acc) as f64 * prep.unscale) as f32;
        *yi = blocks + tail + dot8_avx2(&bbuf, &prep.xsum);
    }
}

/// The whole blocks of one row of `affine_rows_avx2`: `Σ_b (codes_b · xt_b) * scale lanes_b`,
/// blocks meeting groups as `FIT` says (`ONE_GROUP` and the others; a block's scales are at
/// `sp` as a block's factors are in the int8 kernel). Block b reads words `[8b, 8b + 8)` of
/// `wp` and `xp[b e .. (b + 1) e]`; `sp` holds the row's scales as f32, padded by 8.
///
/// Code `k` of the 8 words is masked into place (or shifted) and converted (`InPlace`) or its
/// lanes' bits are used as f32 as they are (`F32B`, `CodeRead::F32Bits`). Four partial sums
/// per block, not two: the block's sum then waits on two FMAs and two additions instead of
/// four FMAs and one addition, which with one row per pass was the critical path.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn row_blocks<const BITS: i32, const LAST: i32, const FIT: u8, const F32B: bool>(
    wp: *const u32,
    xp: *const f32,
    sp: *const f32,
    nb: usize,
    masks: &[__m256i; 16],
    fshift: u32,
    idx: __m256i,
) -> __m256 {
    let e = 8 * (32 / BITS as usize);
    let sstep = match FIT {
        ONE_GROUP => 1,
        GROUP_SPANS_BLOCKS => 0,
        _ => 1 << fshift,
    };
    let (mut wq, mut xb, mut sq) = (wp, xp, sp);
    // Two blocks per step, one prefetch per 64 bytes, and the loop's own instructions once.
    // Not for 2-bit codes: their 15 masks and two blocks' partial sums do not fit in the 16
    // registers, and the spills cost more than the loop saves.
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let pairs = if BITS == 2 { 0 } else { nb / 2 };
    for b in (0..pairs * 2).step_by(2) {
        _mm_prefetch::<_MM_HINT_T0>((wq as *const i8).wrapping_add(PF_BYTES));
        let s0 = block_sum::<BITS, LAST, F32B>(wq, xb, masks);
        acc0 = _mm256_fmadd_ps(s0, block_scales::<FIT>(sp, sq, b, fshift, idx), acc0);
        let s1 = block_sum::<BITS, LAST, F32B>(wq.add(8), xb.add(e), masks);
        let sv1 = block_scales::<FIT>(sp, sq.add(sstep), b + 1, fshift, idx);
        acc1 = _mm256_fmadd_ps(s1, sv1, acc1);
        wq = wq.add(16);
        xb = xb.add(2 * e);
        sq = sq.add(2 * sstep);
    }
    for b in pairs * 2..nb {
        _mm_prefetch::<_MM_HINT_T0>((wq as *const i8).wrapping_add(PF_BYTES));
        let s0 = block_sum::<BITS, LAST, F32B>(wq, xb, masks);
        acc0 = _mm256_fmadd_ps(s0, block_scales::<FIT>(sp, sq, b, fshift, idx), acc0);
        wq = wq.add(8);
        xb = xb.add(e);
        sq = sq.add(sstep);
    }
    _mm256_add_ps(acc0, acc1)
}

/// Block `b`'s scale lanes: `sp[b]` (at `sq`), `sp[b >> fshift]` or the lanes of
/// `sp[b << fshift ..]` (at `sq`) as `FIT` says. A function, not a closure: closures do not
/// inherit the caller's target features, and their intrinsics would not be inlined.
#[inline(always)]
unsafe fn block_scales<const FIT: u8>(
    sp: *const f32,
    sq: *const f32,
    b: usize,
    fshift: u32,
    idx: __m256i,
) -> __m256 {
    match FIT {
        ONE_GROUP => _mm256_broadcast_ss(&*sq),
        GROUP_SPANS_BLOCKS => _mm256_broadcast_ss(&*sp.add(b >> fshift)),
        _ => _mm256_permutevar8x32_ps(_mm256_loadu_ps(sq), idx),
    }
}

/// `Σ_k codes_k(w) ⊙ xt_k` of the block of 8 words at `wq` and its `e` elements of `xt` at
/// `xb`, in four partial sums (see `row_blocks`).
#[inline(always)]
unsafe fn block_sum<const BITS: i32, const LAST: i32, const F32B: bool>(
    wq: *const u32,
    xb: *const f32,
    masks: &[__m256i; 16],
) -> __m256 {
    let pw = 32 / BITS as usize;
    let in_place = if F32B { 24 / BITS as usize } else { pw - 1 };
    let w = _mm256_loadu_si256(wq as *const __m256i);
    // `F32B`: the codes from bit 24 up but the last (`lanes::read_pos`).
    let hi = _mm256_srli_epi32::<24>(w);
    let mut ch = [_mm256_setzero_ps(); 4];
    for k in 0..pw {
        let q = if k + 1 == pw {
            _mm256_srli_epi32::<LAST>(w)
        } else if k < in_place {
            _mm256_and_si256(w, masks[k])
        } else {
            _mm256_and_si256(hi, masks[k - in_place])
        };
        let qf = if F32B {
            _mm256_castsi256_ps(q)
        } else {
            _mm256_cvtepi32_ps(q)
        };
        let xk = _mm256_loadu_ps(xb.add(k * 8));
        ch[k % 4] = if k < 4 {
            _mm256_mul_ps(qf, xk)
        } else {
            _mm256_fmadd_ps(qf, xk, ch[k % 4])
        };
    }
    _mm256_add_ps(_mm256_add_ps(ch[0], ch[1]), _mm256_add_ps(ch[2], ch[3]))
}
