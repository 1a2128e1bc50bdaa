// Index of the largest of n values (first on ties; NaN never wins; 0 when none), one
// workgroup; the single u32 crosses to the host.
struct P {
    n: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read_write> R: array<u32>;

const NONE: u32 = 0xffffffffu;
var<workgroup> bv: array<f32, 256>;
var<workgroup> bi: array<u32, 256>;

fn better(v: f32, i: u32, w: f32, j: u32) -> bool {
    if j == NONE {
        return i != NONE;
    }
    if i == NONE {
        return false;
    }
    return v > w || (v == w && i < j);
}

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) tid: u32) {
    var v = 0.0;
    var idx = NONE;
    for (var i = tid; i < p.n; i += 256u) {
        let x = X[i];
        // NaN by its bits: a compiler may fold `x == x` to true.
        let nan = (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u;
        if !nan && (idx == NONE || x > v) {
            v = x;
            idx = i;
        }
    }
    bv[tid] = v;
    bi[tid] = idx;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if tid < s && better(bv[tid + s], bi[tid + s], bv[tid], bi[tid]) {
            bv[tid] = bv[tid + s];
            bi[tid] = bi[tid + s];
        }
        workgroupBarrier();
    }
    if tid == 0u {
        R[0] = select(bi[0], 0u, bi[0] == NONE);
    }
}
