// The lane sums of fast.wgsl through workgroup memory (adapters without subgroup
// operations, or whose subgroup size varies): sums[rg] of each lane group.
var<workgroup> red: array<f32, WGS * R * TB>;

fn reduce(lane: u32, rg: u32) {
    for (var i = 0u; i < R * TB; i++) {
        red[(rg * LG + lane) * R * TB + i] = acc[i];
    }
    workgroupBarrier();
    for (var i = lane; i < R * TB; i += LG) {
        var s = 0.0;
        for (var l = 0u; l < LG; l++) {
            s += red[(rg * LG + l) * R * TB + i];
        }
        sums[rg * R * TB + i] = s;
    }
    workgroupBarrier();
}
