//! The slot-batch op ([`SlotBackend::slot_experts`]) and the fills behind it, driven through the
//! residency tier as the model drives it, against [`Reference::moe_experts`]: a tier much
//! smaller than the experts (evictions, batches cut at the group size, the middle tier when
//! the backend has one) and a tier holding them all (the layer published, then run without the
//! routing on the host when the backend can), over one token and a prompt, in two formats.
use super::{random_experts, Ctx, Fmt};
use crate::backend::{Backend, ExpertCall};
use crate::cache::CachePolicy;
use crate::error::Result;
use crate::residency::{Residency, SlotBackend, SlotLayout, TierSpec};
use crate::store::DType;

pub(super) fn slots<B: SlotBackend>(c: &mut Ctx<B>) -> Result<()> {
    let (h, inter, e) = (128, 64, 16);
    let layers = [0, 2];
    for f in [Fmt::Affine(4, 64, DType::BF16), Fmt::Bf16] {
        let src = random_experts(&mut c.rng, e, inter, h, f);
        let layout = SlotLayout::of(&src.experts[0])?;
        let small = TierSpec {
            experts: 6,
            policy: CachePolicy::Lru,
            warmup: 0,
            host_experts: 5,
            group: 4,
        };
        let all = TierSpec {
            experts: layers.len() * e,
            ..small
        };
        for (name, spec) in [("evicting", small), ("all resident", all)] {
            let mut tier = Residency::new(c.be, layout, &spec, &layers, e)?;
            tier.preload(c.be, &src, &layers)?;
            // The last prompt gathers more rows (t k) than one pass of CUDA's prompt experts.
            for (round, (t, k)) in [(1, 4), (1, 8), (6, 3), (1, 1), (5, 8), (520, 8)]
                .into_iter()
                .enumerate()
            {
                let layer = layers[round % 2];
                let (x, lg, routes) = c.routed(t, h, e, k)?;
                let call = ExpertCall {
                    source: &src,
                    layer,
                    parallel: false,
                };
                let mut want = vec![0f32; t * h];
                c.r.moe_experts(call, &x, &routes, Some(&routes), &mut want)?;
                let (xb, lgb) = (c.up(&x)?, c.up(&lg)?);
                let mut rb = c.be.alloc_routes(t, k)?;
                c.be.router_topk(&lgb, e, k, true, &mut rb)?;
                // A published layer runs as the model runs it: without the routing on the host.
                let host = if tier.layer_resident(layer) {
                    None
                } else {
                    c.be.routes_host(&rb, layer)?.map(|r| r.into_owned())
                };
                let mut out = c.be.upload(&vec![f32::NAN; t * h])?;
                tier.run(c.be, call, &xb, &rb, host.as_ref(), &mut out)?;
                let got = c.down(&out)?;
                let b = c.mat_bound(f);
                let path = if host.is_some() { "host" } else { "resident" };
                let class = format!("{} {name} t={t} k={k} {path} routing", f.label());
                c.cmp("slot_experts", &class, &got, &want, b);
            }
            if name == "evicting" && tier.stats().evictions == 0 {
                c.report.failures.push(format!(
                    "slot_experts [{}]: the small tier never evicted",
                    f.label()
                ));
            }
        }
    }
    Ok(())
}
