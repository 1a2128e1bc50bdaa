//! Portable fast kernels, written over fixed 8-lane arrays so that LLVM vectorises them on any
//! target (SSE2, NEON), plus the per-call preparation of `x` that every ISA shares.
//!
//! The affine layout trick: 8 consecutive u32 words of a row form a *block* of
//! `E = 8 * (32 / bits)` elements. Word `l` of the block holds elements `l * pw .. (l + 1) * pw`
//! (`pw = 32 / bits`), so shifting all 8 words right by `k * bits` and masking yields, in lane
//! `l`, element `l * pw + k`. `permute_x` reorders `x` once per call so that
//! `xt[b * E + k * 8 + l] = x[b * E + l * pw + k]`: the k-th shift of a block then meets a
//! contiguous 8-float slice of `xt`. Elements past the last whole block stay in natural order.

use super::AffineView;
use half::{bf16, f16};

/// Elements per block of 8 words.
#[inline]
pub(crate) fn block_elems(bits: u32) -> usize {
    8 * (32 / bits as usize)
}

/// Reorders `src [cols]` into the lane order described in the module header.
pub(crate) fn permute_x(bits: u32, src: &[f32], dst: &mut [f32]) {
    let pw = 32 / bits as usize;
    let e = block_elems(bits);
    let nb = src.len() / e;
    for (s, d) in src.chunks_exact(e).zip(dst.chunks_exact_mut(e)) {
        for k in 0..pw {
            for l in 0..8 {
                d[k * 8 + l] = s[l * pw + k];
            }
        }
    }
    dst[nb * e..].copy_from_slice(&src[nb * e..]);
}

/// What an affine product needs from `x`, computed once per call and shared by all rows:
/// the lane-permuted copy and the per-group sums `Σx` (the bias term of each group is
/// `bias * Σx`, arch-spec §11.3 "Kernel arithmetic").
///
/// With `prescaled`, slice `k < pw - 1` of each block is multiplied by `2^(-bits * k)`. A kernel
/// can then mask code `k` in place, `w & (mask << bits * k)`, whose integer value is
/// `q * 2^(bits * k)`, and skip the shift: the product with the prescaled `x` is exactly `q x`
/// (powers of two scale exactly, short of underflow below |x| ~ 1e-30). The last code is shifted
/// down instead, because in place it would set the sign bit.
pub(crate) struct AffinePrep {
    /// `[cols]`, lane-permuted (and prescaled if `prescaled`).
    pub xt: Vec<f32>,
    /// `[cols / group]`.
    pub xsum: Vec<f32>,
    pub prescaled: bool,
}

impl AffinePrep {
    pub fn new(bits: u32, group: usize, x: &[f32], prescaled: bool) -> Self {
        let mut xt = vec![0f32; x.len()];
        permute_x(bits, x, &mut xt);
        if prescaled {
            let pw = 32 / bits as usize;
            for blk in xt.chunks_exact_mut(block_elems(bits)) {
                for k in 1..pw - 1 {
                    let f = (-((bits as usize * k) as f32)).exp2();
                    for v in &mut blk[k * 8..k * 8 + 8] {
                        *v *= f;
                    }
                }
            }
        }
        let xsum = x.chunks_exact(group).map(sum8).collect();
        AffinePrep {
            xt,
            xsum,
            prescaled,
        }
    }
}

