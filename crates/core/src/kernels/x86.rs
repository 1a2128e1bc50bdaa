//! AVX2 + FMA (+ F16C) kernels for x86-64, chosen at run time by `available()`.
//! Same arithmetic and lane layout as `lanes.rs` (read its header first); every function here
//! has its portable twin there and a test comparing both with `reference.rs`. The exact affine
//! kernel reads codes differently from its twin (`lanes::CodeRead`): `x` is scaled by powers of
//! two to match, so the products are the same up to the order of the f32 sums.
//!
//! The exact affine matvec and its preparation of `x` are in `x86/affine.rs`.
//!
//! The safe wrappers check lengths, then call a `#[target_feature]` body. The bodies use raw
//! pointer loads whose bounds follow from those checks.

mod affine;
mod few;
pub(crate) mod int8mm;

#[cfg(test)]
pub(crate) use affine::affine_prep_read;
#[cfg(test)]
pub(crate) use affine::code_read;
pub(crate) use affine::{affine_prep, affine_rows, denormal_inputs};
pub(crate) use few::{affine_few, pack as few_pack, FEW_MAX};

use super::int8::{self, Int8Prep};
use super::{AffineView, Scales};
use half::{bf16, f16};
use std::arch::x86_64::*;

/// True when this CPU has everything the kernels below use.
pub(crate) fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
        && is_x86_feature_detected!("bmi2")
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
}

/// Lane -> group offset inside a block when a block spans several groups (`lpg < 8`).
#[inline(always)]
unsafe fn lane_group_index(lpg: usize) -> __m256i {
    let mut idx = [0i32; 8];
    for (l, v) in idx.iter_mut().enumerate() {
        *v = (l / lpg.max(1)) as i32;
    }
    _mm256_loadu_si256(idx.as_ptr() as *const __m256i)
}

/// The per-lane values (scale or bias) of block `b`: one broadcast value when the block is
/// inside one group, else lanes `l` get `buf[g0 + l / lpg]` (`buf` padded by 8).
#[inline(always)]
unsafe fn lane_values(buf: *const f32, g0: usize, lpg: usize, idx: __m256i) -> __m256 {
    if lpg >= 8 {
        _mm256_set1_ps(*buf.add(g0))
    } else {
        _mm256_permutevar8x32_ps(_mm256_loadu_ps(buf.add(g0)), idx)
    }
}

