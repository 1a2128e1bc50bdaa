// GatedDeltaNet causal depthwise conv + SiLU (arch-spec §6.3): one thread per channel slides
// a window of K inputs over [state ; mixed] and leaves the last K-1 inputs in the state.
struct P {
    cd: u32,
    k: u32,
    t: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> MX: array<f32>;
@group(0) @binding(2) var<storage, read_write> ST: array<f32>;
@group(0) @binding(3) var<storage, read> CW: array<f32>;
@group(0) @binding(4) var<storage, read_write> U: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = gid.x + gid.y * nwg.x * 64u;
    if c >= p.cd {
        return;
    }
    let k = p.k;
    var win: array<f32, 16>;
    for (var j = 0u; j + 1u < k; j++) {
        win[j] = ST[j * p.cd + c];
    }
    for (var ti = 0u; ti < p.t; ti++) {
        win[k - 1u] = MX[ti * p.cd + c];
        var a = 0.0;
        for (var j = 0u; j < k; j++) {
            a = fma(CW[c * k + j], win[j], a);
        }
        U[ti * p.cd + c] = a / (1.0 + exp(-a));
        for (var j = 0u; j + 1u < k; j++) {
            win[j] = win[j + 1u];
        }
    }
    for (var j = 0u; j + 1u < k; j++) {
        ST[j * p.cd + c] = win[j];
    }
}
