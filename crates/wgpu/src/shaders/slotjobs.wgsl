// The job tables of a resident layer's expert batch, built where the routing lives (no read
// back to the host): one thread per routed (token, expert), which places its expert at its
// rank among the token's k ids (ascending; equal ids in routing order, as a stable sort) and
// looks it up in the layer's expert -> slot table, pair p = token * k + rank (a thread per
// token sorting its k ids in series took 18 us per layer on an H100):
//   G [2np, 4]: the gate job (slot's gate rows) at p and the up job at np + p (wbase units,
//               sbase elements, x row, y row), as expert.wgsl reads them;
//   D [np, 4]:  the down job of pair p (x and y row p);
//   T [t, k, 2]: (p, weight bits) in ascending expert id, as esum.wgsl reads them.
struct P {
    t: u32,
    k: u32,
    // Bytes per data unit and per scale; bytes per slot.
    unit: u32,
    ssz: u32,
    slot: u32,
    // Offsets in a slot of gate|up weights and scales, down weights and scales; bytes of the
    // gate half of gate|up's weights and scales.
    o0: u32,
    o1: u32,
    o3: u32,
    o4: u32,
    gw: u32,
    gs: u32,
    // Workgroups along x (the grid's row stride).
    gx: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> IDS: array<u32>;
@group(0) @binding(2) var<storage, read> WTS: array<u32>;
@group(0) @binding(3) var<storage, read> TABLE: array<u32>;
@group(0) @binding(4) var<storage, read_write> G: array<u32>;
@group(0) @binding(5) var<storage, read_write> D: array<u32>;
@group(0) @binding(6) var<storage, read_write> T: array<u32>;

const KMAX: u32 = 64u;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let k = p.k;
    let np = p.t * k;
    let q = (wid.x + wid.y * p.gx) * 64u + lid;
    if q >= np || k > KMAX {
        return;
    }
    let ti = q / k;
    let j0 = q % k;
    let e = IDS[q];
    var rank = 0u;
    for (var j = 0u; j < k; j++) {
        let f = IDS[ti * k + j];
        if f < e || (f == e && j < j0) {
            rank++;
        }
    }
    let pr = ti * k + rank;
    let base = TABLE[e] * p.slot;
    let g = pr * 4u;
    G[g] = (base + p.o0) / p.unit;
    G[g + 1u] = (base + p.o1) / p.ssz;
    G[g + 2u] = ti;
    G[g + 3u] = pr;
    let u = (np + pr) * 4u;
    G[u] = (base + p.o0 + p.gw) / p.unit;
    G[u + 1u] = (base + p.o1 + p.gs) / p.ssz;
    G[u + 2u] = ti;
    G[u + 3u] = np + pr;
    D[g] = (base + p.o3) / p.unit;
    D[g + 1u] = (base + p.o4) / p.ssz;
    D[g + 2u] = pr;
    D[g + 3u] = pr;
    T[pr * 2u] = pr;
    T[pr * 2u + 1u] = WTS[q];
}
