// Index of the largest of n values (first on ties; NaN never wins; NONE when none) and that
// value, in two dispatches: `part` gives each workgroup a slice of CHUNK values and writes its
// best (value bits, index) to PART; `main`, one workgroup, takes the best of the parts. Two
// u32 cross to the host. (One workgroup over a 248,320-entry head's logits took
// 0.39 ms on an H100, a tenth of a decode token.) `better` and NONE: pick.wgsl.
struct P {
    n: u32,
    parts: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read_write> R: array<u32>;
@group(0) @binding(3) var<storage, read_write> PART: array<u32>;

const WG: u32 = 256u;
// Values per workgroup of `part` (16 per thread).
const CHUNK: u32 = 4096u;
var<workgroup> bv: array<f32, 256>;
var<workgroup> bi: array<u32, 256>;

// The workgroup's best of (v, idx) into bv[0], bi[0].
fn reduce(tid: u32, v: f32, idx: u32) {
    bv[tid] = v;
    bi[tid] = idx;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if tid < s && better(bv[tid + s], bi[tid + s], bv[tid], bi[tid]) {
            bv[tid] = bv[tid + s];
            bi[tid] = bi[tid + s];
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(256)
fn part(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    var v = 0.0;
    var idx = NONE;
    let end = min(p.n, (wid.x + 1u) * CHUNK);
    for (var i = wid.x * CHUNK + tid; i < end; i += WG) {
        let x = X[i];
        // NaN by its bits: a compiler may fold `x == x` to true.
        let nan = (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u;
        if !nan && (idx == NONE || x > v) {
            v = x;
            idx = i;
        }
    }
    reduce(tid, v, idx);
    if tid == 0u {
        PART[2u * wid.x] = bitcast<u32>(bv[0]);
        PART[2u * wid.x + 1u] = bi[0];
    }
}

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) tid: u32) {
    var v = 0.0;
    var idx = NONE;
    // Parts in ascending index order per thread: a later part wins only when larger.
    for (var i = tid; i < p.parts; i += WG) {
        let w = bitcast<f32>(PART[2u * i]);
        let j = PART[2u * i + 1u];
        if better(w, j, v, idx) {
            v = w;
            idx = j;
        }
    }
    reduce(tid, v, idx);
    if tid == 0u {
        // The value too, which the host checks is finite (NONE: every value was NaN).
        R[0] = bi[0];
        R[1] = bitcast<u32>(bv[0]);
    }
}
