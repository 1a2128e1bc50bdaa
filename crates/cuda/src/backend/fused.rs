//! The fused operations of [`Cuda`] (the optional group of core's `Backend`), with the
//! kernels and epilogues of the token path behind them:
//! - `matmul_many` over one stacked group: one launch, the outputs views of one buffer;
//! - `fused_attention`, one token whose q|k|v are such views: `attn_prep` norms and rotates q
//!   and k and writes k and v straight into the caches, `attn_decode` applies the output gate;
//! - `fused_gdn_in`, one token: the in-projection's `mpc` kernel runs the causal conv of the
//!   channels it produces (`ops::Epilogue::Conv`);
//! - `fused_swiglu_mlp`: gate‖up in one launch, `swiglu_k` over it (preparing the hidden
//!   state for the down product's `mp` kernel when decoding);
//! - `fused_head_argmax`: the final norm prepares x for the head, whose `mpa` kernel reduces
//!   the argmax as its blocks write their rows.
//!
//! Each falls back to the composition of primitives where its fusion does not apply (several
//! tokens, matrices uploaded apart, shapes the kernels do not take), and each is checked
//! against that composition by the conformance harness. Scratch comes from the pool; the
//! only host round trip is the argmax's id.
use flashmoe_core::backend::{AttnShape, Backend, GdnShape};
use flashmoe_core::{Error, Result};

use super::{cache_at, ce, room, stacked, Cuda, CudaBuf, CudaMat};
use crate::ops::{self, Epilogue, Prepared};

/// `ys[i] = x W_i^T`; one launch when `ws` are one stacked group and `t == 1`.
pub(super) fn matmul_many(
    be: &Cuda,
    ws: &[&CudaMat],
    x: &CudaBuf,
    t: usize,
    ys: &mut [&mut CudaBuf],
) -> Result<()> {
    if ws.len() != ys.len() {
        return Err(Error::Invalid(format!(
            "cuda matmul_many: {} matrices, {} outputs",
            ws.len(),
            ys.len()
        )));
    }
    match stacked(ws).filter(|_| t == 1) {
        Some(m) => {
            let out = stacked_product(be, m, x)?;
            let mut row = 0;
            for (w, y) in ws.iter().zip(ys.iter_mut()) {
                **y = out.view(row, w.m.rows);
                row += w.m.rows;
            }
            Ok(())
        }
        None => {
            if t > 1 && gemm_many(be, ws, x, t, ys)? {
                return Ok(());
            }
            for (w, y) in ws.iter().zip(ys.iter_mut()) {
                be.matmul(w, x, t, y)?;
            }
            Ok(())
        }
    }
}

/// `matmul_many` of `t > 1` rows as one tensor-core GEMM launch when the matrices share
/// format and width (backend/gemm.rs); false when it does not apply.
fn gemm_many(
    be: &Cuda,
    ws: &[&CudaMat],
    x: &CudaBuf,
    t: usize,
    ys: &mut [&mut CudaBuf],
) -> Result<bool> {
    for (w, y) in ws.iter().zip(ys.iter()) {
        room("matmul_many", "x", x, t * w.m.cols)?;
        room("matmul_many", "y", y, t * w.m.rows)?;
    }
    let ms: Vec<&ops::DevMat> = ws.iter().map(|w| &w.m).collect();
    let yp: Vec<u64> = ys.iter().map(|y| y.ptr()).collect();
    if !be.gemm_products(&ms, x.ptr(), t, &yp)? {
        return Ok(false);
    }
    for y in ys.iter_mut() {
        y.written();
    }
    Ok(true)
}

/// `x m^T` for one token into a new buffer of `m.rows`.
fn stacked_product(be: &Cuda, m: &ops::DevMat, x: &CudaBuf) -> Result<CudaBuf> {
    let dev = be.bind()?;
    room("matmul_many", "x", x, m.cols)?;
    let out = be.buf(m.rows)?;
    let p = [(m.w, m.s, m.b, x.ptr(), out.ptr())];
    let pre = x.prepared_for(m);
    ops::matvec_batch_prepared(dev, &dev.compute, m, &p, 1, m.cols, m.rows, pre).map_err(ce)?;
    Ok(out)
}

/// Whether `qg`, `k`, `v` lie back to back in one allocation, as `matmul_many` leaves them.
fn adjacent(qg: &CudaBuf, k: &CudaBuf, v: &CudaBuf, s: &AttnShape) -> bool {
    k.ptr() == qg.ptr() + (s.q_rows() * 4) as u64 && v.ptr() == k.ptr() + (s.kv_width() * 4) as u64
}

