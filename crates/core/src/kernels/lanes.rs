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

/// How an affine kernel turns the codes of a block into f32, and so how `AffinePrep` scales
/// the slices of `xt`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // Only the AVX2 kernel scales `x`.
pub(crate) enum CodeRead {
    /// Code `k` shifted down and converted (`affine_rows` here): `xt` is `x` permuted.
    Converted,
    /// Code `k < pw - 1` masked in place, `w & (mask << bits k)`, and converted: its integer
    /// is `q 2^(bits k)`, so slice `k` of `xt` is `x 2^(e - bits k)` and the product is
    /// exactly `q x 2^e` (powers of two scale exactly; `e` keeps them inside f32's range, see
    /// `read_exponent`). The last code is shifted down instead, because in place it would set
    /// the sign bit.
    InPlace,
    /// Code `k` masked (or shifted) to bit `read_pos(F32Bits, bits, k)` and the lane's bits
    /// taken as an f32, no conversion. Every pattern below `2^24` is the f32
    /// `pattern * 2^-149` (denormals, then the lowest normal binade, whose implicit bit is bit
    /// 23 of the pattern), so a code `q` at bit `p` (`p + bits <= 24`) reads as `q 2^(p - 149)`.
    /// Slice `k` of `xt` is `x 2^(e - p_k)`, which makes each product `q x 2^(e - 149)`: the
    /// products, sums and roundings of `Converted` scaled by one power of two, which
    /// `AffinePrep::unscale` takes back off. `e` puts `max |x|` near `2^100`: no `x 2^(e - p)`
    /// overflows and no product of an element above `max |x| 2^-75` is denormal.
    F32Bits,
}

/// The bit at which a kernel reading as `read` takes code `k` of a word of `bits`-bit codes.
/// `InPlace`: `bits k`, the last code 0. `F32Bits`: in place while the code ends at or below
/// bit 24; the last code shifted down by `32 - bits`; the codes between (bits 24 and up, not
/// the last) from the word shifted down by 24. `Converted`: 0.
pub(crate) fn read_pos(read: CodeRead, bits: u32, k: usize) -> i32 {
    let pw = 32 / bits as usize;
    let in_place = match read {
        CodeRead::Converted => 0,
        CodeRead::InPlace => pw - 1,
        CodeRead::F32Bits => 24 / bits as usize,
    };
    let p = if k + 1 == pw || read == CodeRead::Converted {
        0
    } else if k < in_place {
        k
    } else {
        k - in_place
    };
    (p * bits as usize) as i32
}

/// The exponent `e` by which `AffinePrep` scales `x` for `read`, from `m = max |x|` over the
/// finite elements. `F32Bits`: `max |x| 2^e` in `[2^100, 2^101)`, the products `q x 2^(e -
/// 149)` then near `2^-49` (see `CodeRead::F32Bits`). `InPlace`: in `[2^40, 2^41)`, so that
/// no element above `max |x| 2^-60` scaled by `2^(-bits k)` is denormal and no sum of
/// products comes near overflow. 0 when `m` is zero and for `Converted`.
pub(crate) fn read_exponent(read: CodeRead, m: f32) -> i32 {
    let top = match read {
        CodeRead::Converted => return 0,
        CodeRead::InPlace => 40,
        CodeRead::F32Bits => 100,
    };
    if m > 0.0 {
        top - (m as f64).log2().floor() as i32
    } else {
        0
    }
}

/// `(factor of slice k, unscale)` for `read` with exponent `e`: `2^(e - pos_k)`, and what
/// the kernel's sum is multiplied by, `2^(149 - e)` for `F32Bits` and `2^-e` for `InPlace`.
/// f64: for `x` near either end of f32's range they are beyond it.
pub(crate) fn read_factors(read: CodeRead, bits: u32, e: i32) -> (Vec<f64>, f64) {
    let pw = 32 / bits as usize;
    let f = (0..pw)
        .map(|k| 2f64.powi(e - read_pos(read, bits, k)))
        .collect();
    let unscale = match read {
        CodeRead::F32Bits => 2f64.powi(149 - e),
        _ => 2f64.powi(-e),
    };
    (f, unscale)
}

/// `len` f32s starting on a 64-byte boundary (a cache line). The AVX2 kernels read `xt` in
/// 32-byte loads; from a 16-byte-aligned buffer, which is what the allocator gives a `Vec<f32>`,
/// every other load straddles two lines, and the exact 4-bit kernel ran at 11.2 against 12.6
/// GB/s aligned (one core, 256x4096 from L2, three alternating runs each).
#[derive(Clone, Default)]
pub(crate) struct LineAligned {
    lines: Vec<Line>,
    len: usize,
}

#[repr(C, align(64))]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Line([f32; 16]);