/// `Σ v` as 8 strided partial sums added in order (what `x86::int8_prep` computes too).
#[inline(always)]
pub(crate) fn sum8(v: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut it = v.chunks_exact(8);
    for c in &mut it {
        for l in 0..8 {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + it.remainder().iter().sum::<f32>()
}

#[inline(always)]
pub(crate) fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut ia = a.chunks_exact(8);
    let mut ib = b.chunks_exact(8);
    for (ca, cb) in (&mut ia).zip(&mut ib) {
        for l in 0..8 {
            acc[l] += ca[l] * cb[l];
        }
    }
    let tail: f32 = ia
        .remainder()
        .iter()
        .zip(ib.remainder())
        .map(|(p, q)| p * q)
        .sum();
    acc.iter().sum::<f32>() + tail
}

/// `y[i] = row (r0 + i) · x` for an affine matrix, portable version.
pub(crate) fn affine_rows(a: &AffineView, prep: &AffinePrep, r0: usize, y: &mut [f32]) {
    match a.bits {
        2 => affine_rows_b::<2>(a, prep, r0, y),
        4 => affine_rows_b::<4>(a, prep, r0, y),
        8 => affine_rows_b::<8>(a, prep, r0, y),
        b => unreachable!("bits {b} rejected by AffineView::check"),
    }
}

fn affine_rows_b<const BITS: u32>(a: &AffineView, prep: &AffinePrep, r0: usize, y: &mut [f32]) {
    assert!(
        !prep.prescaled,
        "the portable kernel shifts codes down; x must not be prescaled"
    );
    let ng = a.groups_per_row();
    let wpr = a.words_per_row();
    let pw = (32 / BITS) as usize;
    let e = 8 * pw;
    let nb = a.cols / e;
    let mask = (1u32 << BITS) - 1;
    // Lanes of a block that share one group; >= 8 means the whole block is in one group.
    let lpg = a.group / pw;
    let mut sbuf = vec![0f32; ng];
    let mut bbuf = vec![0f32; ng];
    for (i, yi) in y.iter_mut().enumerate() {
        let row = r0 + i;
        a.scales.to_f32_into(row * ng, &mut sbuf);
        a.biases.to_f32_into(row * ng, &mut bbuf);
        let wrow = &a.w[row * wpr..(row + 1) * wpr];
        let mut acc = [0f32; 8];
        for b in 0..nb {
            let w = &wrow[b * 8..b * 8 + 8];
            let xb = &prep.xt[b * e..(b + 1) * e];
            let mut blk = [0f32; 8];
            for k in 0..pw {
                for l in 0..8 {
                    let q = (w[l] >> (BITS as usize * k)) & mask;
                    blk[l] += q as f32 * xb[k * 8 + l];
                }
            }
            let g0 = (b * e) >> a.group.trailing_zeros();
            for l in 0..8 {
                acc[l] += blk[l] * sbuf[g0 + l / lpg];
            }
        }
        let mut tail = 0f32;
        for j in nb * e..a.cols {
            let q = (wrow[j * BITS as usize / 32] >> ((j * BITS as usize) % 32)) & mask;
            tail += q as f32 * prep.xt[j] * sbuf[j / a.group];
        }
        *yi = acc.iter().sum::<f32>() + tail + dot8(&bbuf, &prep.xsum);
    }
}

/// Dequantises one affine row into `out [cols]` in the lane-permuted order of `permute_x`.
/// `sbuf`/`bbuf` hold the row's scales and biases as f32 (at least `cols / group` each).
pub(crate) fn dequant_row_permuted(
    a: &AffineView,
    wrow: &[u32],
    sbuf: &[f32],
    bbuf: &[f32],
    out: &mut [f32],
) {
    let bits = a.bits as usize;
    let pw = 32 / bits;
    let e = 8 * pw;
    let nb = a.cols / e;
    let mask = (1u32 << bits) - 1;
    let lpg = a.group / pw;
    for b in 0..nb {
        let w = &wrow[b * 8..b * 8 + 8];
        let g0 = (b * e) >> a.group.trailing_zeros();
        let o = &mut out[b * e..(b + 1) * e];
        for l in 0..8 {
            let (s, z) = (sbuf[g0 + l / lpg], bbuf[g0 + l / lpg]);
            for k in 0..pw {
                o[k * 8 + l] = ((w[l] >> (bits * k)) & mask) as f32 * s + z;
            }
        }
    }
    for j in nb * e..a.cols {
        let q = (wrow[j * bits / 32] >> ((j * bits) % 32)) & mask;
        out[j] = q as f32 * sbuf[j / a.group] + bbuf[j / a.group];
    }
}

/// `d[k] = rows[k] · x` for the first `m` rows of `rows [m, cols]`.
pub(crate) fn dot_rows(rows: &[f32], cols: usize, m: usize, x: &[f32], d: &mut [f32]) {
    for k in 0..m {
        d[k] = dot8(&rows[k * cols..(k + 1) * cols], x);
    }
}

pub(crate) fn bf16_to_f32(src: &[bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits((s.to_bits() as u32) << 16);
    }
}

pub(crate) fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

pub(crate) fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    dot8(w, x)
}

pub(crate) fn dot_bf16(w: &[bf16], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut iw = w.chunks_exact(8);
    let mut ix = x.chunks_exact(8);
    for (cw, cx) in (&mut iw).zip(&mut ix) {
        for l in 0..8 {
            acc[l] += f32::from_bits((cw[l].to_bits() as u32) << 16) * cx[l];
        }
    }
    let tail: f32 = iw
        .remainder()
        .iter()
        .zip(ix.remainder())
        .map(|(p, q)| p.to_f32() * q)
        .sum();
    acc.iter().sum::<f32>() + tail
}

pub(crate) fn dot_f16(w: &[f16], x: &[f32]) -> f32 {
    let mut buf = [0f32; 256];
    let mut acc = 0f32;
    for (cw, cx) in w.chunks(256).zip(x.chunks(256)) {
        f16_to_f32(cw, &mut buf[..cw.len()]);
        acc += dot8(&buf[..cw.len()], cx);
    }
    acc
}
