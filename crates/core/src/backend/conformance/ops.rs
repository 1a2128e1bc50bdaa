//! The harness's sections: each runs a group of operations on the backend under test and on
//! [`Reference`] with the same random inputs, and compares every output and updated state.
use super::{attn_shapes, random_experts, random_linear, Ctx, Fmt, GDN};
use crate::backend::{Backend, ExpertCall, Reference, Routes};
use crate::error::Result;
use crate::store::DType;

/// `matmul` over every format and shape class (decode t=1, a few inputs, a blocked prefill
/// product; odd row counts for tails; one matrix large enough for the parallel path), and
/// `matmul_many` over a group.
pub(super) fn matmul<B: Backend>(c: &mut Ctx<B>) -> Result<()> {
    let mut cases: Vec<(Fmt, usize, usize, usize)> = Vec::new();
    for f in Fmt::all() {
        for t in [1, 3, 12] {
            cases.push((f, 37, 256, t));
        }
        cases.push((f, 64, 384, 2));
    }
    for t in [1, 12] {
        cases.push((Fmt::Affine(4, 64, DType::BF16), 1030, 1024, t));
        cases.push((Fmt::Bf16, 1030, 1024, t));
    }
    // Prompts of several row and token tiles of a GEMM (CUDA's tensor-core products: 128 rows
    // by 64 tokens per block), ragged in both, in each code width.
    cases.push((Fmt::Affine(4, 64, DType::BF16), 300, 1024, 70));
    cases.push((Fmt::Affine(8, 32, DType::F16), 130, 512, 129));
    cases.push((Fmt::Affine(2, 128, DType::F32), 200, 768, 65));
    for (f, rows, cols, t) in cases {
        let w = random_linear(&mut c.rng, rows, cols, f);
        let x = c.randv(t * cols, 1.0);
        let mut want = vec![0f32; t * rows];
        c.r.matmul(&w, &x, t, &mut want)?;
        let (wb, xb) = (c.be.upload_mat(&w)?, c.up(&x)?);
        let mut y = c.be.alloc(t * rows)?;
        c.be.matmul(&wb, &xb, t, &mut y)?;
        let got = c.down(&y)?;
        let class = format!("{} [{rows}x{cols}] t={t}", f.label());
        let b = c.mat_bound(f);
        c.cmp("matmul", &class, &got, &want, b);
    }
    // matmul_many: q|k|v-like group of one format.
    let f = Fmt::Affine(4, 64, DType::BF16);
    for t in [1, 5] {
        let ws: Vec<_> = [96, 32, 32]
            .iter()
            .map(|&r| random_linear(&mut c.rng, r, 128, f))
            .collect();
        let x = c.randv(t * 128, 1.0);
        let up = c.be.upload_group(&[&ws[0], &ws[1], &ws[2]])?;
        let xb = c.up(&x)?;
        let mut ys: Vec<B::Buf> = ws
            .iter()
            .map(|w| c.be.alloc(t * w.rows()))
            .collect::<Result<_>>()?;
        let mut outs: Vec<&mut B::Buf> = ys.iter_mut().collect();
        c.be.matmul_many(&[&up[0], &up[1], &up[2]], &xb, t, &mut outs)?;
        for (w, y) in ws.iter().zip(&ys) {
            let mut want = vec![0f32; t * w.rows()];
            c.r.matmul(w, &x, t, &mut want)?;
            let got = c.down(y)?;
            let b = c.mat_bound(f);
            c.cmp(
                "matmul_many",
                &format!("{} t={t}", f.label()),
                &got,
                &want,
                b,
            );
        }
    }
    Ok(())
}

