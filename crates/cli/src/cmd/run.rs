//! `flashmoe run`: generate from token ids (or, with the text layer, a prompt) and optionally
//! print where the time went, layer by layer, like the reference design's timing report.
use std::time::Instant;

use anyhow::Result;
use clap::Args as ClapArgs;
use flashmoe_core::experts::ExpertStatsSnapshot;
use flashmoe_core::model::{ForwardStats, Model};
use flashmoe_core::session::Session;

use super::common::{parse_ids, ModelArgs};
use super::generate::argmax;

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Comma-separated prompt token ids
    #[arg(long)]
    pub ids: Option<String>,
    /// Number of tokens to generate
    #[arg(long, default_value_t = 32)]
    pub tokens: usize,
    /// Print a per-layer time breakdown and per-token I/O figures
    #[arg(long)]
    pub timing: bool,
}

pub fn run(a: Args) -> Result<()> {
    let Some(ids) = &a.ids else {
        anyhow::bail!("give --ids (comma-separated token ids)");
    };
    let ids = parse_ids(ids)?;
    let model = a.model.load()?;
    run_ids(&model, &ids, a.tokens, a.timing)
}

pub fn run_ids(model: &Model, ids: &[u32], tokens: usize, timing: bool) -> Result<()> {
    let mut sess = Session::new(model);
    let t0 = Instant::now();
    let (mut logits, _) = sess.set_prompt(ids)?;
    let prefill = t0.elapsed();
    let prefill_stats = std::mem::take(&mut sess.stats);
    let io0 = model.experts.counters().snapshot();
    let mut out = Vec::new();
    let mut per_token = Vec::new();
    let td = Instant::now();
    for _ in 0..tokens {
        let next = argmax(&logits);
        out.push(next);
        if out.len() == tokens || model.cfg.eos_token_ids.contains(&next) {
            break;
        }
        let ts = Instant::now();
        let before = model.experts.counters().snapshot();
        logits = sess.step(next)?.to_vec();
        per_token.push((
            ts.elapsed(),
            model.experts.counters().snapshot().since(&before),
        ));
    }
    let decode = td.elapsed();
    let s: Vec<String> = out.iter().map(|x| x.to_string()).collect();
    println!("{}", s.join(","));
    if timing {
        let io = model.experts.counters().snapshot().since(&io0);
        print_timing(
            model,
            ids.len(),
            prefill,
            &prefill_stats,
            &sess.stats,
            &per_token,
            decode,
            &io,
        );
    }
    Ok(())
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[allow(clippy::too_many_arguments)]
fn print_timing(
    model: &Model,
    prompt: usize,
    prefill: std::time::Duration,
    _pstats: &ForwardStats,
    dstats: &ForwardStats,
    per_token: &[(std::time::Duration, ExpertStatsSnapshot)],
    decode: std::time::Duration,
    io: &ExpertStatsSnapshot,
) {
    let n = per_token.len().max(1) as f64;
    eprintln!("--- timing ({}) ---", model.experts.describe());
    eprintln!(
        "prefill: {prompt} tokens in {:.1} ms ({:.1} tok/s)",
        ms(prefill),
        prompt as f64 / prefill.as_secs_f64()
    );
    eprintln!("decode, per layer, ms per token:");
    eprintln!(
        "{:>5} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "layer", "mixer", "routing", "shared", "io_wait", "experts", "combine", "total"
    );
    for (i, l) in dstats.layers.iter().enumerate() {
        eprintln!(
            "{:>5} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3}",
            i,
            ms(l.mixer) / n,
            ms(l.routing) / n,
            ms(l.shared) / n,
            ms(l.expert_wait) / n,
            ms(l.expert_compute) / n,
            ms(l.combine) / n,
            ms(l.total()) / n
        );
    }
    let t = dstats.total_layers();
    eprintln!(
        "  all {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3}   (+ embed {:.3}, head {:.3})",
        ms(t.mixer) / n,
        ms(t.routing) / n,
        ms(t.shared) / n,
        ms(t.expert_wait) / n,
        ms(t.expert_compute) / n,
        ms(t.combine) / n,
        ms(t.total()) / n,
        ms(dstats.embed) / n,
        ms(dstats.head) / n
    );
    let secs = decode.as_secs_f64();
    let read_gb = io.bytes_read as f64 / 1e9;
    eprintln!(
        "decode: {} tokens in {:.1} ms = {:.2} tok/s; experts fetched {} ({:.3} GB, {:.2} MB/token), read bandwidth {:.2} GB/s while reading",
        per_token.len(),
        secs * 1e3,
        per_token.len() as f64 / secs.max(1e-9),
        io.fetched,
        read_gb,
        read_gb * 1e3 / n,
        if io.read_ns > 0 { read_gb / (io.read_ns as f64 / 1e9) } else { 0.0 }
    );
    if io.bytes_read > 0 {
        eprintln!(
            "page cache served {:.1}% of expert bytes ({})",
            100.0 * io.bytes_cached as f64 / io.bytes_read as f64,
            model.experts.describe()
        );
    }
}
