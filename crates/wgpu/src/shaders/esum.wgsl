// The routed sum (arch-spec §7): out[ti, i] = sum over token ti's k experts, ascending id, of
// w * D[pair, i]; T [t, k] holds (pair row, weight bits) already in ascending expert order.
// With `add`, out += that sum (a later batch of the residency tier).
struct P {
    h: u32,
    k: u32,
    n: u32,
    add: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> D: array<f32>;
@group(0) @binding(2) var<storage, read> T: array<u32>;
@group(0) @binding(3) var<storage, read_write> O: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    if i >= p.n {
        return;
    }
    let ti = i / p.h;
    let c = i % p.h;
    var a = 0.0;
    for (var j = 0u; j < p.k; j++) {
        let e = (ti * p.k + j) * 2u;
        a = fma(bitcast<f32>(T[e + 1u]), D[T[e] * p.h + c], a);
    }
    if p.add != 0u {
        O[i] += a;
    } else {
        O[i] = a;
    }
}
