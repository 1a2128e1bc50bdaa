//! `flashmoe trace stats FILE [--json] [--plot DIR]`. Per MoE layer: how often each expert is
//! routed to and how skewed that is (share of routings taken by the top 1/5/10% of experts);
//! reuse distances (LRU stack distance: how many other experts of the layer were used since
//! this one, so an LRU share of `d` experts per layer hits exactly the reuses below `d`); the
//! overlap of consecutive tokens' experts, and how that overlap correlates between adjacent
//! layers; the working set (distinct experts of all layers) over windows of tokens.
use std::path::PathBuf;

use anyhow::Result;
use clap::Args as ClapArgs;
use serde_json::{json, Value};

use super::tokens::{tokens, Token};
use super::{r4, FileArg};
use crate::cmd::out::outln;

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(flatten)]
    pub file: FileArg,
    /// Also draw popularity, reuse-distance and working-set PNGs into this directory
    #[arg(long, value_name = "DIR")]
    pub plot: Option<PathBuf>,
}

/// Reuse-distance buckets: [0], [1], [2,3], [4,7], ... up to the expert count.
pub fn bucket(d: usize) -> usize {
    if d == 0 {
        0
    } else {
        (usize::BITS - d.leading_zeros()) as usize
    }
}

pub struct LayerStats {
    pub layer: u16,
    /// Routings per expert.
    pub counts: Vec<u64>,
    /// Reuses per distance bucket; first uses apart.
    pub reuse: Vec<u64>,
    /// Reuses per exact distance (0..experts).
    pub dist: Vec<u64>,
    pub first_uses: u64,
    /// Mean |this token's experts ∩ the previous token's| / K, over consecutive tokens.
    pub overlap: f64,
    /// Per consecutive pair, the overlap fraction (for the cross-layer correlation).
    pub overlaps: Vec<f64>,
}

impl LayerStats {
    /// Share of routings taken by the top `frac` of experts (at least one expert).
    pub fn top_share(&self, frac: f64) -> f64 {
        let mut c = self.counts.clone();
        c.sort_unstable_by(|a, b| b.cmp(a));
        let n = ((c.len() as f64 * frac).ceil() as usize).clamp(1, c.len().max(1));
        let total: u64 = c.iter().sum();
        c[..n.min(c.len())].iter().sum::<u64>() as f64 / total.max(1) as f64
    }
}

pub fn layer_stats(toks: &[Token], li: usize, layer: u16, experts: usize, k: usize) -> LayerStats {
    let mut counts = vec![0u64; experts];
    let mut reuse = vec![0u64; bucket(experts) + 1];
    let mut dist = vec![0u64; experts];
    let mut first_uses = 0;
    // The layer's experts, most recently used first.
    let mut stack: Vec<u16> = Vec::with_capacity(experts);
    let mut overlaps = Vec::new();
    let mut prev: Option<&Token> = None;
    for t in toks {
        let cur = &t.experts[li];
        if cur.is_empty() {
            continue;
        }
        let mut sorted = cur.clone();
        sorted.sort_unstable();
        for &e in &sorted {
            counts[e as usize] += 1;
            match stack.iter().position(|&x| x == e) {
                Some(d) => {
                    reuse[bucket(d)] += 1;
                    dist[d] += 1;
                    stack.remove(d);
                }
                None => first_uses += 1,
            }
            stack.insert(0, e);
        }
        if let Some(p) = prev.filter(|p| t.follows(p) && !p.experts[li].is_empty()) {
            let same = cur.iter().filter(|e| p.experts[li].contains(e)).count();
            overlaps.push(same as f64 / k as f64);
        }
        prev = Some(t);
    }
    let overlap = overlaps.iter().sum::<f64>() / overlaps.len().max(1) as f64;
    LayerStats {
        layer,
        counts,
        reuse,
        dist,
        first_uses,
        overlap,
        overlaps,
    }
}

