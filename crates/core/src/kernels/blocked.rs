//! The blocked prefill product `y[i] = W x[i]` for many inputs (AVX2+FMA): the GotoBLAS
//! scheme with the weight matrix as the broadcast operand.
//!
//! - `x [n, cols]` is packed once per call into panels of `NR` = 16 inputs, `xp[tb][p][16]`
//!   (inputs past `n` are zero), so one column `p` of a panel is two aligned-size vector loads.
//! - Each thread owns contiguous blocks of output rows. For a block of `MB` rows and a slice of
//!   `KC` columns it dequantises the weights once (affine ones in the lane order of
//!   `lanes::permute_x`, the inputs being packed in that order too) into a small f32 buffer
//!   (`[MB, KC]`, in L2), then runs a `MR` x `NR` = 6 x 16 register tile (12 accumulators) over
//!   every input panel: per column, 6 broadcast weights times 2 vectors of inputs (a last
//!   panel of at most 8 inputs uses a 6 x 8 tile, so few-token experts waste less).
//! - Input panels are taken `TG` at a time, outermost, so their column slice stays in L2
//!   while all of a thread's row blocks pass over it.
//! - The result is accumulated transposed, `yt [rows, n]`, so that a thread's rows are one
//!   contiguous slice; `mod.rs` transposes it back.
//!
//! The plain twin is `reference::matmul_ref`; `tests.rs` compares both on every format.

use super::{AffineView, Scales, WeightView};
use rayon::prelude::*;
use std::arch::x86_64::*;

/// Rows of the register tile.
pub(crate) const MR: usize = 6;
/// Inputs of the register tile (two 8-lane vectors).
pub(crate) const NR: usize = 16;
/// Rows dequantised together: 8 register tiles share one pass over an input panel.
const MB: usize = 8 * MR;
/// Columns per slice: a multiple of every group size (32, 64, 128) and of 8. The slice's
/// weights (48 KiB) stay in L2 and one input panel slice (16 KiB) in L1.
const KC: usize = 256;
/// Up to this many input panels, weights are dequantised whole rows at a time.
const WHOLE_ROW_PANELS: usize = 2;
/// Input panels per pass (128 inputs: their column slice is 128 KiB).
const TG: usize = 8;

