// The routed-expert batch (see expert.wgsl) for affine matrices (fast.wgsl, TB = 1): job j
// multiplies the matrix at J[j] = (wbase words, sbase, xrow, yrow) with row xrow of X.

@compute @workgroup_size(WGS)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lane = lid % LG;
    let rg = lid / LG;
    let row0 = ((wid.x + wid.y * p.gx) * (WGS / LG) + rg) * R;
    let j = wid.z + p.j0;
    rows_dot(p.m, J[j * 4u] / 4u, J[j * 4u + 1u], p.bdelta, p.rows, p.cols, row0, J[j * 4u + 2u], 1u, lane);
    reduce(lane, rg);
    for (var i = lane; i < R; i += LG) {
        let row = row0 + i;
        if row < p.rows {
            Y[J[j * 4u + 3u] * p.rows + row] = sums[rg * R + i];
        }
    }
}
