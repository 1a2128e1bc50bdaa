//! The affine product for a few inputs at once (AVX2+FMA): prefill's routed experts, which a
//! 512-token chunk gives ~10 tokens each. Eight codes at a time are turned into f32 weights in
//! a register and applied to every input before the next eight: no dequantised copy of the
//! matrix is written and read back (the blocked kernel's `dequant_segment`), and no lanes are
//! idle (its 6x16 tile, given 10 inputs, computes 16).
//!
//! - The weights are exactly `blocked`'s: `q * scale + bias` in one FMA, in the lane order of
//!   `lanes::permute_x`, which the inputs are given in. Each input's dot product is summed in 8
//!   lanes per column slice and the slices' sums added: the plain twin's sums, reassociated.
//! - Up to `FEW_MAX` inputs, one accumulator each; the other registers hold the codes, the
//!   weights being made and the block's scales and biases. Past 10 the accumulators no longer
//!   fit the 16 registers and the blocked kernel is as fast (measured; see `FEW_MAX`).
//! - `pack` interleaves the inputs 8 columns at a time, `xg[col / 8][input][8]`, so that the
//!   kernel reads all of them at constant offsets from one pointer.
//! - Columns in slices whose inputs stay in L1 (`X_SLICE_BYTES`) while a block of `RB` rows
//!   passes over them. That reads the codes as `RB` short streams, which the hardware
//!   prefetcher does not follow well: the next block of rows is prefetched as it goes.
//!
//! The plain twin is `reference::matmul_ref`; `tests.rs` compares both.

use super::super::lanes::BlockGeom;
use super::super::AffineView;
use super::{available, hsum, lane_group_index, widen};
use std::arch::x86_64::*;

/// Most inputs for which `matmul` takes this kernel. Per core, by CPU time (best of 15 passes,
/// three alternating runs, 2-core EPYC shared with builds), q4 1024x4096 against the blocked
/// kernel: 6 inputs 26-27 GMAC/s against 13-14, 10 inputs 27-28 against 20-22; with 11 and
/// 12 accumulators (registers spilled) 24 against 24 and 24.5 against 25-26.
pub(crate) const FEW_MAX: usize = 10;
/// Bytes of inputs (all `n` of them) per column slice.
const X_SLICE_BYTES: usize = 16 << 10;
/// Rows per block: their scales are widened once, and they share each slice of the inputs.
const RB: usize = 16;

/// Packs `x [n, cols]` for `affine_few` into `xg` (resized to `n * cols` and `off` floats
/// before them, `off` making the start 64-byte aligned; returns `off`): each input permuted
/// by `lanes::permute_x`, then the inputs interleaved 8 columns at a time.
pub(crate) fn pack(bits: u32, x: &[f32], n: usize, cols: usize, xg: &mut Vec<f32>) -> usize {
    assert!(cols.is_multiple_of(8) && x.len() == n * cols);
    xg.resize(n * cols + 16, 0.0);
    let off = xg.as_ptr().align_offset(64).min(16);
    let mut row = vec![0f32; cols];
    for (t, xt) in x.chunks_exact(cols).enumerate() {
        super::super::lanes::permute_x(bits, xt, &mut row);
        for (j, v) in row.chunks_exact(8).enumerate() {
            xg[off + (j * n + t) * 8..][..8].copy_from_slice(v);
        }
    }
    off
}

/// Rows `r0 .. r0 + yt.len() / n` of `y[i] = W x[i]` into `yt [rows, n]` (overwritten).
/// `xg` holds the `n` inputs as `pack` left them.
pub(crate) fn affine_few(a: &AffineView, xg: &[f32], n: usize, r0: usize, yt: &mut [f32]) {
    assert!(available());
    assert!((1..=FEW_MAX).contains(&n));
    assert!(yt.len().is_multiple_of(n) && r0 + yt.len() / n <= a.rows);
    assert!(a.cols.is_multiple_of(8) && xg.len() == n * a.cols);
    // SAFETY: features checked; the view was checked by the caller (`matmul_impl`), so its
    // rows have `wpr` words and `ng` scales and biases each, and `xg` holds `n` inputs of
    // `cols`: the bounds of every load below.
    unsafe {
        match a.bits {
            2 => few_avx2::<2>(a, xg, n, r0, yt),
            4 => few_avx2::<4>(a, xg, n, r0, yt),
            8 => few_avx2::<8>(a, xg, n, r0, yt),
            b => unreachable!("bits {b} rejected by AffineView::check"),
        }
    }
}

/// What a slice of one row needs besides its inputs.
struct RowSlice {
    /// The row's words, scales and biases (as f32, padded by 8).
    w: *const u32,
    s: *const f32,
    b: *const f32,
    /// Whole blocks `b0 .. b1` of the row.
    b0: usize,
    b1: usize,
}

