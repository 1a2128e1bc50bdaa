//! `flashmoe trace predict FILE [--model DIR]`: the routing-predictor study on a trace. For
//! each MoE layer of each token of the evaluation part (the last `1 - --train-frac` of the
//! tokens), each predictor ranks experts before the layer's router has run:
//! - `prev_token`: the previous token's experts at this layer (then the one before's);
//! - `popularity`: the layer's most routed experts in the training part;
//! - `early_router`: this layer's router applied to the previous layer's router input, which
//!   is exactly the CPU model's `prefetch_next` guess (needs `--trace-hidden` and `--model`);
//! - `probe`: a ridge-regression linear probe from the previous layer's router input to this
//!   layer's experts, fitted on the training part (needs `--trace-hidden`).
//!
//! Reported at K and 2K predicted experts: precision (predicted that were routed), recall
//! (routed that were predicted), and what prefetching the prediction would have read per
//! token: bytes that a later fetch then found ready (saved) and bytes never used (wasted).
//! Prefetching pays only where saved exceeds wasted, i.e. precision above one half: a wasted
//! read costs the same disk time as a useful one, and a useful one only hides latency.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use flashmoe_core::backend::{Backend, Cpu};
use flashmoe_core::model::{Ffn, Model};
use serde_json::{json, Value};

use super::tokens::{tokens, Token};
use super::{r4, FileArg};
use crate::cmd::out::outln;

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(flatten)]
    pub file: FileArg,
    /// The model the trace was recorded on: its routers give the `early_router` predictor
    /// (the CPU model's `prefetch_next` guess) from recorded hidden states
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Share of the tokens (the first ones) the probe and popularity are fitted on
    #[arg(long, default_value_t = 0.7)]
    pub train_frac: f64,
    /// Ridge penalty of the linear probe
    #[arg(long, default_value_t = 1e-2)]
    pub ridge: f64,
    /// The probe reads a fixed random projection of the hidden state to this many
    /// dimensions when the model is wider (its normal equations grow with the square)
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=8192))]
    pub probe_dims: u32,
}

/// A fixed random projection `[dims, hidden]` of +-1/sqrt(dims) (Achlioptas), or none when
/// the hidden state is no wider than `dims`.
struct Projection {
    dims: usize,
    m: Option<Vec<f32>>,
}

impl Projection {
    fn new(hidden: usize, dims: usize) -> Projection {
        if hidden <= dims {
            return Projection {
                dims: hidden,
                m: None,
            };
        }
        // A small fixed-seed generator (splitmix64): the same projection every run.
        let mut z = 0x9e37_79b9_7f4a_7c15u64;
        let s = 1.0 / (dims as f32).sqrt();
        let m = (0..dims * hidden)
            .map(|_| {
                z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut x = z;
                x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                if (x ^ (x >> 31)) & 1 == 0 {
                    s
                } else {
                    -s
                }
            })
            .collect();
        Projection { dims, m: Some(m) }
    }

    /// The probe's features of hidden state `h`: projected, then a constant 1.
    fn features(&self, h: &[f32]) -> Vec<f64> {
        let v: Vec<f64> = match &self.m {
            None => h.iter().map(|&v| v as f64).collect(),
            Some(m) => m
                .chunks_exact(h.len())
                .map(|row| row.iter().zip(h).map(|(a, b)| (a * b) as f64).sum())
                .collect(),
        };
        v.into_iter().chain([1.0]).collect()
    }
}

#[derive(Default, Clone, Copy)]
struct Score {
    /// Token-layers evaluated.
    n: u64,
    hit_k: u64,
    hit_2k: u64,
    pred_k: u64,
    pred_2k: u64,
}

impl Score {
    fn add(&mut self, ranked: &[u16], actual: &[u16], k: usize) {
        let hits = |m: usize| {
            ranked[..m.min(ranked.len())]
                .iter()
                .filter(|e| actual.contains(e))
                .count() as u64
        };
        self.n += 1;
        self.hit_k += hits(k);
        self.hit_2k += hits(2 * k);
        self.pred_k += ranked.len().min(k) as u64;
        self.pred_2k += ranked.len().min(2 * k) as u64;
    }