/// `embed` of every format; `copy_rows`.
pub(super) fn embed<B: Backend>(c: &mut Ctx<B>) -> Result<()> {
    let ids = [3u32, 0, 17, 3];
    for f in Fmt::all() {
        let table = random_linear(&mut c.rng, 20, 128, f);
        let mut want = vec![0f32; ids.len() * 128];
        c.r.embed(&table, &ids, &mut want)?;
        let tb = c.be.upload_mat(&table)?;
        let mut out = c.be.alloc(ids.len() * 128)?;
        c.be.embed(&tb, &ids, &mut out)?;
        let got = c.down(&out)?;
        let b = c.bounds.exact;
        c.cmp("embed", &f.label(), &got, &want, b);
    }
    let src = c.randv(5 * 48, 1.0);
    let sb = c.up(&src)?;
    for (row0, n) in [(4, 1), (1, 3)] {
        let mut d = c.be.alloc(n * 48)?;
        c.be.copy_rows(&sb, 48, row0, n, &mut d)?;
        let got = c.down(&d)?;
        let b = c.bounds.exact;
        c.cmp(
            "copy_rows",
            &format!("rows {row0}+{n}"),
            &got,
            &src[row0 * 48..][..n * 48],
            b,
        );
    }
    Ok(())
}

/// `rmsnorm`, `add_rmsnorm`, `add`, `swiglu`, `gated_output`, `gated_rmsnorm`.
pub(super) fn norms<B: Backend>(c: &mut Ctx<B>) -> Result<()> {
    let b = c.bounds.f32_ops;
    for (rows, n) in [(1, 4096), (3, 96), (7, 24)] {
        let class = format!("[{rows}x{n}]");
        let (x, d, w) = (c.randv(rows * n, 2.0), c.randv(rows * n, 1.0), c.normw(n));
        let (xb, db, wb) = (c.up(&x)?, c.up(&d)?, c.up(&w)?);
        let mut want = vec![0f32; rows * n];
        c.r.rmsnorm(&x, &w, 1e-6, &mut want)?;
        let mut out = c.be.alloc(rows * n)?;
        c.be.rmsnorm(&xb, &wb, 1e-6, &mut out)?;
        let got = c.down(&out)?;
        c.cmp("rmsnorm", &class, &got, &want, b);

        let (mut xr, mut wantn) = (x.clone(), vec![0f32; rows * n]);
        c.r.add_rmsnorm(&mut xr, &d, &w, 1e-6, &mut wantn)?;
        let mut xg = c.up(&x)?;
        c.be.add_rmsnorm(&mut xg, &db, &wb, 1e-6, &mut out)?;
        let (gx, gn) = (c.down(&xg)?, c.down(&out)?);
        c.cmp("add_rmsnorm", &format!("{class} sum"), &gx, &xr, b);
        c.cmp("add_rmsnorm", &format!("{class} norm"), &gn, &wantn, b);

        let mut xr = x.clone();
        c.r.add(&mut xr, &d)?;
        let mut xg = c.up(&x)?;
        c.be.add(&mut xg, &db)?;
        let got = c.down(&xg)?;
        c.cmp("add", &class, &got, &xr, b);

        let mut want = vec![0f32; rows * n];
        c.r.swiglu(&x, &d, &mut want)?;
        c.be.swiglu(&xb, &db, &mut out)?;
        let got = c.down(&out)?;
        c.cmp("swiglu", &class, &got, &want, b);

        let mut xr = x.clone();
        c.r.gated_output(&mut xr, &d)?;
        let mut xg = c.up(&x)?;
        c.be.gated_output(&mut xg, &db)?;
        let got = c.down(&xg)?;
        c.cmp("gated_output", &class, &got, &xr, b);

        let mut want = vec![0f32; rows * n];
        c.r.gated_rmsnorm(&x, &d, &w, 1e-6, &mut want)?;
        c.be.gated_rmsnorm(&xb, &db, &wb, 1e-6, &mut out)?;
        let got = c.down(&out)?;
        c.cmp("gated_rmsnorm", &class, &got, &want, b);
    }
    Ok(())
}

