//! `flashmoe trace stats|simulate|predict FILE`: what a routing trace (`--trace-routing`) says
//! about expert caching and prefetching on the user's own model and prompts (issue 22).
//! `tokens.rs` turns the file's per-layer records into per-token rows the analyses share;
//! `bench decode --replay-trace` (`replay.rs`) drives real expert loads by a trace.
mod plot;
mod predict;
pub mod replay;
mod simulate;
mod stats;
mod tokens;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args as ClapArgs, Subcommand};
use flashmoe_core::trace::Trace;

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Per-layer expert popularity and skew, reuse distances, overlap between consecutive
    /// tokens and across layers, working-set size over windows
    Stats(stats::Args),
    /// Replay the trace against cache policies (LRU, LFU with aging, ARC, per-layer LFU,
    /// static pinning, Belady's optimum) at given sizes: hit rates, bytes and time per token
    Simulate(simulate::Args),
    /// How well the previous token's experts, early routing, a linear probe and popularity
    /// predict each layer's experts: precision/recall at K and 2K, prefetch bytes saved/wasted
    Predict(predict::Args),
}

pub fn run(a: Args) -> Result<()> {
    match a.cmd {
        Cmd::Stats(a) => stats::run(a),
        Cmd::Simulate(a) => simulate::run(a),
        Cmd::Predict(a) => predict::run(a),
    }
}

/// Reads a trace, saying on stderr when its tail was cut (the records before it are used).
pub fn read(path: &Path) -> Result<Trace> {
    let t = Trace::read(path).with_context(|| format!("reading the trace {}", path.display()))?;
    if let Some(n) = t.tail_note() {
        eprintln!("warning: {n}");
    }
    if t.records.is_empty() {
        anyhow::bail!("{}: the trace holds no records", path.display());
    }
    Ok(t)
}

/// `FILE` argument shared by the subcommands.
#[derive(ClapArgs, Debug)]
pub struct FileArg {
    /// A routing trace written by --trace-routing
    pub file: PathBuf,
    /// Print one JSON object instead of the readable report
    #[arg(long)]
    pub json: bool,
}

/// `x` rounded to 4 significant digits (the reports' precision).
pub fn r4(x: f64) -> f64 {
    flashmoe_core::bench::round4(x)
}
