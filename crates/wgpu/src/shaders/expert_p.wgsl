// The parameters of expert.wgsl and fast_expert.wgsl; J holds the jobs.
struct P {
    m: M,
    rows: u32,
    cols: u32,
    jobs: u32,
    gx: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(6) var<storage, read> J: array<u32>;
