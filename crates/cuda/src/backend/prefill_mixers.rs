//! The prompt's mixers in one launch per layer (kernels.cu, "Prompt mixers"), where the token
//! path launches once per token:
//! - `attn_prefill`: causal GQA attention of `t` query rows over the cache (the prefix and the
//!   `t` new rows), flash-attention style in f32 with an online softmax, the output gate applied
//!   in its epilogue. Used by [`Backend::attention`] and [`Backend::fused_attention`] for
//!   `t > 1`; its plain twin is [`Cuda::attention_rows`] (`attn_decode` once per row).
//! - `gdn_rows{8,16,32}`: the gated delta rule over `t` tokens with each thread's rows of the
//!   state in registers for the whole prompt, for [`Backend::gdn_chunked`]; its plain twin is
//!   [`Backend::gdn_recurrent`] (`gdn_step` once per token). Same arithmetic as `gdn_step` (the
//!   recurrent definition, arch-spec §6.5), not the chunked algebra of §6.6.
//!
//! Shapes the kernels do not take (head_dim over 256 or not a multiple of 4, dk over 256) go
//! the per-token way.
use cudarc::driver::LaunchConfig;
use flashmoe_core::backend::{AttnShape, Backend, GdnShape};
use flashmoe_core::{Error, Result};

use super::{cache_at, ce, gdn_room, room, Cuda, CudaBuf};
use crate::device::A;
use crate::kernel::Kernel;
use crate::ops::{self, threads_for};

/// Query rows and key rows of an `attn_prefill` tile (`APF_Q`, `APF_K` in kernels.cu).
const APF_Q: usize = 16;
const APF_K: usize = 16;
/// Shared memory a block may use without raising its limit.
const SMEM: usize = 48 * 1024;

/// Whether `attn_prefill` takes heads of `s`.
fn attn_fits(s: &AttnShape) -> bool {
    let hd = s.head_dim;
    hd > 0
        && hd <= 256
        && hd.is_multiple_of(4)
        && s.kv_heads > 0
        && s.heads.is_multiple_of(s.kv_heads)
}

/// `gdn_rows` for key heads of `dk`: (kernel, parts per column P, rows per part RP); 4 parts
/// up to dk 128, 8 up to 256.
fn gdn_kernel(dk: usize) -> Option<(Kernel, usize, usize)> {
    gdn_kernel_parts(dk, if dk <= 128 { 4 } else { 8 })
}

/// `gdn_rows` with `parts` parts a column (a power of two, 2 to 32) for key heads of `dk`:
/// the kernel of the fewest rows a part that covers dk.
fn gdn_kernel_parts(dk: usize, parts: usize) -> Option<(Kernel, usize, usize)> {
    if !parts.is_power_of_two() || !(2..=32).contains(&parts) {
        return None;
    }
    [
        (Kernel::GdnRows8, 8),
        (Kernel::GdnRows16, 16),
        (Kernel::GdnRows32, 32),
    ]
    .into_iter()
    .find(|&(_, rp)| dk > 0 && dk <= parts * rp)
    .map(|(k, rp)| (k, parts, rp))
}

