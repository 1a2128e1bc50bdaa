// The parameters of matmul.wgsl and fast_matmul.wgsl.
struct P {
    m: M,
    rows: u32,
    cols: u32,
    t: u32,
    row0: u32,
    ystride: u32,
    gx: u32,
}

@group(0) @binding(0) var<uniform> p: P;

