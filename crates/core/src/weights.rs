//! Weight matrices as the forward pass sees them: [`Linear`] (dense f32/bf16/f16 or MLX affine
//! 2/4/8-bit), loaded from a [`TensorStore`] with every shape and dtype checked against the
//! config so a wrong checkpoint fails at load time with the tensor's name, never mid-token.
use half::{bf16, f16};

use crate::buf::Buf;
use crate::error::{Error, Result};
use crate::kernels::{AffineView, Scales, WeightView};
use crate::store::{DType, TensorEntry, TensorStore};

/// A weight matrix W [rows, cols]; y = W x.
#[derive(Clone)]
pub enum Linear {
    Dense {
        dtype: DType,
        rows: usize,
        cols: usize,
        data: Buf,
    },
    Affine {
        bits: u32,
        group: usize,
        rows: usize,
        cols: usize,
        /// [rows, cols*bits/32] u32, LSB-first.
        w: Buf,
        /// [rows, cols/group] each, in `sdtype`.
        scales: Buf,
        biases: Buf,
        sdtype: DType,
    },
}

fn scales_of(b: &Buf, dt: DType) -> Scales<'_> {
    match dt {
        DType::BF16 => Scales::Bf16(b.typed::<bf16>()),
        DType::F16 => Scales::F16(b.typed::<f16>()),
        _ => Scales::F32(b.typed::<f32>()),
    }
}

impl Linear {
    pub fn rows(&self) -> usize {
        match self {
            Linear::Dense { rows, .. } | Linear::Affine { rows, .. } => *rows,
        }
    }
    pub fn cols(&self) -> usize {
        match self {
            Linear::Dense { cols, .. } | Linear::Affine { cols, .. } => *cols,
        }
    }
    /// Bytes a product with this matrix reads.
    pub fn nbytes(&self) -> usize {
        match self {
            Linear::Dense { data, .. } => data.len(),
            Linear::Affine {
                w, scales, biases, ..
            } => w.len() + scales.len() + biases.len(),
        }
    }
    pub fn view(&self) -> WeightView<'_> {
        match self {
            Linear::Dense {
                dtype,
                rows,
                cols,
                data,
            } => match dtype {
                DType::BF16 => WeightView::Bf16 {
                    rows: *rows,
                    cols: *cols,
                    data: data.typed(),
                },
                DType::F16 => WeightView::F16 {
                    rows: *rows,
                    cols: *cols,
                    data: data.typed(),
                },
                _ => WeightView::F32 {
                    rows: *rows,
                    cols: *cols,
                    data: data.typed(),
                },
            },
            Linear::Affine {
                bits,
                group,
                rows,
                cols,
                w,
                scales,
                biases,
                sdtype,
            } => WeightView::Affine(AffineView {
                bits: *bits,
                group: *group,
                rows: *rows,
                cols: *cols,
                w: w.typed(),
                scales: scales_of(scales, *sdtype),
                biases: scales_of(biases, *sdtype),
            }),
        }
    }

    /// Rows [start, start+n) as their own matrix (no copy).
    pub fn slice_rows(&self, start: usize, n: usize) -> Linear {
        self.with_rows(n, |b, row_bytes| b.slice(start * row_bytes, n * row_bytes))
    }

    /// The rows of `ranges` (start, count), in that order, as one matrix: a copy into a heap
    /// buffer (one contiguous range is a view, as [`Linear::slice_rows`]). Used once at load to
    /// reorder interleaved projections.
    pub fn gather_rows(&self, ranges: &[(usize, usize)]) -> Linear {
        if let [(s, n)] = ranges {
            return self.slice_rows(*s, *n);
        }
        let rows: usize = ranges.iter().map(|r| r.1).sum();
        self.with_rows(rows, |b, row_bytes| {
            let mut v = Vec::with_capacity(rows * row_bytes);
            for &(s, n) in ranges {
                v.extend_from_slice(&b.bytes()[s * row_bytes..][..n * row_bytes]);
            }
            Buf::from_vec(&v)
        })
    }

    /// This matrix with `rows` rows, each of its row-major buffers replaced by `pick(buffer,
    /// bytes per row)`: the one place that knows which buffers a format has and their row sizes.
    fn with_rows(&self, rows: usize, pick: impl Fn(&Buf, usize) -> Buf) -> Linear {
        match self {
            Linear::Dense {
                dtype, cols, data, ..
            } => Linear::Dense {
                dtype: *dtype,
                rows,
                cols: *cols,
                data: pick(data, cols * dtype.size()),
            },
            Linear::Affine {
                bits,
                group,
                cols,
                w,
                scales,
                biases,
                sdtype,
                ..
            } => {
                let sb = cols / group * sdtype.size();
                Linear::Affine {
                    bits: *bits,
                    group: *group,
                    rows,
                    cols: *cols,
                    w: pick(w, cols * *bits as usize / 8),
                    scales: pick(scales, sb),
                    biases: pick(biases, sb),
                    sdtype: *sdtype,
                }
            }
        }
    }

    /// Row `r` dequantized to f32 (embedding lookup).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let one = self.slice_rows(r, 1);
        out.copy_from_slice(&crate::kernels::dequantize(&one.view()));
    }
}

