// The one-token affine products in half precision: fast_dec.wgsl's loop (same constants, loads
// and flushes) with the codes and x as f16 and the products as vec4<f16> FMAs (two codes per
// lane of a packed half-precision unit), for devices with SHADER_F16 (`shaders::Fast` puts
// `enable f16;` first). Each flush (the end of a group or of a lane's 16-byte chunk) converts
// the row's partial sums to f32 before the scale and bias fold; sums across groups and lanes
// stay f32, and so does the sum of x for the bias. `Fast::for_product` runs it for 2- and 4-bit
// codes only (8-bit matrices run fast_dec.wgsl); the arithmetic below holds for 8 bits too.
//
// Range and rounding: a code q enters as q' = (q - 2^(BITS-1)) * 2^-BITS, exact in f16 and in
// [-1/2, 1/2) (the bias absorbs the shift, the scale the 2^-BITS: y = s 2^BITS sum(q' x) +
// (b + s 2^(BITS-1)) sum(x)). A partial's component adds PER products of a chunk (8 at 4
// bits), so it stays below PER / 2 * max|x| and overflows f16 only past |x| ~ 8000 (2 bits),
// 16000 (4 bits) or 32000 (8 bits); x itself overflows f16 past 65504. x and each FMA round
// at 2^-11 relative (2^-24 in f32): a product's NMSE is ~3e-7 against ~1e-14 (tests/products.rs).

const HALF: u32 = PER / 2u;
const GW: u32 = GROUP / PER;
// 2^-BITS (codes in [-1/2, 1/2)), 2^BITS (undone in the scale) and the shift 2^(BITS-1).
const QS: f32 = 1.0 / f32(1u << BITS);
const QUP: f32 = f32(1u << BITS);
const QMID: f32 = f32(1u << (BITS - 1u));

// Place of code c of a word within its 16-bit half, after the shift by 8 that codes past the
// half's first byte get (so that p + BITS <= 10: the code fits an f16 mantissa).
fn place(c: u32) -> u32 {
    return (c * BITS) % 8u;
}

// Codes c and c + HALF of word w (the same place in each half) as f32 pairs 2^(10-p) + q,
// exactly: each half becomes an f16 of exponent 2^(10-p) whose mantissa holds q at bit p
// (fast_dec.wgsl's trick at half width: an and and an or per two codes). naga has no
// `bitcast<vec2<f16>>(u32)` (it keeps the width), so the halves go out through
// unpack2x16float and back by a conversion that is exact, which a compiler may fold to nothing
// (Metal's `float2(as_type<half2>(..))` then `half4(..)` surely; NVIDIA's Vulkan: to measure).
fn pair(w: u32, c: u32) -> vec2<f32> {
    let src = select(w, w >> 8u, c * BITS >= 8u);
    let p = place(c);
    let one = ((25u - p) << 10u) * 0x10001u;
    return unpack2x16float((src & ((MASK << p) * 0x10001u)) | one);
}

// What `pair(w, c)` times 2^-BITS exceeds q' by.
fn off(c: u32) -> f16 {
    return f16((f32(1u << (10u - place(c))) + QMID) * QS);
}

// Rows row0..row0+R (those < rows) of the matrix whose codes start at vec4 `wbase4` and scales
// at `sbase` (biases `bdelta` elements after them), times x row `xrow0`: this lane's share into
// acc (fast_dec.wgsl's signature).
fn rows_dot(m: M, wbase4: u32, sbase: u32, bdelta: u32, rows: u32, cols: u32, row0: u32, xrow0: u32, tn: u32, lane: u32) {
    let nv = cols / (4u * PER);
    let ng = cols / GROUP;
    let xb = xrow0 * (cols / 4u);
    let qs = vec4<f16>(f16(QS));
    var rs = rows_at(wbase4, sbase, rows, row0, nv, ng);
    for (var i0 = lane; i0 < nv; i0 += LG * SPAN) {
        var wv = step_loads(rs, i0, nv);
        for (var u = 0u; u < SPAN; u++) {
            let i = i0 + u * LG;
            if i >= nv {
                break;
            }
            var qx: array<vec4<f16>, R>;
            var sx = vec4<f32>(0.0);
            for (var j = 0u; j < 4u; j++) {
                // The word's x in f16, once for the R rows.
                var xs: array<vec4<f16>, XV>;
                for (var k = 0u; k < XV; k++) {
                    let xv = X4[xb + (i * 4u + j) * XV + k];
                    sx += xv;
                    xs[k] = vec4<f16>(xv);
                }
                // Codes c, c + HALF, c + 1, c + 1 + HALF against their x.
                for (var c = 0u; c < HALF; c += 2u) {
                    let a = c + HALF;
                    let x4 = vec4<f16>(xs[c / 4u][c % 4u], xs[a / 4u][a % 4u], xs[c / 4u][c % 4u + 1u], xs[a / 4u][a % 4u + 1u]);
                    let o = vec4<f16>(off(c), off(c), off(c + 1u), off(c + 1u));
                    for (var r = 0u; r < R; r++) {
                        let w = wv[u * R + r][j];
                        let h = vec4<f16>(vec4<f32>(pair(w, c), pair(w, c + 1u)));
                        qx[r] = fma(fma(h, qs, -o), x4, qx[r]);
                    }
                }
                if (j + 1u) % GW == 0u || j == 3u {
                    let g = (i * 4u + j) / GW;
                    let s1 = (sx.x + sx.y) + (sx.z + sx.w);
                    for (var r = 0u; r < R; r++) {
                        let gi = rs.s[r] + g;
                        let q = vec4<f32>(qx[r]);
                        let d = (q.x + q.y) + (q.z + q.w);
                        let s = scale_at(gi, SFMT);
                        let b = fma(s, QMID, bias_at(gi + bdelta, SFMT));
                        acc[r] = fma(s * QUP, d, fma(b, s1, acc[r]));
                        qx[r] = vec4<f16>(0.0);
                    }
                    sx = vec4<f32>(0.0);
                }
            }
        }
    }
}
