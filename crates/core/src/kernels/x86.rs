//! AVX2 + FMA (+ F16C) kernels for x86-64, chosen at run time by `available()`.
//! Same arithmetic and lane layout as `lanes.rs` (read its header first); every function here
//! has its portable twin there and a test comparing both with `reference.rs`.
//!
//! The safe wrappers check lengths, then call a `#[target_feature]` body. The bodies use raw
//! pointer loads whose bounds follow from those checks.

use super::lanes::AffinePrep;
use super::AffineView;
use half::{bf16, f16};
use std::arch::x86_64::*;

/// True when this CPU has everything the kernels below use.
pub(crate) fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
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

/// `y[i] = row (r0 + i) · x` for an affine matrix.
pub(crate) fn affine_rows(a: &AffineView, prep: &AffinePrep, r0: usize, y: &mut [f32]) {
    assert!(available());
    assert!((r0 + y.len()) <= a.rows && prep.xt.len() == a.cols);
    assert_eq!(prep.xsum.len(), a.groups_per_row());
    assert!(
        prep.prescaled,
        "the AVX2 kernel masks codes in place; x must be prescaled"
    );
    // SAFETY: the CPU features were checked above, and the row range and `x` length match the
    // view that `AffineView::check` validated, which is what the body's loads rely on.
    unsafe {
        match a.bits {
            2 => affine_rows_avx2::<2, 30>(a, prep, r0, y),
            4 => affine_rows_avx2::<4, 28>(a, prep, r0, y),
            8 => affine_rows_avx2::<8, 24>(a, prep, r0, y),
            b => unreachable!("bits {b} rejected by AffineView::check"),
        }
    }
}

/// `LAST` is `32 - BITS`, the shift that brings the top code down (a const expression of `BITS`
/// cannot be a const argument on stable Rust).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn affine_rows_avx2<const BITS: i32, const LAST: i32>(
    a: &AffineView,
    prep: &AffinePrep,
    r0: usize,
    y: &mut [f32],
) {
    let ng = a.groups_per_row();
    let wpr = a.words_per_row();
    let pw = 32 / BITS as usize;
    let e = 8 * pw;
    let nb = a.cols / e;
    let lpg = a.group / pw;
    let idx = lane_group_index(lpg);
    let mask = (1u32 << BITS) - 1;
    // Groups are powers of two: a shift, not a division per block.
    let gshift = a.group.trailing_zeros();
    // The in-place masks `mask << BITS k`. Built from an opaque value so LLVM keeps them in
    // registers instead of re-loading each from the constant pool every block (the loads, not
    // the arithmetic, were the bottleneck).
    let mut masks = [_mm256_setzero_si256(); 16];
    let mut m = std::hint::black_box(_mm256_set1_epi32(mask as i32));
    for mk in masks.iter_mut().take(pw) {
        *mk = m;
        m = _mm256_slli_epi32::<BITS>(m);
    }
    let mut sbuf = vec![0f32; ng + 8];
    let mut bbuf = vec![0f32; ng];
    let xp = prep.xt.as_ptr();
    for (i, yi) in y.iter_mut().enumerate() {
        let row = r0 + i;
        a.scales.to_f32_into(row * ng, &mut sbuf[..ng]);
        a.biases.to_f32_into(row * ng, &mut bbuf);
        let wrow = &a.w[row * wpr..(row + 1) * wpr];
        let wp = wrow.as_ptr();
        let mut acc = _mm256_setzero_ps();
        for b in 0..nb {
            // Block b reads words [8b, 8b + 8) < wpr and xt [b e, (b + 1) e) <= cols.
            let w = _mm256_loadu_si256(wp.add(b * 8) as *const __m256i);
            let xb = xp.add(b * e);
            // Two accumulators halve the FMA dependency chain. Codes k < pw - 1 are masked in
            // place (x is prescaled by 2^(-BITS k)), the last one is shifted down.
            let mut acc2 = [_mm256_setzero_ps(); 2];
            for k in 0..pw {
                let q = if k + 1 < pw {
                    _mm256_and_si256(w, masks[k])
                } else {
                    _mm256_srli_epi32::<LAST>(w)
                };
                let xk = _mm256_loadu_ps(xb.add(k * 8));
                acc2[k & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), xk, acc2[k & 1]);
            }
            let (a0, a1) = (acc2[0], acc2[1]);
            let sv = lane_values(sbuf.as_ptr(), (b * e) >> gshift, lpg, idx);
            acc = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), sv, acc);
        }
        let mut tail = 0f32;
        for j in nb * e..a.cols {
            // Past the last whole block `xt` is in natural order and not prescaled.
            let q = (wrow[j * BITS as usize / 32] >> ((j * BITS as usize) % 32)) & mask;
            tail += q as f32 * prep.xt[j] * sbuf[j / a.group];
        }
        *yi = hsum(acc) + tail + dot_f32_avx2(&bbuf, &prep.xsum);
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