/// Dequantises one affine row into `out [cols]` in the lane-permuted order of
/// `lanes::permute_x`. `sbuf`/`bbuf` hold the row's scales and biases as f32, padded by 8.
pub(crate) fn dequant_row_permuted(
    a: &AffineView,
    wrow: &[u32],
    sbuf: &[f32],
    bbuf: &[f32],
    out: &mut [f32],
) {
    assert!(available());
    assert!(wrow.len() == a.words_per_row() && out.len() == a.cols);
    assert!(sbuf.len() >= a.groups_per_row() + 8 && bbuf.len() >= a.groups_per_row() + 8);
    // SAFETY: features checked; lengths checked above are the bounds of every load and store.
    unsafe {
        match a.bits {
            2 => dequant_avx2::<2>(a, wrow, sbuf, bbuf, out),
            4 => dequant_avx2::<4>(a, wrow, sbuf, bbuf, out),
            8 => dequant_avx2::<8>(a, wrow, sbuf, bbuf, out),
            b => unreachable!("bits {b} rejected by AffineView::check"),
        }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn dequant_avx2<const BITS: i32>(
    a: &AffineView,
    wrow: &[u32],
    sbuf: &[f32],
    bbuf: &[f32],
    out: &mut [f32],
) {
    let pw = 32 / BITS as usize;
    let e = 8 * pw;
    let nb = a.cols / e;
    let lpg = a.group / pw;
    let idx = lane_group_index(lpg);
    let maskv = _mm256_set1_epi32((1 << BITS) - 1);
    let mask = (1u32 << BITS) - 1;
    let op = out.as_mut_ptr();
    for b in 0..nb {
        let mut w = _mm256_loadu_si256(wrow.as_ptr().add(b * 8) as *const __m256i);
        let g0 = (b * e) >> a.group.trailing_zeros();
        let sv = lane_values(sbuf.as_ptr(), g0, lpg, idx);
        let bv = lane_values(bbuf.as_ptr(), g0, lpg, idx);
        for k in 0..pw {
            let q = _mm256_cvtepi32_ps(_mm256_and_si256(w, maskv));
            w = _mm256_srli_epi32::<BITS>(w);
            _mm256_storeu_ps(op.add(b * e + k * 8), _mm256_fmadd_ps(q, sv, bv));
        }
    }
    for j in nb * e..a.cols {
        let q = (wrow[j * BITS as usize / 32] >> ((j * BITS as usize) % 32)) & mask;
        out[j] = q as f32 * sbuf[j / a.group] + bbuf[j / a.group];
    }
}

/// `d[k] = rows[k] · x` for the first `m` (1..=4) rows of `rows [m, cols]`: each 8 floats of
/// `x` are loaded once and used against all `m` rows.
pub(crate) fn dot_rows(rows: &[f32], cols: usize, m: usize, x: &[f32], d: &mut [f32]) {
    assert!(available());
    assert!(m <= 4 && d.len() >= m && rows.len() >= m * cols && x.len() == cols);
    // SAFETY: features checked; `rows` holds m rows of `cols` and `x` holds `cols`.
    unsafe {
        match m {
            1 => dot_rows_avx2::<1>(rows, cols, x, d),
            2 => dot_rows_avx2::<2>(rows, cols, x, d),
            3 => dot_rows_avx2::<3>(rows, cols, x, d),
            4 => dot_rows_avx2::<4>(rows, cols, x, d),
            _ => {}
        }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn dot_rows_avx2<const M: usize>(rows: &[f32], cols: usize, x: &[f32], d: &mut [f32]) {
    let mut acc0 = [_mm256_setzero_ps(); M];
    let mut acc1 = [_mm256_setzero_ps(); M];
    let rp = rows.as_ptr();
    let xp = x.as_ptr();
    let n16 = cols / 16 * 16;
    let mut j = 0;
    while j < n16 {
        let x0 = _mm256_loadu_ps(xp.add(j));
        let x1 = _mm256_loadu_ps(xp.add(j + 8));
        for k in 0..M {
            let r = rp.add(k * cols + j);
            acc0[k] = _mm256_fmadd_ps(_mm256_loadu_ps(r), x0, acc0[k]);
            acc1[k] = _mm256_fmadd_ps(_mm256_loadu_ps(r.add(8)), x1, acc1[k]);
        }
        j += 16;
    }
    for k in 0..M {
        let mut s = hsum(_mm256_add_ps(acc0[k], acc1[k]));
        for jj in n16..cols {
            s += rows[k * cols + jj] * x[jj];
        }
        d[k] = s;
    }
}

pub(crate) fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    assert!(available() && w.len() == x.len());
    // SAFETY: features checked; both slices have the length the body loops over.
    unsafe { dot_f32_avx2(w, x) }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn dot_f32_avx2(w: &[f32], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let n32 = n / 32 * 32;
    let mut j = 0;
    while j < n32 {
        for (u, a) in acc.iter_mut().enumerate() {
            let o = j + u * 8;
            *a = _mm256_fmadd_ps(_mm256_loadu_ps(wp.add(o)), _mm256_loadu_ps(xp.add(o)), *a);
        }
        j += 32;
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut t = hsum(s);
    for jj in n32..n {
        t += w[jj] * x[jj];
    }
    t
}

/// `a · b` eight lanes at a time in one accumulator (short vectors: a row's groups).
#[inline(always)]
unsafe fn dot8_avx2(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let n8 = n / 8 * 8;
    let mut acc = _mm256_setzero_ps();
    for j in (0..n8).step_by(8) {
        acc = _mm256_fmadd_ps(
            _mm256_loadu_ps(a.as_ptr().add(j)),
            _mm256_loadu_ps(b.as_ptr().add(j)),
            acc,
        );
    }
    let mut t = hsum(acc);
    for j in n8..n {
        t += a[j] * b[j];
    }
    t
}

pub(crate) fn dot_bf16(w: &[bf16], x: &[f32]) -> f32 {
    assert!(available() && w.len() == x.len());
    // SAFETY: features checked; both slices have the length the body loops over.
    unsafe { dot_bf16_avx2(w, x) }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn dot_bf16_avx2(w: &[bf16], x: &[f32]) -> f32 {
    let n = w.len();
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let n32 = n / 32 * 32;
    let mut j = 0;
    while j < n32 {
        for (u, a) in acc.iter_mut().enumerate() {
            let o = j + u * 8;
            *a = _mm256_fmadd_ps(bf16x8(wp.add(o)), _mm256_loadu_ps(xp.add(o)), *a);
        }
        j += 32;
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut t = hsum(s);
    for jj in n32..n {
        t += w[jj].to_f32() * x[jj];
    }
    t
}

pub(crate) fn dot_f16(w: &[f16], x: &[f32]) -> f32 {
    assert!(available() && w.len() == x.len());
    // SAFETY: features checked; both slices have the length the body loops over.
    unsafe { dot_f16_avx2(w, x) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16_avx2(w: &[f16], x: &[f32]) -> f32 {
    let n = w.len();
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let n32 = n / 32 * 32;
    let mut j = 0;
    while j < n32 {
        for (u, a) in acc.iter_mut().enumerate() {
            let o = j + u * 8;
            *a = _mm256_fmadd_ps(f16x8(wp.add(o)), _mm256_loadu_ps(xp.add(o)), *a);
        }
        j += 32;
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut t = hsum(s);
    for jj in n32..n {
        t += w[jj].to_f32() * x[jj];
    }
    t
}

/// `int8::Int8Prep::new` vectorised: the same bytes, units and sums (the tests compare them).
pub(crate) fn int8_prep(bits: u32, group: usize, x: &[f32]) -> Option<Int8Prep> {
    assert!(available());
    assert!(
        matches!(bits, 2 | 4),
        "int8 activations: bits {bits} not in {{2, 4}}"
    );
    assert!(group.is_multiple_of(32) && x.len().is_multiple_of(group));
    // SAFETY: features checked; every load and store below stays inside `x` (whole groups of
    // multiples of 32) and the buffers allocated for them.
    unsafe { int8_prep_avx2(bits, group, x) }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn int8_prep_avx2(bits: u32, group: usize, x: &[f32]) -> Option<Int8Prep> {
    let n = x.len();
    let e = int8::block_elems(bits);
    let nb = n / e;
    let ng = n / group;
    let mut unit = Vec::with_capacity(ng);
    let mut xsum = Vec::with_capacity(ng);
    let mut natural = vec![0i8; n];
    let xp = x.as_ptr();
    let np = natural.as_mut_ptr();
    let absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    // `packs` works inside 128-bit lanes; this puts its 8 dwords back in order.
    let unlane = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for g in 0..ng {
        let gp = xp.add(g * group);
        let mut acc = _mm256_setzero_ps();
        let mut mx = _mm256_setzero_ps();
        for j in (0..group).step_by(8) {
            let v = _mm256_loadu_ps(gp.add(j));
            acc = _mm256_add_ps(acc, v);
            mx = _mm256_max_ps(mx, _mm256_and_ps(v, absmask));
        }
        // The order of `lanes::sum8`: 8 strided partial sums, then summed in order.
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        let sum = lanes.iter().sum::<f32>();
        // A NaN or infinity anywhere in the group makes its sum non-finite.
        if !sum.is_finite() {
            return None;
        }
        _mm256_storeu_ps(lanes.as_mut_ptr(), mx);
        let sx = lanes.iter().fold(0f32, |m, v| m.max(*v));
        let inv = if sx > 0.0 { int8::XQ_MAX / sx } else { 0.0 };
        let iv = _mm256_set1_ps(inv);
        // The group's `Σ x_q` (i32 lanes; at most 128 * 127 in all).
        let mut qs = _mm256_setzero_si256();
        for j in (0..group).step_by(32) {
            // Round to nearest even (the default MXCSR mode), as the portable prep does.
            let q = |k: usize| {
                _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(gp.add(j + 8 * k)), iv))
            };
            let (q0, q1, q2, q3) = (q(0), q(1), q(2), q(3));
            qs = _mm256_add_epi32(
                qs,
                _mm256_add_epi32(_mm256_add_epi32(q0, q1), _mm256_add_epi32(q2, q3)),
            );
            let p01 = _mm256_packs_epi32(q0, q1);
            let p23 = _mm256_packs_epi32(q2, q3);
            let b = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23), unlane);
            _mm256_storeu_si256(np.add(g * group + j) as *mut __m256i, b);
        }
        let mut qlanes = [0i32; 8];
        _mm256_storeu_si256(qlanes.as_mut_ptr() as *mut __m256i, qs);
        let u = sx / int8::XQ_MAX;
        unit.push(u);
        xsum.push(int8::quantised_sum(u, qlanes.iter().sum()));
    }
    let mut xq = vec![0i8; nb * e];
    let (src, dst) = (natural.as_ptr(), xq.as_mut_ptr());
    let ld = |o: usize| _mm256_loadu_si256(src.add(o) as *const __m256i);
    let st = |o: usize, v: __m256i| _mm256_storeu_si256(dst.add(o) as *mut __m256i, v);
    if bits == 4 {
        // Per 128-bit lane: even bytes to the low qword, odd bytes to the high one.
        let m = _mm256_setr_epi8(
            0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14, 1, 3,
            5, 7, 9, 11, 13, 15,
        );
        for b in 0..nb {
            let o = b * e;
            // [evens 0..16, evens 16..32, odds 0..16, odds 16..32] of each 32 bytes.
            let a = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_shuffle_epi8(ld(o), m));
            let c = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_shuffle_epi8(ld(o + 32), m));
            st(o, _mm256_permute2x128_si256::<0x20>(a, c));
            st(o + 32, _mm256_permute2x128_si256::<0x31>(a, c));
        }
    } else {
        // Per 128-bit lane: bytes 4i + s to dword s.
        let m = _mm256_setr_epi8(
            0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15, 0, 4, 8, 12, 1, 5, 9, 13, 2, 6,
            10, 14, 3, 7, 11, 15,
        );
        for b in 0..nb {
            let o = b * e;
            // Qword s of v(i): code s of the 8 bytes j = 8i .. 8i + 8.
            let v = |i: usize| {
                _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(ld(o + 32 * i), m), unlane)
            };
            let (v0, v1, v2, v3) = (v(0), v(1), v(2), v(3));
            let (lo01, hi01) = (_mm256_unpacklo_epi64(v0, v1), _mm256_unpackhi_epi64(v0, v1));
            let (lo23, hi23) = (_mm256_unpacklo_epi64(v2, v3), _mm256_unpackhi_epi64(v2, v3));
            st(o, _mm256_permute2x128_si256::<0x20>(lo01, lo23));
            st(o + 32, _mm256_permute2x128_si256::<0x20>(hi01, hi23));
            st(o + 64, _mm256_permute2x128_si256::<0x31>(lo01, lo23));
            st(o + 96, _mm256_permute2x128_si256::<0x31>(hi01, hi23));
        }
    }
    Some(Int8Prep {
        bits,
        xq,
        unit,
        xsum,
        tail: x[nb * e..].to_vec(),
    })
}

/// `y[i] = row (r0 + i) · x` for a 2- or 4-bit affine matrix with int8 activations (see
/// `int8.rs` for the layout and the error bound). Per block: the codes masked out of 32 bytes
/// at a time (`srli_epi16` then a byte mask), `_mm256_maddubs_epi16` against the matching
/// 32 bytes of `x_q` (u8 x i8 -> i16 pairs, at most `2 * 15 * 127`), the products of all codes
/// of a byte added in i16, `_mm256_madd_epi16` with ones into i32 lane `l` = word `l`, one
/// conversion to f32 and one FMA with `scale_g * unit_g`.
pub(crate) fn int8_rows(a: &AffineView, prep: &Int8Prep, r0: usize, y: &mut [f32]) {
    assert!(available());
    assert!(matches!(a.bits, 2 | 4) && prep.bits == a.bits);
    let e = int8::block_elems(a.bits);
    let nb = a.cols / e;
    assert!(r0 + y.len() <= a.rows && prep.xq.len() == nb * e);
    assert_eq!(prep.tail.len(), a.cols - nb * e);
    let ng = a.groups_per_row();
    assert!(prep.unit.len() == ng && prep.xsum.len() == ng);
    // SAFETY: features checked; the row range and prep lengths match the view that
    // `AffineView::check` validated, which is what the body's loads rely on.
    unsafe {
        match a.bits {
            2 => int8_rows_avx2::<2>(a, prep, r0, y),
            4 => int8_rows_avx2::<4>(a, prep, r0, y),
            b => unreachable!("bits {b} checked above"),
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c,bmi2")]
unsafe fn int8_rows_avx2<const BITS: i32>(
    a: &AffineView,
    prep: &Int8Prep,
    r0: usize,
    y: &mut [f32],
) {
    // How blocks meet groups is known per call, not per block.
    let e = int8::block_elems(BITS as u32);
    match a.group.cmp(&e) {
        std::cmp::Ordering::Equal => int8_rows_g::<BITS, ONE_GROUP>(a, prep, r0, y),
        std::cmp::Ordering::Greater => int8_rows_g::<BITS, GROUP_SPANS_BLOCKS>(a, prep, r0, y),
        std::cmp::Ordering::Less => int8_rows_g::<BITS, BLOCK_SPANS_GROUPS>(a, prep, r0, y),
    }
}

/// How the blocks of the int8 kernel (`E` elements) meet the groups, `int8_rows_g`'s `FIT`.
/// A block is one group: block `b`'s factor is `f[b]`.
const ONE_GROUP: u8 = 0;
/// A group spans `2^fshift` blocks: block `b`'s factor is `f[b >> fshift]`.
const GROUP_SPANS_BLOCKS: u8 = 1;
/// A block spans `2^fshift` groups: its lanes' factors start at `f[b << fshift]`, lane `l`
/// takes its group's through `idx`.
const BLOCK_SPANS_GROUPS: u8 = 2;

/// `int8_rows_avx2`, one row after the other, blocks meeting groups as `FIT` says.
///
/// One row at a time, so that a thread reads one ascending stream of bytes (its chunk of rows
/// is contiguous) rather than two or four streams a row apart: with two rows interleaved, as
/// earlier, the kernel read 15-17 GB/s from DRAM on the 2-core EPYC with both threads; one row
/// at a time 19-22 GB/s (the memory probe: 20-26), though it loads `x_q` once per row instead
/// of once per two rows (4-bit: 21 instead of 20 instructions per 64 weights).
#[inline(always)]
unsafe fn int8_rows_g<const BITS: i32, const FIT: u8>(
    a: &AffineView,
    prep: &Int8Prep,
    r0: usize,
    y: &mut [f32],
) {
    let ng = a.groups_per_row();
    let wpr = a.words_per_row();
    let e = int8::block_elems(BITS as u32);
    let c = DotConsts {
        nb: a.cols / e,
        xq: prep.xq.as_ptr(),
        fshift: a.group.trailing_zeros().abs_diff(e.trailing_zeros()),
        idx: lane_group_index(a.group / (32 / BITS as usize)),
    };
    // The row's `scale_g * unit_g`, padded by 8 for the lane permutation.
    let mut fbuf = vec![0f32; ng + 8];
    for (i, yi) in y.iter_mut().enumerate() {
        let row = r0 + i;
        let bias = int8_row_factors(a, prep, row, &mut fbuf);
        let d = int8_dots::<BITS, FIT>(&c, a.w.as_ptr().add(row * wpr), fbuf.as_ptr());
        *yi = d + bias + tail(a, row, prep);
    }
}

/// [`widen`] behind its checks: `Scales::to_f32_into` for the blocked kernel's weight slices
/// (the generic loop was ~1.5% of a prefill profile) and the twin test.
pub(crate) fn widen_checked(s: &Scales, start: usize, out: &mut [f32]) {
    assert!(available() && start + out.len() <= s.len());
    // SAFETY: features and bounds checked above.
    unsafe { widen_avx2(s, start, out) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn widen_avx2(s: &Scales, start: usize, out: &mut [f32]) {
    widen(s, start, out)
}

/// `out[j] = s[start + j]` as f32, eight at a time: `Scales::to_f32_into` vectorised (the same
/// values exactly; the decode kernel widens every row's scales and biases, which the generic
/// loop did at about a tenth of the kernel's time). The caller guarantees
/// `start + out.len() <= s.len()` and the CPU features of `available()`.
#[inline(always)]
unsafe fn widen(s: &Scales, start: usize, out: &mut [f32]) {
    let n = out.len();
    let n8 = n / 8 * 8;
    let op = out.as_mut_ptr();
    // One match per call; [start + j, start + j + 8) <= start + n lies inside `s`.
    match s {
        Scales::Bf16(v) => {
            let p = v.as_ptr().add(start);
            for j in (0..n8).step_by(8) {
                _mm256_storeu_ps(op.add(j), bf16x8(p.add(j)));
            }
        }
        Scales::F16(v) => {
            let p = v.as_ptr().add(start);
            for j in (0..n8).step_by(8) {
                _mm256_storeu_ps(op.add(j), f16x8(p.add(j)));
            }
        }
        Scales::F32(v) => out[..n8].copy_from_slice(&v[start..start + n8]),
    }
    for (j, o) in out.iter_mut().enumerate().skip(n8) {
        *o = s.get(start + j);
    }
}

/// Eight bf16 at `p` as f32 (bf16 is the top half of an f32: widen, shift into place).
#[inline(always)]
unsafe fn bf16x8(p: *const bf16) -> __m256 {
    let h = _mm_loadu_si128(p as *const __m128i);
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
}

/// Eight f16 at `p` as f32 (F16C).
#[inline(always)]
unsafe fn f16x8(p: *const f16) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

/// A stored scale or bias dtype, eight of which widen to f32 lanes.
trait Lane8: Copy {
    /// Eight values at `p` as f32; the caller guarantees `p[..8]` and the CPU features of
    /// `available()`.
    unsafe fn load8(p: *const Self) -> __m256;
}

impl Lane8 for bf16 {
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        bf16x8(p)
    }
}

impl Lane8 for f16 {
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        f16x8(p)
    }
}

impl Lane8 for f32 {
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        _mm256_loadu_ps(p)
    }
}

/// Row `row`'s factors `scale_g * unit_g` into `fbuf[..ng]`; returns the bias term
/// `Σ_g bias_g Σx_g` (exact f32, 8 strided partial sums as `lanes::dot8`). One match on the
/// dtypes per row: matching per eight groups, as before, made this loop ~30 instructions per
/// eight groups, ~20% of the kernel's instructions on a 2-bit 1024x4096 matrix.
#[inline(always)]
unsafe fn int8_row_factors(a: &AffineView, prep: &Int8Prep, row: usize, fbuf: &mut [f32]) -> f32 {
    let ng = a.groups_per_row();
    let base = row * ng;
    // The view was checked: rows * ng scales and biases, so [base, base + ng) is inside both.
    match (&a.scales, &a.biases) {
        (Scales::Bf16(s), Scales::Bf16(b)) => row_factors_typed(s, b, base, prep, fbuf),
        (Scales::F16(s), Scales::F16(b)) => row_factors_typed(s, b, base, prep, fbuf),
        (Scales::F32(s), Scales::F32(b)) => row_factors_typed(s, b, base, prep, fbuf),
        _ => {
            let mut bsum = 0f32;
            let mut bl = [0f32; 8];
            for (g, f) in fbuf.iter_mut().enumerate().take(ng) {
                *f = a.scales.get(base + g) * prep.unit[g];
                bl[g % 8] += a.biases.get(base + g) * prep.xsum[g];
            }
            for v in bl {
                bsum += v;
            }
            bsum
        }
    }
}

/// `int8_row_factors` for one pair of dtypes: groups `[base, base + ng)` of `s` and `b`.
#[inline(always)]
unsafe fn row_factors_typed<S: Lane8 + Into<f32>, B: Lane8 + Into<f32>>(
    s: &[S],
    b: &[B],
    base: usize,
    prep: &Int8Prep,
    fbuf: &mut [f32],
) -> f32 {
    let ng = prep.unit.len();
    let (up, xp, fp) = (prep.unit.as_ptr(), prep.xsum.as_ptr(), fbuf.as_mut_ptr());
    let (s, b) = (&s[base..base + ng], &b[base..base + ng]);
    let mut bacc = _mm256_setzero_ps();
    let n8 = ng / 8 * 8;
    for g in (0..n8).step_by(8) {
        let f = _mm256_mul_ps(S::load8(s.as_ptr().add(g)), _mm256_loadu_ps(up.add(g)));
        _mm256_storeu_ps(fp.add(g), f);
        bacc = _mm256_fmadd_ps(
            B::load8(b.as_ptr().add(g)),
            _mm256_loadu_ps(xp.add(g)),
            bacc,
        );
    }
    let mut bsum = hsum(bacc);
    for g in n8..ng {
        fbuf[g] = s[g].into() * prep.unit[g];
        bsum += b[g].into() * prep.xsum[g];
    }
    bsum
}

/// `int8::tail_dot`, skipped when every column is in a whole block (the usual case: its
/// per-row set-up was ~6% of the kernel's instructions on a 1024x4096 4-bit matrix).
#[inline(always)]
fn tail(a: &AffineView, row: usize, prep: &Int8Prep) -> f32 {
    if prep.tail.is_empty() {
        0.0
    } else {
        int8::tail_dot(a, row, prep)
    }
}

/// What `int8_dots` needs besides the row, the same for every row of a call.
struct DotConsts {
    /// Whole blocks per row.
    nb: usize,
    xq: *const i8,
    /// See `int8_rows_g`.
    fshift: u32,
    idx: __m256i,
}

/// How far ahead of the current block `int8_dots` prefetches, in bytes. Without a software
/// prefetch the int8 kernel read only ~7.5 GB/s from DRAM on one core of the 2-core EPYC dev
/// VM (the same as the f32 kernel, though it computes twice as fast from cache); with it,
/// 11-13 GB/s. With one row per pass (one ascending stream per thread), 2 and 4 KB ahead
/// measured the same, no prefetch ~5% slower, and the T0, T1 and NTA hints the same within
/// the noise (both threads, interleaved A/B runs).
const PF_BYTES: usize = 2048;

/// The block part of the row at `wp`: `Σ_b Σ_l dot_l(b) f[g(b, l)]`; `f` points at the row's
/// factors (padded by 8).
#[inline(always)]
unsafe fn int8_dots<const BITS: i32, const FIT: u8>(
    c: &DotConsts,
    wp: *const u32,
    f: *const f32,
) -> f32 {
    // Opaque, so that LLVM keeps them in registers (see `affine_rows_avx2`).
    let m = BlockMasks {
        lo: std::hint::black_box(_mm256_set1_epi8(((1 << BITS) - 1) as i8)),
        hi: std::hint::black_box(_mm256_set1_epi8((((1 << BITS) - 1) << BITS) as i8)),
        ones: std::hint::black_box(_mm256_set1_epi16(1)),
    };
    let e = int8::block_elems(BITS as u32);
    // Factors per block (0: shifted from the block index instead).
    let fstep = match FIT {
        ONE_GROUP => 1,
        GROUP_SPANS_BLOCKS => 0,
        _ => 1 << c.fshift,
    };
    let mut wq = wp as *const u8;
    let (mut xq, mut fq) = (c.xq, f);
    // Two accumulators (even and odd blocks): one FMA chain would wait on the FMA latency
    // every block.
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let nb = c.nb;
    // Block b: the row's bytes [32 b, 32 b + 32) < wpr * 4, xq [b e, (b + 1) e) <= nb e and
    // factors below ng + 8: inside what `int8_rows` checked and `int8_rows_g` allocated.
    for b in (0..nb / 2 * 2).step_by(2) {
        // One prefetch per 64 bytes (two blocks). A prefetch does not fault, so running past
        // the matrix is harmless; the address is formed with wrapping arithmetic so that it is
        // not an out-of-bounds `add`.
        _mm_prefetch::<_MM_HINT_T0>(wq.wrapping_add(PF_BYTES) as *const i8);
        acc0 = int8_block::<BITS>(wq, xq, block_factors::<FIT>(c, f, fq, b), &m, acc0);
        let f1 = block_factors::<FIT>(c, f, fq.add(fstep), b + 1);
        acc1 = int8_block::<BITS>(wq.add(32), xq.add(e), f1, &m, acc1);
        wq = wq.add(64);
        xq = xq.add(2 * e);
        fq = fq.add(2 * fstep);
    }
    if nb % 2 == 1 {
        acc0 = int8_block::<BITS>(wq, xq, block_factors::<FIT>(c, f, fq, nb - 1), &m, acc0);
    }
    hsum(_mm256_add_ps(acc0, acc1))
}

/// Block `b`'s factors: `f[b]`, `f[b >> fshift]` or the lanes of `f[b << fshift ..]`, the
/// first and last read at `fq` (= `f + b fstep`). A function, not a closure (see `int8_block`).
#[inline(always)]
unsafe fn block_factors<const FIT: u8>(
    c: &DotConsts,
    f: *const f32,
    fq: *const f32,
    b: usize,
) -> __m256 {
    match FIT {
        ONE_GROUP => _mm256_broadcast_ss(&*fq),
        GROUP_SPANS_BLOCKS => _mm256_broadcast_ss(&*f.add(b >> c.fshift)),
        _ => _mm256_permutevar8x32_ps(_mm256_loadu_ps(fq), c.idx),
    }
}

/// The `s`-th 32 bytes of `x_q` at `xq`.
#[inline(always)]
unsafe fn xs32(xq: *const i8, s: usize) -> __m256i {
    _mm256_loadu_si256(xq.add(32 * s) as *const __m256i)
}

/// The byte masks of `int8_block`, built once per row from opaque values so that LLVM keeps
/// them in registers (see `affine_rows_avx2`).
struct BlockMasks {
    /// The low code of each byte: `2^bits - 1`.
    lo: __m256i,
    /// The second code of each byte in place: `(2^bits - 1) << bits`.
    hi: __m256i,
    /// i16 ones, for `madd_epi16`.
    ones: __m256i,
}

/// `acc` plus the block of 32 bytes of codes at `wq` against `x_q` at `xq`, times the lanes'
/// factors `fv` (a function, not a closure: closures do not inherit the caller's target
/// features, and their intrinsics would not be inlined). The codes are masked out of 32 bytes
/// at a time (`srli_epi16` then a byte mask), `_mm256_maddubs_epi16` multiplies them with the
/// matching 32 bytes of `x_q` (u8 x i8 -> i16 pairs), the products of all codes of a byte are
/// added in i16, `_mm256_madd_epi16` with ones gives i32 lane `l` = word `l`, then one
/// conversion to f32 and one FMA with the factors.
///
/// 2-bit: codes 1 and 3 are masked in place (`hi`), so their products are 4x theirs and one
/// shift serves two codes; the sum of those products is a multiple of 4 (at most
/// `4 * 2 * 2 * 3 * 127 = 6096`, no saturation), so an arithmetic shift right by 2 gives back
/// the same integer exactly. 13 vector instructions per block instead of 14.
#[inline(always)]
unsafe fn int8_block<const BITS: i32>(
    wq: *const u8,
    xq: *const i8,
    fv: __m256,
    m: &BlockMasks,
    acc: __m256,
) -> __m256 {
    let cpb = 8 / BITS as usize;
    let mut w = _mm256_loadu_si256(wq as *const __m256i);
    let s16 = if BITS == 2 {
        let w4 = _mm256_srli_epi16::<4>(w);
        let p0 = _mm256_maddubs_epi16(_mm256_and_si256(w, m.lo), xs32(xq, 0));
        let p1 = _mm256_maddubs_epi16(_mm256_and_si256(w, m.hi), xs32(xq, 1));
        let p2 = _mm256_maddubs_epi16(_mm256_and_si256(w4, m.lo), xs32(xq, 2));
        let p3 = _mm256_maddubs_epi16(_mm256_and_si256(w4, m.hi), xs32(xq, 3));
        let odd = _mm256_srai_epi16::<2>(_mm256_add_epi16(p1, p3));
        _mm256_add_epi16(_mm256_add_epi16(p0, p2), odd)
    } else {
        let mut s16 = _mm256_setzero_si256();
        for s in 0..cpb {
            let p = _mm256_maddubs_epi16(_mm256_and_si256(w, m.lo), xs32(xq, s));
            if s + 1 < cpb {
                w = _mm256_srli_epi16::<BITS>(w);
            }
            s16 = if s == 0 { p } else { _mm256_add_epi16(s16, p) };
        }
        s16
    };
    let s32 = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16, m.ones));
    _mm256_fmadd_ps(s32, fv, acc)
}
