// Scales and biases of a weight matrix, shared by every product kernel and embed (prepended
// to mat.wgsl and fast.wgsl). A matrix is `W` in its stored format: fmt 0 f32, 1 bf16, 2 f16
// (two per u32, low half first), 3 MLX affine (`bits`-bit codes LSB-first in u32 words, one scale and bias per
// `group` columns, scales/biases in sfmt 0 f32, 1 bf16, 2 f16). `w = q * scale + bias`.
struct M {
    fmt: u32,
    bits: u32,
    group: u32,
    sfmt: u32,
}

@group(0) @binding(2) var<storage, read> S: array<u32>;
@group(0) @binding(3) var<storage, read> Bz: array<u32>;

fn half_bits(word: u32, i: u32) -> u32 {
    return (word >> ((i & 1u) * 16u)) & 0xffffu;
}

fn half_to_f32(h: u32, f: u32) -> f32 {
    if f == 1u {
        return bitcast<f32>(h << 16u);
    }
    return unpack2x16float(h).x;
}

fn scale_at(i: u32, f: u32) -> f32 {
    if f == 0u {
        return bitcast<f32>(S[i]);
    }
    return half_to_f32(half_bits(S[i >> 1u], i), f);
}

fn bias_at(i: u32, f: u32) -> f32 {
    if f == 0u {
        return bitcast<f32>(Bz[i]);
    }
    return half_to_f32(half_bits(Bz[i >> 1u], i), f);
}