pub(crate) fn dot_bf16(w: &[bf16], x: &[f32]) -> f32 {
    assert!(available() && w.len() == x.len());
    // SAFETY: features checked; both slices have the length the body loops over.
    unsafe { dot_bf16_avx2(w, x) }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn dot_bf16_avx2(w: &[bf16], x: &[f32]) -> f32 {
    let n = w.len();
    let (wp, xp) = (w.as_ptr() as *const u16, x.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let n32 = n / 32 * 32;
    let mut j = 0;
    while j < n32 {
        for (u, a) in acc.iter_mut().enumerate() {
            let o = j + u * 8;
            // bf16 is the top half of an f32: widen to 32 bits and shift into place.
            let h = _mm_loadu_si128(wp.add(o) as *const __m128i);
            let wv = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)));
            *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp.add(o)), *a);
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
    let (wp, xp) = (w.as_ptr() as *const u16, x.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let n32 = n / 32 * 32;
    let mut j = 0;
    while j < n32 {
        for (u, a) in acc.iter_mut().enumerate() {
            let o = j + u * 8;
            let wv = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(o) as *const __m128i));
            *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp.add(o)), *a);
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

/// One unit of `x_q` is `sx_g / XQ_MAX`, where `sx_g = max |x|` over the group.
const XQ_MAX: f32 = 32767.0;

/// `x` quantised once per call for the integer-dot kernel `affine_rows_int`.
///
/// Per group `g`: `x_q = round(x / sx_g * 32767)` as i16, so `|x - x_q * unit_g| <= unit_g / 2`
/// with `unit_g = sx_g / 32767`. Block `b` (8 words, `e = 8 * pw` elements, `pw = 32 / bits`)
/// holds at `xq[b e + 16 k + 2 l + h]` the element `b e + l pw + h pw / 2 + k`: the code that
/// step `k` of the kernel leaves in 16-bit lane `2 l + h` of the block's words, so that
/// `_mm256_madd_epi16` sums the two halves of word `l` into i32 lane `l`.
pub(crate) struct IntPrep {
    /// `[cols / e * e]`, in the block order above.
    pub xq: Vec<i16>,
    /// `[cols / group]`: `sx_g / 32767`.
    pub unit: Vec<f32>,
    /// `[cols / group]`: `Σx` in f32, for the bias term.
    pub xsum: Vec<f32>,
    /// `[cols]`: `x` unchanged (elements past the last whole block are done in f32).
    pub x: Vec<f32>,
}

impl IntPrep {
    /// `None` when a group of `x` holds a non-finite value: the float kernel then propagates it.
    pub fn new(bits: u32, group: usize, x: &[f32]) -> Option<Self> {
        let pw = 32 / bits as usize;
        let p16 = pw / 2;
        let e = 8 * pw;
        let nb = x.len() / e;
        let mut unit = Vec::with_capacity(x.len() / group);
        let mut xsum = Vec::with_capacity(x.len() / group);
        let mut qn = vec![0i16; x.len()];
        for (xg, qg) in x.chunks_exact(group).zip(qn.chunks_exact_mut(group)) {
            let sx = xg.iter().fold(0f32, |m, v| m.max(v.abs()));
            if !sx.is_finite() || xg.iter().any(|v| v.is_nan()) {
                return None;
            }
            let inv = if sx > 0.0 { XQ_MAX / sx } else { 0.0 };
            for (q, v) in qg.iter_mut().zip(xg) {
                *q = (v * inv).round().clamp(-XQ_MAX, XQ_MAX) as i16;
            }
            unit.push(sx / XQ_MAX);
            let mut acc = [0f32; 8];
            for c in xg.chunks_exact(8) {
                for l in 0..8 {
                    acc[l] += c[l];
                }
            }
            xsum.push(acc.iter().sum());
        }
        let mut xq = vec![0i16; nb * e];
        for (s, d) in qn.chunks_exact(e).zip(xq.chunks_exact_mut(e)) {
            for k in 0..p16 {
                for l in 0..8 {
                    for h in 0..2 {
                        d[16 * k + 2 * l + h] = s[l * pw + h * p16 + k];
                    }
                }
            }
        }
        Some(IntPrep {
            xq,
            unit,
            xsum,
            x: x.to_vec(),
        })
    }
}