fn bad(t: &TensorEntry, expected: String) -> Error {
    Error::BadTensor {
        name: t.orig_name.clone(),
        file: t.file.clone(),
        expected,
        found: format!("{:?} {:?}", t.dtype, t.shape),
    }
}

fn float_dtype(t: &TensorEntry) -> Result<DType> {
    match t.dtype {
        DType::F32 | DType::F16 | DType::BF16 => Ok(t.dtype),
        _ => Err(bad(t, "a float tensor (f32, f16 or bf16)".into())),
    }
}

/// Loads a matrix whose logical shape is `lead ++ [rows, cols]` flattened to
/// [prod(lead)*rows, cols]. `weight` names the tensor; if it is packed (u32 with a quant spec)
/// `{base}.scales` and `{base}.biases` are read beside it, where `base` is `weight` less a
/// trailing `.weight`.
pub fn load_matrix(
    store: &TensorStore,
    weight: &str,
    lead: &[usize],
    rows: usize,
    cols: usize,
) -> Result<Linear> {
    let t = store.get(weight)?;
    let mut want: Vec<usize> = lead.to_vec();
    want.push(rows);
    let total_rows: usize = lead.iter().product::<usize>() * rows;
    if let (DType::U32, Some(q)) = (t.dtype, t.quant) {
        let base = weight.strip_suffix(".weight").unwrap_or(weight);
        let s = store.get(&format!("{base}.scales"))?;
        let b = store.get(&format!("{base}.biases"))?;
        let bits = q.bits as usize;
        let mut ws = want.clone();
        ws.push(cols * bits / 32);
        let mut ss = want.clone();
        ss.push(cols / q.group_size);
        if !cols.is_multiple_of(q.group_size) || !(cols * bits).is_multiple_of(32) || t.shape != ws
        {
            return Err(bad(
                t,
                format!("u32 {ws:?} ({}-bit, group {})", q.bits, q.group_size),
            ));
        }
        let sdt = float_dtype(s)?;
        if s.shape != ss {
            return Err(bad(s, format!("{ss:?}")));
        }
        if b.shape != ss || b.dtype != sdt {
            return Err(bad(b, format!("{sdt:?} {ss:?}")));
        }
        return Ok(Linear::Affine {
            bits: q.bits,
            group: q.group_size,
            rows: total_rows,
            cols,
            w: t.buf.aligned::<u32>(),
            scales: s.buf.aligned::<u32>(),
            biases: b.buf.aligned::<u32>(),
            sdtype: sdt,
        });
    }
    want.push(cols);
    let dt = float_dtype(t)?;
    if t.shape != want {
        return Err(bad(t, format!("shape {want:?}")));
    }
    Ok(Linear::Dense {
        dtype: dt,
        rows: total_rows,
        cols,
        data: t.buf.aligned::<u32>(),
    })
}

/// `{prefix}.weight` as a [rows, cols] matrix.
pub fn load_linear(store: &TensorStore, prefix: &str, rows: usize, cols: usize) -> Result<Linear> {
    load_matrix(store, &format!("{prefix}.weight"), &[], rows, cols)
}

/// A float tensor of `len` elements (any shape with that many elements) as f32.
pub fn load_vec(store: &TensorStore, name: &str, len: usize) -> Result<Vec<f32>> {
    let t = store.get(name)?;
    let dt = float_dtype(t)?;
    let n: usize = t.shape.iter().product();
    if n != len {
        return Err(bad(t, format!("{len} elements")));
    }
    let b = t.buf.bytes();
    Ok(match dt {
        DType::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::BF16 => b
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => b
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    })
}
