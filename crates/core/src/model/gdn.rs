//! Gated DeltaNet (arch-spec §6): projections, causal depthwise conv1d with carried state,
//! L2-normalised q/k, the gated delta rule (recurrent form for one token, chunked form for a
//! prompt: gdn_chunk.rs; fp32 state), gated RMSNorm with silu(z), out_proj. Decoding one token
//! at a time equals one pass over the sequence (within float rounding).
use rayon::prelude::*;

use crate::config::ModelConfig;
use crate::kernels;
use crate::weights::Linear;

use super::gdn_chunk::{delta_rule_chunked, delta_rule_recurrent};
use super::{linear, sigmoid};

/// State elements (heads × dk × dv × tokens) from which the delta rule runs heads in parallel.
const PAR_MIN_STATE: usize = 1 << 18;

#[allow(clippy::large_enum_variant)] // one per layer; boxing buys nothing
pub enum GdnProj {
    /// Qwen3.5: in_proj_qkv [2*nk*dk + nv*dv, H], in_proj_z [nv*dv, H], in_proj_b/a [nv, H].
    Separate {
        qkv: Linear,
        z: Linear,
        b: Linear,
        a: Linear,
    },
    /// Qwen3-Next: in_proj_qkvz [nk*(2dk + 2*rep*dv), H] and in_proj_ba [nk*2*rep, H],
    /// interleaved per key-head group (arch-spec §6.2).
    Fused { qkvz: Linear, ba: Linear },
}

pub struct GatedDeltaNet {
    pub proj: GdnProj,
    /// [conv_dim, K]: w[c, j], the newest input multiplies w[c, K-1].
    pub conv_w: Vec<f32>,
    /// [nv]
    pub dt_bias: Vec<f32>,
    /// [nv] -exp(A_log), precomputed.
    pub neg_a: Vec<f32>,
    /// [dv] plain weight of the gated RMSNorm.
    pub norm_w: Vec<f32>,
    /// [H, nv*dv]
    pub out_proj: Linear,
}

fn softplus(x: f32) -> f32 {
    // torch softplus(beta=1, threshold=20)
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}
fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

impl GatedDeltaNet {
    /// Returns (mixed [t, conv_dim], z [t, nv*dv], b [t, nv], a [t, nv]) in Qwen3.5 order.
    fn project(
        &self,
        cfg: &ModelConfig,
        x: &[f32],
        t: usize,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        match &self.proj {
            GdnProj::Separate { qkv, z, b, a } => (
                linear(qkv, x, t),
                linear(z, x, t),
                linear(b, x, t),
                linear(a, x, t),
            ),
            GdnProj::Fused { qkvz, ba } => {
                let (nk, nv) = (cfg.linear_num_key_heads, cfg.linear_num_value_heads);
                let (dk, dv) = (cfg.linear_key_head_dim, cfg.linear_value_head_dim);
                let rep = nv / nk;
                let p = linear(qkvz, x, t);
                let q2 = linear(ba, x, t);
                let (kd, vd) = (nk * dk, nv * dv);
                let gw = 2 * dk + 2 * rep * dv;
                let mut mixed = vec![0f32; t * (2 * kd + vd)];
                let mut z = vec![0f32; t * vd];
                let mut b = vec![0f32; t * nv];
                let mut a = vec![0f32; t * nv];
                for ti in 0..t {
                    let row = &p[ti * nk * gw..][..nk * gw];
                    let m = &mut mixed[ti * (2 * kd + vd)..][..2 * kd + vd];
                    for g in 0..nk {
                        let grp = &row[g * gw..][..gw];
                        m[g * dk..][..dk].copy_from_slice(&grp[..dk]);
                        m[kd + g * dk..][..dk].copy_from_slice(&grp[dk..2 * dk]);
                        m[2 * kd + g * rep * dv..][..rep * dv]
                            .copy_from_slice(&grp[2 * dk..2 * dk + rep * dv]);
                        z[ti * vd + g * rep * dv..][..rep * dv]
                            .copy_from_slice(&grp[2 * dk + rep * dv..]);
                        let bag = &q2[ti * nk * 2 * rep + g * 2 * rep..][..2 * rep];
                        b[ti * nv + g * rep..][..rep].copy_from_slice(&bag[..rep]);
                        a[ti * nv + g * rep..][..rep].copy_from_slice(&bag[rep..]);
                    }
                }
                (mixed, z, b, a)
            }
        }
    }

    /// x: [t, H] normed input. Updates conv/recurrent state; returns [t, H].
    pub fn forward(
        &self,
        cfg: &ModelConfig,
        x: &[f32],
        t: usize,
        conv: &mut [f32],
        s: &mut [f32],
    ) -> Vec<f32> {
        self.forward_with(cfg, x, t, conv, s, true)
    }

