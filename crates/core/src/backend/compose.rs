//! The fused operations of [`Backend`] composed from its primitives: the trait's default
//! bodies, and what a backend that fuses an op falls back on where its fusion does not apply
//! (CUDA's one-token kernels, for a prompt). Each has the contract of the trait method of the
//! same name (`fused_attention`, `fused_gdn_in`, `fused_swiglu_mlp`,
//! `fused_moe`).
use super::{AttnShape, Backend, ExpertTimes, GdnShape, MoeCall};
use crate::error::Result;

/// [`Backend::fused_attention`]: `qk_norm_rope` (k normed and rotated in place), `attention`
/// over the caches, the output gate when `s.gated`.
#[allow(clippy::too_many_arguments)]
pub fn attention<B: Backend>(
    be: &B,
    qg: &B::Buf,
    k: &mut B::Buf,
    v: &B::Buf,
    q_norm: &B::Buf,
    k_norm: &B::Buf,
    kc: &mut B::Buf,
    vc: &mut B::Buf,
    s: &AttnShape,
    pos0: usize,
    t: usize,
    o: &mut B::Buf,
) -> Result<()> {
    let mut q = be.scratch(t * s.o_width())?;
    let mut gate = be.scratch(if s.gated { t * s.o_width() } else { 0 })?;
    be.qk_norm_rope(qg, k, q_norm, k_norm, s, pos0, t, &mut q, &mut gate)?;
    be.attention(&q, k, v, kc, vc, s, pos0, t, o)?;
    if s.gated {
        be.gated_output(o, &gate)?;
    }
    Ok(())
}

/// [`Backend::fused_gdn_in`]: `matmul_many` over the in-projections, `gdn_conv` of the first.
#[allow(clippy::too_many_arguments)]
pub fn gdn_in<B: Backend>(
    be: &B,
    w: [&B::Mat; 4],
    x: &B::Buf,
    t: usize,
    conv_w: &B::Buf,
    state: &mut B::Buf,
    s: &GdnShape,
    [u, z, b, a]: [&mut B::Buf; 4],
) -> Result<()> {
    let mut mixed = be.scratch(t * s.conv_dim())?;
    be.matmul_many(&w, x, t, &mut [&mut mixed, z, b, a])?;
    be.gdn_conv(&mixed, state, conv_w, s, t, u)
}

/// [`Backend::fused_swiglu_mlp`]: gate and up by `matmul_many`, `swiglu`, down.
pub fn swiglu_mlp<B: Backend>(
    be: &B,
    [gate, up, down]: [&B::Mat; 3],
    x: &B::Buf,
    t: usize,
    y: &mut B::Buf,
) -> Result<()> {
    let inter = be.mat_shape(gate).0;
    let mut g = be.scratch(t * inter)?;
    let mut u = be.scratch(t * inter)?;
    be.matmul_many(&[gate, up], x, t, &mut [&mut g, &mut u])?;
    let mut hdn = be.scratch(t * inter)?;
    be.swiglu(&g, &u, &mut hdn)?;
    be.matmul(down, &hdn, t, y)
}

/// [`Backend::fused_moe`]: `router_topk`, the shared expert (`fused_swiglu_mlp`), the routing
/// to the host (`routes_host`), `moe_experts`, `moe_combine`: the MoE block's ops in order.
pub fn moe<B: Backend>(
    be: &B,
    m: &MoeCall<'_, B>,
    routes: &mut B::Routes,
    x: &mut B::Buf,
) -> Result<ExpertTimes> {
    be.router_topk(m.logits, m.ne, m.k, m.renorm, routes)?;
    let h = be.buf_len(m.xn).checked_div(m.t).unwrap_or(0);
    let shared = match m.shared {
        Some([g, u, d]) => {
            let mut ys = be.scratch(m.t * h)?;
            be.fused_swiglu_mlp(g, u, d, m.xn, m.t, &mut ys)?;
            Some(ys)
        }
        None => None,
    };
    let routes: &B::Routes = routes;
    let host = be.routes_host(routes, m.call.layer)?;
    // Written whole by `moe_experts`.
    let mut routed = be.scratch(m.t * h)?;
    let et = be.moe_experts(m.call, m.xn, routes, host.as_deref(), &mut routed)?;
    be.moe_combine(x, &routed, shared.as_ref(), m.shared_gate)?;
    Ok(et)
}
