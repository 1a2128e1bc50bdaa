// Router (arch-spec §7): per token (one thread each) softmax over `ne` logits, the top `k`
// by descending logit (ties to the lower id), weights renormalised over the chosen when
// `renorm`.
struct P {
    ne: u32,
    k: u32,
    t: u32,
    renorm: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> L: array<f32>;
@group(0) @binding(2) var<storage, read_write> IDS: array<u32>;
@group(0) @binding(3) var<storage, read_write> WTS: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let ti = gid.x;
    if ti >= p.t {
        return;
    }
    let lb = ti * p.ne;
    var m = -3.0e38;
    for (var e = 0u; e < p.ne; e++) {
        m = max(m, L[lb + e]);
    }
    var z = 0.0;
    for (var e = 0u; e < p.ne; e++) {
        z += exp(L[lb + e] - m);
    }
    var taken: array<u32, 64>;
    var sum = 0.0;
    for (var j = 0u; j < p.k; j++) {
        var best = 0xffffffffu;
        var bv = 0.0;
        for (var e = 0u; e < p.ne; e++) {
            if (taken[e >> 5u] & (1u << (e & 31u))) != 0u {
                continue;
            }
            let v = L[lb + e];
            if best == 0xffffffffu || v > bv {
                best = e;
                bv = v;
            }
        }
        taken[best >> 5u] |= 1u << (best & 31u);
        let w = exp(bv - m) / z;
        IDS[ti * p.k + j] = best;
        WTS[ti * p.k + j] = w;
        sum += w;
    }
    if p.renorm != 0u {
        for (var j = 0u; j < p.k; j++) {
            WTS[ti * p.k + j] /= sum;
        }
    }
}