thread_local! {
    /// Packed inputs and the transposed result of the last product on this thread, kept so
    /// that a prefill chunk does not page-fault megabytes of fresh memory for every product
    /// (a fault costs microseconds on a VM). Taken out while in use, so a nested product on
    /// the same thread simply starts with an empty buffer.
    static SCRATCH: std::cell::Cell<(Vec<f32>, Vec<f32>)> = const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// Borrows this thread's scratch buffers (see `SCRATCH`); give them back with `put_scratch`.
pub(crate) fn take_scratch() -> (Vec<f32>, Vec<f32>) {
    SCRATCH.with(|c| c.take())
}

/// Returns the scratch buffers to this thread, dropping any larger than `SCRATCH_KEEP` floats
/// (a product with a huge output, such as logits for a whole prompt, must not pin its memory).
pub(crate) fn put_scratch(bufs: (Vec<f32>, Vec<f32>)) {
    let keep = |v: Vec<f32>| {
        if v.capacity() > SCRATCH_KEEP {
            Vec::new()
        } else {
            v
        }
    };
    SCRATCH.with(|c| c.set((keep(bufs.0), keep(bufs.1))));
}

/// 64 MiB of f32: a 512-token chunk of inputs up to 32k wide.
const SCRATCH_KEEP: usize = 16 << 20;

/// Packs `x [n, cols]` into `xp [n.div_ceil(NR)][cols][NR]`, zero past input `n`, reusing
/// `xp`'s memory. For affine weights (`perm_bits`) each input is first put in the lane order of
/// `lanes::permute_x`, the order `dequant_segment` gives the weights. Panels are packed in
/// parallel when there are several.
pub(crate) fn pack_inputs(
    x: &[f32],
    n: usize,
    cols: usize,
    perm_bits: Option<u32>,
    xp: &mut Vec<f32>,
) {
    let panels = n.div_ceil(NR);
    xp.resize(panels * cols * NR, 0.0);
    if cols == 0 {
        return;
    }
    let pack = |tb: usize, panel: &mut [f32]| {
        let nt = NR.min(n - tb * NR);
        let mut row = vec![0f32; cols];
        for j in 0..NR {
            let src: &[f32] = if j >= nt {
                row.fill(0.0);
                &row
            } else {
                let xj = &x[(tb * NR + j) * cols..(tb * NR + j + 1) * cols];
                match perm_bits {
                    Some(bits) => {
                        super::lanes::permute_x(bits, xj, &mut row);
                        &row
                    }
                    None => xj,
                }
            };
            for (p, v) in src.iter().enumerate() {
                panel[p * NR + j] = *v;
            }
        }
    };
    if panels > 1 && panels * cols * NR >= 1 << 16 {
        xp.par_chunks_mut(cols * NR)
            .enumerate()
            .for_each(|(tb, panel)| pack(tb, panel));
    } else {
        for (tb, panel) in xp.chunks_mut(cols * NR).enumerate() {
            pack(tb, panel);
        }
    }
}

/// Rows `r0 .. r0 + yt.len() / n` of the product, into `yt [rows, n]` (overwritten).
/// `xp` comes from `pack_inputs`.
pub(crate) fn rows_blocked(w: &WeightView, xp: &[f32], n: usize, r0: usize, yt: &mut [f32]) {
    assert!(super::x86::available());
    let cols = w.cols();
    let nrows = yt.len() / n;
    let panels = n.div_ceil(NR);
    assert!(r0 + nrows <= w.rows() && yt.len() == nrows * n);
    assert_eq!(
        xp.len(),
        panels * cols * NR,
        "blocked: packed inputs length"
    );
    yt.fill(0.0);
    // Rows past the block's end are never written back, so stale values there are harmless;
    // zeroing once keeps them finite.
    // With one or two input panels (few-token experts) the product is close to memory-bound,
    // and 48 rows x 256 columns would read the weights as 48 short streams that the hardware
    // prefetcher cannot follow: take whole rows, one tile's worth at a time, instead (the
    // panels, at most 2 x cols x 64 bytes, are re-read from L2 by every tile).
    let (mbx, kcx) = if panels <= WHOLE_ROW_PANELS {
        (MR, cols.max(1))
    } else {
        (MB, KC)
    };
    let mut wbuf = vec![0f32; mbx * kcx];
    let (mut sbuf, mut bbuf) = (Vec::new(), Vec::new());
    // Loop order: a group of input panels, then a column slice, then row blocks. The group's
    // slice of inputs (TG * 16 KiB) then stays in L2 while every row block of this thread
    // passes over it; the weights are dequantised once per group (n / 128 times in all).
    for tg in (0..panels).step_by(TG) {
        let tgn = TG.min(panels - tg);
        let mut k0 = 0;
        while k0 < cols {
            let kc = kcx.min(cols - k0);
            let mut rb = 0;
            while rb < nrows {
                let mb = mbx.min(nrows - rb);
                for i in 0..mb {
                    let out = &mut wbuf[i * kcx..i * kcx + kc];
                    dequant_segment(w, r0 + rb + i, k0, out, &mut sbuf, &mut bbuf);
                }
                for tb in tg..tg + tgn {
                    let nt = NR.min(n - tb * NR);
                    let off = tb * cols * NR;
                    let panel = &xp[off + k0 * NR..off + (k0 + kc) * NR];
                    let mut i = 0;
                    while i < mb {
                        let mr = MR.min(mb - i);
                        let c0 = (rb + i) * n + tb * NR;
                        // SAFETY: AVX2+FMA checked above. `wbuf` holds mbx >= i + MR rows of
                        // kcx >= kc floats, `panel` holds kc columns of NR, and the tile writes
                        // only rows < mr and inputs < nt, i.e. inside `yt` (rows < nrows,
                        // inputs < n).
                        unsafe {
                            // A panel of at most 8 inputs needs only its first vector.
                            let tile = if nt <= 8 { tile::<1> } else { tile::<2> };
                            tile(
                                kc,
                                wbuf[i * kcx..].as_ptr(),
                                kcx,
                                panel.as_ptr(),
                                yt.as_mut_ptr().add(c0),
                                n,
                                mr,
                                nt,
                            )
                        };
                        i += MR;
                    }
                }
                rb += mb;
            }
            k0 += kc;
        }
    }
}

/// `c[r * ldc + t] += Σ_p a[r * lda + p] * b[p * NR + t]` for `r < mr`, `t < nt`, `p < kc`,
/// over the first `NV` vectors (8 inputs each) of the panel: a `MR` x `8 NV` register tile.
///
/// # Safety
/// AVX2 and FMA present; `nt <= 8 NV`; `a` readable for `MR` rows of `kc` at stride `lda`, `b`
/// for `kc * NR` floats, `c` writable at `r * ldc + t` for `r < mr`, `t < nt`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile<const NV: usize>(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nt: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); NV]; MR];
    for p in 0..kc {
        let mut bv = [_mm256_setzero_ps(); NV];
        for (v, x) in bv.iter_mut().enumerate() {
            *x = _mm256_loadu_ps(b.add(p * NR + 8 * v));
        }
        for (r, ar) in acc.iter_mut().enumerate() {
            let av = _mm256_broadcast_ss(&*a.add(r * lda + p));
            for (x, y) in ar.iter_mut().zip(&bv) {
                *x = _mm256_fmadd_ps(av, *y, *x);
            }
        }
    }
    if nt == 8 * NV {
        for (r, ar) in acc.iter().enumerate().take(mr) {
            for (v, x) in ar.iter().enumerate() {
                let cr = c.add(r * ldc + 8 * v);
                _mm256_storeu_ps(cr, _mm256_add_ps(_mm256_loadu_ps(cr), *x));
            }
        }
    } else {
        let mut tmp = [0f32; NR];
        for (r, ar) in acc.iter().enumerate().take(mr) {
            for (v, x) in ar.iter().enumerate() {
                _mm256_storeu_ps(tmp.as_mut_ptr().add(8 * v), *x);
            }
            for (t, v) in tmp.iter().enumerate().take(nt) {
                *c.add(r * ldc + t) += v;
            }
        }
    }
}