    fn json(&self, k: usize, eb: f64, tokens: usize) -> Value {
        let t = tokens.max(1) as f64;
        let div = |a: u64, b: u64| if b == 0 { 0.0 } else { r4(a as f64 / b as f64) };
        json!({
            "evaluated": self.n,
            "precision_at_k": div(self.hit_k, self.pred_k),
            "recall_at_k": div(self.hit_k, self.n * k as u64),
            "precision_at_2k": div(self.hit_2k, self.pred_2k),
            "recall_at_2k": div(self.hit_2k, self.n * k as u64),
            "prefetch_k_saved_bytes_per_token": r4(self.hit_k as f64 * eb / t),
            "prefetch_k_wasted_bytes_per_token": r4((self.pred_k - self.hit_k) as f64 * eb / t),
            "prefetch_2k_saved_bytes_per_token": r4(self.hit_2k as f64 * eb / t),
            "prefetch_2k_wasted_bytes_per_token": r4((self.pred_2k - self.hit_2k) as f64 * eb / t),
        })
    }
}

/// Indices of `v` by descending value (ties to the lower index), the first `n`.
fn top(v: &[f64], n: usize) -> Vec<u16> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    idx.into_iter().take(n).map(|i| i as u16).collect()
}

/// Solves `(X^T X + lambda I) W = X^T Y` for `W [d, e]` by Cholesky; rows of `x` have `d`
/// features (the last one the constant 1).
fn ridge(x: &[Vec<f64>], y: &[Vec<f64>], d: usize, e: usize, lambda: f64) -> Result<Vec<f64>> {
    let mut a = vec![0f64; d * d];
    let mut b = vec![0f64; d * e];
    for (xr, yr) in x.iter().zip(y) {
        for i in 0..d {
            if xr[i] == 0.0 {
                continue;
            }
            for j in 0..d {
                a[i * d + j] += xr[i] * xr[j];
            }
            for j in 0..e {
                b[i * e + j] += xr[i] * yr[j];
            }
        }
    }
    for i in 0..d {
        a[i * d + i] += lambda;
    }
    // a = L L^T, in place (lower triangle).
    for j in 0..d {
        let mut s = a[j * d + j];
        for p in 0..j {
            s -= a[j * d + p] * a[j * d + p];
        }
        if s <= 0.0 {
            bail!("the probe's normal equations are not positive definite (raise --ridge)");
        }
        let l = s.sqrt();
        a[j * d + j] = l;
        for i in j + 1..d {
            let mut s = a[i * d + j];
            for p in 0..j {
                s -= a[i * d + p] * a[j * d + p];
            }
            a[i * d + j] = s / l;
        }
    }
    // Forward then back substitution, every column of b at once.
    for i in 0..d {
        for p in 0..i {
            let f = a[i * d + p];
            for j in 0..e {
                b[i * e + j] -= f * b[p * e + j];
            }
        }
        for j in 0..e {
            b[i * e + j] /= a[i * d + i];
        }
    }
    for i in (0..d).rev() {
        for p in i + 1..d {
            let f = a[p * d + i];
            for j in 0..e {
                b[i * e + j] -= f * b[p * e + j];
            }
        }
        for j in 0..e {
            b[i * e + j] /= a[i * d + i];
        }
    }
    Ok(b)
}

/// The previous token's experts at `li` (then the one before's), if it directly precedes.
fn prev_token(toks: &[Token], i: usize, li: usize) -> Option<Vec<u16>> {
    let p = toks.get(i.checked_sub(1)?)?;
    if !toks[i].follows(p) || p.experts[li].is_empty() {
        return None;
    }
    let mut r = p.experts[li].clone();
    if let Some(pp) = i
        .checked_sub(2)
        .map(|j| &toks[j])
        .filter(|pp| p.follows(pp))
    {
        r.extend(pp.experts[li].iter().filter(|e| !p.experts[li].contains(e)));
    }
    Some(r)
}

