// qk_norm_rope (arch-spec §5, §5.1): one workgroup per (token, head); heads first, then the
// kv heads. RMSNorm per head, then NeoX rotate-half over the first `rot` dims with the
// angles' cos/sin from CS [t, rot/2, 2] (computed on the host in f64: an f32 angle at
// position 1e5 is off by ~6e-3 rad).
struct P {
    heads: u32,
    kv_heads: u32,
    hd: u32,
    rot: u32,
    t: u32,
    gated: u32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> QG: array<f32>;
@group(0) @binding(2) var<storage, read_write> K: array<f32>;
@group(0) @binding(3) var<storage, read> QN: array<f32>;
@group(0) @binding(4) var<storage, read> KN: array<f32>;
@group(0) @binding(5) var<storage, read> CS: array<f32>;
@group(0) @binding(6) var<storage, read_write> Q: array<f32>;
@group(0) @binding(7) var<storage, read_write> G: array<f32>;

var<workgroup> red: array<f32, 64>;
var<workgroup> nv: array<f32, 512>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let nh = p.heads + p.kv_heads;
    let ti = wid.x / nh;
    let h = wid.x % nh;
    let is_q = h < p.heads;
    let hd = p.hd;
    var qw = hd;
    if p.gated != 0u {
        qw = 2u * hd;
    }
    var src = 0u;
    if is_q {
        src = (ti * p.heads + h) * qw;
    } else {
        src = (ti * p.kv_heads + (h - p.heads)) * hd;
    }
    var ss = 0.0;
    for (var d = tid; d < hd; d += 64u) {
        var v = 0.0;
        if is_q {
            v = QG[src + d];
        } else {
            v = K[src + d];
        }
        nv[d] = v;
        ss = fma(v, v, ss);
    }
    red[tid] = ss;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if tid < s {
            red[tid] += red[tid + s];
        }
        workgroupBarrier();
    }
    let r = inverseSqrt(red[0] / f32(hd) + p.eps);
    for (var d = tid; d < hd; d += 64u) {
        var w = 0.0;
        if is_q {
            w = QN[d];
        } else {
            w = KN[d];
        }
        nv[d] = nv[d] * r * w;
    }
    workgroupBarrier();
    let half = p.rot / 2u;
    var dst = 0u;
    if is_q {
        dst = (ti * p.heads + h) * hd;
    } else {
        dst = src;
    }
    for (var d = tid; d < hd; d += 64u) {
        var y = nv[d];
        if d < p.rot {
            let i = d % half;
            let c = CS[(ti * half + i) * 2u];
            let s = CS[(ti * half + i) * 2u + 1u];
            if d < half {
                y = nv[d] * c - nv[d + half] * s;
            } else {
                y = nv[d - half] * s + nv[d] * c;
            }
        }
        if is_q {
            Q[dst + d] = y;
            if p.gated != 0u {
                G[dst + d] = QG[src + hd + d];
            }
        } else {
            K[dst + d] = y;
        }
    }
}