/// Block geometry and the constants of the block loop.
#[derive(Clone, Copy)]
struct Consts {
    e: usize,
    gshift: u32,
    /// Lane -> group inside a block (all 0 when a block is inside one group).
    idx: __m256i,
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn few_avx2<const BITS: i32>(
    a: &AffineView,
    xg: &[f32],
    n: usize,
    r0: usize,
    yt: &mut [f32],
) {
    let BlockGeom {
        ng,
        wpr,
        e,
        nb,
        lpg,
        ..
    } = BlockGeom::new(a, BITS as usize);
    let c = Consts {
        e,
        gshift: a.group.trailing_zeros(),
        idx: lane_group_index(lpg),
    };
    let cols = a.cols;
    let nrows = yt.len() / n;
    yt.fill(0.0);
    // Blocks per column slice.
    let kb = (X_SLICE_BYTES / (4 * n * e)).max(1);
    let sstride = ng + 8;
    let mut sbuf = vec![0f32; RB * sstride];
    let mut bbuf = vec![0f32; RB * sstride];
    for rb in (0..nrows).step_by(RB) {
        let mb = RB.min(nrows - rb);
        for i in 0..mb {
            let row = r0 + rb + i;
            widen(&a.scales, row * ng, &mut sbuf[i * sstride..][..ng]);
            widen(&a.biases, row * ng, &mut bbuf[i * sstride..][..ng]);
        }
        // The next block of rows is prefetched in order, one row slice's worth of bytes per
        // row slice computed here: one ascending stream, a block of rows ahead.
        let mut pf = a.w.as_ptr().wrapping_add((r0 + rb + RB) * wpr) as *const i8;
        for b0 in (0..nb).step_by(kb) {
            let b1 = (b0 + kb).min(nb);
            for i in 0..mb {
                let w = a.w.as_ptr().add((r0 + rb + i) * wpr);
                for _ in (0..(b1 - b0) * 32).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(pf);
                    pf = pf.wrapping_add(64);
                }
                let rs = RowSlice {
                    w,
                    s: sbuf.as_ptr().add(i * sstride),
                    b: bbuf.as_ptr().add(i * sstride),
                    b0,
                    b1,
                };
                let out = yt.as_mut_ptr().add((rb + i) * n);
                inputs_slice::<BITS>(n, &c, &rs, xg.as_ptr(), out);
            }
        }
    }
    // Past the last whole block the inputs are in natural order.
    for i in 0..nrows {
        let row = r0 + i;
        let wrow = &a.w[row * wpr..(row + 1) * wpr];
        for j in nb * e..cols {
            let q =
                (wrow[j * BITS as usize / 32] >> ((j * BITS as usize) % 32)) & ((1 << BITS) - 1);
            let g = row * ng + j / a.group;
            let wj = q as f32 * a.scales.get(g) + a.biases.get(g);
            for t in 0..n {
                yt[i * n + t] += wj * xg[(j / 8 * n + t) * 8 + j % 8];
            }
        }
    }
}

/// `slice::<BITS, T, S>` for `n` (1..=`FEW_MAX`) inputs.
#[inline(always)]
unsafe fn inputs_slice<const BITS: i32>(
    n: usize,
    c: &Consts,
    rs: &RowSlice,
    x: *const f32,
    out: *mut f32,
) {
    match n {
        1 => slice::<BITS, 1, 4>(c, rs, x, out),
        2 => slice::<BITS, 2, 4>(c, rs, x, out),
        3 => slice::<BITS, 3, 2>(c, rs, x, out),
        4 => slice::<BITS, 4, 2>(c, rs, x, out),
        5 => slice::<BITS, 5, 1>(c, rs, x, out),
        6 => slice::<BITS, 6, 1>(c, rs, x, out),
        7 => slice::<BITS, 7, 1>(c, rs, x, out),
        8 => slice::<BITS, 8, 1>(c, rs, x, out),
        9 => slice::<BITS, 9, 1>(c, rs, x, out),
        10 => slice::<BITS, 10, 1>(c, rs, x, out),
        _ => unreachable!("at most {FEW_MAX} inputs"),
    }
}

/// `out[t] += Σ_j w_j x_t[j]` over the blocks of `rs` for the `T` inputs packed at `x`,
/// `w_j = q_j scale + bias` made 8 at a time in a register. Each input has `S` accumulators,
/// used in turn by the codes of a block: an FMA waits ~4 cycles for the one before it on the
/// same accumulator, and a step of `T < 5` inputs issues in less.
#[inline(always)]
unsafe fn slice<const BITS: i32, const T: usize, const S: usize>(
    c: &Consts,
    rs: &RowSlice,
    x: *const f32,
    out: *mut f32,
) {
    let pw = 32 / BITS as usize;
    let mask = _mm256_set1_epi32((1 << BITS) - 1);
    let mut acc = [[_mm256_setzero_ps(); T]; S];
    for b in rs.b0..rs.b1 {
        let mut wv = _mm256_loadu_si256(rs.w.add(b * 8) as *const __m256i);
        let g0 = (b * c.e) >> c.gshift;
        // Lane l's group is g0 + idx[l]; the buffers are padded by 8.
        let sv = _mm256_permutevar8x32_ps(_mm256_loadu_ps(rs.s.add(g0)), c.idx);
        let bv = _mm256_permutevar8x32_ps(_mm256_loadu_ps(rs.b.add(g0)), c.idx);
        let xb = x.add(b * c.e * T);
        for k in 0..pw {
            let q = _mm256_cvtepi32_ps(_mm256_and_si256(wv, mask));
            wv = _mm256_srli_epi32::<BITS>(wv);
            let wk = _mm256_fmadd_ps(q, sv, bv);
            for (t, at) in acc[k % S].iter_mut().enumerate() {
                *at = _mm256_fmadd_ps(wk, _mm256_loadu_ps(xb.add((k * T + t) * 8)), *at);
            }
        }
    }
    for t in 0..T {
        let mut v = acc[0][t];
        for set in &acc[1..] {
            v = _mm256_add_ps(v, set[t]);
        }
        *out.add(t) += hsum(v);
    }
}
