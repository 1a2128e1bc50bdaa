//! The int8-activation affine matvec (`ActQuant::Int8`, the CLI default; `--exact` keeps f32):
//! `x` quantised to int8 per weight group once per call, then integer dot products of the
//! unsigned 2- or 4-bit codes with the int8 activations, as llama.cpp's `ggml_vec_dot_q4_0_q8_0`
//! does. This file holds
//! the shared preparation of `x` and the portable twin of `x86::int8_rows`; both compute the
//! same integers.
//!
//! Layout: a *block* is 8 u32 words = 32 bytes of codes, `E = 32 * cpb` elements with
//! `cpb = 8 / bits` codes per byte. Byte `j` of a block (byte `j % 4` of word `j / 4`, LSB-first)
//! holds elements `cpb * j + s` for `s` in `0..cpb` at bit offset `bits * s`. `Int8Prep` stores
//! `x_q` so that `xq[b E + 32 s + j] = x_q[b E + cpb j + s]`: masking code `s` out of the 32
//! bytes of a block meets one contiguous 32-byte slice of `xq`, so a kernel multiplies bytes
//! with bytes (`_mm256_maddubs_epi16`) without moving either. The 4 bytes of word `l` then sum
//! to elements `l pw .. (l + 1) pw` (`pw = 32 / bits`), the same lanes as the float kernel's.
//!
//! Accuracy: per group `g`, `unit_g = max|x| / 127` and `x_q = round(x / unit_g)`, so each
//! element `x̂ = unit_g x_q` is off by at most `unit_g / 2`. The bias term is
//! `Σ_g bias_g unit_g Σ x_q`, the *quantised* activations' sum as llama.cpp's `q4_1 · q8_1`
//! takes it: then every weight `w_j = scale_g q_j + bias_g` meets the same `x̂_j`, and row `r`
//! is `Σ_j w_j x̂_j` up to f32 rounding, off by at most `Σ_j |w_j| unit_g / 2`, the least that
//! rounding the activations can cost. The exact `Σx_g` there (as before 2026-12-07) leaves the
//! rounding error `Σ_j scale_g q_j (x̂_j - x_j)`: MLX codes sit far from zero (mean ~7.5 of
//! 0..15, the bias cancelling it), so that was 2.5-3x the RMS error of `Σ_j w_j (x̂_j - x_j)`
//! and ~3x llama.cpp's Q8_0 (`tests/int8_accuracy.rs`).

use super::lanes::dot8;
use super::AffineView;

/// `x_q` spans `[-XQ_MAX, XQ_MAX]`. A 4-bit code times this, two per `maddubs` pair, two pairs
/// added: `4 * 15 * 127 = 7620`; 2-bit: `8 * 3 * 127 = 3048`; both far inside i16.
pub(crate) const XQ_MAX: f32 = 127.0;

/// Codes per byte.
#[inline]
pub(crate) fn codes_per_byte(bits: u32) -> usize {
    8 / bits as usize
}

/// Elements per block of 8 words (32 bytes).
#[inline]
pub(crate) fn block_elems(bits: u32) -> usize {
    32 * codes_per_byte(bits)
}

/// `x` prepared once per call, shared by all rows (layout in the module header).
#[derive(Debug, PartialEq)]
pub(crate) struct Int8Prep {
    pub bits: u32,
    /// `[cols / E * E]`, in the block order of the module header.
    pub xq: Vec<i8>,
    /// `[cols / group]`: `max|x_g| / 127`.
    pub unit: Vec<f32>,
    /// `[cols / group]`: `unit_g Σ x_q` (`quantised_sum`), the bias term's sum.
    pub xsum: Vec<f32>,
    /// `x[cols / E * E ..]`, unchanged: columns past the last whole block are done in f32.
    pub tail: Vec<f32>,
}