    /// [`Self::forward`] with `chunked` picking the chunked delta rule for t > 1 (the
    /// recurrent form otherwise).
    pub fn forward_with(
        &self,
        cfg: &ModelConfig,
        x: &[f32],
        t: usize,
        conv: &mut [f32],
        s: &mut [f32],
        chunked: bool,
    ) -> Vec<f32> {
        let (nk, nv) = (cfg.linear_num_key_heads, cfg.linear_num_value_heads);
        let (dk, dv) = (cfg.linear_key_head_dim, cfg.linear_value_head_dim);
        let kk = cfg.linear_conv_kernel_dim;
        let cd = cfg.gdn_conv_dim();
        let rep = nv / nk;
        let (mixed, z, b, a) = self.project(cfg, x, t);

        // Causal depthwise conv over [state (K-1 rows) ; mixed (t rows)], then SiLU.
        let mut ext = Vec::with_capacity((kk - 1 + t) * cd);
        ext.extend_from_slice(conv);
        ext.extend_from_slice(&mixed);
        let mut u = vec![0f32; t * cd];
        for ti in 0..t {
            let out = &mut u[ti * cd..][..cd];
            for (c, o) in out.iter_mut().enumerate() {
                let w = &self.conv_w[c * kk..][..kk];
                let mut acc = 0f32;
                for (j, wj) in w.iter().enumerate() {
                    acc += wj * ext[(ti + j) * cd + c];
                }
                *o = silu(acc);
            }
        }
        conv.copy_from_slice(&ext[t * cd..]);

        let kd = nk * dk;
        let qscale = 1.0 / (dk as f32).sqrt();
        // l2norm with eps inside the rsqrt (HF-Q35 `l2norm`), q scaled by 1/sqrt(dk):
        // qn, kn [t, nk, dk]; beta, g [t, nv].
        let mut qn = vec![0f32; t * kd];
        let mut kn = vec![0f32; t * kd];
        let mut beta = vec![0f32; t * nv];
        let mut gl = vec![0f32; t * nv];
        for ti in 0..t {
            let ut = &u[ti * cd..][..cd];
            for h in 0..nk {
                for (src, dst, sc) in [
                    (
                        &ut[h * dk..][..dk],
                        &mut qn[ti * kd + h * dk..][..dk],
                        qscale,
                    ),
                    (
                        &ut[kd + h * dk..][..dk],
                        &mut kn[ti * kd + h * dk..][..dk],
                        1.0,
                    ),
                ] {
                    let ss: f32 = src.iter().map(|v| v * v).sum();
                    let r = 1.0 / (ss + 1e-6).sqrt() * sc;
                    for (d, s_) in dst.iter_mut().zip(src) {
                        *d = s_ * r;
                    }
                }
            }
            for h in 0..nv {
                beta[ti * nv + h] = sigmoid(b[ti * nv + h]);
                gl[ti * nv + h] = self.neg_a[h] * softplus(a[ti * nv + h] + self.dt_bias[h]);
            }
        }

        // The delta rule per value head (GQA: value head h reads key head h / rep), heads in
        // parallel; recurrent for one token, chunked (§6.6) for a prompt. oh [nv, t, dv].
        let mut oh = vec![0f32; nv * t * dv];
        let head = |h: usize, st: &mut [f32], out: &mut [f32]| {
            let kh = h / rep;
            let gather = |src: &[f32], stride: usize, off: usize, n: usize| -> Vec<f32> {
                (0..t)
                    .flat_map(|ti| src[ti * stride + off..][..n].iter().copied())
                    .collect()
            };
            let q = gather(&qn, kd, kh * dk, dk);
            let k = gather(&kn, kd, kh * dk, dk);
            let v = gather(&u, cd, 2 * kd + h * dv, dv);
            let bh = gather(&beta, nv, h, 1);
            let gh = gather(&gl, nv, h, 1);
            if t == 1 || !chunked {
                delta_rule_recurrent(&q, &k, &v, &bh, &gh, dk, dv, st, out);
            } else {
                delta_rule_chunked(&q, &k, &v, &bh, &gh, dk, dv, st, out);
            }
        };
        // One head of one token is ~50k FMAs: below a few heads' worth a fork-join costs more.
        if nv * t * dk * dv >= PAR_MIN_STATE {
            s.par_chunks_mut(dk * dv)
                .zip(oh.par_chunks_mut(t * dv))
                .enumerate()
                .for_each(|(h, (st, out))| head(h, st, out));
        } else {
            for (h, (st, out)) in s.chunks_mut(dk * dv).zip(oh.chunks_mut(t * dv)).enumerate() {
                head(h, st, out);
            }
        }
        let mut o = vec![0f32; t * nv * dv];
        for h in 0..nv {
            for ti in 0..t {
                o[(ti * nv + h) * dv..][..dv].copy_from_slice(&oh[(h * t + ti) * dv..][..dv]);
            }
        }

        // Gated RMSNorm per (token, value head): w * norm(o) * silu(z).
        let eps = cfg.rms_norm_eps;
        let mut y = vec![0f32; t * nv * dv];
        for ((oh, zh), yh) in o.chunks(dv).zip(z.chunks(dv)).zip(y.chunks_mut(dv)) {
            kernels::rmsnorm(oh, &self.norm_w, eps, false, yh);
            for (yv, zv) in yh.iter_mut().zip(zh) {
                *yv *= silu(*zv);
            }
        }
        linear(&self.out_proj, &y, t)
    }
}
