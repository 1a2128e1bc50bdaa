// y [t, ystride] (columns row0..row0+rows) = x [t, cols] W^T for an affine W (fast.wgsl):
// (WGS / LG) * R rows and TB tokens per workgroup.
@compute @workgroup_size(WGS)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lane = lid % LG;
    let rg = lid / LG;
    let row0 = ((wid.x + wid.y * p.gx) * (WGS / LG) + rg) * R;
    let t0 = wid.z * TB;
    let tn = min(TB, p.t - t0);
    rows_dot(p.m, 0u, 0u, 0u, p.rows, p.cols, row0, t0, tn, lane);
    reduce(lane, rg);
    for (var i = lane; i < R * TB; i += LG) {
        let row = row0 + i / TB;
        let tt = i % TB;
        if row < p.rows && tt < tn {
            Y[(t0 + tt) * p.ystride + p.row0 + row] = sums[rg * R * TB + i];
        }
    }
}
