//! Affine quantisation of f32 matrices into the MLX format (arch-spec §11.3): MLX's reference
//! rule, and a plain min-max rule as the baseline it is measured against. Used to build test
//! weights and to re-quantise; never on the inference path.

use half::bf16;

/// Packs `codes [rows, cols]` (each `< 2^bits`) LSB-first into `[rows, cols * bits / 32]`.
fn pack(codes: &[u8], bits: u32) -> Vec<u32> {
    let bits = bits as usize;
    let mut w = vec![0u32; codes.len() * bits / 32];
    for (j, &q) in codes.iter().enumerate() {
        w[j * bits / 32] |= (q as u32) << ((j * bits) % 32);
    }
    w
}

fn check_shape(w: &[f32], rows: usize, cols: usize, bits: u32, group: usize) {
    assert!(
        matches!(bits, 2 | 4 | 8),
        "quantize: bits {bits} not in {{2, 4, 8}}"
    );
    assert!(
        matches!(group, 32 | 64 | 128),
        "quantize: group {group} not in {{32, 64, 128}}"
    );
    assert!(
        cols.is_multiple_of(group),
        "quantize: cols {cols} not a multiple of group {group}"
    );
    assert_eq!(w.len(), rows * cols, "quantize: w length vs rows * cols");
}

/// Quantises every group with `rule(group) -> (scale, bias)` (f32), rounds scale and bias to
/// bf16, then computes the codes against the *rounded* pair.
fn quantize_with(
    w: &[f32],
    rows: usize,
    cols: usize,
    bits: u32,
    group: usize,
    rule: impl Fn(&[f32], f32) -> (f32, f32),
) -> (Vec<u32>, Vec<bf16>, Vec<bf16>) {
    check_shape(w, rows, cols, bits, group);
    let n_bins = ((1u32 << bits) - 1) as f32;
    let ngroups = rows * cols / group;
    let mut scales = Vec::with_capacity(ngroups);
    let mut biases = Vec::with_capacity(ngroups);
    let mut codes = vec![0u8; rows * cols];
    for (wg, qg) in w.chunks_exact(group).zip(codes.chunks_exact_mut(group)) {
        let (scale, bias) = rule(wg, n_bins);
        let (s, b) = (bf16::from_f32(scale), bf16::from_f32(bias));
        let (sf, bf) = (s.to_f32(), b.to_f32());
        for (q, &v) in qg.iter_mut().zip(wg) {
            *q = ((v - bf) / sf).round_ties_even().clamp(0.0, n_bins) as u8;
        }
        scales.push(s);
        biases.push(b);
    }
    (pack(&codes, bits), scales, biases)
}

fn min_max(g: &[f32]) -> (f32, f32) {
    g.iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

/// MLX's affine rule (`mlx/ops.cpp` `affine_quantize` fallback), per group of `group` values:
///
/// ```text
/// scale = max((max - min) / (2^b - 1), 1e-7)
/// if |min| > |max| { edge = min } else { edge = max; scale = -scale }   // scale may be < 0
/// q0 = round(edge / scale)
/// if q0 != 0 { scale = edge / q0; bias = edge } else { bias = 0 }      // 0.0 exactly on the grid
/// q = clip(round((w - bias) / scale), 0, 2^b - 1)
/// ```
///
/// Scales and biases are returned in bf16, as MLX checkpoints converted from bf16 store them.
/// Choice: MLX computes `q` against the f32 scale and bias and rounds those to the storage dtype
/// afterwards; here `q` is computed against the *rounded* pair, so each code is the nearest one
/// for the values that will actually be used to dequantise. Codes can therefore differ from
/// MLX's by one where a value sits near a rounding boundary; the dequantisation error is never
/// larger. Rounding is to nearest, ties to even (`mx.round`).
///
/// Returns `(w [rows, cols * bits / 32], scales [rows, cols / group], biases [same])`.
pub fn quantize_affine(
    w: &[f32],
    rows: usize,
    cols: usize,
    bits: u32,
    group: usize,
) -> (Vec<u32>, Vec<bf16>, Vec<bf16>) {
    quantize_with(w, rows, cols, bits, group, |g, n_bins| {
        let (lo, hi) = min_max(g);
        let mut scale = ((hi - lo) / n_bins).max(1e-7);
        let edge = if lo.abs() > hi.abs() {
            lo
        } else {
            scale = -scale;
            hi
        };
        let q0 = (edge / scale).round_ties_even();
        if q0 != 0.0 {
            (edge / q0, edge)
        } else {
            (scale, 0.0)
        }
    })
}

/// Plain min-max affine quantisation, the baseline for `quantize_affine`'s error:
/// `scale = max((max - min) / (2^b - 1), 1e-7)`, `bias = min`, then as `quantize_affine`
/// (bf16 rounding of the pair, codes against the rounded pair). Same return layout.
pub fn quantize_minmax(
    w: &[f32],
    rows: usize,
    cols: usize,
    bits: u32,
    group: usize,
) -> (Vec<u32>, Vec<bf16>, Vec<bf16>) {
    quantize_with(w, rows, cols, bits, group, |g, n_bins| {
        let (lo, hi) = min_max(g);
        (((hi - lo) / n_bins).max(1e-7), lo)
    })
}