/// `qk_norm_rope` and `attention` (prefill from empty, decode after a cached prefix, a
/// prefill chunk after a prefix; prompts of more than 64 rows, from empty and after a prefix,
/// which a backend may run in query tiles with a ragged last one), gated and plain shapes,
/// positions up to 1e5.
pub(super) fn attention<B: Backend>(c: &mut Ctx<B>) -> Result<()> {
    for s in attn_shapes() {
        for (pos0, t) in [(0, 5), (6, 1), (3, 4), (100_000, 1), (0, 70), (45, 67)] {
            let class = format!("gated={} hd={} pos0={pos0} t={t}", s.gated, s.head_dim);
            let (qg, k0) = (c.randv(t * s.q_rows(), 2.0), c.randv(t * s.kv_width(), 2.0));
            let (qn, kn) = (c.normw(s.head_dim), c.normw(s.head_dim));
            let gl = if s.gated { t * s.o_width() } else { 0 };
            let (mut q_r, mut g_r, mut k_r) =
                (vec![0f32; t * s.o_width()], vec![0f32; gl], k0.clone());
            c.r.qk_norm_rope(&qg, &mut k_r, &qn, &kn, &s, pos0, t, &mut q_r, &mut g_r)?;
            let (qgb, qnb, knb) = (c.up(&qg)?, c.up(&qn)?, c.up(&kn)?);
            let mut kb = c.up(&k0)?;
            let mut qb = c.be.alloc(t * s.o_width())?;
            let mut gb = c.be.alloc(gl)?;
            c.be.qk_norm_rope(&qgb, &mut kb, &qnb, &knb, &s, pos0, t, &mut qb, &mut gb)?;
            let b = c.bounds.f32_ops;
            let (q, g, k) = (c.down(&qb)?, c.down(&gb)?, c.down(&kb)?);
            c.cmp("qk_norm_rope", &format!("{class} q"), &q, &q_r, b);
            c.cmp("qk_norm_rope", &format!("{class} gate"), &g, &g_r, b);
            c.cmp("qk_norm_rope", &format!("{class} k"), &k, &k_r, b);
            if pos0 > 1000 {
                continue; // a 1e5-token cache is the RoPE case only
            }
            // Attention over a random cached prefix of pos0 rows.
            let (kc0, vc0) = (
                c.randv(pos0 * s.kv_width(), 1.0),
                c.randv(pos0 * s.kv_width(), 1.0),
            );
            let v = c.randv(t * s.kv_width(), 1.0);
            let (mut kcr, mut vcr, mut o_r) =
                (kc0.clone(), vc0.clone(), vec![0f32; t * s.o_width()]);
            c.r.attention(&q_r, &k_r, &v, &mut kcr, &mut vcr, &s, pos0, t, &mut o_r)?;
            let (qb, kb, vb) = (c.up(&q_r)?, c.up(&k_r)?, c.up(&v)?);
            let (mut kcb, mut vcb) = (c.up(&kc0)?, c.up(&vc0)?);
            let mut ob = c.be.alloc(t * s.o_width())?;
            c.be.attention(&qb, &kb, &vb, &mut kcb, &mut vcb, &s, pos0, t, &mut ob)?;
            let b = c.bounds.seq_ops;
            let (o, kc, vc) = (c.down(&ob)?, c.down(&kcb)?, c.down(&vcb)?);
            c.cmp("attention", &format!("{class} out"), &o, &o_r, b);
            c.cmp("attention", &format!("{class} k cache"), &kc, &kcr, b);
            c.cmp("attention", &format!("{class} v cache"), &vc, &vcr, b);
            // The fused form from the projections.
            let (mut kr2, mut kcr, mut vcr) = (k0.clone(), kc0.clone(), vc0.clone());
            let mut o_r = vec![0f32; t * s.o_width()];
            let r = Reference;
            r.fused_attention(
                &qg, &mut kr2, &v, &qn, &kn, &mut kcr, &mut vcr, &s, pos0, t, &mut o_r,
            )?;
            let (mut kb, mut kcb, mut vcb) = (c.up(&k0)?, c.up(&kc0)?, c.up(&vc0)?);
            let vb = c.up(&v)?;
            c.be.fused_attention(
                &qgb, &mut kb, &vb, &qnb, &knb, &mut kcb, &mut vcb, &s, pos0, t, &mut ob,
            )?;
            let (o, kc) = (c.down(&ob)?, c.down(&kcb)?);
            c.cmp("fused_attention", &format!("{class} out"), &o, &o_r, b);
            c.cmp("fused_attention", &format!("{class} k cache"), &kc, &kcr, b);
        }
    }
    Ok(())
}

