//! Full attention (arch-spec §5): q/k RMSNorm per head, partial rotate-half RoPE, GQA, causal
//! softmax in fp32, and (Qwen3.5 / Qwen3-Next) the sigmoid output gate taken from q_proj.
use crate::config::ModelConfig;
use crate::kernels;
use crate::weights::Linear;

use super::{linear, sigmoid};

pub struct Attention {
    /// [n_heads * head_dim * (2 if gated else 1), H]; per head rows [q ‖ gate].
    pub q_proj: Linear,
    /// [n_kv * head_dim, H]
    pub k_proj: Linear,
    pub v_proj: Linear,
    /// [H, n_heads * head_dim]
    pub o_proj: Linear,
    /// [head_dim], plain weight (the loader folds a zero-centred offset in).
    pub q_norm: Vec<f32>,
    pub k_norm: Vec<f32>,
}

/// Rotates the first `rot` dims of one head vector at position `pos` (NeoX rotate-half:
/// dim d < rot/2 pairs with d + rot/2, frequency index d).
pub fn rope(x: &mut [f32], pos: usize, rot: usize, theta: f64) {
    let half = rot / 2;
    for d in 0..half {
        // HF computes inv_freq = 1 / theta^(2d/rot) in fp32; the angle in f64 keeps long
        // positions exact without changing short ones beyond f32 rounding.
        let inv = (1.0 / theta.powf((2 * d) as f64 / rot as f64)) as f32 as f64;
        let ang = pos as f64 * inv;
        let (s, c) = (ang.sin() as f32, ang.cos() as f32);
        let (x1, x2) = (x[d], x[d + half]);
        x[d] = x1 * c - x2 * s;
        x[d + half] = x2 * c + x1 * s;
    }
}

impl Attention {
    /// x: [t, H] normed input for positions pos0..pos0+t. Appends to the cache and returns [t, H].
    pub fn forward(
        &self,
        cfg: &ModelConfig,
        x: &[f32],
        t: usize,
        pos0: usize,
        kc: &mut Vec<f32>,
        vc: &mut Vec<f32>,
    ) -> Vec<f32> {
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let eps = cfg.rms_norm_eps;
        let qw = if cfg.attn_output_gate { 2 * hd } else { hd };
        let qg = linear(&self.q_proj, x, t);
        let mut k = linear(&self.k_proj, x, t);
        let v = linear(&self.v_proj, x, t);

        let mut q = vec![0f32; t * nh * hd];
        let mut gate = vec![0f32; if cfg.attn_output_gate { t * nh * hd } else { 0 }];
        let mut tmp = vec![0f32; hd];
        for ti in 0..t {
            for h in 0..nh {
                let src = &qg[ti * nh * qw + h * qw..][..qw];
                let dst = &mut q[(ti * nh + h) * hd..][..hd];
                kernels::rmsnorm(&src[..hd], &self.q_norm, eps, false, dst);
                rope(dst, pos0 + ti, cfg.rotary_dim, cfg.rope_theta);
                if cfg.attn_output_gate {
                    gate[(ti * nh + h) * hd..][..hd].copy_from_slice(&src[hd..]);
                }
            }
            for h in 0..nkv {
                let kh = &mut k[(ti * nkv + h) * hd..][..hd];
                tmp.copy_from_slice(kh);
                kernels::rmsnorm(&tmp, &self.k_norm, eps, false, kh);
                rope(kh, pos0 + ti, cfg.rotary_dim, cfg.rope_theta);
            }
        }
        kc.extend_from_slice(&k);
        vc.extend_from_slice(&v);

        let group = nh / nkv;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut o = vec![0f32; t * nh * hd];
        let kvw = nkv * hd;
        // Heads are independent: one task per (token, head).
        use rayon::prelude::*;
        o.par_chunks_mut(hd).enumerate().for_each(|(idx, oh)| {
            let (ti, h) = (idx / nh, idx % nh);
            let kvh = h / group;
            let qh = &q[idx * hd..][..hd];
            let n = pos0 + ti + 1; // causal: keys 0..=pos
            let mut sc: Vec<f32> = (0..n)
                .map(|s| kernels::dot(qh, &kc[s * kvw + kvh * hd..][..hd]) * scale)
                .collect();
            kernels::softmax_inplace(&mut sc);
            for (s, &a) in sc.iter().enumerate() {
                kernels::axpy(a, &vc[s * kvw + kvh * hd..][..hd], oh);
            }
        });
        if cfg.attn_output_gate {
            for (ov, g) in o.iter_mut().zip(&gate) {
                *ov *= sigmoid(*g);
            }
        }
        linear(&self.o_proj, &o, t)
    }
}
