// out [t, cols]: for each pair (token ti, row r) in I, row r of the matrix, dequantised.
struct P {
    m: M,
    cols: u32,
    n: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(4) var<storage, read> I: array<u32>;
@group(0) @binding(5) var<storage, read_write> O: array<f32>;
// Unused by this shader (mat.wgsl's row_dot reads it); declared so the prelude compiles.
var<private> X: array<f32, 1>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    if i >= p.n * p.cols {
        return;
    }
    let k = i / p.cols;
    let c = i % p.cols;
    O[I[2u * k] * p.cols + c] = deq(p.m, 0u, 0u, p.cols, I[2u * k + 1u], c);
}
