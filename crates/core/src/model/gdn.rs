//! Gated DeltaNet (arch-spec §6): projections, causal depthwise conv1d with carried state,
//! L2-normalised q/k, the gated delta rule (recurrent form for one token, chunked form for a
//! prompt; fp32 state), gated RMSNorm with silu(z), out_proj. Decoding one token at a time
//! equals one pass over the sequence (within float rounding).
use crate::backend::{Backend, Cpu, GdnShape};
use crate::config::ModelConfig;
use crate::error::Result;

/// The in-projections in Qwen3.5's layout (Qwen3-Next's interleaved `in_proj_qkvz`/`in_proj_ba`
/// are reordered into it at load, `load::deinterleave`).
pub struct GdnProj<B: Backend = Cpu> {
    /// [2*nk*dk + nv*dv, H]: rows q (nk*dk) ‖ k (nk*dk) ‖ v (nv*dv), head-major.
    pub qkv: B::Mat,
    /// [nv*dv, H]
    pub z: B::Mat,
    /// [nv, H] each.
    pub b: B::Mat,
    pub a: B::Mat,
}

pub struct GatedDeltaNet<B: Backend = Cpu> {
    pub proj: GdnProj<B>,
    /// [conv_dim, K]: w[c, j], the newest input multiplies w[c, K-1].
    pub conv_w: B::Buf,
    /// [nv]
    pub dt_bias: B::Buf,
    /// [nv] -exp(A_log), precomputed.
    pub neg_a: B::Buf,
    /// [dv] plain weight of the gated RMSNorm.
    pub norm_w: B::Buf,
    /// [H, nv*dv]
    pub out_proj: B::Mat,
}

/// The GatedDeltaNet shapes of `cfg`.
pub fn shape(cfg: &ModelConfig) -> GdnShape {
    GdnShape {
        nk: cfg.linear_num_key_heads,
        nv: cfg.linear_num_value_heads,
        dk: cfg.linear_key_head_dim,
        dv: cfg.linear_value_head_dim,
        kconv: cfg.linear_conv_kernel_dim,
    }
}

impl<B: Backend> GatedDeltaNet<B> {
    /// x: [t, H] normed input. Updates the conv state `[K-1, conv_dim]` and the recurrent state
    /// `s [nv, dk, dv]`; writes `out [t, H]`. `chunked` picks the chunked delta rule for
    /// t > 1 (the recurrent form otherwise).
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        be: &B,
        cfg: &ModelConfig,
        x: &B::Buf,
        t: usize,
        conv: &mut B::Buf,
        s: &mut B::Buf,
        chunked: bool,
        out: &mut B::Buf,
    ) -> Result<()> {
        let g = shape(cfg);
        let (nv, vd) = (g.nv, g.value_dim());
        // mixed = x Wqkv^T -> u = silu(conv(mixed)) [t, conv_dim]; z [t, nv*dv]; b, a [t, nv]
        let mut u = be.scratch(t * g.conv_dim())?;
        let mut z = be.scratch(t * vd)?;
        let mut b = be.scratch(t * nv)?;
        let mut a = be.scratch(t * nv)?;
        let p = &self.proj;
        let w = [&p.qkv, &p.z, &p.b, &p.a];
        be.fused_gdn_in(
            w,
            x,
            t,
            &self.conv_w,
            conv,
            &g,
            &mut u,
            &mut z,
            &mut b,
            &mut a,
        )?;
        // o = delta rule over (l2norm q, l2norm k, v, beta = sigmoid(b), g = -exp(A) softplus(a + dt))
        let mut o = be.scratch(t * vd)?;
        let (dt, na) = (&self.dt_bias, &self.neg_a);
        if t > 1 && chunked {
            be.gdn_chunked(&u, &b, &a, dt, na, s, &g, t, &mut o)?;
        } else {
            be.gdn_recurrent(&u, &b, &a, dt, na, s, &g, t, &mut o)?;
        }
        // y = RMSNorm(o; norm) * silu(z) per value head; out = y Wout^T
        let mut y = be.scratch(t * vd)?;
        be.gated_rmsnorm(&o, &z, &self.norm_w, cfg.rms_norm_eps, &mut y)?;
        be.matmul(&self.out_proj, &y, t, out)
    }
}

impl GatedDeltaNet<Cpu> {
    /// [`GatedDeltaNet::run`] on the CPU over host slices (chunked for prompts), returning
    /// `[t, H]`.
    pub fn forward(
        &self,
        cfg: &ModelConfig,
        x: &[f32],
        t: usize,
        conv: &mut Vec<f32>,
        s: &mut Vec<f32>,
    ) -> Result<Vec<f32>> {
        let mut out = vec![0f32; t * cfg.hidden_size];
        self.run(&Cpu, cfg, &x.to_vec(), t, conv, s, true, &mut out)?;
        Ok(out)
    }
}