/// Row `row`, columns `k0 .. k0 + out.len()`, as f32. Dense formats come out in natural
/// order; affine ones in the lane-permuted order of `lanes::permute_x` (whole 8-word blocks
/// counted from the row start, natural order past the row's last whole block), which is the
/// order `pack_inputs` gives the inputs. For affine weights `k0` is a multiple of the block
/// (KC is) and the length a multiple of the group. `sbuf`/`bbuf` are scratch for the
/// segment's scales and biases as f32.
fn dequant_segment(
    w: &WeightView,
    row: usize,
    k0: usize,
    out: &mut [f32],
    sbuf: &mut Vec<f32>,
    bbuf: &mut Vec<f32>,
) {
    let cols = w.cols();
    let range = row * cols + k0..row * cols + k0 + out.len();
    match w {
        WeightView::F32 { data, .. } => out.copy_from_slice(&data[range]),
        WeightView::Bf16 { data, .. } => super::lanes::bf16_to_f32(&data[range], out),
        WeightView::F16 { data, .. } => {
            // SAFETY: F16C is part of `x86::available()`, checked by the caller.
            unsafe { f16_to_f32_f16c(&data[range], out) }
        }
        WeightView::Affine(a) => {
            let e = super::lanes::block_elems(a.bits);
            assert!(k0.is_multiple_of(e) && out.len().is_multiple_of(a.group));
            let bits = a.bits as usize;
            let w0 = row * a.words_per_row() + k0 * bits / 32;
            let words = &a.w[w0..w0 + out.len() * bits / 32];
            // The segment's scales, widened once (not per group in the hot loop), padded by 8
            // as the permuted dequantiser wants.
            let gn = out.len() / a.group;
            let g0 = row * a.groups_per_row() + k0 / a.group;
            sbuf.resize(gn + 8, 0.0);
            bbuf.resize(gn + 8, 0.0);
            super::x86::widen_checked(&a.scales, g0, &mut sbuf[..gn]);
            super::x86::widen_checked(&a.biases, g0, &mut bbuf[..gn]);
            // The segment as a one-row matrix of its own: its blocks start at the segment's
            // start, a multiple of the block, so they are the row's blocks.
            let seg = AffineView {
                bits: a.bits,
                group: a.group,
                rows: 1,
                cols: out.len(),
                w: words,
                scales: Scales::F32(&sbuf[..gn]),
                biases: Scales::F32(&bbuf[..gn]),
            };
            super::x86::dequant_row_permuted(&seg, words, sbuf, bbuf, out);
        }
    }
}

#[target_feature(enable = "avx2,f16c")]
unsafe fn f16_to_f32_f16c(src: &[half::f16], out: &mut [f32]) {
    let n8 = out.len() / 8 * 8;
    let sp = src.as_ptr() as *const u16;
    for j in (0..n8).step_by(8) {
        let v = _mm256_cvtph_ps(_mm_loadu_si128(sp.add(j) as *const __m128i));
        _mm256_storeu_ps(out.as_mut_ptr().add(j), v);
    }
    for j in n8..out.len() {
        out[j] = src[j].to_f32();
    }
}
