// Weight access of matmul, the expert batch and embed (after scales.wgsl): `W` as words.
@group(0) @binding(1) var<storage, read> W: array<u32>;

// Element `i` of a dense 16/32-bit array in format `f` (0 f32, 1 bf16, 2 f16).
fn w_at(i: u32, f: u32) -> f32 {
    if f == 0u {
        return bitcast<f32>(W[i]);
    }
    return half_to_f32(half_bits(W[i >> 1u], i), f);
}

// Element (row, c) of a matrix of `cols` columns whose data starts at `wbase` (format units:
// elements for dense, words for affine) and whose scales start at `sbase` (elements).
fn deq(m: M, wbase: u32, sbase: u32, cols: u32, row: u32, c: u32) -> f32 {
    if m.fmt < 3u {
        return w_at(wbase + row * cols + c, m.fmt);
    }
    let per = 32u / m.bits;
    let word = W[wbase + row * (cols / per) + c / per];
    let q = (word >> ((c % per) * m.bits)) & ((1u << m.bits) - 1u);
    let g = sbase + row * (cols / m.group) + c / m.group;
    return f32(q) * scale_at(g, m.sfmt) + bias_at(g, m.sfmt);
}

const WG: u32 = 64u;
const TB: u32 = 8u;
var<private> acc: array<f32, 8>;
var<workgroup> red: array<f32, 512>;

// acc[tt] = W[row] . X[xrow0 + tt] for tt < tn, over this thread's share of the columns
// (from `tid` in steps of `step`: WG when a workgroup shares a row, 1 when a thread owns it).
// A group's bias is element `bdelta` after its scale's index (0 where S and Bz are separate
// buffers; the offset of the biases from the scales where one slot buffer holds both).
// The affine form folds the dequantisation: sum over a word of q*x, times the scale, plus the
// bias times the sum of x (one multiply per code instead of a dequantised weight).
fn row_dot(m: M, wbase: u32, sbase: u32, bdelta: u32, cols: u32, row: u32, xrow0: u32, tn: u32, tid: u32, step: u32) {
    for (var tt = 0u; tt < TB; tt++) {
        acc[tt] = 0.0;
    }
    if m.fmt < 3u {
        for (var c = tid; c < cols; c += step) {
            let w = w_at(wbase + row * cols + c, m.fmt);
            for (var tt = 0u; tt < tn; tt++) {
                acc[tt] = fma(w, X[(xrow0 + tt) * cols + c], acc[tt]);
            }
        }
        return;
    }
    let per = 32u / m.bits;
    let nw = cols / per;
    let mask = (1u << m.bits) - 1u;
    let ng = cols / m.group;
    for (var i = tid; i < nw; i += step) {
        let word = W[wbase + row * nw + i];
        let c0 = i * per;
        let g = sbase + row * ng + c0 / m.group;
        let s = scale_at(g, m.sfmt);
        let b = bias_at(g + bdelta, m.sfmt);
        for (var tt = 0u; tt < tn; tt++) {
            let xb = (xrow0 + tt) * cols + c0;
            var qx = 0.0;
            var sx = 0.0;
            for (var k = 0u; k < per; k++) {
                let xv = X[xb + k];
                qx = fma(f32((word >> (k * m.bits)) & mask), xv, qx);
                sx += xv;
            }
            acc[tt] = fma(s, qx, fma(b, sx, acc[tt]));
        }
    }
}

// Sums acc over the workgroup: afterwards red[tt * WG] holds token tt's dot product.
fn reduce_acc(tid: u32) {
    for (var tt = 0u; tt < TB; tt++) {
        red[tt * WG + tid] = acc[tt];
    }
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if tid < s {
            for (var tt = 0u; tt < TB; tt++) {
                red[tt * WG + tid] += red[tt * WG + tid + s];
            }
        }
        workgroupBarrier();
    }
}
