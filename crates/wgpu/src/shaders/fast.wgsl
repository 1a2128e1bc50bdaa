// The affine products for GPUs (after scales.wgsl and the constants that `shaders::fast`
// writes per adapter: BITS, R rows per lane group, TB tokens, LG lanes per row, WGS threads).
// A lane group of LG consecutive invocations shares R rows; each lane reads 16-byte chunks
// of the rows (4 words of codes), loads the matching x once for the R rows, and folds the
// dequantisation into the dot product, `s * sum(q * x) + b * sum(x)` per group (the FMA form
// of the reference design: one multiply-add per code). The lane sums are added by
// `reduce` (subgroup or workgroup variant, see reduce_*.wgsl). Bindings and layout: fast_io.wgsl.

// Codes as floats without an integer conversion (a quarter-rate instruction on NVIDIA):
// 2^23 + q has q in its mantissa, exactly; subtracting 2^23 leaves q.
fn codes(q: vec4<u32>) -> vec4<f32> {
    return bitcast<vec4<f32>>(q | vec4<u32>(0x4b000000u)) - vec4<f32>(8388608.0);
}

// Rows row0..row0+R (those < rows) of the matrix whose codes start at vec4 `wbase4` and
// scales at `sbase` (biases `bdelta` elements after them, see mat.wgsl's row_dot), times x
// rows xrow0..xrow0+tn: this lane's share into acc.
fn rows_dot(m: M, wbase4: u32, sbase: u32, bdelta: u32, rows: u32, cols: u32, row0: u32, xrow0: u32, tn: u32, lane: u32) {
    for (var i = 0u; i < R * TB; i++) {
        acc[i] = 0.0;
    }
    let nv = cols / (4u * PER);
    let gw = m.group / PER;
    let ng = cols / m.group;
    for (var i = lane; i < nv; i += LG) {
        var wv: array<vec4<u32>, R>;
        for (var r = 0u; r < R; r++) {
            wv[r] = W4[wbase4 + min(row0 + r, rows - 1u) * nv + i];
        }
        for (var tt = 0u; tt < TB; tt++) {
            if tt >= tn {
                break;
            }
            let xb = (xrow0 + tt) * (cols / 4u) + i * 4u * XV;
            var qx: array<f32, R>;
            var sx = 0.0;
            for (var j = 0u; j < 4u; j++) {
                for (var k = 0u; k < XV; k++) {
                    let xv = X4[xb + j * XV + k];
                    sx += xv.x + xv.y + xv.z + xv.w;
                    let sh = (vec4<u32>(0u, 1u, 2u, 3u) + 4u * k) * BITS;
                    for (var r = 0u; r < R; r++) {
                        let q = codes((vec4<u32>(wv[r][j]) >> sh) & vec4<u32>(MASK));
                        qx[r] = fma(q.w, xv.w, fma(q.z, xv.z, fma(q.y, xv.y, fma(q.x, xv.x, qx[r]))));
                    }
                }
                // The end of a group (2-bit codes in groups of 32 end within a chunk) or of
                // the chunk: scale and bias once for the words since the last flush.
                if (j + 1u) % gw == 0u || j == 3u {
                    let g = (i * 4u + j) / gw;
                    for (var r = 0u; r < R; r++) {
                        let gi = sbase + min(row0 + r, rows - 1u) * ng + g;
                        let a = r * TB + tt;
                        acc[a] = fma(scale_at(gi, m.sfmt), qx[r], fma(bias_at(gi + bdelta, m.sfmt), sx, acc[a]));
                        qx[r] = 0.0;
                    }
                    sx = 0.0;
                }
            }
        }
    }
}