/// `y[i] = row (r0 + i) · x` for an affine matrix by integer dot products: codes widened to
/// i16 against `x_q`, `_mm256_madd_epi16` into i32 (at most `255 * 32767 * 2` per madd and
/// `255 * 32767 * 16` per block lane, far below `i32::MAX`), one conversion to f32 per block,
/// scaled by `scale_g * unit_g`. The bias term `bias_g * Σx_g` is exact f32 as in the float
/// kernel. Error against exact arithmetic: `|err| <= Σ_g |scale_g| qmax group unit_g / 2` plus
/// f32 rounding (arch-spec §11.3 affine; `qmax = 2^bits - 1`).
pub(crate) fn affine_rows_int(a: &AffineView, prep: &IntPrep, r0: usize, y: &mut [f32]) {
    assert!(available());
    let e = 8 * (32 / a.bits as usize);
    assert!((r0 + y.len()) <= a.rows && prep.x.len() == a.cols);
    assert_eq!(prep.xq.len(), a.cols / e * e);
    assert!(prep.xsum.len() == a.groups_per_row() && prep.unit.len() == a.groups_per_row());
    // SAFETY: the CPU features were checked above, and the row range and prep lengths match
    // the view that `AffineView::check` validated, which is what the body's loads rely on.
    unsafe {
        match a.bits {
            2 => affine_rows_int_avx2::<2>(a, prep, r0, y),
            4 => affine_rows_int_avx2::<4>(a, prep, r0, y),
            8 => affine_rows_int_avx2::<8>(a, prep, r0, y),
            b => unreachable!("bits {b} rejected by AffineView::check"),
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn affine_rows_int_avx2<const BITS: i32>(
    a: &AffineView,
    prep: &IntPrep,
    r0: usize,
    y: &mut [f32],
) {
    let ng = a.groups_per_row();
    let wpr = a.words_per_row();
    let pw = 32 / BITS as usize;
    let p16 = pw / 2;
    let e = 8 * pw;
    let nb = a.cols / e;
    let lpg = a.group / pw;
    let idx = lane_group_index(lpg);
    let mask = (1u32 << BITS) - 1;
    let mask16 = std::hint::black_box(_mm256_set1_epi16(mask as i16));
    let gshift = a.group.trailing_zeros();
    // Per row: `scale_g * unit_g`, padded by 8 for `lane_values`.
    let mut fbuf = vec![0f32; ng + 8];
    let mut bbuf = vec![0f32; ng];
    let xq = prep.xq.as_ptr();
    for (i, yi) in y.iter_mut().enumerate() {
        let row = r0 + i;
        a.scales.to_f32_into(row * ng, &mut fbuf[..ng]);
        let mut tail = 0f32;
        let wrow = &a.w[row * wpr..(row + 1) * wpr];
        for j in nb * e..a.cols {
            let q = (wrow[j * BITS as usize / 32] >> ((j * BITS as usize) % 32)) & mask;
            tail += q as f32 * prep.x[j] * fbuf[j / a.group];
        }
        for (f, u) in fbuf[..ng].iter_mut().zip(&prep.unit) {
            *f *= u;
        }
        a.biases.to_f32_into(row * ng, &mut bbuf);
        let wp = wrow.as_ptr();
        let mut acc = [_mm256_setzero_ps(); 2];
        for b in 0..nb {
            // Block b reads words [8b, 8b + 8) < wpr and xq [b e, (b + 1) e) <= nb e.
            let mut w = _mm256_loadu_si256(wp.add(b * 8) as *const __m256i);
            let xb = xq.add(b * e);
            let mut s = [_mm256_setzero_si256(); 2];
            for k in 0..p16 {
                // The last step's shift leaves only the top code of each 16-bit half.
                let q = if k + 1 < p16 {
                    _mm256_and_si256(w, mask16)
                } else {
                    w
                };
                w = _mm256_srli_epi16::<BITS>(w);
                let xk = _mm256_loadu_si256(xb.add(k * 16) as *const __m256i);
                s[k & 1] = _mm256_add_epi32(s[k & 1], _mm256_madd_epi16(q, xk));
            }
            let fv = lane_values(fbuf.as_ptr(), (b * e) >> gshift, lpg, idx);
            let si = _mm256_cvtepi32_ps(_mm256_add_epi32(s[0], s[1]));
            acc[b & 1] = _mm256_fmadd_ps(si, fv, acc[b & 1]);
        }
        *yi = hsum(_mm256_add_ps(acc[0], acc[1])) + tail + dot_f32_avx2(&bbuf, &prep.xsum);
    }
}
