//! `flashmoe demo`: the main job on an embedded default, no download. Synthesizes a small
//! random Qwen3.5-MoE model in the packed format (experts in per-layer files, read with pread
//! like a real model), generates text from it and reports where the time went.
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use flashmoe_core::loader::LoadOptions as CoreLoadOptions;
use flashmoe_core::packed::NoProgress;
use flashmoe_core::packed::{synth, SynthOptions};
use flashmoe_runtime::{Engine, Event, GenerationRequest, LoadOptions, PromptInput};

use super::out::{out, outln};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Text to continue
    #[arg(long, default_value = "The quick brown fox")]
    pub prompt: String,
    /// Tokens to generate
    #[arg(long, default_value_t = 48)]
    pub tokens: usize,
    /// Synth preset (see `flashmoe synth --help`)
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Keep the synthesized model in this directory instead of a temporary one
    #[arg(long)]
    pub keep: Option<PathBuf>,
    /// Sampling temperature (0 = greedy)
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Random seed for the weights and the sampler
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[command(flatten)]
    pub threads: super::common::Threads,
}

/// Removes the temporary model directory when the demo ends, however it ends.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn run(a: Args) -> Result<()> {
    a.threads.apply()?;
    let (dir, _guard) = match &a.keep {
        Some(d) => (d.clone(), None),
        None => {
            let d = std::env::temp_dir().join(format!("flashmoe-demo-{}", std::process::id()));
            (d.clone(), Some(TempDir(d)))
        }
    };
    // The embedded vocabulary goes in a directory of its own; synth copies it beside the model.
    let tok_dir = dir.with_extension("vocab");
    let _tok_guard = TempDir(tok_dir.clone());
    std::fs::create_dir_all(&tok_dir).with_context(|| format!("creating {}", tok_dir.display()))?;
    std::fs::write(
        tok_dir.join("tokenizer.json"),
        super::demo_vocab::tokenizer_json(),
    )
    .with_context(|| format!("writing {}", tok_dir.display()))?;
    let t0 = Instant::now();
    let opts = SynthOptions {
        preset: a.preset.clone(),
        layers: None,
        experts: None,
        bits: 4,
        dense_bits: 16,
        seed: a.seed,
        force: true,
        vocab: None,
        tokenizer: Some(tok_dir.clone()),
    };
    let manifest = synth(&dir, &opts, &NoProgress).context("synthesizing the demo model")?;
    let synth_ms = t0.elapsed().as_secs_f64() * 1e3;
    let cfg = manifest.model_config(&dir)?;
    outln!(
        "synthesized a random {} model ({} layers, {} experts top-{}, hidden {}) in {} [{:.0} ms]",
        a.preset,
        cfg.num_layers,
        cfg.num_experts,
        cfg.num_experts_per_tok,
        cfg.hidden_size,
        dir.display(),
        synth_ms
    )?;

    let t1 = Instant::now();
    let mut engine = Engine::open(
        &dir,
        LoadOptions {
            core: CoreLoadOptions::default(),
            ..Default::default()
        },
    )?;
    let load_ms = t1.elapsed().as_secs_f64() * 1e3;
    outln!(
        "loaded: experts via {} [{:.0} ms]",
        engine.model().experts.describe(),
        load_ms
    )?;

    let mut req = GenerationRequest::new(PromptInput::Text(a.prompt.clone()));
    req.max_tokens = Some(a.tokens);
    req.sampling.temperature = Some(a.temperature);
    req.sampling.seed = Some(a.seed);
    outln!("--- random weights, so expect random text ---")?;
    out!("{} ", a.prompt.trim_end())?;
    let mut closed = None;
    let done = engine.generate(&req, |ev| {
        if let Event::Content(t) | Event::Reasoning(t) = ev {
            // A closed stdout ends the generation before the next token.
            if let Err(e) = out!("{t}") {
                closed = Some(e);
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    })?;
    if let Some(e) = closed {
        return Err(e);
    }
    outln!("\n---")?;
    let t = &done.timings;
    let io = &done.expert_io;
    outln!(
        "prompt {} tokens: prefill {:.1} ms, time to first token {:.1} ms",
        done.usage.prompt_tokens,
        t.prefill_ms,
        t.ttft_ms
    )?;
    outln!(
        "generated {} tokens: {:.1} tok/s ({})",
        done.usage.completion_tokens,
        t.decode_tok_s,
        done.finish_reason.as_str()
    )?;
    outln!(
        "experts read: {} ({:.2} MB), read time {:.1} ms, page cache served {:.0}%",
        io.fetched,
        io.bytes_read as f64 / 1e6,
        io.read_ns as f64 / 1e6,
        if io.bytes_read > 0 {
            100.0 * io.bytes_cached as f64 / io.bytes_read as f64
        } else {
            0.0
        }
    )?;
    Ok(())
}