/// `fused_attention` on the outputs of `matmul_many` over a q|k|v group, as the model calls it
/// (a backend may fuse only there: CUDA's one-token path needs q|k|v adjacent, as its stacked
/// product leaves them), decoding after a cached prefix and a prompt.
pub(super) fn attention_proj<B: Backend>(c: &mut Ctx<B>) -> Result<()> {
    let (f, h) = (Fmt::F32, 128);
    for s in attn_shapes() {
        let rows = [s.q_rows(), s.kv_width(), s.kv_width()];
        let ws: Vec<_> = rows
            .iter()
            .map(|&r| random_linear(&mut c.rng, r, h, f))
            .collect();
        let up = c.be.upload_group(&[&ws[0], &ws[1], &ws[2]])?;
        let (qn, kn) = (c.normw(s.head_dim), c.normw(s.head_dim));
        let (qnb, knb) = (c.up(&qn)?, c.up(&kn)?);
        for (pos0, t) in [(6, 1), (0, 1), (3, 4)] {
            let class = format!("gated={} hd={} pos0={pos0} t={t}", s.gated, s.head_dim);
            let x = c.randv(t * h, 1.0);
            let (kc0, vc0) = (
                c.randv(pos0 * s.kv_width(), 1.0),
                c.randv(pos0 * s.kv_width(), 1.0),
            );
            let mut proj: Vec<Vec<f32>> = rows.iter().map(|&r| vec![0f32; t * r]).collect();
            for (w, y) in ws.iter().zip(proj.iter_mut()) {
                c.r.matmul(w, &x, t, y)?;
            }
            let (mut kcr, mut vcr) = (kc0.clone(), vc0.clone());
            let mut o_r = vec![0f32; t * s.o_width()];
            let [qg, k, v] = &mut proj[..] else {
                unreachable!("three projections")
            };
            let (qn, kn) = (&qn, &kn);
            let r = Reference;
            r.fused_attention(qg, k, v, qn, kn, &mut kcr, &mut vcr, &s, pos0, t, &mut o_r)?;
            let xb = c.up(&x)?;
            let mut outs: Vec<B::Buf> = rows
                .iter()
                .map(|&r| c.be.alloc(t * r))
                .collect::<Result<_>>()?;
            let [qgb, kb, vb] = &mut outs[..] else {
                unreachable!("three projections")
            };
            let w = [&up[0], &up[1], &up[2]];
            c.be.matmul_many(&w, &xb, t, &mut [&mut *qgb, &mut *kb, &mut *vb])?;
            let (mut kcb, mut vcb) = (c.up(&kc0)?, c.up(&vc0)?);
            let mut ob = c.be.alloc(t * s.o_width())?;
            let (qnb, knb) = (&qnb, &knb);
            c.be.fused_attention(
                qgb, kb, vb, qnb, knb, &mut kcb, &mut vcb, &s, pos0, t, &mut ob,
            )?;
            let b = c.mat_bound(f).max(c.bounds.seq_ops);
            let (o, kc, vc) = (c.down(&ob)?, c.down(&kcb)?, c.down(&vcb)?);
            c.cmp("fused_attention", &format!("{class} proj out"), &o, &o_r, b);
            c.cmp(
                "fused_attention",
                &format!("{class} proj k cache"),
                &kc,
                &kcr,
                b,
            );
            c.cmp(
                "fused_attention",
                &format!("{class} proj v cache"),
                &vc,
                &vcr,
                b,
            );
        }
    }
    Ok(())
}

/// Random GatedDeltaNet inputs for `t` tokens: (u, b, a, dt_bias, neg_a, state).
type GdnIn = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

