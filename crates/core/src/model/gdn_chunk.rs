//! The gated delta rule in its chunked form (arch-spec §6.6, HF-Q35
//! `torch_chunk_gated_delta_rule`, chunk 64), used for prefill; and the recurrent form
//! (§6.5), the canonical definition, used for decode and as the chunked form's twin.
//!
//! Both work on one value head at a time with contiguous inputs (the caller gathers them):
//! `q, k [t, dk]` (already l2-normalised, q scaled by 1/sqrt(dk)), `v [t, dv]`, `beta [t]`,
//! `g [t]` (log-decay, <= 0), state `s [dk, dv]` fp32 carried in and out, output `o [t, dv]`.
//!
//! Why chunks: inside a chunk of C tokens the recurrence unrolls into small dense products
//! (C×C, C×dk, dk×dv) that stream the state once per chunk instead of three times per token,
//! so prefill touches the 64 KB state C times less often. Mathematically equal to the
//! recurrent form, not bit-identical (summation order differs).
//!
//! Never does I/O, never allocates per token: scratch is per call.
use crate::kernels::{axpy, gemm_acc, Mat};

/// Tokens per chunk (HF-Q35 `chunk_size=64`).
pub const CHUNK: usize = 64;

/// Recurrent form (arch-spec §6.5) for one value head: decay first, then the delta update,
/// then the output from the updated state.
#[allow(clippy::too_many_arguments)]
pub fn delta_rule_recurrent(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    beta: &[f32],
    g: &[f32],
    dk: usize,
    dv: usize,
    s: &mut [f32],
    o: &mut [f32],
) {
    let t = beta.len();
    debug_assert_eq!(s.len(), dk * dv);
    debug_assert_eq!(o.len(), t * dv);
    let mut kv_mem = vec![0f32; dv];
    for ti in 0..t {
        let (qt, kt, vt) = (
            &q[ti * dk..][..dk],
            &k[ti * dk..][..dk],
            &v[ti * dv..][..dv],
        );
        let decay = g[ti].exp();
        // S = S*decay; kv_mem = S^T k; delta = (v - kv_mem)*beta; S += k ⊗ delta; o = S^T q
        kv_mem.fill(0.0);
        for i in 0..dk {
            let row = &mut s[i * dv..][..dv];
            for x in row.iter_mut() {
                *x *= decay;
            }
            axpy(kt[i], row, &mut kv_mem);
        }
        for (m, vv) in kv_mem.iter_mut().zip(vt) {
            *m = (vv - *m) * beta[ti];
        }
        let ot = &mut o[ti * dv..][..dv];
        ot.fill(0.0);
        for i in 0..dk {
            let row = &mut s[i * dv..][..dv];
            axpy(kt[i], &kv_mem, row);
            axpy(qt[i], row, ot);
        }
    }
}