/// Pearson correlation of two equally long series (0 when either is constant).
fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    if n < 2 {
        return 0.0;
    }
    let (ma, mb) = (
        a[..n].iter().sum::<f64>() / n as f64,
        b[..n].iter().sum::<f64>() / n as f64,
    );
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for i in 0..n {
        let (x, y) = (a[i] - ma, b[i] - mb);
        sab += x * y;
        saa += x * x;
        sbb += y * y;
    }
    if saa == 0.0 || sbb == 0.0 {
        0.0
    } else {
        sab / (saa * sbb).sqrt()
    }
}

/// Window sizes (tokens) the working set is measured over.
pub const WINDOWS: [usize; 7] = [1, 4, 16, 64, 256, 1024, 4096];

/// Mean distinct (layer, expert) pairs per window of `w` consecutive tokens (non-overlapping
/// windows; a last partial window is left out unless it is the only one).
pub fn working_set(toks: &[Token], w: usize) -> f64 {
    let mut sizes = Vec::new();
    for chunk in toks.chunks(w) {
        if chunk.len() < w && !sizes.is_empty() {
            break;
        }
        let mut seen = std::collections::HashSet::new();
        for t in chunk {
            for (li, ex) in t.experts.iter().enumerate() {
                for &e in ex {
                    seen.insert((li, e));
                }
            }
        }
        sizes.push(seen.len() as f64);
    }
    sizes.iter().sum::<f64>() / sizes.len().max(1) as f64
}