fn gdn_inputs<B: Backend>(c: &mut Ctx<B>, t: usize) -> GdnIn {
    let g = GDN;
    let u = c.randv(t * g.conv_dim(), 1.0);
    let b = c.randv(t * g.nv, 2.0);
    let a = c.randv(t * g.nv, 2.0);
    let dt = c.randv(g.nv, 1.0);
    let neg_a: Vec<f32> = c.randv(g.nv, 1.0).iter().map(|v| -v.exp()).collect();
    let st = c.randv(g.state_len(), 0.5);
    (u, b, a, dt, neg_a, st)
}

/// `gdn_conv`, `gdn_recurrent` (decode and a few tokens), `gdn_chunked` (within a chunk, a
/// whole chunk, a ragged tail) against the recurrent definition.
pub(super) fn gdn<B: Backend>(c: &mut Ctx<B>) -> Result<()> {
    let g = GDN;
    let b = c.bounds.seq_ops;
    for t in [1, 5] {
        let (mixed, st0) = (
            c.randv(t * g.conv_dim(), 1.0),
            c.randv(g.conv_state_len(), 1.0),
        );
        let w = c.randv(g.conv_dim() * g.kconv, 0.5);
        let (mut sr, mut ur) = (st0.clone(), vec![0f32; t * g.conv_dim()]);
        c.r.gdn_conv(&mixed, &mut sr, &w, &g, t, &mut ur)?;
        let (mb, wb) = (c.up(&mixed)?, c.up(&w)?);
        let mut sb = c.up(&st0)?;
        let mut ub = c.be.alloc(t * g.conv_dim())?;
        c.be.gdn_conv(&mb, &mut sb, &wb, &g, t, &mut ub)?;
        let (u, s) = (c.down(&ub)?, c.down(&sb)?);
        c.cmp("gdn_conv", &format!("t={t} out"), &u, &ur, b);
        c.cmp("gdn_conv", &format!("t={t} state"), &s, &sr, b);
    }
    for (op, t) in [
        ("gdn_recurrent", 1),
        ("gdn_recurrent", 3),
        ("gdn_chunked", 1),
    ]
    .into_iter()
    .chain([5, 64, 67, 130].map(|t| ("gdn_chunked", t)))
    {
        let (u, bb, a, dt, na, st0) = gdn_inputs(c, t);
        let (mut sr, mut or) = (st0.clone(), vec![0f32; t * g.value_dim()]);
        c.r.gdn_recurrent(&u, &bb, &a, &dt, &na, &mut sr, &g, t, &mut or)?;
        let (ub, bbb, ab, dtb, nab) = (c.up(&u)?, c.up(&bb)?, c.up(&a)?, c.up(&dt)?, c.up(&na)?);
        let mut sb = c.up(&st0)?;
        let mut ob = c.be.alloc(t * g.value_dim())?;
        if op == "gdn_chunked" {
            c.be.gdn_chunked(&ub, &bbb, &ab, &dtb, &nab, &mut sb, &g, t, &mut ob)?;
        } else {
            c.be.gdn_recurrent(&ub, &bbb, &ab, &dtb, &nab, &mut sb, &g, t, &mut ob)?;
        }
        let (o, s) = (c.down(&ob)?, c.down(&sb)?);
        c.cmp(op, &format!("t={t} out"), &o, &or, b);
        c.cmp(op, &format!("t={t} state"), &s, &sr, b);
    }
    Ok(())
}

