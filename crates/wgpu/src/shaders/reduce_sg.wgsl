// The lane sums of fast.wgsl through subgroup operations (LG is the adapter's subgroup size
// and its subgroups are consecutive invocations): sums[rg] of each lane group.
fn reduce(lane: u32, rg: u32) {
    for (var i = 0u; i < R * TB; i++) {
        let s = subgroupAdd(acc[i]);
        if lane == 0u {
            sums[rg * R * TB + i] = s;
        }
    }
    workgroupBarrier();
}