/// One decode token's attention from adjacent projections (see the module doc); `None` when
/// the fused kernels do not apply.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention(
    be: &Cuda,
    [qg, k, v]: [&CudaBuf; 3],
    q_norm: &CudaBuf,
    k_norm: &CudaBuf,
    kc: &mut CudaBuf,
    vc: &mut CudaBuf,
    s: &AttnShape,
    pos0: usize,
    t: usize,
    o: &mut CudaBuf,
) -> Result<Option<()>> {
    if t != 1 || s.head_dim > 256 || !adjacent(qg, k, v, s) {
        return Ok(None);
    }
    let dev = be.bind()?;
    let kvw = s.kv_width();
    cache_at("fused_attention", kc, vc, kvw, pos0)?;
    room("fused_attention", "o", o, s.o_width())?;
    room("fused_attention", "q_norm", q_norm, s.head_dim)?;
    room("fused_attention", "k_norm", k_norm, s.head_dim)?;
    let n = (pos0 + 1) * kvw;
    for c in [&mut *kc, &mut *vc] {
        be.grow(c, n)?;
        c.len = n;
    }
    let a = ops::AttnShape {
        nh: s.heads,
        nkv: s.kv_heads,
        hd: s.head_dim,
        gated: s.gated,
        rot: s.rotary_dim,
        theta: s.rope_theta,
        eps: s.eps,
    };
    let q = be.buf(s.o_width())?;
    let (qkv, qn, kn) = (qg.ptr(), q_norm.ptr(), k_norm.ptr());
    ops::attn_prep(dev, &a, qkv, qn, kn, pos0, q.ptr(), kc.ptr(), vc.ptr()).map_err(ce)?;
    // The output prepared for the o-projection (whole warps per head: hd % 32 == 0).
    let prep = if s.head_dim.is_multiple_of(32) {
        be.prep_room(s.o_width(), 1)?
    } else {
        [None, None]
    };
    let pre = Cuda::prep_args(&prep)[0];
    let (kp, vp) = (kc.ptr(), vc.ptr());
    ops::attn_decode(dev, &a, q.ptr(), kp, vp, qkv, pos0 + 1, o.ptr(), pre).map_err(ce)?;
    o.attach(prep);
    Ok(Some(()))
}

/// x prepared for `m`'s `mp` kernel in prepared-x slot `slot` (one `quant_x3` launch), when
/// `m` runs that kernel.
fn prepare(be: &Cuda, m: &ops::DevMat, x: &CudaBuf, slot: usize) -> Result<Option<Prepared>> {
    let dev = be.bind()?;
    let Some(bits) = m.prepared_bits() else {
        return Ok(None);
    };
    let at = dev.qx_slot(slot);
    ops::prepare_x(dev, m, x.ptr(), at).map_err(ce)?;
    Ok(Some(Prepared { at, bits, qb: 0 }))
}

/// The in-projection and conv of one decode token with the conv in the projection's epilogue;
/// `None` when it does not apply.
#[allow(clippy::too_many_arguments)]
pub(super) fn gdn_in(
    be: &Cuda,
    w: [&CudaMat; 4],
    x: &CudaBuf,
    t: usize,
    conv_w: &CudaBuf,
    state: &mut CudaBuf,
    s: &GdnShape,
    [u, z, b, a]: [&mut CudaBuf; 4],
) -> Result<Option<()>> {
    let Some(m) = stacked(&w).filter(|_| t == 1) else {
        return Ok(None);
    };
    let cd = s.conv_dim();
    let probe = Epilogue::Conv {
        state: 0,
        w: 0,
        u: 0,
        cd,
        k: s.kconv,
    };
    let pre = m
        .prepared_bits()
        .map(|bits| Prepared { at: 0, bits, qb: 0 });
    if !ops::epilogue_fits(m, pre, &probe) {
        return Ok(None);
    }
    room("fused_gdn_in", "x", x, m.cols)?;
    room("fused_gdn_in", "state", state, s.conv_state_len())?;
    room("fused_gdn_in", "conv_w", conv_w, cd * s.kconv)?;
    room("fused_gdn_in", "u", u, cd)?;
    let pre = match x.prepared_for(m) {
        Some(p) => p,
        None => match prepare(be, m, x, 0)? {
            Some(p) => p,
            None => return Ok(None),
        },
    };
    let dev = be.bind()?;
    let out = be.buf(m.rows)?;
    let epi = Epilogue::Conv {
        state: state.ptr(),
        w: conv_w.ptr(),
        u: u.ptr(),
        cd,
        k: s.kconv,
    };
    ops::matvec_epilogue(dev, m, x.ptr(), out.ptr(), pre, epi).map_err(ce)?;
    let mut row = cd;
    for (y, n) in [(z, w[1].m.rows), (b, w[2].m.rows), (a, w[3].m.rows)] {
        *y = out.view(row, n);
        row += n;
    }
    Ok(Some(()))
}

