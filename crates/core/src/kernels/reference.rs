//! Plain twins of the fast products: dequantise element by element, accumulate in f64.
//! These define the formats (arch-spec §11.3) and are what the tests compare the fast kernels
//! against. Never optimise them; clarity is their job.

use super::{AffineView, WeightView};

/// The unsigned code of element `j` of row `row`: `bits` bits taken LSB-first from word
/// `j * bits / 32` of the row, at bit offset `(j * bits) % 32`.
#[inline]
pub(crate) fn code(a: &AffineView, row: usize, j: usize) -> u32 {
    let bits = a.bits as usize;
    let word = a.w[row * a.words_per_row() + j * bits / 32];
    (word >> ((j * bits) % 32)) & ((1u32 << bits) - 1)
}

/// Dequantises row `row` of `w` into `out [cols]`: `out[j] = scale * q + bias` of `j`'s group.
pub fn dequantize_row(w: &AffineView, row: usize, out: &mut [f32]) {
    w.check();
    assert!(row < w.rows, "dequantize_row: row {row} of {}", w.rows);
    assert_eq!(out.len(), w.cols, "dequantize_row: out length vs cols");
    let ng = w.groups_per_row();
    for (j, o) in out.iter_mut().enumerate() {
        let g = row * ng + j / w.group;
        *o = w.scales.get(g) * code(w, row, j) as f32 + w.biases.get(g);
    }
}

/// The whole matrix as f32, `[rows, cols]`.
pub fn dequantize(w: &WeightView) -> Vec<f32> {
    w.check();
    let (rows, cols) = (w.rows(), w.cols());
    match w {
        WeightView::F32 { data, .. } => data.to_vec(),
        WeightView::Bf16 { data, .. } => data.iter().map(|v| v.to_f32()).collect(),
        WeightView::F16 { data, .. } => data.iter().map(|v| v.to_f32()).collect(),
        WeightView::Affine(a) => {
            let mut out = vec![0f32; rows * cols];
            for (r, o) in out.chunks_exact_mut(cols.max(1)).enumerate().take(rows) {
                dequantize_row(a, r, o);
            }
            out
        }
    }
}

fn element(w: &WeightView, row: usize, j: usize) -> f64 {
    let cols = w.cols();
    match w {
        WeightView::F32 { data, .. } => data[row * cols + j] as f64,
        WeightView::Bf16 { data, .. } => data[row * cols + j].to_f64(),
        WeightView::F16 { data, .. } => data[row * cols + j].to_f64(),
        WeightView::Affine(a) => {
            let g = row * a.groups_per_row() + j / a.group;
            a.scales.get(g) as f64 * code(a, row, j) as f64 + a.biases.get(g) as f64
        }
    }
}

/// `y = W x`, one element at a time in f64.
pub fn matvec_ref(w: &WeightView, x: &[f32], y: &mut [f32]) {
    w.check();
    assert_eq!(x.len(), w.cols(), "matvec_ref: x length vs cols");
    assert_eq!(y.len(), w.rows(), "matvec_ref: y length vs rows");
    for (r, yr) in y.iter_mut().enumerate() {
        let mut acc = 0f64;
        for (j, xj) in x.iter().enumerate() {
            acc += element(w, r, j) * *xj as f64;
        }
        *yr = acc as f32;
    }
}

/// `y[i] = W x[i]` for `x [n, cols]`, `y [n, rows]`, one `matvec_ref` per input.
pub fn matmul_ref(w: &WeightView, x: &[f32], n: usize, y: &mut [f32]) {
    let (rows, cols) = (w.rows(), w.cols());
    assert_eq!(x.len(), n * cols, "matmul_ref: x length vs n * cols");
    assert_eq!(y.len(), n * rows, "matmul_ref: y length vs n * rows");
    for i in 0..n {
        matvec_ref(
            w,
            &x[i * cols..(i + 1) * cols],
            &mut y[i * rows..(i + 1) * rows],
        );
    }
}
