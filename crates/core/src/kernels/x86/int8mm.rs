//! The int8-activation tile kernel of `int8mm.rs` (read its header for the layout) on x86-64:
//! AVX2 (`vpmaddubsw` then `vpmaddwd`) and AVX512-VNNI (`vpdpbusd` on 256-bit registers, which
//! needs AVX512VL too). Same integers and the same f32 operations in the same order as
//! `int8mm::tile_plain`, so the results are bit-identical (`tests.rs` checks).
//!
//! Four inputs at a time share each load of a tile's 32 code bytes; each input's 4 columns are
//! one broadcast 32-bit load. AVX2's `maddubs` gives i16 sums of two products (at most
//! `2 * 15 * 127 = 3810` for 4-bit codes), so up to 8 column quads are summed in i16 (30,480)
//! before one `madd` with ones widens them to i32.
use std::arch::x86_64::*;

use super::super::int8mm::{Batch, Tile, TILE};

/// Inputs per pass.
const NI: usize = 4;
/// Column quads summed in i16 before widening (AVX2; see the header).
const I16_QUADS: usize = 8;

/// AVX512-VNNI with 256-bit forms (AVX512VL), and everything else the kernel uses.
pub(crate) fn vnni_available() -> bool {
    super::available()
        && is_x86_feature_detected!("avx512vnni")
        && is_x86_feature_detected!("avx512vl")
}

/// `out[i * TILE + l]` = row `l` of `t` times input `i` of `b`; `vnni` picks `vpdpbusd`.
pub(crate) fn tile(vnni: bool, t: &Tile, b: &Batch, out: &mut [f32]) {
    assert!(out.len() >= b.n * TILE);
    assert!(t.ws.len() >= b.cols * TILE && t.sl.len() >= b.ng * TILE && t.bl.len() >= b.ng * TILE);
    assert!(b.xq.len() >= b.n * b.cols && b.ng * b.qpg * 4 == b.cols);
    // SAFETY: features checked here; loads stay inside `ws` (cols / 4 quads of 32 bytes),
    // `sl`/`bl` (ng groups of 8), each input's `xq` row and `unit`/`xsum` (checked above).
    unsafe {
        if vnni {
            assert!(vnni_available());
            tile_vnni(t, b, out)
        } else {
            assert!(super::available());
            tile_avx2(t, b, out)
        }
    }
}

#[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
unsafe fn tile_vnni(t: &Tile, b: &Batch, out: &mut [f32]) {
    all_inputs::<true>(t, b, out)
}

#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2(t: &Tile, b: &Batch, out: &mut [f32]) {
    all_inputs::<false>(t, b, out)
}

/// Every input against the tile, `NI` at a time, then one at a time.
#[inline(always)]
unsafe fn all_inputs<const VNNI: bool>(t: &Tile, b: &Batch, out: &mut [f32]) {
    let mut i = 0;
    while i + NI <= b.n {
        inputs::<NI, VNNI>(t, b, i, out);
        i += NI;
    }
    while i < b.n {
        inputs::<1, VNNI>(t, b, i, out);
        i += 1;
    }
}

/// Inputs `i0 .. i0 + M` against the tile. Inlined into a `#[target_feature]` caller that has
/// AVX2 and FMA, and AVX512-VNNI/VL when `VNNI`.
#[inline(always)]
unsafe fn inputs<const M: usize, const VNNI: bool>(
    t: &Tile,
    b: &Batch,
    i0: usize,
    out: &mut [f32],
) {
    let ws = t.ws.as_ptr();
    let xq: [*const i8; M] = std::array::from_fn(|k| b.xq.as_ptr().add((i0 + k) * b.cols));
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); M];
    for g in 0..b.ng {
        let mut d = [_mm256_setzero_si256(); M];
        let (j0, j1) = (g * b.qpg, (g + 1) * b.qpg);
        if VNNI {
            for j in j0..j1 {
                let w = _mm256_loadu_si256(ws.add(j * 32) as *const __m256i);
                for k in 0..M {
                    let x = _mm256_set1_epi32((xq[k].add(4 * j) as *const i32).read_unaligned());
                    d[k] = _mm256_dpbusd_epi32(d[k], w, x);
                }
            }
        } else {
            let mut j = j0;
            while j < j1 {
                let stop = (j + I16_QUADS).min(j1);
                let mut p = [_mm256_setzero_si256(); M];
                while j < stop {
                    let w = _mm256_loadu_si256(ws.add(j * 32) as *const __m256i);
                    for k in 0..M {
                        let x =
                            _mm256_set1_epi32((xq[k].add(4 * j) as *const i32).read_unaligned());
                        p[k] = _mm256_add_epi16(p[k], _mm256_maddubs_epi16(w, x));
                    }
                    j += 1;
                }
                for k in 0..M {
                    d[k] = _mm256_add_epi32(d[k], _mm256_madd_epi16(p[k], ones));
                }
            }
        }
        let s = _mm256_loadu_ps(t.sl.as_ptr().add(g * TILE));
        let bias = _mm256_loadu_ps(t.bl.as_ptr().add(g * TILE));
        for k in 0..M {
            let gi = (i0 + k) * b.ng + g;
            let f = _mm256_mul_ps(s, _mm256_set1_ps(*b.unit.get_unchecked(gi)));
            acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[k]), f, acc[k]);
            acc[k] = _mm256_fmadd_ps(bias, _mm256_set1_ps(*b.xsum.get_unchecked(gi)), acc[k]);
        }
    }
    for (k, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(out.as_mut_ptr().add((i0 + k) * TILE), *a);
    }
}