impl Cuda {
    /// Appends `k, v [t, kv_width]` to the caches at row `pos0`, growing them.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn append_kv(
        &self,
        op: &str,
        k: &CudaBuf,
        v: &CudaBuf,
        kc: &mut CudaBuf,
        vc: &mut CudaBuf,
        s: &AttnShape,
        pos0: usize,
        t: usize,
    ) -> Result<()> {
        kc.written();
        vc.written();
        let kvw = s.kv_width();
        cache_at(op, kc, vc, kvw, pos0)?;
        room(op, "k", k, t * kvw)?;
        room(op, "v", v, t * kvw)?;
        let n = (pos0 + t) * kvw;
        for (c, src) in [(&mut *kc, k), (&mut *vc, v)] {
            self.grow(c, n)?;
            self.copy(c.at(pos0 * kvw), src.ptr(), t * kvw)?;
            c.len = n;
        }
        Ok(())
    }

    /// `o [t, heads*hd]` for query rows `q [t, heads*hd]` at positions `pos0..` over caches
    /// that already hold them: `attn_decode` once per row (the plain twin of `attn_prefill`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_rows(
        &self,
        q: &CudaBuf,
        kc: &CudaBuf,
        vc: &CudaBuf,
        s: &AttnShape,
        pos0: usize,
        t: usize,
        o: &mut CudaBuf,
    ) -> Result<()> {
        o.written();
        let dev = self.bind()?;
        let a = ops::AttnShape {
            nh: s.heads,
            nkv: s.kv_heads,
            hd: s.head_dim,
            gated: false,
            rot: s.rotary_dim,
            theta: s.rope_theta,
            eps: s.eps,
        };
        let ow = s.o_width();
        for i in 0..t {
            let (qi, oi) = (q.at(i * ow), o.at(i * ow));
            ops::attn_decode(dev, &a, qi, kc.ptr(), vc.ptr(), 0, pos0 + i + 1, oi, None)
                .map_err(ce)?;
        }
        Ok(())
    }

    /// [`Cuda::attention_rows`] in one `attn_prefill` launch, times sigmoid(`gate [t,
    /// heads*hd]`) when given. `false` (nothing launched) for shapes it does not take.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_prefill(
        &self,
        q: &CudaBuf,
        kc: &CudaBuf,
        vc: &CudaBuf,
        gate: Option<&CudaBuf>,
        s: &AttnShape,
        pos0: usize,
        t: usize,
        o: &mut CudaBuf,
    ) -> Result<bool> {
        if !attn_fits(s) {
            return Ok(false);
        }
        o.written();
        let dev = self.bind()?;
        let ow = s.o_width();
        room("attn_prefill", "q", q, t * ow)?;
        room("attn_prefill", "o", o, t * ow)?;
        room("attn_prefill", "k cache", kc, (pos0 + t) * s.kv_width())?;
        room("attn_prefill", "v cache", vc, (pos0 + t) * s.kv_width())?;
        if let Some(g) = gate {
            room("attn_prefill", "gate", g, t * ow)?;
        }
        if t == 0 {
            return Ok(true);
        }
        let hd = s.head_dim;
        let cfg = LaunchConfig {
            grid_dim: (s.heads as u32, t.div_ceil(APF_Q) as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: ((2 * APF_Q * (hd + 4) + APF_Q * (APF_K + 1) + 3 * APF_Q) * 4) as u32,
        };
        let args = [
            A::P(q.ptr()),
            A::P(kc.ptr()),
            A::P(vc.ptr()),
            A::P(gate.map_or(0, |g| g.ptr())),
            A::I(s.heads as i32),
            A::I(s.kv_heads as i32),
            A::I(hd as i32),
            A::I(t as i32),
            A::L(pos0 as i64),
            A::F(1.0 / (hd as f32).sqrt()),
            A::P(o.ptr()),
        ];
        dev.launch(Kernel::AttnPrefill, cfg, &args).map_err(ce)?;
        Ok(true)
    }

    /// [`Backend::fused_attention`] for a prompt (`t > 1`): `qk_norm_rope`, the new rows into
    /// the caches, `attn_prefill` with the gate in its epilogue. `false` (nothing done) where
    /// it does not apply.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn fused_attention_prompt(
        &self,
        qg: &CudaBuf,
        k: &mut CudaBuf,
        v: &CudaBuf,
        q_norm: &CudaBuf,
        k_norm: &CudaBuf,
        kc: &mut CudaBuf,
        vc: &mut CudaBuf,
        s: &AttnShape,
        pos0: usize,
        t: usize,
        o: &mut CudaBuf,
    ) -> Result<bool> {
        if t < 2 || !attn_fits(s) {
            return Ok(false);
        }
        let ow = s.o_width();
        let mut q = self.scratch(t * ow)?;
        let mut gate = self.scratch(if s.gated { t * ow } else { 0 })?;
        self.qk_norm_rope(qg, k, q_norm, k_norm, s, pos0, t, &mut q, &mut gate)?;
        self.append_kv("fused_attention", k, v, kc, vc, s, pos0, t)?;
        let gate = s.gated.then_some(&gate);
        self.attention_prefill(&q, kc, vc, gate, s, pos0, t, o)
    }

    /// [`Backend::gdn_chunked`]: the delta rule over `t` tokens in one `gdn_rows` launch.
    /// `false` (nothing launched) for shapes it does not take.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gdn_prompt(
        &self,
        u: &CudaBuf,
        b: &CudaBuf,
        a: &CudaBuf,
        dt_bias: &CudaBuf,
        neg_a: &CudaBuf,
        state: &mut CudaBuf,
        s: &GdnShape,
        t: usize,
        o: &mut CudaBuf,
    ) -> Result<bool> {
        let k = gdn_kernel(s.dk);
        self.gdn_prompt_with(k, [u, b, a, dt_bias, neg_a], state, s, t, o)
    }

    /// [`Cuda::gdn_prompt`] with `kernel` (name, parts, rows a part) chosen by the caller.
    pub(super) fn gdn_prompt_with(
        &self,
        kernel: Option<(Kernel, usize, usize)>,
        [u, b, a, dt_bias, neg_a]: [&CudaBuf; 5],
        state: &mut CudaBuf,
        s: &GdnShape,
        t: usize,
        o: &mut CudaBuf,
    ) -> Result<bool> {
        let Some((name, parts, rp)) = kernel else {
            return Ok(false);
        };
        if s.nk == 0 || !s.nv.is_multiple_of(s.nk) || s.dv == 0 {
            return Ok(false);
        }
        state.written();
        o.written();
        let dev = self.bind()?;
        gdn_room("gdn_chunked", [u, b, a, dt_bias, neg_a], state, o, s, t)?;
        let nv = s.nv;
        if t == 0 {
            return Ok(true);
        }
        // Columns of a block: up to 32 and 256 threads (a block of nc * P threads); a head's
        // columns over ceil(dv / nc) blocks, so the 64 heads of a 397B layer fill 256 blocks.
        let nc = s.dv.min(32).min(256 / parts);
        let per_token = (2 * parts * rp + nc + 2) * 4;
        if per_token > SMEM {
            return Err(Error::Invalid(format!(
                "cuda gdn_chunked: {per_token} bytes of shared memory a token, over {SMEM}"
            )));
        }
        // Tokens a chunk (staged between two barriers): as many as fit, at most 32.
        let chunk = (SMEM / per_token).min(32);
        let cfg = LaunchConfig {
            grid_dim: (nv as u32, s.dv.div_ceil(nc) as u32, 1),
            block_dim: (threads_for(nc * parts), 1, 1),
            shared_mem_bytes: (chunk * per_token) as u32,
        };
        let args = [
            A::P(u.ptr()),
            A::P(b.ptr()),
            A::P(a.ptr()),
            A::P(dt_bias.ptr()),
            A::P(neg_a.ptr()),
            A::P(state.ptr()),
            A::P(o.ptr()),
            A::I(s.nk as i32),
            A::I(nv as i32),
            A::I(s.dk as i32),
            A::I(s.dv as i32),
            A::I(parts as i32),
            A::I(nc as i32),
            A::I(t as i32),
            A::I(chunk as i32),
        ];
        dev.launch(name, cfg, &args).map_err(ce)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests;
