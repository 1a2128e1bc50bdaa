// Elementwise ops on n elements (op): 0 add `A += B`; 1 gate `A *= sigmoid(B)`; 2 SwiGLU
// `A = silu(B[boff + i]) * C[coff + i]`; 3 MoE combine `A += B + sigmoid(G[i / h]) * C` with
// `flags` bit 0 = shared present, bit 1 = gate present.
struct P {
    op: u32,
    n: u32,
    boff: u32,
    coff: u32,
    h: u32,
    flags: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read_write> A: array<f32>;
@group(0) @binding(2) var<storage, read> B: array<f32>;
@group(0) @binding(3) var<storage, read> C: array<f32>;
@group(0) @binding(4) var<storage, read> G: array<f32>;

fn sigmoid(x: f32) -> f32 {
    return 1.0 / (1.0 + exp(-x));
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    if i >= p.n {
        return;
    }
    switch p.op {
        case 0u: {
            A[i] += B[i];
        }
        case 1u: {
            A[i] *= sigmoid(B[i]);
        }
        case 2u: {
            let g = B[p.boff + i];
            A[i] = g * sigmoid(g) * C[p.coff + i];
        }
        default: {
            var s = 0.0;
            if (p.flags & 1u) != 0u {
                var w = 1.0;
                if (p.flags & 2u) != 0u {
                    w = sigmoid(G[i / p.h]);
                }
                s = w * C[i];
            }
            A[i] += B[i] + s;
        }
    }
}
