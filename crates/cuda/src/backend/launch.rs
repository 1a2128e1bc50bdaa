//! Launches of the kernels that exist for core's `Backend` primitives only (the fused ops fold
//! them into others on the token path): `silu_mul`, `mul_sigmoid`, `qk_norm_rope`,
//! `gdn_conv_rows`, `gated_rmsnorm_rows` in kernels.cu.
use cudarc::driver::LaunchConfig;
use flashmoe_core::backend::AttnShape;

use crate::device::{Device, A};
use crate::kernel::Kernel;
use crate::ops::{elementwise, threads_for, Prepared};
use crate::{CudaError, Result};

/// out[i] = silu(g[i]) * u[i], i < n.
pub fn silu_mul(dev: &Device, g: u64, u: u64, out: u64, n: usize) -> Result<()> {
    dev.launch(
        Kernel::SiluMul,
        elementwise(n),
        &[A::P(g), A::P(u), A::P(out), A::I(n as i32)],
    )
}

/// o[i] *= sigmoid(g[i]), i < n.
pub fn mul_sigmoid(dev: &Device, o: u64, g: u64, n: usize) -> Result<()> {
    dev.launch(
        Kernel::MulSigmoid,
        elementwise(n),
        &[A::P(o), A::P(g), A::I(n as i32)],
    )
}

/// q/k RMSNorm and RoPE of `t` tokens from `pos0` (core's `qk_norm_rope`); `gate` is written
/// when `s.gated`.
#[allow(clippy::too_many_arguments)]
pub fn qk_norm_rope(
    dev: &Device,
    s: &AttnShape,
    qg: u64,
    k: u64,
    qn: u64,
    kn: u64,
    pos0: usize,
    t: usize,
    q: u64,
    gate: u64,
) -> Result<()> {
    let hd = s.head_dim;
    let cfg = LaunchConfig {
        grid_dim: ((s.heads + s.kv_heads) as u32, t as u32, 1),
        block_dim: (threads_for(hd).min(256), 1, 1),
        shared_mem_bytes: (hd * 4) as u32,
    };
    dev.launch(
        Kernel::QkNormRope,
        cfg,
        &[
            A::P(qg),
            A::P(k),
            A::P(qn),
            A::P(kn),
            A::I(s.heads as i32),
            A::I(s.kv_heads as i32),
            A::I(hd as i32),
            A::I((s.q_rows() / s.heads) as i32),
            A::F(s.eps),
            A::I(s.rotary_dim as i32),
            A::D(s.rope_theta),
            A::L(pos0 as i64),
            A::P(q),
            A::P(gate),
        ],
    )
}

/// The causal conv + SiLU of `t` tokens over `cd` channels with a `k`-tap kernel.
#[allow(clippy::too_many_arguments)]
pub fn gdn_conv_rows(
    dev: &Device,
    mixed: u64,
    state: u64,
    w: u64,
    cd: usize,
    k: usize,
    t: usize,
    u: u64,
) -> Result<()> {
    dev.launch(
        Kernel::GdnConvRows,
        elementwise(cd),
        &[
            A::P(mixed),
            A::P(state),
            A::P(w),
            A::I(cd as i32),
            A::I(k as i32),
            A::I(t as i32),
            A::P(u),
        ],
    )
}

/// y[r] = rmsnorm(o[r]) * w * silu(z[r]) for `rows` rows of `dv`; with `pre` (`dv` a
/// multiple of 32), y is also prepared there as one vector of `rows * dv`.
#[allow(clippy::too_many_arguments)]
pub fn gated_rmsnorm_rows(
    dev: &Device,
    o: u64,
    z: u64,
    w: u64,
    dv: usize,
    rows: usize,
    eps: f32,
    y: u64,
    pre: Option<Prepared>,
) -> Result<()> {
    if pre.is_some() && !dv.is_multiple_of(32) {
        return Err(CudaError::Invalid(format!(
            "gated_rmsnorm_rows: prepared y needs dv a multiple of 32, not {dv}"
        )));
    }
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads_for(dv).min(256), 1, 1),
        shared_mem_bytes: 0,
    };
    let (qx, qbits) = pre.map_or((0, 0), |p| (p.at, p.bits as i32));
    dev.launch(
        Kernel::GatedRmsnormRows,
        cfg,
        &[
            A::P(o),
            A::P(z),
            A::P(w),
            A::I(dv as i32),
            A::F(eps),
            A::P(y),
            A::P(qx),
            A::I(qbits),
            A::I((rows * dv) as i32),
        ],
    )
}
