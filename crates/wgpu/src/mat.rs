//! Weight matrices on the device in their stored format (`mat.wgsl` reads them): the bytes
//! of a [`Linear`] as they are, split into row parts where one would exceed the adapter's
//! storage binding size (a 248,320-row head at 4 bits is ~0.5 GB).
use flashmoe_core::error::Result;
use flashmoe_core::store::DType;
use flashmoe_core::weights::Linear;

use crate::device::Wgpu;
use crate::op_err;

/// Format words of the `M` struct in `mat.wgsl`: fmt, bits, group, scale format.
pub(crate) fn format_words(w: &Linear) -> Result<[u32; 4]> {
    let half = |d: DType| match d {
        DType::F32 => Ok(0),
        DType::BF16 => Ok(1),
        DType::F16 => Ok(2),
        d => Err(op_err("upload_mat", format!("unsupported dtype {d:?}"))),
    };
    Ok(match w {
        Linear::Dense { dtype, .. } => [half(*dtype)?, 0, 0, 0],
        Linear::Affine {
            bits,
            group,
            sdtype,
            cols,
            ..
        } => {
            if !matches!(bits, 2 | 4 | 8) || cols % group != 0 || group % (32 / *bits as usize) != 0
            {
                return Err(op_err(
                    "upload_mat",
                    format!("affine {bits}-bit group {group} over {cols} columns"),
                ));
            }
            [3, *bits, *group as u32, half(*sdtype)?]
        }
    })
}

/// Bytes per row of `w`'s data and of its scales (0 for dense).
pub(crate) fn row_bytes(w: &Linear) -> (usize, usize) {
    match w {
        Linear::Dense { dtype, cols, .. } => (cols * dtype.size(), 0),
        Linear::Affine {
            bits,
            group,
            cols,
            sdtype,
            ..
        } => (cols * *bits as usize / 8, cols / group * sdtype.size()),
    }
}

/// The byte arrays of `w`: data, scales, biases (empty for dense).
pub(crate) fn parts_of(w: &Linear) -> (&[u8], &[u8], &[u8]) {
    match w {
        Linear::Dense { data, .. } => (data.bytes(), &[], &[]),
        Linear::Affine {
            w, scales, biases, ..
        } => (w.bytes(), scales.bytes(), biases.bytes()),
    }
}

/// Rows `row0..row0+rows` of a matrix.
pub(crate) struct Part {
    pub row0: usize,
    pub rows: usize,
    pub w: wgpu::Buffer,
    pub s: Option<wgpu::Buffer>,
    pub b: Option<wgpu::Buffer>,
}

/// A weight matrix on the device.
pub struct GMat {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) m: [u32; 4],
    pub(crate) parts: Vec<Part>,
}

impl Wgpu {
    pub(crate) fn mat(&self, w: &Linear) -> Result<GMat> {
        let m = format_words(w)?;
        let (rows, cols) = (w.rows(), w.cols());
        let (rb, sb) = row_bytes(w);
        let (data, sc, bi) = parts_of(w);
        if data.len() < rows * rb || sc.len() < rows * sb || bi.len() < rows * sb {
            return Err(op_err(
                "upload_mat",
                format!("[{rows}x{cols}] matrix with {} data bytes", data.len()),
            ));
        }
        // Rows per part: within the binding size, and even so that a 16-bit part starts on a
        // word.
        let max = self.max_binding() as usize;
        let per = ((max / rb.max(1)).min(rows.max(1)) & !1)
            .max(2)
            .min(rows.max(1));
        let mut parts = Vec::new();
        let mut r0 = 0;
        while r0 < rows {
            let n = per.min(rows - r0);
            let s = (sb > 0).then(|| self.buffer_with(&sc[r0 * sb..(r0 + n) * sb]));
            let b = (sb > 0).then(|| self.buffer_with(&bi[r0 * sb..(r0 + n) * sb]));
            parts.push(Part {
                row0: r0,
                rows: n,
                w: self.buffer_with(&data[r0 * rb..(r0 + n) * rb]),
                s,
                b,
            });
            r0 += n;
        }
        Ok(GMat {
            rows,
            cols,
            m,
            parts,
        })
    }
}
