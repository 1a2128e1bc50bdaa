//! [`CudaMat`]: a weight matrix on the device, alone or one member of a stacked group
//! ([`Backend::upload_group`](flashmoe_core::backend::Backend::upload_group)): how a group is
//! laid out, where a member starts, and whether matrices are one stack (one launch).
use std::sync::Arc;

use flashmoe_core::weights::Linear;

use crate::ops::{self, DMat, DevMat};

/// A weight matrix on the device: `m` (its own rows), inside `whole`, the matrix uploaded with
/// it. [`Backend::upload_group`] stacks a group's matrices into one `whole` (one launch for
/// all of them); [`Backend::upload_mat`] gives a matrix its own.
pub struct CudaMat {
    pub m: DevMat,
    pub(super) whole: Arc<DMat>,
    /// First row of `m` in `whole`.
    pub(super) row0: usize,
}

impl CudaMat {
    pub(super) fn alone(d: DMat) -> CudaMat {
        CudaMat {
            m: d.m,
            whole: Arc::new(d),
            row0: 0,
        }
    }
}

/// The stacked matrix `ws` are, in order, when they are all of one [`Backend::upload_group`].
pub(super) fn stacked<'a>(ws: &[&'a CudaMat]) -> Option<&'a DevMat> {
    let first = ws.first()?;
    let mut row = 0;
    for w in ws {
        if !Arc::ptr_eq(&w.whole, &first.whole) || w.row0 != row {
            return None;
        }
        row += w.m.rows;
    }
    (ws.len() > 1 && row == first.whole.m.rows).then_some(&first.whole.m)
}

/// First rows of `ws` stacked in one matrix, when they can be: one format and width, and each
/// member's weights, scales and biases starting 16-byte aligned (the kernels' loads), so a
/// member also runs alone (`matmul` of one of them, prefill).
pub(super) fn group_layout(ws: &[&Linear]) -> Option<Vec<usize>> {
    let fmt = ops::Fmt::of(ws.first()?).ok()?;
    let cols = ws[0].cols();
    let mut rows0 = Vec::with_capacity(ws.len());
    let mut row = 0;
    for w in ws {
        if ops::Fmt::of(w).ok()? != fmt || w.cols() != cols {
            return None;
        }
        let (a, b, c) = fmt.sizes(row, cols);
        if [a, b, c].iter().any(|o| o % 16 != 0) {
            return None;
        }
        rows0.push(row);
        row += w.rows();
    }
    (ws.len() > 1).then_some(rows0)
}

/// Rows `row0..row0 + rows` of the stacked matrix `whole`.
pub(super) fn member(whole: &DevMat, row0: usize, rows: usize) -> DevMat {
    let (a, b, c) = whole.fmt.sizes(row0, whole.cols);
    DevMat {
        rows,
        w: whole.w + a as u64,
        s: whole.s + b as u64,
        b: whole.b + c as u64,
        ..*whole
    }
}