impl Int8Prep {
    /// Portable preparation. `None` when `x` holds a non-finite value (or a group sums past
    /// f32's range): the float kernel then propagates it.
    pub fn new(bits: u32, group: usize, x: &[f32]) -> Option<Self> {
        let e = block_elems(bits);
        let cpb = codes_per_byte(bits);
        let nb = x.len() / e;
        let ng = x.len() / group;
        let mut unit = Vec::with_capacity(ng);
        let mut xsum = Vec::with_capacity(ng);
        let mut natural = vec![0i8; x.len()];
        if !quantize_groups(group, x, &mut natural, &mut unit, &mut xsum) {
            return None;
        }
        let mut xq = vec![0i8; nb * e];
        for (src, dst) in natural.chunks_exact(e).zip(xq.chunks_exact_mut(e)) {
            for s in 0..cpb {
                for j in 0..32 {
                    dst[32 * s + j] = src[cpb * j + s];
                }
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
}

/// The bias term's sum of group `g`: `unit_g Σ x_q`, the sum of the int8 activations the codes
/// meet, not the exact `Σ x_g` (module header, "Accuracy"). `|qsum| <= 128 * 127`: exact in f32.
#[inline]
pub(crate) fn quantised_sum(unit: f32, qsum: i32) -> f32 {
    unit * qsum as f32
}

/// Quantises `x` per group of `group` into `q` (natural order), pushing each group's unit
/// (`max|x_g| / 127`) and bias-term sum (`quantised_sum`); false when a group holds a non-finite
/// value (or sums past f32's range). Shared by the matvec's preparation and the batched one
/// (`int8mm::Batch`).
pub(crate) fn quantize_groups(
    group: usize,
    x: &[f32],
    q: &mut [i8],
    unit: &mut Vec<f32>,
    xsum: &mut Vec<f32>,
) -> bool {
    for (xg, qg) in x.chunks_exact(group).zip(q.chunks_exact_mut(group)) {
        let sum = super::lanes::sum8(xg);
        // A NaN or infinity anywhere in the group makes its sum non-finite.
        if !sum.is_finite() {
            return false;
        }
        let sx = xg.iter().fold(0f32, |m, v| m.max(v.abs()));
        let inv = if sx > 0.0 { XQ_MAX / sx } else { 0.0 };
        let mut qsum = 0i32;
        for (q, v) in qg.iter_mut().zip(xg) {
            // Ties to even, as `_mm256_cvtps_epi32` rounds, so both preps agree exactly.
            *q = (v * inv).round_ties_even() as i8;
            qsum += *q as i32;
        }
        let u = sx / XQ_MAX;
        unit.push(u);
        xsum.push(quantised_sum(u, qsum));
    }
    true
}

/// `x` as llama.cpp's Q8_0 activations hold it (`quantize_row_q8_0_ref`): per block of 32
/// elements `d = max|x| / 127`, `q = round(x / d)` (ties away from zero, as `roundf`), and the
/// value `q * f16(d)`. For `ActQuant::Q8_0Ref`, the yardstick of the int8 path's accuracy.
pub(crate) fn q8_0_round(x: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for b in x.chunks(32) {
        let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / XQ_MAX;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let dh = half::f16::from_f32(d).to_f32();
        out.extend(b.iter().map(|v| (v * id).round() * dh));
    }
    out
}

/// Per row: `f_g = scale_g * unit_g` into `fbuf[..ng]` (the factor of a group's integer dot),
/// the row's scales into `sbuf[..ng]` and biases into `bbuf[..ng]`.
#[inline]
pub(crate) fn row_factors(
    a: &AffineView,
    prep: &Int8Prep,
    row: usize,
    sbuf: &mut [f32],
    fbuf: &mut [f32],
    bbuf: &mut [f32],
) {
    let ng = a.groups_per_row();
    a.scales.to_f32_into(row * ng, &mut sbuf[..ng]);
    a.biases.to_f32_into(row * ng, &mut bbuf[..ng]);
    for ((f, s), u) in fbuf[..ng].iter_mut().zip(&sbuf[..ng]).zip(&prep.unit) {
        *f = s * u;
    }
}

/// `Σ_{j >= nb E} q_j x_j scale_g(j)` in f32 for row `row`, the columns past the last whole
/// block.
#[inline]
pub(crate) fn tail_dot(a: &AffineView, row: usize, prep: &Int8Prep) -> f32 {
    let bits = a.bits as usize;
    let mask = (1u32 << bits) - 1;
    let start = a.cols - prep.tail.len();
    let wrow = &a.w[row * a.words_per_row()..(row + 1) * a.words_per_row()];
    let g0 = row * a.groups_per_row();
    let mut t = 0f32;
    for (j, xj) in (start..a.cols).zip(&prep.tail) {
        let q = (wrow[j * bits / 32] >> ((j * bits) % 32)) & mask;
        t += q as f32 * xj * a.scales.get(g0 + j / a.group);
    }
    t
}

/// `y[i] = row (r0 + i) · x` for a 2- or 4-bit affine matrix with int8 activations, portable
/// twin of `x86::int8_rows`: the same integer dot per word, f32 after that.
pub(crate) fn int8_rows(a: &AffineView, prep: &Int8Prep, r0: usize, y: &mut [f32]) {
    assert!(matches!(a.bits, 2 | 4) && prep.bits == a.bits);
    let bits = a.bits as usize;
    let cpb = codes_per_byte(a.bits);
    let e = block_elems(a.bits);
    let nb = a.cols / e;
    assert!(r0 + y.len() <= a.rows && prep.xq.len() == nb * e);
    assert_eq!(prep.tail.len(), a.cols - nb * e);
    let ng = a.groups_per_row();
    let wpr = a.words_per_row();
    let mask = (1u8 << bits) - 1;
    // Lanes (words) of a block that share one group; >= 8: the whole block is in one group.
    let lpg = a.group / (32 / bits);
    let (mut sbuf, mut fbuf, mut bbuf) = (vec![0f32; ng], vec![0f32; ng], vec![0f32; ng]);
    for (i, yi) in y.iter_mut().enumerate() {
        let row = r0 + i;
        row_factors(a, prep, row, &mut sbuf, &mut fbuf, &mut bbuf);
        let wrow = &a.w[row * wpr..(row + 1) * wpr];
        let mut acc = [0f32; 8];
        for b in 0..nb {
            let xb = &prep.xq[b * e..(b + 1) * e];
            let g0 = (b * e) / a.group;
            for l in 0..8 {
                let bytes = wrow[b * 8 + l].to_le_bytes();
                let mut d = 0i32;
                for (c, &byte) in bytes.iter().enumerate() {
                    let j = 4 * l + c;
                    for s in 0..cpb {
                        let q = (byte >> (bits * s)) & mask;
                        d += q as i32 * xb[32 * s + j] as i32;
                    }
                }
                acc[l] += d as f32 * fbuf[g0 + l / lpg];
            }
        }
        *yi = acc.iter().sum::<f32>() + tail_dot(a, row, prep) + dot8(&bbuf, &prep.xsum);
    }
}
