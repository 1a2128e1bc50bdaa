// The parameters of expert.wgsl and fast_expert.wgsl; J holds the jobs. `bdelta`: where the
// biases are from the scales (0 for separate buffers; see mat.wgsl's row_dot).
struct P {
    m: M,
    rows: u32,
    cols: u32,
    jobs: u32,
    gx: u32,
    bdelta: u32,
    // The first job of this dispatch (a batch of more jobs than a grid dimension holds is
    // several dispatches).
    j0: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(6) var<storage, read> J: array<u32>;