/// Chunked form (arch-spec §6.6) for one value head; same contract as
/// [`delta_rule_recurrent`]. A last chunk shorter than [`CHUNK`] is computed at its own
/// length, which equals zero-padding it (padded rows have beta = 0, g = 0, k = 0).
#[allow(clippy::too_many_arguments)]
pub fn delta_rule_chunked(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    beta: &[f32],
    g: &[f32],
    dk: usize,
    dv: usize,
    s: &mut [f32],
    o: &mut [f32],
) {
    let t = beta.len();
    debug_assert_eq!(s.len(), dk * dv);
    debug_assert_eq!(o.len(), t * dv);
    let c_max = CHUNK.min(t);
    // Per-chunk scratch, shapes for a full chunk of C rows.
    let mut cum = vec![0f32; c_max]; // G [C]: cumulative log-decay
    let mut kt = vec![0f32; dk * c_max]; // K^T [dk, C]
    let mut m = vec![0f32; c_max * c_max]; // beta_i (k_i · k_j) exp(G_i - G_j), j < i [C, C]
    let mut a = vec![0f32; c_max * c_max]; // (q_i · k_j) exp(G_i - G_j), j <= i [C, C]
    let wd = dv + dk;
    // X = (I + M)^{-1} [vb | kb ⊙ exp(G)] = [U | W], [C, dv + dk]
    let mut x = vec![0f32; c_max * wd];
    let mut vn = vec![0f32; c_max * dv]; // U - W S [C, dv]
    let mut qe = vec![0f32; c_max * dk]; // q_i exp(G_i) [C, dk]
    let mut kdt = vec![0f32; dk * c_max]; // (k_j exp(G_last - G_j))^T [dk, C]

    for c0 in (0..t).step_by(CHUNK) {
        let c = CHUNK.min(t - c0);
        let (qc, kc) = (&q[c0 * dk..][..c * dk], &k[c0 * dk..][..c * dk]);
        let (vc, bc, gc) = (&v[c0 * dv..][..c * dv], &beta[c0..][..c], &g[c0..][..c]);
        let mut acc = 0f32;
        for i in 0..c {
            acc += gc[i];
            cum[i] = acc;
        }
        for i in 0..c {
            for d in 0..dk {
                kt[d * c_max + i] = kc[i * dk + d];
            }
        }
        let ktm = Mat {
            data: &kt,
            stride: c_max,
        };
        m[..c * c_max].fill(0.0);
        a[..c * c_max].fill(0.0);
        gemm_acc(
            c,
            c,
            dk,
            1.0,
            Mat {
                data: kc,
                stride: dk,
            },
            ktm,
            &mut m,
            c_max,
        );
        gemm_acc(
            c,
            c,
            dk,
            1.0,
            Mat {
                data: qc,
                stride: dk,
            },
            ktm,
            &mut a,
            c_max,
        );
        for i in 0..c {
            for j in 0..c {
                let d = if j <= i { (cum[i] - cum[j]).exp() } else { 0.0 };
                a[i * c_max + j] *= d;
                m[i * c_max + j] *= if j < i { bc[i] * d } else { 0.0 };
            }
        }
        // Forward substitution: X_i = B_i - sum_{j<i} M[i,j] X_j, B_i = beta_i [v_i | k_i exp(G_i)].
        for i in 0..c {
            let (head, rest) = x.split_at_mut(i * wd);
            let xi = &mut rest[..wd];
            let e = cum[i].exp();
            for (dst, src) in xi[..dv].iter_mut().zip(&vc[i * dv..][..dv]) {
                *dst = src * bc[i];
            }
            for (dst, src) in xi[dv..].iter_mut().zip(&kc[i * dk..][..dk]) {
                *dst = src * bc[i] * e;
            }
            for j in 0..i {
                axpy(-m[i * c_max + j], &head[j * wd..][..wd], xi);
            }
        }
        let sm = Mat {
            data: s,
            stride: dv,
        };
        // Vn = U - W S
        for i in 0..c {
            vn[i * dv..][..dv].copy_from_slice(&x[i * wd..][..dv]);
        }
        let wm = Mat {
            data: &x[dv..],
            stride: wd,
        };
        gemm_acc(c, dv, dk, -1.0, wm, sm, &mut vn, dv);
        // O = (Q ⊙ exp(G)) S + A Vn  (S still the chunk's incoming state)
        for i in 0..c {
            let e = cum[i].exp();
            for (dst, src) in qe[i * dk..][..dk].iter_mut().zip(&qc[i * dk..][..dk]) {
                *dst = src * e;
            }
        }
        let oc = &mut o[c0 * dv..][..c * dv];
        oc.fill(0.0);
        gemm_acc(
            c,
            dv,
            dk,
            1.0,
            Mat {
                data: &qe,
                stride: dk,
            },
            sm,
            oc,
            dv,
        );
        let vm = Mat {
            data: &vn,
            stride: dv,
        };
        gemm_acc(
            c,
            dv,
            c,
            1.0,
            Mat {
                data: &a,
                stride: c_max,
            },
            vm,
            oc,
            dv,
        );
        // S = S exp(G_last) + (K ⊙ exp(G_last - G))^T Vn
        let last = cum[c - 1];
        let el = last.exp();
        for x in s.iter_mut() {
            *x *= el;
        }
        for j in 0..c {
            let f = (last - cum[j]).exp();
            for d in 0..dk {
                kdt[d * c_max + j] = kc[j * dk + d] * f;
            }
        }
        gemm_acc(
            dk,
            dv,
            c,
            1.0,
            Mat {
                data: &kdt,
                stride: c_max,
            },
            vm,
            s,
            dv,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn l2n(x: &mut [f32], scale: f32) {
        let r = scale / (x.iter().map(|v| v * v).sum::<f32>() + 1e-6).sqrt();
        x.iter_mut().for_each(|v| *v *= r);
    }

    /// Chunked equals recurrent within 1e-4 on random inputs shaped as in the model (q, k
    /// l2-normalised, beta in (0,1), g <= 0), with a carried-in state, over lengths that hit
    /// one short chunk, exact multiples and a ragged tail; both output and final state.
    #[test]
    fn chunked_equals_recurrent() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for &(t, dk, dv) in &[
            (1, 16, 8),
            (5, 16, 24),
            (64, 32, 32),
            (150, 128, 128),
            (200, 24, 32),
        ] {
            let mut q: Vec<f32> = (0..t * dk).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let mut k: Vec<f32> = (0..t * dk).map(|_| rng.gen_range(-1.0..1.0)).collect();
            for ti in 0..t {
                l2n(&mut q[ti * dk..][..dk], 1.0 / (dk as f32).sqrt());
                l2n(&mut k[ti * dk..][..dk], 1.0);
            }
            let v: Vec<f32> = (0..t * dv).map(|_| rng.gen_range(-2.0..2.0)).collect();
            let beta: Vec<f32> = (0..t).map(|_| rng.gen_range(0.05..0.95)).collect();
            let g: Vec<f32> = (0..t).map(|_| -rng.gen_range(0.0..0.5f32)).collect();
            let s0: Vec<f32> = (0..dk * dv).map(|_| rng.gen_range(-0.5..0.5)).collect();
            let (mut s1, mut s2) = (s0.clone(), s0.clone());
            let (mut o1, mut o2) = (vec![0f32; t * dv], vec![0f32; t * dv]);
            delta_rule_recurrent(&q, &k, &v, &beta, &g, dk, dv, &mut s1, &mut o1);
            delta_rule_chunked(&q, &k, &v, &beta, &g, dk, dv, &mut s2, &mut o2);
            let eo = o1
                .iter()
                .zip(&o2)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let es = s1
                .iter()
                .zip(&s2)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(eo < 1e-4, "t={t} dk={dk} dv={dv}: output off by {eo}");
            assert!(es < 1e-4, "t={t} dk={dk} dv={dv}: state off by {es}");
        }
    }
}