/// `fused_gdn_in` (in-projection and conv) against the reference's composition.
pub(super) fn gdn_fused<B: Backend>(c: &mut Ctx<B>) -> Result<()> {
    let g = GDN;
    let h = 128;
    for f in [Fmt::Affine(4, 64, DType::BF16), Fmt::Bf16] {
        let rows = [g.conv_dim(), g.value_dim(), g.nv, g.nv];
        let ws: Vec<_> = rows
            .iter()
            .map(|&r| random_linear(&mut c.rng, r, h, f))
            .collect();
        let wr = [&ws[0], &ws[1], &ws[2], &ws[3]];
        let up = c.be.upload_group(&wr)?;
        let conv_w = c.randv(g.conv_dim() * g.kconv, 0.5);
        let cwb = c.up(&conv_w)?;
        for t in [1, 6] {
            let x = c.randv(t * h, 1.0);
            let st0 = c.randv(g.conv_state_len(), 1.0);
            let mut outs_r: Vec<Vec<f32>> = [g.conv_dim(), g.value_dim(), g.nv, g.nv]
                .iter()
                .map(|&n| vec![0f32; t * n])
                .collect();
            let mut sr = st0.clone();
            let [ur, zr, br, ar] = &mut outs_r[..] else {
                unreachable!("four outputs")
            };
            Reference.fused_gdn_in(wr, &x, t, &conv_w, &mut sr, &g, ur, zr, br, ar)?;
            let xb = c.up(&x)?;
            let mut sb = c.up(&st0)?;
            let mut outs: Vec<B::Buf> = [g.conv_dim(), g.value_dim(), g.nv, g.nv]
                .iter()
                .map(|&n| c.be.alloc(t * n))
                .collect::<Result<_>>()?;
            let [u, z, bo, a] = &mut outs[..] else {
                unreachable!("four outputs")
            };
            let w = [&up[0], &up[1], &up[2], &up[3]];
            c.be.fused_gdn_in(w, &xb, t, &cwb, &mut sb, &g, u, z, bo, a)?;
            let bound = c.mat_bound(f).max(c.bounds.seq_ops);
            for (name, (got, want)) in ["u", "z", "b", "a"].iter().zip(outs.iter().zip(&outs_r)) {
                let got = c.down(got)?;
                c.cmp(
                    "fused_gdn_in",
                    &format!("{} t={t} {name}", f.label()),
                    &got,
                    want,
                    bound,
                );
            }
            let s = c.down(&sb)?;
            c.cmp(
                "fused_gdn_in",
                &format!("{} t={t} state", f.label()),
                &s,
                &sr,
                bound,
            );
        }
    }
    Ok(())
}

