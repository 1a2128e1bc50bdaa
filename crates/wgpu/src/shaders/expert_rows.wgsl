// expert.wgsl's batch with one thread per row (see matmul_rows.wgsl for when).
struct P {
    m: M,
    rows: u32,
    cols: u32,
    jobs: u32,
    gx: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(4) var<storage, read> X: array<f32>;
@group(0) @binding(5) var<storage, read_write> Y: array<f32>;
@group(0) @binding(6) var<storage, read> J: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let row = (wid.x + wid.y * p.gx) * WG + tid;
    let j = wid.z;
    if row >= p.rows {
        return;
    }
    row_dot(p.m, J[j * 4u], J[j * 4u + 1u], p.cols, row, J[j * 4u + 2u], 1u, 0u, 1u);
    Y[J[j * 4u + 3u] * p.rows + row] = acc[0];
}
