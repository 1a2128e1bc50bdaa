// The one-token affine products (decode): fast.wgsl's `rows_dot` for TB = 1, after scales.wgsl
// and the constants `shaders::Fast` writes (BITS, R, TB, LG, WGS, and SPAN chunks per lane
// step, GROUP columns per scale, SFMT the scales' dtype). Against fast.wgsl: the group and the
// scale dtype are constants (no branch on the dtype per group), a lane issues all R * SPAN of
// its 16-byte loads of a step before it uses one, the codes become floats without a shift per
// code (`codes4`), and each row's products go into a vec4 (four independent chains of FMAs
// per row, not one serial chain per word). Chunks stay interleaved over the lanes (lane l
// reads chunks l, l + LG, ...), so each load of a subgroup is one contiguous span.

// Codes per 16-bit half of a word, words per group (the rest of the layout: fast_io.wgsl).
const HALF: u32 = PER / 2u;
const GW: u32 = GROUP / PER;

// Codes c0..c0+3 of a word as floats (`lo` the word, `hi` its upper half shifted down). A code
// at bit p of its half (p + BITS <= 16) placed in the mantissa of 2^(23-p), whose last place
// is worth 2^-p, reads 2^(23-p) + q exactly; subtracting 2^(23-p) leaves q, exactly. With c0
// a constant (the loops over a word unroll) masks and exponents are constants: an and, an or
// and a subtract per code, one shift per word (fast.wgsl: a shift more per code).
fn codes4(lo: u32, hi: u32, c0: u32) -> vec4<f32> {
    let c = vec4<u32>(c0) + vec4<u32>(0u, 1u, 2u, 3u);
    let p = (c % vec4<u32>(HALF)) * BITS;
    let src = select(vec4<u32>(lo), vec4<u32>(hi), c >= vec4<u32>(HALF));
    let one = (vec4<u32>(150u) - p) << vec4<u32>(23u);
    return bitcast<vec4<f32>>((src & (vec4<u32>(MASK) << p)) | one) - bitcast<vec4<f32>>(one);
}

// Rows row0..row0+R (those < rows) of the matrix whose codes start at vec4 `wbase4` and scales
// at `sbase` (biases `bdelta` elements after them), times x row `xrow0`: this lane's share into
// acc (fast.wgsl's signature; `m` and `tn` are constants here).
fn rows_dot(m: M, wbase4: u32, sbase: u32, bdelta: u32, rows: u32, cols: u32, row0: u32, xrow0: u32, tn: u32, lane: u32) {
    let nv = cols / (4u * PER);
    let ng = cols / GROUP;
    let xb = xrow0 * (cols / 4u);
    var rs = rows_at(wbase4, sbase, rows, row0, nv, ng);
    for (var i0 = lane; i0 < nv; i0 += LG * SPAN) {
        var wv = step_loads(rs, i0, nv);
        for (var u = 0u; u < SPAN; u++) {
            let i = i0 + u * LG;
            if i >= nv {
                break;
            }
            var qx: array<vec4<f32>, R>;
            var sx = vec4<f32>(0.0);
            for (var j = 0u; j < 4u; j++) {
                for (var k = 0u; k < XV; k++) {
                    let xv = X4[xb + (i * 4u + j) * XV + k];
                    sx += xv;
                    for (var r = 0u; r < R; r++) {
                        let w = wv[u * R + r][j];
                        qx[r] = fma(codes4(w, w >> 16u, 4u * k), xv, qx[r]);
                    }
                }
                // The end of a group (within the chunk where groups are shorter) or of the
                // chunk: scale and bias once for the words since the last flush.
                if (j + 1u) % GW == 0u || j == 3u {
                    let g = (i * 4u + j) / GW;
                    let s1 = (sx.x + sx.y) + (sx.z + sx.w);
                    for (var r = 0u; r < R; r++) {
                        let gi = rs.s[r] + g;
                        let q = qx[r];
                        let d = (q.x + q.y) + (q.z + q.w);
                        acc[r] = fma(scale_at(gi, SFMT), d, fma(bias_at(gi + bdelta, SFMT), s1, acc[r]));
                        qx[r] = vec4<f32>(0.0);
                    }
                    sx = vec4<f32>(0.0);
                }
            }
        }
    }
}
