//! [`Reference`]: the plain twin of every operation. Element by element in f64, exact `exp`,
//! the recurrent delta rule for both GatedDeltaNet forms (arch-spec §6.5 is the canonical
//! definition), experts one after another. It defines what each [`Backend`] op computes; the
//! conformance harness holds every backend to it. Never optimise it: clarity is its job.
use std::borrow::Cow;

use super::{AttnShape, Backend, ExpertCall, ExpertTimes, GdnShape, Routes};
use crate::error::{Error, Result};
use crate::kernels::{dequantize, dequantize_row, matmul_ref, WeightView};
use crate::weights::Linear;

/// The reference backend: host `Vec<f32>` buffers, [`Linear`] matrices, f64 arithmetic.
#[derive(Clone, Copy, Debug, Default)]
pub struct Reference;

fn sig(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn silu(x: f64) -> f64 {
    x * sig(x)
}

/// `x / sqrt(mean(x^2) + eps) * w`, f64.
fn rms(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps as f64).sqrt();
    x.iter()
        .zip(w)
        .map(|(&v, &w)| (v as f64 * r * w as f64) as f32)
        .collect()
}

/// NeoX rotate-half over the first `rot` dims, as a rotation of pairs `(d, d + rot/2)`.
fn rope(x: &mut [f32], pos: usize, rot: usize, theta: f64) {
    for d in 0..rot / 2 {
        // inv_freq is an fp32 tensor in HF (arch-spec §5.1); at position 1e5 its rounding
        // moves the angle by ~6e-3, so the definition includes it.
        let inv = (1.0 / theta.powf(2.0 * d as f64 / rot as f64)) as f32 as f64;
        let (s, c) = (pos as f64 * inv).sin_cos();
        let (re, im) = (x[d] as f64, x[d + rot / 2] as f64);
        x[d] = (re * c - im * s) as f32;
        x[d + rot / 2] = (re * s + im * c) as f32;
    }
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// The recurrent gated delta rule (arch-spec §6.4-6.5) for `t` tokens, f64 inside.
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
    o: &mut [f32],
) {
    let (nk, nv, dk, dv) = (g.nk, g.nv, g.dk, g.dv);
    let (cd, kd, rep) = (g.conv_dim(), nk * dk, nv / nk);
    let l2 = |v: &[f32], scale: f64| -> Vec<f64> {
        let r = scale / (v.iter().map(|&x| x as f64 * x as f64).sum::<f64>() + 1e-6).sqrt();
        v.iter().map(|&x| x as f64 * r).collect()
    };
    for ti in 0..t {
        let ut = &u[ti * cd..][..cd];
        for h in 0..nv {
            let kh = h / rep;
            let q = l2(&ut[kh * dk..][..dk], 1.0 / (dk as f64).sqrt());
            let k = l2(&ut[kd + kh * dk..][..dk], 1.0);
            let v = &ut[2 * kd + h * dv..][..dv];
            let beta = sig(b[ti * nv + h] as f64);
            let x = a[ti * nv + h] as f64 + dt_bias[h] as f64;
            let sp = if x > 20.0 { x } else { x.exp().ln_1p() };
            let decay = (neg_a[h] as f64 * sp).exp();
            let s = &mut st[h * dk * dv..][..dk * dv];
            let mut sd: Vec<f64> = s.iter().map(|&x| x as f64 * decay).collect();
            let kv: Vec<f64> = (0..dv)
                .map(|j| (0..dk).map(|i| sd[i * dv + j] * k[i]).sum())
                .collect();
            for i in 0..dk {
                for j in 0..dv {
                    sd[i * dv + j] += k[i] * (v[j] as f64 - kv[j]) * beta;
                }
            }
            for j in 0..dv {
                let oj: f64 = (0..dk).map(|i| sd[i * dv + j] * q[i]).sum();
                o[(ti * nv + h) * dv + j] = oj as f32;
            }
            for (d, x) in s.iter_mut().zip(&sd) {
                *d = *x as f32;
            }
        }
    }
}

impl Backend for Reference {
    super::host_memory!();

