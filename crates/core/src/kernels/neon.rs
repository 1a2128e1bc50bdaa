//! aarch64 NEON kernels (NEON is part of every aarch64 Linux target, so no detection): the exact
//! affine matvec and the dense dot products. Their plain twins are the portable kernels of
//! `lanes.rs` (same layout, same lane-permuted `x`); `tests.rs` runs every product on every ISA
//! the CPU has against `reference.rs`. The int8-activation kernel and f16 weights use the
//! portable code here (`sdot` and f16 arithmetic are optional features of the architecture).
//!
//! Arithmetic is that of `lanes::affine_rows`: codes are shifted down, masked and converted,
//! each block's 8 lanes accumulate `q * xt` for every code position, then meet their group's
//! scale; the bias term is `Σ bias_g Σx_g` from the shared preparation.

use super::lanes::{affine_tail, dot8, AffinePrep, BlockGeom, CodeRead};
use super::AffineView;
use half::bf16;
use std::arch::aarch64::*;

/// `y[i] = row (r0 + i) · x` for an affine matrix (`prep` from `AffinePrep::new` with
/// `CodeRead::Converted`).
pub(crate) fn affine_rows(a: &AffineView, prep: &AffinePrep, r0: usize, y: &mut [f32]) {
    assert_eq!(
        prep.read,
        CodeRead::Converted,
        "the NEON kernel converts codes"
    );
    // SAFETY: NEON is mandatory on aarch64; the body's loads stay inside the row's words and
    // `xt`'s whole blocks (checked by AffineView::check and the block count below).
    unsafe {
        match a.bits {
            2 => affine_rows_b::<2>(a, prep, r0, y),
            4 => affine_rows_b::<4>(a, prep, r0, y),
            8 => affine_rows_b::<8>(a, prep, r0, y),
            b => unreachable!("bits {b} rejected by AffineView::check"),
        }
    }
}

#[target_feature(enable = "neon")]
unsafe fn affine_rows_b<const BITS: u32>(
    a: &AffineView,
    prep: &AffinePrep,
    r0: usize,
    y: &mut [f32],
) {
    let BlockGeom {
        ng,
        wpr,
        pw,
        e,
        nb,
        lpg,
    } = BlockGeom::new(a, BITS as usize);
    let mask = vdupq_n_u32((1u32 << BITS) - 1);
    let gshift = a.group.trailing_zeros();
    let mut sbuf = vec![0f32; ng];
    let mut bbuf = vec![0f32; ng];
    let xt = prep.xt.as_ptr();
    for (i, yi) in y.iter_mut().enumerate() {
        let row = r0 + i;
        a.scales.to_f32_into(row * ng, &mut sbuf);
        a.biases.to_f32_into(row * ng, &mut bbuf);
        let wrow = &a.w[row * wpr..(row + 1) * wpr];
        let wp = wrow.as_ptr();
        let (mut acc0, mut acc1) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
        for b in 0..nb {
            let w0 = vld1q_u32(wp.add(b * 8));
            let w1 = vld1q_u32(wp.add(b * 8 + 4));
            let xb = xt.add(b * e);
            let (mut b0, mut b1) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
            for k in 0..pw {
                // A right shift by a run-time count: vshlq with a negative count.
                let sh = vdupq_n_s32(-((BITS as usize * k) as i32));
                let q0 = vcvtq_f32_u32(vandq_u32(vshlq_u32(w0, sh), mask));
                let q1 = vcvtq_f32_u32(vandq_u32(vshlq_u32(w1, sh), mask));
                b0 = vfmaq_f32(b0, q0, vld1q_f32(xb.add(k * 8)));
                b1 = vfmaq_f32(b1, q1, vld1q_f32(xb.add(k * 8 + 4)));
            }
            let g0 = (b * e) >> gshift;
            if lpg >= 8 {
                let s = vdupq_n_f32(sbuf[g0]);
                acc0 = vfmaq_f32(acc0, b0, s);
                acc1 = vfmaq_f32(acc1, b1, s);
            } else {
                let s: [f32; 8] = std::array::from_fn(|l| sbuf[g0 + l / lpg]);
                acc0 = vfmaq_f32(acc0, b0, vld1q_f32(s.as_ptr()));
                acc1 = vfmaq_f32(acc1, b1, vld1q_f32(s.as_ptr().add(4)));
            }
        }
        let tail = affine_tail::<BITS>(a, &prep.xt, wrow, &sbuf, nb * e);
        *yi = vaddvq_f32(vaddq_f32(acc0, acc1)) + tail + dot8(&bbuf, &prep.xsum);
    }
}

/// `w · x` over f32, four vectors of partial sums.
pub(crate) fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot_f32: lengths");
    // SAFETY: NEON is mandatory on aarch64; loads stay below `n` in both slices.
    unsafe { dot_by::<false>(w.as_ptr() as *const u8, x) }
}

/// `w · x` with bf16 weights (a bf16 is the top half of an f32: widened by a shift).
pub(crate) fn dot_bf16(w: &[bf16], x: &[f32]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot_bf16: lengths");
    // SAFETY: as dot_f32; bf16 is two bytes, read as u16.
    unsafe { dot_by::<true>(w.as_ptr() as *const u8, x) }
}

/// The dot product of `x` with `x.len()` weights at `w`: bf16 when `BF16`, else f32.
#[target_feature(enable = "neon")]
unsafe fn dot_by<const BF16: bool>(w: *const u8, x: &[f32]) -> f32 {
    let n = x.len();
    let xp = x.as_ptr();
    let load = |i: usize| -> float32x4_t {
        if BF16 {
            let h = vld1_u16((w as *const u16).add(i));
            vreinterpretq_f32_u32(vshll_n_u16::<16>(h))
        } else {
            vld1q_f32((w as *const f32).add(i))
        }
    };
    let mut acc = [vdupq_n_f32(0.0); 4];
    let mut i = 0;
    while i + 16 <= n {
        for (j, a) in acc.iter_mut().enumerate() {
            *a = vfmaq_f32(*a, load(i + 4 * j), vld1q_f32(xp.add(i + 4 * j)));
        }
        i += 16;
    }
    while i + 4 <= n {
        acc[0] = vfmaq_f32(acc[0], load(i), vld1q_f32(xp.add(i)));
        i += 4;
    }
    let mut s = vaddvq_f32(vaddq_f32(
        vaddq_f32(acc[0], acc[1]),
        vaddq_f32(acc[2], acc[3]),
    ));
    for (j, xj) in x.iter().enumerate().skip(i) {
        let wj = if BF16 {
            f32::from_bits((*(w as *const u16).add(j) as u32) << 16)
        } else {
            *(w as *const f32).add(j)
        };
        s += wj * xj;
    }
    s
}

/// `d[k] = rows[k] · x` for the first `m` rows of `rows [m, cols]`.
pub(crate) fn dot_rows(rows: &[f32], cols: usize, m: usize, x: &[f32], d: &mut [f32]) {
    for k in 0..m {
        d[k] = dot_f32(&rows[k * cols..(k + 1) * cols], x);
    }
}