/// `y = down(silu(gate x) * up x)` with gate‖up stacked; `None` when they are not.
pub(super) fn swiglu_mlp(
    be: &Cuda,
    [gate, up, down]: [&CudaMat; 3],
    x: &CudaBuf,
    t: usize,
    y: &mut CudaBuf,
) -> Result<Option<()>> {
    let Some(gu) = stacked(&[gate, up]) else {
        return Ok(None);
    };
    let dev = be.bind()?;
    let (inter, h) = (gate.m.rows, gu.cols);
    if up.m.rows != inter || down.m.cols != inter {
        return Err(Error::Invalid(format!(
            "cuda fused_swiglu_mlp: gate {inter} rows, up {} rows, down {} columns",
            up.m.rows, down.m.cols
        )));
    }
    room("fused_swiglu_mlp", "x", x, t * h)?;
    room("fused_swiglu_mlp", "y", y, t * down.m.rows)?;
    let g = be.buf(t * 2 * inter)?;
    let p = [(gu.w, gu.s, gu.b, x.ptr(), g.ptr())];
    let pre = x.prepared_for(gu).filter(|_| t == 1);
    if !(t > 1 && be.gemm_products(&[gu], x.ptr(), t, &[g.ptr()])?) {
        ops::matvec_batch_prepared(dev, &dev.compute, gu, &p, t, h, 2 * inter, pre).map_err(ce)?;
    }
    let hid = be.buf(t * inter)?;
    // Decoding, SwiGLU prepares the hidden state for the down product's `mp` kernel.
    let dm = &down.m;
    let pre = dm
        .prepared_bits()
        .filter(|_| t == 1 && ops::epilogues())
        .map(|bits| Prepared {
            at: dev.qx_slot(1),
            bits,
            qb: 0,
        });
    ops::swiglu(dev, g.ptr(), hid.ptr(), inter, t, pre).map_err(ce)?;
    let p = [(dm.w, dm.s, dm.b, hid.ptr(), y.ptr())];
    if !(t > 1 && be.gemm_products(&[dm], hid.ptr(), t, &[y.ptr()])?) {
        ops::matvec_batch_prepared(dev, &dev.compute, dm, &p, t, inter, dm.rows, pre)
            .map_err(ce)?;
    }
    Ok(Some(()))
}

/// Greedy decoding's head: the final norm prepares x for the head's `mp` kernel, whose
/// blocks reduce the argmax (`mpa`); else the head's product and `argmax_f32`.
pub(super) fn head_argmax(
    be: &Cuda,
    x: &CudaBuf,
    norm: &CudaBuf,
    eps: f32,
    head: &CudaMat,
) -> Result<u32> {
    let dev = be.bind()?;
    let (m, h) = (&head.m, norm.len);
    if h != m.cols {
        return Err(Error::Invalid(format!(
            "cuda fused_head_argmax: norm of {h} for a head of {} columns",
            m.cols
        )));
    }
    room("fused_head_argmax", "x", x, h)?;
    let key = be.buf(2)?;
    // Zeroed first, so nothing but kernels runs between the head and its argmax.
    dev.memset_async(key.ptr(), 8).map_err(ce)?;
    let pre = m
        .prepared_bits()
        .filter(|_| ops::epilogues())
        .map(|bits| Prepared {
            at: dev.qx_slot(0),
            bits,
            qb: 0,
        });
    let xn = be.buf(h)?;
    let (np, xp) = (norm.ptr(), xn.ptr());
    ops::rmsnorm_rows(dev, x.ptr(), h, np, xp, h, h, 1, eps, pre).map_err(ce)?;
    let logits = be.buf(m.rows)?;
    let epi = Epilogue::Argmax { key: key.ptr() };
    match pre {
        Some(p) if ops::epilogue_fits(m, pre, &epi) => {
            ops::matvec_epilogue(dev, m, xp, logits.ptr(), p, epi).map_err(ce)?
        }
        _ => {
            let p = [(m.w, m.s, m.b, xp, logits.ptr())];
            ops::matvec_batch_prepared(dev, &dev.compute, m, &p, 1, h, m.rows, pre).map_err(ce)?;
            ops::argmax_zeroed(dev, logits.ptr(), m.rows, key.ptr()).map_err(ce)?;
        }
    }
    read_key(be, &key)
}

/// The index an argmax key (`ops::argmax`) holds, read back (waits for the device).
pub(super) fn read_key(be: &Cuda, key: &CudaBuf) -> Result<u32> {
    let mut k = [0f32; 2];
    be.bind()?.read_f32(key.ptr(), &mut k).map_err(ce)?;
    let bits = k[0].to_bits() as u64 | (k[1].to_bits() as u64) << 32;
    if !ops::argmax_value(bits).is_finite() {
        return Err(Error::NonFiniteArgmax { pos: 0 });
    }
    Ok(ops::argmax_index(bits))
}