pub fn run(a: Args) -> Result<()> {
    if !(a.train_frac > 0.0 && a.train_frac < 1.0) {
        bail!("--train-frac must be between 0 and 1 (exclusive)");
    }
    let t = super::read(&a.file.file)?;
    let h = &t.header;
    let (k, ne, hd) = (h.k as usize, h.experts as usize, h.hidden as usize);
    let toks = tokens(&t);
    let split = ((toks.len() as f64 * a.train_frac) as usize).clamp(1, toks.len());
    let (train, eval) = (0..split, split..toks.len());
    if eval.is_empty() {
        bail!(
            "{}: too few tokens ({}) to hold some out for evaluation",
            a.file.file.display(),
            toks.len()
        );
    }
    let nm = h.moe_layers.len();
    let proj = Projection::new(hd, a.probe_dims as usize);
    let model: Option<Model> =
        match &a.model {
            Some(dir) => {
                let m = flashmoe_core::loader::open_model(dir, &Default::default())
                    .with_context(|| format!("loading model from {}", dir.display()))?;
                let hdr = flashmoe_core::trace::header_of(&m, &h.model_id, h.has_hidden())?;
                if hdr.experts != h.experts
                    || hdr.hidden != h.hidden
                    || hdr.moe_layers != h.moe_layers
                {
                    bail!(
                    "--model {}: {} experts, hidden {}, MoE layers {:?}; the trace was recorded \
                     on {} experts, hidden {}, MoE layers {:?}",
                    dir.display(), hdr.experts, hdr.hidden, hdr.moe_layers, h.experts, h.hidden,
                    h.moe_layers
                );
                }
                Some(m)
            }
            None => None,
        };
    let mut scores: Vec<(&str, Vec<Score>)> = ["prev_token", "popularity", "early_router", "probe"]
        .iter()
        .map(|n| (*n, vec![Score::default(); nm]))
        .collect();
    let mut notes = Vec::new();
    if !h.has_hidden() {
        notes.push(
            "early_router and probe need hidden states: record with --trace-hidden".to_string(),
        );
    } else if model.is_none() {
        notes.push("early_router (prefetch_next's guess) needs --model DIR".to_string());
    }
    for li in 0..nm {
        // popularity from the training part
        let mut counts = vec![0f64; ne];
        for i in train.clone() {
            for &e in &toks[i].experts[li] {
                counts[e as usize] += 1.0;
            }
        }
        let pop = top(&counts, 2 * k);
        // the probe, fitted on the training part
        let adjacent = li > 0 && h.moe_layers[li - 1] + 1 == h.moe_layers[li];
        let probe = if li > 0 && h.has_hidden() {
            let (mut xs, mut ys) = (Vec::new(), Vec::new());
            for i in train.clone() {
                if let (Some(x), false) = (&toks[i].hidden[li - 1], toks[i].experts[li].is_empty())
                {
                    xs.push(proj.features(x));
                    let mut y = vec![0f64; ne];
                    for &e in &toks[i].experts[li] {
                        y[e as usize] = 1.0;
                    }
                    ys.push(y);
                }
            }
            match xs.is_empty() {
                true => None,
                false => Some(ridge(&xs, &ys, proj.dims + 1, ne, a.ridge)?),
            }
        } else {
            None
        };
        let router = match (&model, adjacent) {
            (Some(m), true) => match &m.layers[h.moe_layers[li] as usize].ffn {
                Ffn::Moe(moe) => Some(&moe.router),
                Ffn::Dense(_) => None,
            },
            _ => None,
        };
        for i in eval.clone() {
            let actual = &toks[i].experts[li];
            if actual.is_empty() {
                continue;
            }
            if let Some(r) = prev_token(&toks, i, li) {
                scores[0].1[li].add(&r, actual, k);
            }
            scores[1].1[li].add(&pop, actual, k);
            let Some(x) = (li > 0).then(|| toks[i].hidden[li - 1].as_ref()).flatten() else {
                continue;
            };
            if let Some(w) = router {
                let mut logits = vec![0f32; ne];
                Cpu.matmul(w, x, 1, &mut logits)?;
                let l: Vec<f64> = logits.iter().map(|&v| v as f64).collect();
                scores[2].1[li].add(&top(&l, 2 * k), actual, k);
            }
            if let Some(w) = &probe {
                let f = proj.features(x);
                let s: Vec<f64> = (0..ne)
                    .map(|e| f.iter().enumerate().map(|(j, v)| v * w[j * ne + e]).sum())
                    .collect();
                scores[3].1[li].add(&top(&s, 2 * k), actual, k);
            }
        }
    }
    let eb = h.expert_bytes as f64;
    let ntok = eval.len();
    let mut preds = serde_json::Map::new();
    for (name, per) in &scores {
        let mut all = Score::default();
        for s in per {
            all.n += s.n;
            all.hit_k += s.hit_k;
            all.hit_2k += s.hit_2k;
            all.pred_k += s.pred_k;
            all.pred_2k += s.pred_2k;
        }
        if all.n == 0 {
            continue;
        }
        let mut v = all.json(k, eb, ntok);
        v["per_layer"] = per
            .iter()
            .zip(&h.moe_layers)
            .filter(|(s, _)| s.n > 0)
            .map(|(s, l)| {
                let mut x = s.json(k, eb, ntok);
                x["layer"] = json!(l);
                x
            })
            .collect();
        preds.insert(name.to_string(), v);
    }
    let verdict = preds.get("early_router").map(|v| {
        let s = v["prefetch_k_saved_bytes_per_token"].as_f64().unwrap_or(0.0);
        let w = v["prefetch_k_wasted_bytes_per_token"].as_f64().unwrap_or(0.0);
        json!({
            "pays": s > w,
            "why": format!(
                "prefetching its top-K would have read {:.0} useful and {:.0} wasted bytes per token \
                 (precision {}): {}",
                s, w, v["precision_at_k"],
                if s > w { "more useful than wasted" } else { "at least as much wasted as useful" }
            ),
        })
    });
    let report = json!({
        "file": a.file.file.display().to_string(),
        "model": h.model_id, "k": k, "tokens": toks.len(), "train_tokens": split,
        "probe_dims": proj.dims,
        "eval_tokens": ntok, "expert_bytes": h.expert_bytes,
        "predictors": preds, "prefetch_next": verdict, "notes": notes,
    });
    if a.file.json {
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
        return Ok(());
    }
    outln!(
        "{}: {} tokens, fitted on the first {}, evaluated on the last {}; K {}",
        a.file.file.display(),
        toks.len(),
        split,
        ntok,
        k
    )?;
    outln!("predictor      P@K     R@K     P@2K    R@2K   prefetch K: saved / wasted MB/token")?;
    for (name, v) in &preds {
        let f = |key: &str| v[key].as_f64().unwrap_or(0.0);
        outln!(
            "{:<13} {:>6.3}  {:>6.3}  {:>6.3}  {:>6.3}   {:.3} / {:.3}",
            name,
            f("precision_at_k"),
            f("recall_at_k"),
            f("precision_at_2k"),
            f("recall_at_2k"),
            f("prefetch_k_saved_bytes_per_token") / 1e6,
            f("prefetch_k_wasted_bytes_per_token") / 1e6
        )?;
    }
    if let Some(v) = &report["prefetch_next"].as_object() {
        outln!(
            "prefetch_next (early_router): pays: {} ({})",
            v["pays"],
            v["why"].as_str().unwrap_or("")
        )?;
    }
    for n in &notes {
        outln!("note: {n}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ridge_recovers_a_linear_map_and_top_ranks() {
        // y = [2 x0 - x1, x1 + 3] from exact samples; a tiny penalty barely moves it.
        let xs: Vec<Vec<f64>> = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0], [0.5, 3.0]]
            .iter()
            .map(|x| vec![x[0], x[1], 1.0])
            .collect();
        let ys: Vec<Vec<f64>> = xs
            .iter()
            .map(|x| vec![2.0 * x[0] - x[1], x[1] + 3.0])
            .collect();
        let w = ridge(&xs, &ys, 3, 2, 1e-9).unwrap();
        let want = [2.0, 0.0, -1.0, 1.0, 0.0, 3.0];
        for (a, b) in w.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{w:?}");
        }
        assert_eq!(top(&[0.1, 0.9, 0.5, 0.9], 3), [1, 3, 2]);
        let mut s = Score::default();
        s.add(&[3, 1, 0, 2], &[1, 2], 2);
        assert_eq!((s.hit_k, s.hit_2k, s.pred_k, s.pred_2k), (1, 2, 2, 4));
    }
}
