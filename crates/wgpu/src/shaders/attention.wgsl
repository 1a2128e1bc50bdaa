// Causal GQA softmax attention over the caches (arch-spec §5), for tokens t0..t0+tn of the
// call: one workgroup per (token, head). Scores go to the scratch SC (one row of up to `maxn`
// per workgroup), then exp and sum, then the value sum.
struct P {
    heads: u32,
    kv_heads: u32,
    hd: u32,
    pos0: u32,
    t0: u32,
    maxn: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> Q: array<f32>;
@group(0) @binding(2) var<storage, read> KC: array<f32>;
@group(0) @binding(3) var<storage, read> VC: array<f32>;
@group(0) @binding(4) var<storage, read_write> O: array<f32>;
@group(0) @binding(5) var<storage, read_write> SC: array<f32>;

var<workgroup> red: array<f32, 64>;

fn reduce(tid: u32, v: f32, is_max: bool) -> f32 {
    red[tid] = v;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if tid < s {
            if is_max {
                red[tid] = max(red[tid], red[tid + s]);
            } else {
                red[tid] += red[tid + s];
            }
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let tl = wid.x / p.heads;
    let h = wid.x % p.heads;
    let ti = p.t0 + tl;
    let hd = p.hd;
    let kvw = p.kv_heads * hd;
    let kvh = h / (p.heads / p.kv_heads);
    let n = p.pos0 + ti + 1u;
    let qb = (ti * p.heads + h) * hd;
    let sb = wid.x * p.maxn;
    var m = -3.0e38;
    for (var j = tid; j < n; j += 64u) {
        let kb = j * kvw + kvh * hd;
        var s = 0.0;
        for (var d = 0u; d < hd; d++) {
            s = fma(Q[qb + d], KC[kb + d], s);
        }
        s *= p.scale;
        SC[sb + j] = s;
        m = max(m, s);
    }
    m = reduce(tid, m, true);
    var z = 0.0;
    for (var j = tid; j < n; j += 64u) {
        let e = exp(SC[sb + j] - m);
        SC[sb + j] = e;
        z += e;
    }
    z = reduce(tid, z, false);
    storageBarrier();
    workgroupBarrier();
    for (var d = tid; d < hd; d += 64u) {
        var a = 0.0;
        for (var j = 0u; j < n; j++) {
            a = fma(SC[sb + j], VC[j * kvw + kvh * hd + d], a);
        }
        O[qb + d] = a / z;
    }
}
