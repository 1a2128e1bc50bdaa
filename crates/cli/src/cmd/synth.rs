//! `flashmoe synth`: a packed model of random weights at a real model's shapes, for benchmarks
//! and tests without the real weights.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use flashmoe_core::packed::{synth, SynthOptions, PRESETS};

use super::out::outln;
use super::progress::Bar;

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Model shapes: tiny, qwen3.5-397b-a17b, qwen3.5-35b-a3b, qwen3-next-80b-a3b,
    /// qwen3-30b-a3b, qwen3-235b-a22b
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(PRESETS))]
    pub preset: String,
    /// Output directory
    #[arg(long)]
    pub out: PathBuf,
    /// Keep only the first N layers (to fit the disk at hand)
    #[arg(long)]
    pub layers: Option<usize>,
    /// Experts per layer instead of the preset's
    #[arg(long)]
    pub experts: Option<usize>,
    /// Expert bits (affine, group 64; 16 = bf16)
    #[arg(long, default_value = "4", value_parser = clap::builder::PossibleValuesParser::new(["2", "4", "8", "16"]))]
    pub bits: String,
    /// Dense matrix bits (router and shared-expert gate stay >= 8; 16 = bf16)
    #[arg(long, default_value = "4", value_parser = clap::builder::PossibleValuesParser::new(["4", "8", "16"]))]
    pub dense_bits: String,
    /// Vocabulary size instead of the preset's (at least the tokenizer's; default: the
    /// preset's, or the --tokenizer's when larger)
    #[arg(long)]
    pub vocab: Option<usize>,
    /// Random seed
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Copy this directory's tokenizer and chat template (default: a small byte-level one)
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Replace an existing packed model at OUT (never a non-empty directory that holds
    /// anything else)
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub threads: super::common::Threads,
}

pub fn run(a: Args) -> Result<()> {
    a.threads.apply()?;
    let opts = SynthOptions {
        preset: a.preset.clone(),
        layers: a.layers,
        experts: a.experts,
        bits: a.bits.parse()?,
        dense_bits: a.dense_bits.parse()?,
        seed: a.seed,
        force: a.force,
        vocab: a.vocab,
        tokenizer: a.tokenizer.clone(),
    };
    let t = Instant::now();
    let bar = Bar::new();
    super::progress::clean_up_on_ctrl_c(&a.out);
    let m = synth(&a.out, &opts, &bar)
        .with_context(|| format!("writing synthetic {} to {}", a.preset, a.out.display()))?;
    let experts: u64 = m.experts.layers.iter().map(|l| l.nbytes).sum();
    outln!(
        "wrote {} ({}, {} MoE layers x {} experts of {} bytes at {} bits) in {:.1}s: dense {:.2} GB, experts {:.2} GB",
        a.out.display(),
        a.preset,
        m.experts.layers.len(),
        m.experts.count,
        m.experts.expert_bytes,
        m.experts.bits,
        t.elapsed().as_secs_f64(),
        m.dense.nbytes as f64 / 1e9,
        experts as f64 / 1e9
    )?;
    Ok(())
}