impl LineAligned {
    pub fn zeroed(len: usize) -> Self {
        LineAligned {
            lines: vec![Line([0.0; 16]); len.div_ceil(16)],
            len,
        }
    }
}

impl std::ops::Deref for LineAligned {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &bytemuck::cast_slice(&self.lines)[..self.len]
    }
}

impl std::ops::DerefMut for LineAligned {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut bytemuck::cast_slice_mut(&mut self.lines)[..self.len]
    }
}

impl PartialEq for LineAligned {
    fn eq(&self, o: &Self) -> bool {
        **self == **o
    }
}

impl std::fmt::Debug for LineAligned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

/// What an affine product needs from `x`, computed once per call and shared by all rows:
/// the lane-permuted copy and the per-group sums `Σx` (the bias term of each group is
/// `bias * Σx`, arch-spec §11.3 "Kernel arithmetic").
pub(crate) struct AffinePrep {
    /// `[cols]`, lane-permuted, each block's slices scaled as `read` says. Elements past the
    /// last whole block are in natural order and unscaled.
    pub xt: LineAligned,
    /// `[cols / group]`.
    pub xsum: Vec<f32>,
    pub read: CodeRead,
    /// What the whole blocks' `Σ scale q xt` is multiplied by to be `Σ scale q x` (a power of
    /// two, see `read_factors`; f64 because it can be beyond f32's range).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub unscale: f64,
}

impl AffinePrep {
    pub fn new(bits: u32, group: usize, x: &[f32], read: CodeRead) -> Self {
        let mut xt = LineAligned::zeroed(x.len());
        permute_x(bits, x, &mut xt);
        // Non-finite elements stay what they are scaled; zero `x` needs no scale.
        let m = x
            .iter()
            .filter(|v| v.is_finite())
            .fold(0f32, |m, v| m.max(v.abs()));
        let (f, unscale) = read_factors(read, bits, read_exponent(read, m));
        for blk in xt.chunks_exact_mut(block_elems(bits)) {
            if read == CodeRead::Converted {
                break;
            }
            for (k, &fk) in f.iter().enumerate() {
                for v in &mut blk[k * 8..k * 8 + 8] {
                    // One rounding, the same as f32's when `fk` is an f32.
                    *v = (*v as f64 * fk) as f32;
                }
            }
        }
        let xsum = x.chunks_exact(group).map(sum8).collect();
        AffinePrep {
            xt,
            xsum,
            read,
            unscale,
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

/// A row's geometry in this module's block layout, which every affine kernel walks.
#[derive(Clone, Copy)]
pub(crate) struct BlockGeom {
    /// Scale groups and u32 words per row.
    pub ng: usize,
    pub wpr: usize,
    /// Codes per word, elements per block of 8 words, whole blocks per row.
    pub pw: usize,
    pub e: usize,
    pub nb: usize,
    /// Lanes of a block that share one group; >= 8: the whole block is in one group.
    pub lpg: usize,
}

impl BlockGeom {
    /// For `bits`-bit codes; inlined, so a kernel's constant `bits` keeps `pw` and `e`
    /// constants (its loops over code positions unroll).
    #[inline(always)]
    pub fn new(a: &AffineView, bits: usize) -> Self {
        let pw = 32 / bits;
        let e = 8 * pw;
        BlockGeom {
            ng: a.groups_per_row(),
            wpr: a.words_per_row(),
            pw,
            e,
            nb: a.cols / e,
            lpg: a.group / pw,
        }
    }
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
    assert_eq!(
        prep.read,
        CodeRead::Converted,
        "the portable kernel converts codes; x must not be scaled"
    );
    let BlockGeom {
        ng,
        wpr,
        pw,
        e,
        nb,
        lpg,
    } = BlockGeom::new(a, BITS as usize);
    let mask = (1u32 << BITS) - 1;
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
        let tail = affine_tail::<BITS>(a, &prep.xt, wrow, &sbuf, nb * e);
        *yi = acc.iter().sum::<f32>() + tail + dot8(&bbuf, &prep.xsum);
    }
}

/// `Σ scale q x` over a row's elements from `from` on (those past its last whole block, which
/// `xt` keeps in natural order and unscaled), for the kernels that convert codes.
pub(crate) fn affine_tail<const BITS: u32>(
    a: &AffineView,
    xt: &[f32],
    wrow: &[u32],
    sbuf: &[f32],
    from: usize,
) -> f32 {
    let mask = (1u32 << BITS) - 1;
    let mut tail = 0f32;
    for j in from..a.cols {
        let q = (wrow[j * BITS as usize / 32] >> ((j * BITS as usize) % 32)) & mask;
        tail += q as f32 * xt[j] * sbuf[j / a.group];
    }
    tail
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
