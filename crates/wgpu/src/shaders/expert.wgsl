// A batch of routed-expert products in one dispatch: job j multiplies row-block `rows` of the
// matrix at J[j] = (wbase, sbase, xrow, yrow) with row `xrow` of X into row `yrow` of Y. The
// experts' matrices sit side by side in W/S/Bz (one upload per layer and call).
@group(0) @binding(4) var<storage, read> X: array<f32>;
@group(0) @binding(5) var<storage, read_write> Y: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let row = wid.x + wid.y * p.gx;
    let j = wid.z + p.j0;
    if row >= p.rows {
        return;
    }
    row_dot(p.m, J[j * 4u], J[j * 4u + 1u], p.bdelta, p.cols, row, J[j * 4u + 2u], 1u, tid, WG);
    reduce_acc(tid);
    if tid == 0u {
        Y[J[j * 4u + 3u] * p.rows + row] = red[0];
    }
}

// The same batch with one thread per row (see matmul.wgsl's per_row for when).
@compute @workgroup_size(64)
fn per_row(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let row = (wid.x + wid.y * p.gx) * WG + tid;
    let j = wid.z + p.j0;
    if row >= p.rows {
        return;
    }
    row_dot(p.m, J[j * 4u], J[j * 4u + 1u], p.bdelta, p.cols, row, J[j * 4u + 2u], 1u, 0u, 1u);
    Y[J[j * 4u + 3u] * p.rows + row] = acc[0];
}
