//! [`Cpu`]: the CPU backend. Buffers are host `Vec<f32>`, matrices the loaded [`Linear`]s
//! themselves (views of the mmap'd weights, no copy), products the fast kernels of
//! `crate::kernels` (AVX2/NEON, rayon over rows). The routed experts of a layer run in parallel,
//! each as soon as its own read completes.
//!
//! Never owns model structure: one call, one operation of the forward pass.
use std::borrow::Cow;
use std::time::{Duration, Instant};

use rayon::prelude::*;

use super::{AttnShape, Backend, ExpertCall, ExpertTimes, GdnShape, Routes};
use crate::error::{Error, Result};
use crate::experts::ExpertWeights;
use crate::kernels;
use crate::model::gdn_chunk::{delta_rule_chunked, delta_rule_recurrent};
use crate::weights::Linear;

/// The CPU backend (stateless: the kernels pick their ISA and threads per call).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

/// The logistic function (output gates, shared-expert gate, GatedDeltaNet beta).
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

fn softplus(x: f32) -> f32 {
    // torch softplus(beta=1, threshold=20)
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// The rotation of position `pos` for the first `rot` dims of a head vector: `(cos, sin)` of
/// frequency index d < rot/2, as [`rope`] computes them. The cos and sin of one position are
/// the same for every head: computed once per token here instead of once per head (with
/// 32 q and 4 k heads, `pow` and `sin_cos` per head were ~2% of a decoded token's
/// instructions).
fn rope_table(pos: usize, rot: usize, theta: f64, cs: &mut Vec<(f32, f32)>) {
    cs.clear();
    cs.extend((0..rot / 2).map(|d| {
        // HF computes inv_freq = 1 / theta^(2d/rot) in fp32; the angle in f64 keeps long
        // positions exact without changing short ones beyond f32 rounding.
        let inv = (1.0 / theta.powf((2 * d) as f64 / rot as f64)) as f32 as f64;
        let ang = pos as f64 * inv;
        (ang.cos() as f32, ang.sin() as f32)
    }));
}

/// Rotates the first `2 * cs.len()` dims of one head vector by a [`rope_table`] (NeoX
/// rotate-half: dim d < rot/2 pairs with d + rot/2, frequency index d).
fn rope_apply(x: &mut [f32], cs: &[(f32, f32)]) {
    let half = cs.len();
    let (lo, hi) = x[..2 * half].split_at_mut(half);
    for ((x1, x2), &(c, s)) in lo.iter_mut().zip(hi.iter_mut()).zip(cs) {
        let (a, b) = (*x1, *x2);
        *x1 = a * c - b * s;
        *x2 = b * c + a * s;
    }
}

/// Rotates the first `rot` dims of one head vector at position `pos` (NeoX rotate-half:
/// dim d < rot/2 pairs with d + rot/2, frequency index d): the plain twin of
/// [`rope_table`] + [`rope_apply`], which the tests hold them to bit for bit.
#[cfg(test)]
fn rope(x: &mut [f32], pos: usize, rot: usize, theta: f64) {
    let half = rot / 2;
    for d in 0..half {
        let inv = (1.0 / theta.powf((2 * d) as f64 / rot as f64)) as f32 as f64;
        let ang = pos as f64 * inv;
        let (s, c) = (ang.sin() as f32, ang.cos() as f32);
        let (x1, x2) = (x[d], x[d + half]);
        x[d] = x1 * c - x2 * s;
        x[d + half] = x2 * c + x1 * s;
    }
}

/// `y [t, rows] = x W^T` on the fast kernels (`matvec` for one input).
fn linear_into(w: &Linear, x: &[f32], t: usize, y: &mut [f32]) {
    if t == 1 {
        kernels::matvec(&w.view(), x, y);
    } else {
        kernels::matmul(&w.view(), x, t, y);
    }
}

/// State elements (heads × dk × dv × tokens) from which the delta rule runs heads in parallel.
/// One head of one token is ~50k FMAs: below a few heads' worth a fork-join costs more.
const PAR_MIN_STATE: usize = 1 << 18;

/// Experts run in parallel only when each is at least this much work (bytes × tokens): a rayon
/// fork-join costs 10-25 us on the 2-core dev VM, more than a tiny expert's whole product.
const PAR_MIN_EXPERT_BYTES: usize = 1 << 20;

/// Most experts fetched at once: bounds the buffers a prefill chunk holds.
pub(crate) const FETCH_BATCH: usize = 16;

/// Whether rayon has a second thread to share work with. With one (`--threads 1`) a parallel
/// iterator called from outside the pool, as the forward pass is, still hands the work to
/// the pool's one thread and sleeps until it is done: two wake-ups per call and nothing run
/// in parallel (8 per decoded token on Qwen3-30B-A3B shapes: attention heads and the routed
/// experts of each layer). Below two threads the callers here loop on their own thread.
fn pool_parallel() -> bool {
    rayon::current_num_threads() > 1
}

fn shape_err(op: &str, what: String) -> Error {
    Error::Invalid(format!("cpu backend, {op}: {what}"))
}

/// The gated delta rule over `t` tokens (recurrent or chunked per head), as
/// [`Backend::gdn_recurrent`] documents.
#[allow(clippy::too_many_arguments)]
fn delta_rule(
    u: &[f32],
    b: &[f32],
    a: &[f32],
    dt_bias: &[f32],
    neg_a: &[f32],
    st: &mut [f32],
    g: &GdnShape,
    t: usize,
    chunked: bool,
    o: &mut [f32],
) {
    let (nk, nv, dk, dv) = (g.nk, g.nv, g.dk, g.dv);
    let (cd, kd, rep) = (g.conv_dim(), nk * dk, nv / nk);
    let qscale = 1.0 / (dk as f32).sqrt();
    // l2norm with eps inside the rsqrt (HF-Q35 `l2norm`), q scaled by 1/sqrt(dk):
    // qn, kn [t, nk, dk]; beta, gl [t, nv].
    let mut qn = vec![0f32; t * kd];
    let mut kn = vec![0f32; t * kd];
    let mut beta = vec![0f32; t * nv];
    let mut gl = vec![0f32; t * nv];
    for ti in 0..t {
        let ut = &u[ti * cd..][..cd];
        for h in 0..nk {
            for (src, dst, sc) in [
                (
                    &ut[h * dk..][..dk],
                    &mut qn[ti * kd + h * dk..][..dk],
                    qscale,
                ),
                (
                    &ut[kd + h * dk..][..dk],
                    &mut kn[ti * kd + h * dk..][..dk],
                    1.0,
                ),
            ] {
                let ss: f32 = src.iter().map(|v| v * v).sum();
                let r = 1.0 / (ss + 1e-6).sqrt() * sc;
                for (d, s_) in dst.iter_mut().zip(src) {
                    *d = s_ * r;
                }
            }
        }
        for h in 0..nv {
            beta[ti * nv + h] = sigmoid(b[ti * nv + h]);
            gl[ti * nv + h] = neg_a[h] * softplus(a[ti * nv + h] + dt_bias[h]);
        }
    }
    // Per value head (GQA: value head h reads key head h / rep), heads in parallel.
    // oh [nv, t, dv].
    let mut oh = vec![0f32; nv * t * dv];
    let head = |h: usize, st: &mut [f32], out: &mut [f32]| {
        let kh = h / rep;
        let gather = |src: &[f32], stride: usize, off: usize, n: usize| -> Vec<f32> {
            (0..t)
                .flat_map(|ti| src[ti * stride + off..][..n].iter().copied())
                .collect()
        };
        let q = gather(&qn, kd, kh * dk, dk);
        let k = gather(&kn, kd, kh * dk, dk);
        let v = gather(u, cd, 2 * kd + h * dv, dv);
        let bh = gather(&beta, nv, h, 1);
        let gh = gather(&gl, nv, h, 1);
        if chunked {
            delta_rule_chunked(&q, &k, &v, &bh, &gh, dk, dv, st, out);
        } else {
            delta_rule_recurrent(&q, &k, &v, &bh, &gh, dk, dv, st, out);
        }
    };
    if nv * t * dk * dv >= PAR_MIN_STATE && pool_parallel() {
        st.par_chunks_mut(dk * dv)
            .zip(oh.par_chunks_mut(t * dv))
            .enumerate()
            .for_each(|(h, (st, out))| head(h, st, out));
    } else {
        for (h, (st, out)) in st
            .chunks_mut(dk * dv)
            .zip(oh.chunks_mut(t * dv))
            .enumerate()
        {
            head(h, st, out);
        }
    }
    for h in 0..nv {
        for ti in 0..t {
            o[(ti * nv + h) * dv..][..dv].copy_from_slice(&oh[(h * t + ti) * dv..][..dv]);
        }
    }
}

/// One routed expert's output: the tokens it served (index, routing weight), `y [n, H]`.
struct ExpertOut {
    toks: Vec<(usize, f32)>,
    y: Vec<f32>,
    wait: Duration,
    compute: Duration,
}

/// A SwiGLU MLP on host slices; `one_thread` keeps each product on the calling thread (for
/// products that already run one per thread).
fn swiglu_mlp_host(w: &ExpertWeights, x: &[f32], t: usize, one_thread: bool) -> Vec<f32> {
    let lin = |m: &Linear, x: &[f32]| -> Vec<f32> {
        let mut y = vec![0f32; t * m.rows()];
        if one_thread {
            kernels::matmul_with(kernels::isa(), usize::MAX, &m.view(), x, t, &mut y);
        } else {
            linear_into(m, x, t, &mut y);
        }
        y
    };
    let g = lin(&w.gate, x);
    let u = lin(&w.up, x);
    let mut hdn = vec![0f32; g.len()];
    kernels::swiglu(&g, &u, &mut hdn);
    lin(&w.down, &hdn)
}

/// Fetches expert `e` (waiting only for its own read) and applies it to the tokens routed to
/// it.
fn run_expert(
    call: &ExpertCall<'_>,
    e: usize,
    x: &[f32],
    hidden: usize,
    routes: &Routes,
    one_thread: bool,
) -> Result<ExpertOut> {
    let tw = Instant::now();
    let w = call
        .source
        .fetch(call.layer, &[e])?
        .pop()
        .ok_or_else(|| Error::Expert {
            layer: call.layer,
            expert: e,
            msg: "expert source returned nothing".into(),
        })?;
    let wait = tw.elapsed();
    let tc = Instant::now();
    let toks = routes.tokens_of(e);
    let mut xe = Vec::with_capacity(toks.len() * hidden);
    for &(ti, _) in &toks {
        xe.extend_from_slice(&x[ti * hidden..][..hidden]);
    }
    let y = swiglu_mlp_host(&w, &xe, toks.len(), one_thread);
    Ok(ExpertOut {
        toks,
        y,
        wait,
        compute: tc.elapsed(),
    })
}

impl Backend for Cpu {
    super::host_memory!();

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn matmul(&self, w: &Linear, x: &Vec<f32>, t: usize, y: &mut Vec<f32>) -> Result<()> {
        if x.len() != t * w.cols() || y.len() != t * w.rows() {
            return Err(shape_err(
                "matmul",
                format!(
                    "x {} / y {} for {t} rows of a [{}, {}] matrix",
                    x.len(),
                    y.len(),
                    w.rows(),
                    w.cols()
                ),
            ));
        }
        linear_into(w, x, t, y);
        Ok(())
    }

    fn embed(&self, table: &Linear, ids: &[u32], out: &mut Vec<f32>) -> Result<()> {
        let h = table.cols();
        for (ti, &id) in ids.iter().enumerate() {
            if id as usize >= table.rows() {
                return Err(Error::TokenOutOfRange {
                    id,
                    vocab: table.rows(),
                });
            }
            table.row_f32(id as usize, &mut out[ti * h..][..h]);
        }
        Ok(())
    }

    fn rmsnorm(&self, x: &Vec<f32>, w: &Vec<f32>, eps: f32, out: &mut Vec<f32>) -> Result<()> {
        for (xr, nr) in x.chunks(w.len()).zip(out.chunks_mut(w.len())) {
            kernels::rmsnorm(xr, w, eps, false, nr);
        }
        Ok(())
    }

    fn add(&self, x: &mut Vec<f32>, d: &Vec<f32>) -> Result<()> {
        for (a, b) in x.iter_mut().zip(d) {
            *a += b;
        }
        Ok(())
    }

    fn copy_rows(
        &self,
        src: &Vec<f32>,
        width: usize,
        row0: usize,
        n: usize,
        dst: &mut Vec<f32>,
    ) -> Result<()> {
        dst[..n * width].copy_from_slice(&src[row0 * width..][..n * width]);
        Ok(())
    }

    fn qk_norm_rope(
        &self,
        qg: &Vec<f32>,
        k: &mut Vec<f32>,
        q_norm: &Vec<f32>,
        k_norm: &Vec<f32>,
        s: &AttnShape,
        pos0: usize,
        t: usize,
        q: &mut Vec<f32>,
        gate: &mut Vec<f32>,
    ) -> Result<()> {
        let (nh, nkv, hd) = (s.heads, s.kv_heads, s.head_dim);
        let qw = s.q_rows() / nh;
        let mut tmp = vec![0f32; hd];
        let mut cs = Vec::with_capacity(s.rotary_dim / 2);
        for ti in 0..t {
            rope_table(pos0 + ti, s.rotary_dim, s.rope_theta, &mut cs);
            for h in 0..nh {
                let src = &qg[ti * nh * qw + h * qw..][..qw];
                let dst = &mut q[(ti * nh + h) * hd..][..hd];
                kernels::rmsnorm(&src[..hd], q_norm, s.eps, false, dst);
                rope_apply(dst, &cs);
                if s.gated {
                    gate[(ti * nh + h) * hd..][..hd].copy_from_slice(&src[hd..]);
                }
            }
            for h in 0..nkv {
                let kh = &mut k[(ti * nkv + h) * hd..][..hd];
                tmp.copy_from_slice(kh);
                kernels::rmsnorm(&tmp, k_norm, s.eps, false, kh);
                rope_apply(kh, &cs);
            }
        }
        Ok(())
    }

    fn attention(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        kc: &mut Vec<f32>,
        vc: &mut Vec<f32>,
        s: &AttnShape,
        pos0: usize,
        _t: usize,
        o: &mut Vec<f32>,
    ) -> Result<()> {
        let (nh, hd, kvw) = (s.heads, s.head_dim, s.kv_width());
        if kc.len() != pos0 * kvw || vc.len() != pos0 * kvw {
            return Err(shape_err(
                "attention",
                format!("KV cache of {} elements at position {pos0}", kc.len()),
            ));
        }
        kc.extend_from_slice(k);
        vc.extend_from_slice(v);
        let group = nh / s.kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let (kc, vc) = (&*kc, &*vc);
        // Heads are independent: one task per (token, head).
        let head = |(idx, oh): (usize, &mut [f32])| {
            let (ti, h) = (idx / nh, idx % nh);
            let kvh = h / group;
            let qh = &q[idx * hd..][..hd];
            let n = pos0 + ti + 1; // causal: keys 0..=pos
            let mut sc: Vec<f32> = (0..n)
                .map(|p| kernels::dot(qh, &kc[p * kvw + kvh * hd..][..hd]) * scale)
                .collect();
            kernels::softmax_inplace(&mut sc);
            oh.fill(0.0);
            for (p, &a) in sc.iter().enumerate() {
                kernels::axpy(a, &vc[p * kvw + kvh * hd..][..hd], oh);
            }
        };
        if pool_parallel() {
            o.par_chunks_mut(hd).enumerate().for_each(head);
        } else {
            o.chunks_mut(hd).enumerate().for_each(head);
        }
        Ok(())
    }

    fn gated_output(&self, o: &mut Vec<f32>, gate: &Vec<f32>) -> Result<()> {
        for (ov, g) in o.iter_mut().zip(gate) {
            *ov *= sigmoid(*g);
        }
        Ok(())
    }

    fn gdn_conv(
        &self,
        mixed: &Vec<f32>,
        state: &mut Vec<f32>,
        conv_w: &Vec<f32>,
        g: &GdnShape,
        t: usize,
        u: &mut Vec<f32>,
    ) -> Result<()> {
        let (kk, cd) = (g.kconv, g.conv_dim());
        // Causal depthwise conv over [state (K-1 rows) ; mixed (t rows)], then SiLU.
        let mut ext = Vec::with_capacity((kk - 1 + t) * cd);
        ext.extend_from_slice(state);
        ext.extend_from_slice(mixed);
        for ti in 0..t {
            let out = &mut u[ti * cd..][..cd];
            for (c, o) in out.iter_mut().enumerate() {
                let w = &conv_w[c * kk..][..kk];
                let mut acc = 0f32;
                for (j, wj) in w.iter().enumerate() {
                    acc += wj * ext[(ti + j) * cd + c];
                }
                *o = silu(acc);
            }
        }
        state.copy_from_slice(&ext[t * cd..]);
        Ok(())
    }

    fn gdn_recurrent(
        &self,
        u: &Vec<f32>,
        b: &Vec<f32>,
        a: &Vec<f32>,
        dt_bias: &Vec<f32>,
        neg_a: &Vec<f32>,
        state: &mut Vec<f32>,
        s: &GdnShape,
        t: usize,
        o: &mut Vec<f32>,
    ) -> Result<()> {
        delta_rule(u, b, a, dt_bias, neg_a, state, s, t, false, o);
        Ok(())
    }

    fn gdn_chunked(
        &self,
        u: &Vec<f32>,
        b: &Vec<f32>,
        a: &Vec<f32>,
        dt_bias: &Vec<f32>,
        neg_a: &Vec<f32>,
        state: &mut Vec<f32>,
        s: &GdnShape,
        t: usize,
        o: &mut Vec<f32>,
    ) -> Result<()> {
        delta_rule(u, b, a, dt_bias, neg_a, state, s, t, t > 1, o);
        Ok(())
    }

    fn gated_rmsnorm(
        &self,
        o: &Vec<f32>,
        z: &Vec<f32>,
        w: &Vec<f32>,
        eps: f32,
        y: &mut Vec<f32>,
    ) -> Result<()> {
        let dv = w.len();
        for ((oh, zh), yh) in o.chunks(dv).zip(z.chunks(dv)).zip(y.chunks_mut(dv)) {
            kernels::rmsnorm(oh, w, eps, false, yh);
            for (yv, zv) in yh.iter_mut().zip(zh) {
                *yv *= silu(*zv);
            }
        }
        Ok(())
    }

    fn swiglu(&self, g: &Vec<f32>, u: &Vec<f32>, out: &mut Vec<f32>) -> Result<()> {
        kernels::swiglu(g, u, out);
        Ok(())
    }

    fn router_topk(
        &self,
        logits: &Vec<f32>,
        ne: usize,
        k: usize,
        renorm: bool,
        out: &mut Routes,
    ) -> Result<()> {
        let t = logits.len() / ne;
        out.k = k;
        out.ids.clear();
        out.weights.clear();
        let mut p = vec![0f32; ne];
        for ti in 0..t {
            p.copy_from_slice(&logits[ti * ne..][..ne]);
            kernels::softmax_inplace(&mut p);
            let mut sel = kernels::top_k(&p, k);
            if renorm {
                let sum: f32 = sel.iter().map(|s| s.1).sum();
                for s in sel.iter_mut() {
                    s.1 /= sum;
                }
            }
            out.ids.extend(sel.iter().map(|s| s.0 as u32));
            out.weights.extend(sel.iter().map(|s| s.1));
        }
        Ok(())
    }

    fn moe_experts(
        &self,
        call: ExpertCall<'_>,
        x: &Vec<f32>,
        routes: &Routes,
        _host: Option<&Routes>,
        out: &mut Vec<f32>,
    ) -> Result<ExpertTimes> {
        let t = routes.tokens();
        let hidden = x.len().checked_div(t).unwrap_or(0);
        out.fill(0.0);
        let used = routes.used();
        let mut times = ExpertTimes::default();
        // Experts of a batch run in parallel, each as soon as its own read completes; the
        // next batch's reads are queued first so they land while this batch computes.
        // Results are added in ascending expert id, the order of the sequential loop.
        let batches: Vec<&[usize]> = used.chunks(FETCH_BATCH).collect();
        for (bi, batch) in batches.iter().enumerate() {
            if let Some(next) = batches.get(bi + 1) {
                call.source.prefetch(call.layer, next);
            }
            let par = call.parallel && call.source.expert_bytes() * t >= PAR_MIN_EXPERT_BYTES;
            // In parallel, each expert's products run on its own thread (the experts are the
            // parallelism); serially, each product is split over rows instead.
            let run = |&e: &usize| run_expert(&call, e, x, hidden, routes, par);
            // At one thread the experts still take the one-thread products (the same
            // arithmetic as in the pool), in a loop on this thread.
            let done: Vec<Result<ExpertOut>> = if par && pool_parallel() {
                batch.par_iter().map(run).collect()
            } else {
                batch.iter().map(run).collect()
            };
            for r in done {
                let r = r?;
                times.wait += r.wait;
                times.compute += r.compute;
                for (j, &(ti, wt)) in r.toks.iter().enumerate() {
                    kernels::axpy(
                        wt,
                        &r.y[j * hidden..][..hidden],
                        &mut out[ti * hidden..][..hidden],
                    );
                }
            }
        }
        Ok(times)
    }

    fn moe_combine(
        &self,
        x: &mut Vec<f32>,
        routed: &Vec<f32>,
        shared: Option<&Vec<f32>>,
        shared_gate: Option<&Vec<f32>>,
    ) -> Result<()> {
        let Some(sh) = shared else {
            return self.add(x, routed);
        };
        let h = x.len() / shared_gate.map_or(1, |g| g.len()).max(1);
        for (ti, ((xr, rr), sr)) in x
            .chunks_mut(h)
            .zip(routed.chunks(h))
            .zip(sh.chunks(h))
            .enumerate()
        {
            let w = shared_gate.map_or(1.0, |g| sigmoid(g[ti]));
            for ((xv, rv), sv) in xr.iter_mut().zip(rr).zip(sr) {
                *xv += w * sv + rv;
            }
        }
        Ok(())
    }

    fn argmax(&self, x: &Vec<f32>) -> Result<u32> {
        super::argmax_checked(x)
    }
}

#[cfg(test)]
mod tests {
    use super::{rope, rope_apply, rope_table};

    /// One table per position rotates every head exactly as the per-head `rope` did: the
    /// same angles, the same f32 arithmetic, bit for bit; dims past `rot` untouched.
    #[test]
    fn rope_table_matches_rope_bit_for_bit() {
        let mut cs = Vec::new();
        for (hd, rot, theta) in [(128, 128, 1e6), (256, 64, 1e7), (64, 32, 1e4), (8, 2, 1e4)] {
            for pos in [0, 1, 7, 4095, 100_000, 1 << 20] {
                rope_table(pos, rot, theta, &mut cs);
                for head in 0..3 {
                    let x: Vec<f32> = (0..hd)
                        .map(|d| ((d * 31 + head * 7 + pos) as f32 * 0.173).sin() * 3.0)
                        .collect();
                    let (mut a, mut b) = (x.clone(), x.clone());
                    rope(&mut a, pos, rot, theta);
                    rope_apply(&mut b, &cs);
                    let (ab, bb): (Vec<u32>, Vec<u32>) = (
                        a.iter().map(|v| v.to_bits()).collect(),
                        b.iter().map(|v| v.to_bits()).collect(),
                    );
                    assert_eq!(ab, bb, "hd {hd} rot {rot} pos {pos} head {head}");
                    assert_eq!(&b[rot..], &x[rot..], "dims past rot changed");
                }
            }
        }
    }
}
