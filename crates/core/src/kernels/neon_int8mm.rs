//! The int8-activation tile kernel of `int8mm.rs` (read its header for the layout) on aarch64
//! with the dot-product extension (`sdot`, FEAT_DotProd: Apple M1 and later, Neoverse N1 and
//! later): a tile's 8 rows are two registers of 4 i32 lanes, each input's 4 columns one
//! broadcast 32-bit lane, and one `sdot` per register is 16 multiply-adds. Codes (0..15) are
//! read as signed bytes, which they fit. Same integers and the same f32 operations in the same
//! order as `int8mm::tile_plain`, so the results are bit-identical (`tests.rs` checks, under
//! qemu: `scripts/test-aarch64.sh`).
//!
//! `sdot` is written as inline assembly: Rust's `vdotq_s32` is not stable yet.
use std::arch::aarch64::*;

use super::int8mm::{Batch, Tile, TILE};

/// Inputs per pass: 4 inputs' 8 accumulators and 8 integer sums, 2 code registers.
const NI: usize = 4;

pub(crate) fn available() -> bool {
    std::arch::is_aarch64_feature_detected!("dotprod")
}

/// `out[i * TILE + l]` = row `l` of `t` times input `i` of `b`.
pub(crate) fn tile(t: &Tile, b: &Batch, out: &mut [f32]) {
    assert!(available());
    assert!(out.len() >= b.n * TILE);
    assert!(t.ws.len() >= b.cols * TILE && t.sl.len() >= b.ng * TILE && t.bl.len() >= b.ng * TILE);
    assert!(b.xq.len() >= b.n * b.cols && b.ng * b.qpg * 4 == b.cols);
    // SAFETY: the dot-product extension is checked above; loads stay inside the slices (same
    // bounds as the checks above).
    unsafe { tile_sdot(t, b, out) }
}

#[target_feature(enable = "neon,dotprod")]
unsafe fn tile_sdot(t: &Tile, b: &Batch, out: &mut [f32]) {
    let mut i = 0;
    while i + NI <= b.n {
        inputs::<NI>(t, b, i, out);
        i += NI;
    }
    while i < b.n {
        inputs::<1>(t, b, i, out);
        i += 1;
    }
}

/// `acc + a · b` per 4-byte lane (signed bytes).
#[inline(always)]
pub(crate) unsafe fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    std::arch::asm!(
        "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
        acc = inout(vreg) acc,
        a = in(vreg) a,
        b = in(vreg) b,
        options(pure, nomem, nostack)
    );
    acc
}

#[inline(always)]
unsafe fn inputs<const M: usize>(t: &Tile, b: &Batch, i0: usize, out: &mut [f32]) {
    let ws = t.ws.as_ptr() as *const i8;
    let xq: [*const i8; M] = std::array::from_fn(|k| b.xq.as_ptr().add((i0 + k) * b.cols));
    let mut acc = [[vdupq_n_f32(0.0); 2]; M];
    for g in 0..b.ng {
        let mut d = [[vdupq_n_s32(0); 2]; M];
        for j in g * b.qpg..(g + 1) * b.qpg {
            let w0 = vld1q_s8(ws.add(j * 32));
            let w1 = vld1q_s8(ws.add(j * 32 + 16));
            for k in 0..M {
                let q = (xq[k].add(4 * j) as *const i32).read_unaligned();
                let x = vreinterpretq_s8_s32(vdupq_n_s32(q));
                d[k][0] = sdot(d[k][0], w0, x);
                d[k][1] = sdot(d[k][1], w1, x);
            }
        }
        let sl = t.sl.as_ptr().add(g * TILE);
        let bl = t.bl.as_ptr().add(g * TILE);
        for k in 0..M {
            let gi = (i0 + k) * b.ng + g;
            let u = vdupq_n_f32(*b.unit.get_unchecked(gi));
            let s = vdupq_n_f32(*b.xsum.get_unchecked(gi));
            for h in 0..2 {
                let f = vmulq_f32(vld1q_f32(sl.add(4 * h)), u);
                acc[k][h] = vfmaq_f32(acc[k][h], vcvtq_f32_s32(d[k][h]), f);
                acc[k][h] = vfmaq_f32(acc[k][h], vld1q_f32(bl.add(4 * h)), s);
            }
        }
    }
    for k in 0..M {
        let o = out.as_mut_ptr().add((i0 + k) * TILE);
        vst1q_f32(o, acc[k][0]);
        vst1q_f32(o.add(4), acc[k][1]);
    }
}