    fn name(&self) -> &'static str {
        "reference"
    }

    fn matmul(&self, w: &Linear, x: &Vec<f32>, t: usize, y: &mut Vec<f32>) -> Result<()> {
        matmul_ref(&w.view(), x, t, y);
        Ok(())
    }

    fn embed(&self, table: &Linear, ids: &[u32], out: &mut Vec<f32>) -> Result<()> {
        let h = table.cols();
        for (ti, &id) in ids.iter().enumerate() {
            let r = id as usize;
            let o = &mut out[ti * h..][..h];
            match table.view() {
                WeightView::Affine(a) => dequantize_row(&a, r, o),
                _ => o.copy_from_slice(&dequantize(&table.slice_rows(r, 1).view())),
            }
        }
        Ok(())
    }

    fn rmsnorm(&self, x: &Vec<f32>, w: &Vec<f32>, eps: f32, out: &mut Vec<f32>) -> Result<()> {
        for (xr, nr) in x.chunks(w.len()).zip(out.chunks_mut(w.len())) {
            nr.copy_from_slice(&rms(xr, w, eps));
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
        for i in 0..n * width {
            dst[i] = src[row0 * width + i];
        }
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
        let hd = s.head_dim;
        let qw = s.q_rows() / s.heads;
        for ti in 0..t {
            for h in 0..s.heads {
                let src = &qg[(ti * s.heads + h) * qw..][..qw];
                let mut qh = rms(&src[..hd], q_norm, s.eps);
                rope(&mut qh, pos0 + ti, s.rotary_dim, s.rope_theta);
                q[(ti * s.heads + h) * hd..][..hd].copy_from_slice(&qh);
                if s.gated {
                    gate[(ti * s.heads + h) * hd..][..hd].copy_from_slice(&src[hd..]);
                }
            }
            for h in 0..s.kv_heads {
                let kh = &mut k[(ti * s.kv_heads + h) * hd..][..hd];
                let mut n = rms(kh, k_norm, s.eps);
                rope(&mut n, pos0 + ti, s.rotary_dim, s.rope_theta);
                kh.copy_from_slice(&n);
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
        t: usize,
        o: &mut Vec<f32>,
    ) -> Result<()> {
        let (hd, kvw) = (s.head_dim, s.kv_width());
        if kc.len() != pos0 * kvw {
            return Err(Error::Invalid(format!(
                "reference attention: KV cache of {} elements at position {pos0}",
                kc.len()
            )));
        }
        kc.extend_from_slice(k);
        vc.extend_from_slice(v);
        for ti in 0..t {
            for h in 0..s.heads {
                let kvh = h / (s.heads / s.kv_heads);
                let qh = &q[(ti * s.heads + h) * hd..][..hd];
                let n = pos0 + ti + 1;
                let sc: Vec<f64> = (0..n)
                    .map(|p| dot(qh, &kc[p * kvw + kvh * hd..][..hd]) / (hd as f64).sqrt())
                    .collect();
                let m = sc.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = sc.iter().map(|v| (v - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hd {
                    let acc: f64 = (0..n)
                        .map(|p| e[p] / z * vc[p * kvw + kvh * hd + d] as f64)
                        .sum();
                    o[(ti * s.heads + h) * hd + d] = acc as f32;
                }
            }
        }
        Ok(())
    }

    fn gated_output(&self, o: &mut Vec<f32>, gate: &Vec<f32>) -> Result<()> {
        for (ov, g) in o.iter_mut().zip(gate) {
            *ov = (*ov as f64 * sig(*g as f64)) as f32;
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
        // Input row r of [state ; mixed]: state rows first (oldest first).
        let input = |r: usize, c: usize| -> f64 {
            if r < kk - 1 {
                state[r * cd + c] as f64
            } else {
                mixed[(r - (kk - 1)) * cd + c] as f64
            }
        };
        for ti in 0..t {
            for c in 0..cd {
                let acc: f64 = (0..kk)
                    .map(|j| conv_w[c * kk + j] as f64 * input(ti + j, c))
                    .sum();
                u[ti * cd + c] = silu(acc) as f32;
            }
        }
        let new: Vec<f32> = (0..(kk - 1) * cd)
            .map(|i| input(t + i / cd, i % cd) as f32)
            .collect();
        state.copy_from_slice(&new);
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
        delta_rule(u, b, a, dt_bias, neg_a, state, s, t, o);
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
            let n = rms(oh, w, eps);
            for ((yv, nv), zv) in yh.iter_mut().zip(&n).zip(zh) {
                *yv = (*nv as f64 * silu(*zv as f64)) as f32;
            }
        }
        Ok(())
    }

    fn swiglu(&self, g: &Vec<f32>, u: &Vec<f32>, out: &mut Vec<f32>) -> Result<()> {
        for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
            *o = (silu(g as f64) * u as f64) as f32;
        }
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
        out.k = k;
        out.ids.clear();
        out.weights.clear();
        for row in logits.chunks(ne) {
            let m = row.iter().map(|&v| v as f64).fold(f64::MIN, f64::max);
            let e: Vec<f64> = row.iter().map(|&v| (v as f64 - m).exp()).collect();
            let z: f64 = e.iter().sum();
            let mut idx: Vec<usize> = (0..ne).collect();
            // Descending probability, ties to the lower id (a stable sort keeps id order).
            idx.sort_by(|&i, &j| e[j].total_cmp(&e[i]));
            let top = &idx[..k.min(ne)];
            let sum: f64 = if renorm {
                top.iter().map(|&i| e[i] / z).sum()
            } else {
                1.0
            };
            out.ids.extend(top.iter().map(|&i| i as u32));
            out.weights
                .extend(top.iter().map(|&i| (e[i] / z / sum) as f32));
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
        let h = x.len().checked_div(t).unwrap_or(0);
        let mut acc = vec![0f64; out.len()];
        for e in routes.used() {
            let w = call
                .source
                .fetch(call.layer, &[e])?
                .pop()
                .ok_or(Error::Expert {
                    layer: call.layer,
                    expert: e,
                    msg: "expert source returned nothing".into(),
                })?;
            for (ti, wt) in routes.tokens_of(e) {
                let xt = x[ti * h..][..h].to_vec();
                let inter = w.gate.rows();
                let (mut g, mut u) = (vec![0f32; inter], vec![0f32; inter]);
                self.matmul(&w.gate, &xt, 1, &mut g)?;
                self.matmul(&w.up, &xt, 1, &mut u)?;
                let mut hd = vec![0f32; inter];
                self.swiglu(&g, &u, &mut hd)?;
                let mut y = vec![0f32; h];
                self.matmul(&w.down, &hd, 1, &mut y)?;
                for (a, &v) in acc[ti * h..][..h].iter_mut().zip(&y) {
                    *a += wt as f64 * v as f64;
                }
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = a as f32;
        }
        Ok(ExpertTimes::default())
    }

    fn moe_combine(
        &self,
        x: &mut Vec<f32>,
        routed: &Vec<f32>,
        shared: Option<&Vec<f32>>,
        shared_gate: Option<&Vec<f32>>,
    ) -> Result<()> {
        let t = shared_gate.map_or(1, |g| g.len()).max(1);
        let h = x.len() / t;
        for i in 0..x.len() {
            let w = shared_gate.map_or(1.0, |g| sig(g[i / h] as f64));
            let s = shared.map_or(0.0, |s| s[i] as f64);
            x[i] = (x[i] as f64 + routed[i] as f64 + w * s) as f32;
        }
        Ok(())
    }

    fn argmax(&self, x: &Vec<f32>) -> Result<u32> {
        let mut best: Option<usize> = None;
        for (i, &v) in x.iter().enumerate() {
            if !v.is_nan() && best.is_none_or(|b| v > x[b]) {
                best = Some(i);
            }
        }
        match best {
            Some(b) if x[b].is_finite() => Ok(b as u32),
            _ => Err(Error::NonFiniteArgmax { pos: 0 }),
        }
    }
}
