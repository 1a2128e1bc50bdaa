// y [t, ystride] (columns row0..row0+rows) = x [t, cols] W^T. One workgroup per row and block
// of up to TB tokens, so a row's weights are read once per block.
@group(0) @binding(4) var<storage, read> X: array<f32>;
@group(0) @binding(5) var<storage, read_write> Y: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let row = wid.x + wid.y * p.gx;
    if row >= p.rows {
        return;
    }
    let t0 = wid.z * TB;
    let tn = min(TB, p.t - t0);
    row_dot(p.m, 0u, 0u, 0u, p.cols, row, t0, tn, tid, WG);
    reduce_acc(tid);
    if tid < tn {
        Y[(t0 + tid) * p.ystride + p.row0 + row] = red[tid * WG];
    }
}

// The same product with one thread per row and block of up to TB tokens: no workgroup
// reduction. For software adapters (lavapipe runs a workgroup's barriers as coroutine
// switches, which cost more than the dot product at small widths) and for wide, short
// matrices.
@compute @workgroup_size(64)
fn per_row(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let row = (wid.x + wid.y * p.gx) * WG + tid;
    if row >= p.rows {
        return;
    }
    let t0 = wid.z * TB;
    let tn = min(TB, p.t - t0);
    row_dot(p.m, 0u, 0u, 0u, p.cols, row, t0, tn, 0u, 1u);
    for (var tt = 0u; tt < tn; tt++) {
        Y[(t0 + tt) * p.ystride + p.row0 + row] = acc[tt];
    }
}