pub fn run(a: Args) -> Result<()> {
    let t = super::read(&a.file.file)?;
    let h = &t.header;
    let toks = tokens(&t);
    let (e, k) = (h.experts as usize, h.k as usize);
    let layers: Vec<LayerStats> = h
        .moe_layers
        .iter()
        .enumerate()
        .map(|(li, &l)| layer_stats(&toks, li, l, e, k))
        .collect();
    let cross: Vec<f64> = layers
        .windows(2)
        .map(|p| pearson(&p[0].overlaps, &p[1].overlaps))
        .collect();
    let ws: Vec<(usize, f64)> = WINDOWS
        .iter()
        .filter(|&&w| w <= toks.len().max(1))
        .map(|&w| (w, working_set(&toks, w)))
        .collect();
    let decode = toks
        .iter()
        .filter(|t| t.phase == flashmoe_core::trace::Phase::Decode)
        .count();
    let requests: std::collections::HashSet<u64> = toks.iter().map(|t| t.request).collect();
    let total_experts = (e * h.moe_layers.len()) as f64;
    let report = json!({
        "file": a.file.file.display().to_string(),
        "model": h.model_id,
        "layers": h.layers, "moe_layers": h.moe_layers.len(), "experts": e, "k": k,
        "expert_bytes": h.expert_bytes,
        "tokens": toks.len(), "decode_tokens": decode, "prefill_tokens": toks.len() - decode,
        "requests": requests.len(),
        "per_layer": layers.iter().map(|l| json!({
            "layer": l.layer,
            "top1pct_share": r4(l.top_share(0.01)),
            "top5pct_share": r4(l.top_share(0.05)),
            "top10pct_share": r4(l.top_share(0.10)),
            "experts_used": l.counts.iter().filter(|&&c| c > 0).count(),
            "counts": l.counts,
            "reuse_distance_buckets": l.reuse,
            "first_uses": l.first_uses,
            "consecutive_overlap": r4(l.overlap),
        })).collect::<Vec<Value>>(),
        "reuse_bucket_bounds": (0..layers.first().map_or(0, |l| l.reuse.len()))
            .map(|b| if b == 0 { json!([0, 0]) } else { json!([1usize << (b - 1), (1usize << b) - 1]) })
            .collect::<Vec<Value>>(),
        "cross_layer_overlap_correlation": cross.iter().map(|&c| r4(c)).collect::<Vec<f64>>(),
        "working_set": ws.iter().map(|&(w, n)| json!({
            "window_tokens": w, "experts": r4(n), "share_of_all": r4(n / total_experts.max(1.0)),
            "gb": r4(n * h.expert_bytes as f64 / 1e9),
        })).collect::<Vec<Value>>(),
    });
    let mut report = report;
    if let Some(dir) = &a.plot {
        let files = super::plot::stats(dir, &layers, &ws, e)?;
        report["plots"] = json!(files);
    }
    if a.file.json {
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
        return Ok(());
    }
    outln!(
        "{}: model {}, {} tokens ({} decode) in {} requests; {} MoE layers x {} experts, K {}",
        a.file.file.display(),
        h.model_id,
        toks.len(),
        decode,
        requests.len(),
        h.moe_layers.len(),
        e,
        k
    )?;
    outln!(
        "layer  top1%  top5%  top10%  used  overlap(t,t-1)  dist<K  dist<4K  (share of accesses)"
    )?;
    for l in &layers {
        let reuses: u64 = l.reuse.iter().sum::<u64>() + l.first_uses;
        let below = |d: usize| {
            l.dist[..d.min(l.dist.len())].iter().sum::<u64>() as f64 / reuses.max(1) as f64
        };
        outln!(
            "{:>5}  {:>5.3}  {:>5.3}  {:>6.3}  {:>4}  {:>14.3}  {:>7.3}  {:>8.3}",
            l.layer,
            l.top_share(0.01),
            l.top_share(0.05),
            l.top_share(0.10),
            l.counts.iter().filter(|&&c| c > 0).count(),
            l.overlap,
            below(k),
            below(4 * k)
        )?;
    }
    let mc = cross.iter().sum::<f64>() / cross.len().max(1) as f64;
    outln!("cross-layer correlation of consecutive-token overlap (adjacent layers): mean {mc:.3}")?;
    for (w, n) in &ws {
        outln!(
            "working set over {w:>4} tokens: {n:>8.1} experts ({:.1}% of all, {:.3} GB)",
            100.0 * n / total_experts.max(1.0),
            n * h.expert_bytes as f64 / 1e9
        )?;
    }
    if let Some(p) = report.get("plots") {
        outln!("plots: {p}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flashmoe_core::trace::Phase;

    fn tok(pos: u32, experts: &[u16]) -> Token {
        Token {
            request: 0,
            pos,
            phase: Phase::Decode,
            experts: vec![experts.to_vec()],
            hidden: vec![None],
        }
    }

    #[test]
    fn stack_distance_overlap_and_skew_by_hand() {
        // K 2 over 4 experts. Accesses in ascending id per token:
        // t0: 0 1 (first, first); t1: 1 2 (d 0: only 0 used since... stack [1,0] -> 1 at 0;
        // 2 first); t2: 0 3 (stack [2,1,0] -> 0 at 2; 3 first).
        let toks = [tok(0, &[1, 0]), tok(1, &[2, 1]), tok(2, &[3, 0])];
        let s = layer_stats(&toks, 0, 5, 4, 2);
        assert_eq!(s.counts, [2, 2, 1, 1]);
        assert_eq!(s.first_uses, 4);
        assert_eq!(s.dist, [1, 0, 1, 0]);
        assert_eq!(s.reuse, [1, 0, 1, 0]);
        // overlaps: t1 vs t0 share {1}: 1/2; t2 vs t1 share nothing.
        assert_eq!(s.overlaps, [0.5, 0.0]);
        // top 10% of 4 experts is one expert: 2 of 6 routings.
        assert!((s.top_share(0.10) - 2.0 / 6.0).abs() < 1e-12);
        // A gap in positions is not a consecutive pair.
        let gap = [tok(0, &[1, 0]), tok(5, &[1, 0])];
        assert!(layer_stats(&gap, 0, 0, 4, 2).overlaps.is_empty());
        // Working set: windows of 2 tokens -> {0,1,2} then the partial last one left out.
        assert_eq!(working_set(&toks, 2), 3.0);
        assert_eq!(working_set(&toks, 1), 2.0);
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(1), 1);
        assert_eq!((bucket(2), bucket(3), bucket(4)), (2, 2, 3));
    }
}
