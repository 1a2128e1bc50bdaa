//! Full attention (arch-spec §5): q/k RMSNorm per head, partial rotate-half RoPE, GQA, causal
//! softmax in fp32, and (Qwen3.5 / Qwen3-Next) the sigmoid output gate taken from q_proj.
use crate::backend::{AttnShape, Backend, Cpu};
use crate::config::ModelConfig;
use crate::error::Result;

pub struct Attention<B: Backend = Cpu> {
    /// [n_heads * head_dim * (2 if gated else 1), H]; per head rows [q ‖ gate].
    pub q_proj: B::Mat,
    /// [n_kv * head_dim, H]
    pub k_proj: B::Mat,
    pub v_proj: B::Mat,
    /// [H, n_heads * head_dim]
    pub o_proj: B::Mat,
    /// [head_dim], plain weight (the loader folds a zero-centred offset in).
    pub q_norm: B::Buf,
    pub k_norm: B::Buf,
}

/// The attention shapes of `cfg`.
pub fn shape(cfg: &ModelConfig) -> AttnShape {
    AttnShape {
        heads: cfg.num_heads,
        kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
        rotary_dim: cfg.rotary_dim,
        rope_theta: cfg.rope_theta,
        gated: cfg.attn_output_gate,
        eps: cfg.rms_norm_eps,
    }
}

impl<B: Backend> Attention<B> {
    /// x: [t, H] normed input for positions pos0..pos0+t. Appends to the cache (kc, vc) and
    /// writes `out [t, H]`.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        be: &B,
        cfg: &ModelConfig,
        x: &B::Buf,
        t: usize,
        pos0: usize,
        kc: &mut B::Buf,
        vc: &mut B::Buf,
        out: &mut B::Buf,
    ) -> Result<()> {
        let s = shape(cfg);
        // qg = x Wq^T [t, q_rows]; k, v = x Wk^T, x Wv^T [t, nkv*hd]
        let mut qg = be.scratch(t * s.q_rows())?;
        let mut k = be.scratch(t * s.kv_width())?;
        let mut v = be.scratch(t * s.kv_width())?;
        let w = [&self.q_proj, &self.k_proj, &self.v_proj];
        be.matmul_many(&w, x, t, &mut [&mut qg, &mut k, &mut v])?;
        // q = RoPE(RMSNorm(q; q_norm)), gate; k = RoPE(RMSNorm(k; k_norm)); append k, v to
        // the cache; o = softmax(q K^T / sqrt(hd)) V per head; o *= sigmoid(gate)   [t, nh*hd]
        let mut o = be.scratch(t * s.o_width())?;
        let (qn, kn) = (&self.q_norm, &self.k_norm);
        be.fused_attention(&qg, &mut k, &v, qn, kn, kc, vc, &s, pos0, t, &mut o)?;
        be.matmul(&self.o_proj, &o, t, out)
    }
}

impl Attention<Cpu> {
    /// [`Attention::run`] on the CPU over host slices, returning `[t, H]`.
    pub fn forward(
        &self,
        cfg: &ModelConfig,
        x: &[f32],
        t: usize,
        pos0: usize,
        kc: &mut Vec<f32>,
        vc: &mut Vec<f32>,
    ) -> Result<Vec<f32>> {
        let mut out = vec![0f32; t * cfg.hidden_size];
        self.run(&Cpu, cfg, &x.to_vec(), t, pos0, kc, vc, &mut out)?;
        Ok(out)
    }
}
