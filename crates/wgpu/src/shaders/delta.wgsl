// The gated delta rule, recurrent form (arch-spec §6.4-6.5): one workgroup per value head;
// each thread owns columns j of the head's state [dk, dv] (f32, updated in place), token by
// token. q and k are l2-normalised (eps 1e-6 inside the rsqrt) in workgroup memory.
struct P {
    nk: u32,
    nv: u32,
    dk: u32,
    dv: u32,
    t: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> U: array<f32>;
@group(0) @binding(2) var<storage, read> Bt: array<f32>;
@group(0) @binding(3) var<storage, read> A: array<f32>;
@group(0) @binding(4) var<storage, read> DT: array<f32>;
@group(0) @binding(5) var<storage, read> NA: array<f32>;
@group(0) @binding(6) var<storage, read_write> ST: array<f32>;
@group(0) @binding(7) var<storage, read_write> O: array<f32>;

const WGD: u32 = 128u;
var<workgroup> qs: array<f32, 256>;
var<workgroup> ks: array<f32, 256>;
var<workgroup> rq: array<f32, 128>;
var<workgroup> rk: array<f32, 128>;

@compute @workgroup_size(128)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let h = wid.x;
    let dk = p.dk;
    let dv = p.dv;
    let kd = p.nk * dk;
    let cd = 2u * kd + p.nv * dv;
    let kh = h / (p.nv / p.nk);
    let sb = h * dk * dv;
    for (var ti = 0u; ti < p.t; ti++) {
        let ub = ti * cd;
        var sq = 0.0;
        var sk = 0.0;
        for (var i = tid; i < dk; i += WGD) {
            let q = U[ub + kh * dk + i];
            let k = U[ub + kd + kh * dk + i];
            qs[i] = q;
            ks[i] = k;
            sq = fma(q, q, sq);
            sk = fma(k, k, sk);
        }
        rq[tid] = sq;
        rk[tid] = sk;
        workgroupBarrier();
        for (var s = WGD / 2u; s > 0u; s >>= 1u) {
            if tid < s {
                rq[tid] += rq[tid + s];
                rk[tid] += rk[tid + s];
            }
            workgroupBarrier();
        }
        let nq = inverseSqrt(rq[0] + 1e-6) * inverseSqrt(f32(dk));
        let nk = inverseSqrt(rk[0] + 1e-6);
        let beta = 1.0 / (1.0 + exp(-Bt[ti * p.nv + h]));
        let x = A[ti * p.nv + h] + DT[h];
        var sp = x;
        if x <= 20.0 {
            sp = log(1.0 + exp(x));
        }
        let decay = exp(NA[h] * sp);
        for (var j = tid; j < dv; j += WGD) {
            var kv = 0.0;
            for (var i = 0u; i < dk; i++) {
                kv = fma(ST[sb + i * dv + j] * decay, ks[i] * nk, kv);
            }
            let dlt = (U[ub + 2u * kd + h * dv + j] - kv) * beta;
            var o = 0.0;
            for (var i = 0u; i < dk; i++) {
                let s = fma(ST[sb + i * dv + j], decay, ks[i] * nk * dlt);
                ST[sb + i * dv + j] = s;
                o = fma(s, qs[i] * nq, o);
            }
            O[(ti * p.nv + h) * dv + j] = o;
        }
        workgroupBarrier();
    }
}