/// `router_topk` (k of 1, the model's 10, all; renormalised or not) and `routes_host`;
/// `moe_experts` (serial and parallel, one token and a prompt); `moe_combine`;
/// `fused_swiglu_mlp`.
pub(super) fn moe<B: Backend>(c: &mut Ctx<B>) -> Result<()> {
    let (ne, t) = (64, 3);
    let logits = c.randv(t * ne, 4.0);
    let lb = c.up(&logits)?;
    for (k, renorm) in [(1, true), (10, true), (10, false), (64, true)] {
        let class = format!("k={k} renorm={renorm}");
        let mut want = Routes::default();
        c.r.router_topk(&logits, ne, k, renorm, &mut want)?;
        let mut rb = c.be.alloc_routes(t, k)?;
        c.be.router_topk(&lb, ne, k, renorm, &mut rb)?;
        let Some(got) = c.be.routes_host(&rb, 0)? else {
            // A backend keeping every expert resident need not read ids back; its routing
            // is checked through moe_experts.
            continue;
        };
        let got = got.into_owned();
        c.same("router_topk", &format!("{class} ids"), &got.ids, &want.ids);
        let b = c.bounds.f32_ops;
        c.cmp(
            "router_topk",
            &format!("{class} weights"),
            &got.weights,
            &want.weights,
            b,
        );
    }

    let (h, inter, e) = (128, 64, 8);
    let f = Fmt::Affine(4, 64, DType::BF16);
    let src = random_experts(&mut c.rng, e, inter, h, f);
    for (t, k, parallel) in [(1, 3, false), (1, 3, true), (6, 2, true), (6, 8, false)] {
        let (x, lg, routes) = c.routed(t, h, e, k)?;
        let call = ExpertCall {
            source: &src,
            layer: 0,
            parallel,
        };
        let mut want = vec![0f32; t * h];
        c.r.moe_experts(call, &x, &routes, Some(&routes), &mut want)?;
        let (xb, lgb) = (c.up(&x)?, c.up(&lg)?);
        let mut rb = c.be.alloc_routes(t, k)?;
        c.be.router_topk(&lgb, e, k, true, &mut rb)?;
        let host = c.be.routes_host(&rb, 0)?.map(|r| r.into_owned());
        let mut out = c.be.alloc(t * h)?;
        c.be.moe_experts(call, &xb, &rb, host.as_ref(), &mut out)?;
        let got = c.down(&out)?;
        let b = c.mat_bound(f);
        c.cmp(
            "moe_experts",
            &format!("t={t} k={k} parallel={parallel}"),
            &got,
            &want,
            b,
        );
    }

    let t = 4;
    let (x, r, s, g) = (
        c.randv(t * h, 1.0),
        c.randv(t * h, 1.0),
        c.randv(t * h, 1.0),
        c.randv(t, 3.0),
    );
    let (rb, sb, gb) = (c.up(&r)?, c.up(&s)?, c.up(&g)?);
    for (name, shared, gate) in [
        ("shared+gate", true, true),
        ("shared", true, false),
        ("routed only", false, false),
    ] {
        let mut xr = x.clone();
        c.r.moe_combine(&mut xr, &r, shared.then_some(&s), gate.then_some(&g))?;
        let mut xb = c.up(&x)?;
        c.be.moe_combine(&mut xb, &rb, shared.then_some(&sb), gate.then_some(&gb))?;
        let got = c.down(&xb)?;
        let b = c.bounds.f32_ops;
        c.cmp("moe_combine", name, &got, &xr, b);
    }

    for f in [
        Fmt::Affine(4, 64, DType::BF16),
        Fmt::Affine(8, 32, DType::BF16),
        Fmt::Bf16,
    ] {
        let (g, u, d) = (
            random_linear(&mut c.rng, inter, h, f),
            random_linear(&mut c.rng, inter, h, f),
            random_linear(&mut c.rng, h, inter, f),
        );
        for t in [1, 5] {
            let x = c.randv(t * h, 1.0);
            let mut want = vec![0f32; t * h];
            Reference.fused_swiglu_mlp(&g, &u, &d, &x, t, &mut want)?;
            let gu = c.be.upload_group(&[&g, &u])?;
            let db = c.be.upload_mat(&d)?;
            let xb = c.up(&x)?;
            let mut y = c.be.alloc(t * h)?;
            c.be.fused_swiglu_mlp(&gu[0], &gu[1], &db, &xb, t, &mut y)?;
            let got = c.down(&y)?;
            let b = c.mat_bound(f);
            c.cmp(
                "fused_swiglu_mlp",
                &format!("{} t={t}", f.label()),
                &got,
                &want,
                b,
            );
        }
    }
    Ok(())
}

/// `argmax` (a clear maximum, ties to the lower index, NaN never wins) and
/// `fused_head_argmax`.
pub(super) fn head<B: Backend>(c: &mut Ctx<B>) -> Result<()> {
    let mut v = c.randv(1000, 1.0);
    v[613] = 5.0;
    let mut tie = v.clone();
    tie[200] = 5.0;
    let mut nan = v.clone();
    nan[7] = f32::NAN;
    // No finite largest value: an error on every backend, never an id.
    let mut inf = nan.clone();
    inf[500] = f32::INFINITY;
    let all_nan = vec![f32::NAN; 5000];
    for (name, x) in [
        ("clear", v),
        ("tie", tie),
        ("nan", nan),
        ("inf", inf),
        ("all nan", all_nan),
    ] {
        let want = c.r.argmax(&x).ok();
        let xb = c.up(&x)?;
        let got = c.be.argmax(&xb).ok();
        c.same("argmax", name, got, want);
    }
    let (h, vocab) = (128, 300);
    for f in [Fmt::Affine(4, 64, DType::BF16), Fmt::Bf16] {
        let head = random_linear(&mut c.rng, vocab, h, f);
        let (x, nw) = (c.randv(h, 2.0), c.normw(h));
        let want = Reference.fused_head_argmax(&x, &nw, 1e-6, &head)?;
        let (xb, nb, hb) = (c.up(&x)?, c.up(&nw)?, c.be.upload_mat(&head)?);
        let got = c.be.fused_head_argmax(&xb, &nb, 1e-6, &hb)?;
        c.same("fused_head_argmax", &f.label(), got, want);
    }
    Ok(())
}
