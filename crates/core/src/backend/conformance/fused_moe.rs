//! `fused_moe` (the MoE block after the router product) against [`Reference`]'s default
//! composition of the same ops: one token and a prompt, with and without a shared expert of the
//! routed experts' shape (the case CUDA runs as one more problem of the experts' launches).
use super::{random_linear, Ctx, Fmt, MemExperts};
use crate::backend::{Backend, ExpertCall, MoeCall, Reference};
use crate::error::Result;

/// Shapes of a [`fused_moe`] case: hidden width, expert intermediate width, experts, format.
#[derive(Clone, Copy, Debug)]
pub struct MoeShape {
    pub hidden: usize,
    pub inter: usize,
    pub experts: usize,
    pub fmt: Fmt,
}

/// Runs `fused_moe` on the backend and on the reference over `src`'s experts of `layer`
/// (`shape` says their shapes) and compares the updated residuals.
pub(super) fn fused_moe<B: Backend>(
    c: &mut Ctx<B>,
    src: &MemExperts,
    layer: usize,
    shape: MoeShape,
) -> Result<()> {
    let MoeShape {
        hidden: h,
        inter,
        experts: e,
        fmt: f,
    } = shape;
    let ws = [
        random_linear(&mut c.rng, inter, h, f),
        random_linear(&mut c.rng, inter, h, f),
        random_linear(&mut c.rng, h, inter, f),
    ];
    // As the model uploads a shared expert: gate|up one group.
    let gu = c.be.upload_group(&[&ws[0], &ws[1]])?;
    let dn = c.be.upload_mat(&ws[2])?;
    for (t, k, shared) in [(1, 3, true), (1, 3, false), (1, e, true), (4, 2, true)] {
        let (xn, lg, sg, x0) = (
            c.randv(t * h, 1.0),
            c.randv(t * e, 3.0),
            c.randv(t, 3.0),
            c.randv(t * h, 1.0),
        );
        let call = ExpertCall {
            source: src,
            layer,
            parallel: false,
        };
        let r = Reference;
        let m = MoeCall::<Reference> {
            call,
            xn: &xn,
            t,
            logits: &lg,
            ne: e,
            k,
            renorm: true,
            shared: shared.then_some([&ws[0], &ws[1], &ws[2]]),
            shared_gate: shared.then_some(&sg),
        };
        let mut want = x0.clone();
        let mut rr = r.alloc_routes(t, k)?;
        r.fused_moe(&m, &mut rr, &mut want)?;
        let (xnb, lgb, sgb) = (c.up(&xn)?, c.up(&lg)?, c.up(&sg)?);
        let mb = MoeCall::<B> {
            call,
            xn: &xnb,
            t,
            logits: &lgb,
            ne: e,
            k,
            renorm: true,
            shared: shared.then_some([&gu[0], &gu[1], &dn]),
            shared_gate: shared.then_some(&sgb),
        };
        let mut xb = c.up(&x0)?;
        let mut rb = c.be.alloc_routes(t, k)?;
        c.be.fused_moe(&mb, &mut rb, &mut xb)?;
        let got = c.down(&xb)?;
        let fused = t == 1 && c.be.fuses_moe(layer, k);
        let class = format!("t={t} k={k} shared={shared} fused={fused}");
        let b = c.mat_bound(f);
        c.cmp("fused_moe", &class, &got, &want, b);
    }
    Ok(())
}
