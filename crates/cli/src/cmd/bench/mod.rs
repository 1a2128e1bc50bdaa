//! `flashmoe bench [kernels|io|moe|decode|prefill|all] --model DIR`: runs the benchmarks of
//! `flashmoe_core::bench` and prints a readable report, or one JSON object (`--json`) in
//! which every figure with a limit sits beside it and their ratio (`*_ratio`). `--record`
//! appends one TSV row per run (naming the build's commit), `--plot` draws the TSV's history
//! as a PNG or a self-contained HTML page.
mod constrained;
pub(crate) mod plot;
mod record;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args as ClapArgs, ValueEnum};
use flashmoe_core::bench::{run_bench, BenchOptions, Which};
use serde_json::Value;

use super::out::outln;

#[derive(Copy, Clone, Debug, ValueEnum, PartialEq, Eq)]
pub enum What {
    /// Matvec GB/s per format beside memory read bandwidth
    Kernels,
    /// Expert-read GB/s at K in flight beside plain reads of the same size
    Io,
    /// Expert-only tokens/s
    Moe,
    /// Decode tok/s, warm and cold, with phases and the bound
    Decode,
    /// Prefill time to first token, warm and cold
    Prefill,
    /// Everything above
    All,
}

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Which benchmark
    #[arg(value_enum, default_value_t = What::All)]
    pub what: What,
    /// Model directory (a packed model from `flashmoe synth`/`pack` for I/O and cold figures)
    #[arg(long)]
    pub model: PathBuf,
    /// Print one JSON object instead of the readable report
    #[arg(long)]
    pub json: bool,
    /// Append a row (commit, model, bits, K, tok/s, ttft, mem GB, notes) to this TSV file
    #[arg(long)]
    pub record: Option<PathBuf>,
    /// Draw the history of the --record TSV (or of this run's row alone) as a PNG, or as a
    /// self-contained HTML page (inline SVG and a table of the runs) when F ends in .html
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Routed experts per token (default: the model's own)
    #[arg(long)]
    pub k: Option<usize>,
    /// Decode steps per decode measurement (and tokens of the MoE-only benchmark), at least 1
    #[arg(long, default_value_t = 8, value_parser = at_least::<1>)]
    pub tokens: usize,
    /// Prompt length of the prefill benchmark, at least 2; one beyond the model's context is
    /// lowered to fit it, with a note (the JSON's `prefill.prompt_tokens` is what ran)
    #[arg(long, default_value_t = 2000, value_parser = at_least::<2>)]
    pub prompt_tokens: usize,
    /// Tokens per prefill forward call (each routed expert is read once per call)
    #[arg(long, default_value_t = flashmoe_core::session::DEFAULT_PREFILL_CHUNK, value_parser = at_least::<1>)]
    pub prefill_chunk: usize,
    /// MB of weights each kernel measurement streams per pass
    #[arg(long, default_value_t = 256, value_parser = at_least::<1>)]
    pub kernel_mb: usize,
    /// MB read per I/O measurement
    #[arg(long, default_value_t = 1024, value_parser = at_least::<1>)]
    pub io_mb: usize,
    /// Skip the cold (--io direct) variants
    #[arg(long)]
    pub no_cold: bool,
    /// Skip the same-run baselines (serial experts, recurrent delta rule, next-layer prefetch)
    #[arg(long)]
    pub no_compare: bool,
    /// Alternating rounds (with and without a JSON Schema) of the constrained-decoding
    /// figure that `decode` adds (`constrained.mask_ratio`); 0 skips it
    #[arg(long, default_value_t = 5)]
    pub constrained_rounds: usize,
    /// Free text for the --record row's notes column
    #[arg(long, default_value = "")]
    pub notes: String,
    /// Also benchmark this backend: `cuda` adds GPU copy bandwidths, GPU kernel GB/s,
    /// synthetic decode with experts in VRAM / pinned host RAM, and (packed models, unless
    /// --no-cold) this model's decode with every routed expert read from disk, each beside
    /// its bound
    #[arg(long, value_enum, default_value_t = super::backend::BackendKind::Cpu)]
    pub backend: super::backend::BackendKind,
    /// Measure with exact f32 activations instead of the default int8 ones (see `run --help`).
    /// `decode` reports the other path's warm tok/s too (unless --no-compare) and, either way,
    /// int8's KL divergence and top-1 agreement against exact (`int8_decode_kl_mean`, ...),
    /// beside llama.cpp's Q8_0 activations' on the same products (`q8_0_ref_decode_kl_mean`, ...);
    /// `kernels` reports both paths (`q4_matvec_bw`, `q4_int8_matvec_bw`)
    #[arg(long, env = "FLASHMOE_EXACT", value_parser = clap::builder::FalseyValueParser::new(), conflicts_with = "int8_activations")]
    pub exact: bool,
    /// Int8 activations for 4- and 2-bit products: the default (see --exact); kept so that
    /// scripts naming it still run
    #[arg(long)]
    pub int8_activations: bool,
    #[command(flatten)]
    pub threads: super::common::Threads,
    /// `decode`: drive the expert loads by this routing trace (`--trace-routing`, recorded on a
    /// model of the same shape) instead of the model's own routing; with --expert-cache-gb
    /// and --cache-policy its hits equal `flashmoe trace simulate`'s
    #[arg(long, value_name = "FILE")]
    pub replay_trace: Option<PathBuf>,
    #[command(flatten)]
    pub trace: super::common::TraceOpts,
}

/// A whole number >= `MIN`: the benchmark would otherwise raise 0 to 1 without a word.
fn at_least<const MIN: usize>(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(v) if v >= MIN => Ok(v),
        _ => Err(format!("`{s}` must be a whole number >= {MIN}")),
    }
}

pub fn run(a: Args) -> Result<()> {
    let which: Vec<Which> = match a.what {
        What::All => Which::ALL.to_vec(),
        What::Kernels => vec![Which::Kernels],
        What::Io => vec![Which::Io],
        What::Moe => vec![Which::Moe],
        What::Decode => vec![Which::Decode],
        What::Prefill => vec![Which::Decode, Which::Prefill],
    };
    if a.backend == super::backend::BackendKind::Cuda && !cfg!(feature = "cuda") {
        anyhow::bail!(
            "--backend cuda: this flashmoe was built without CUDA support; rebuild with \
             `cargo build --release -p flashmoe --features cuda`"
        );
    }
    a.threads.apply()?;
    a.trace.install(&a.model)?;
    if let Some(f) = &a.replay_trace {
        if a.what == What::Decode {
            return replay_only(&a, f);
        }
    }
    let mut opts = BenchOptions::new(a.model.clone());
    opts.k = a.k;
    opts.tokens = a.tokens;
    opts.prompt_tokens = a.prompt_tokens;
    opts.prefill_chunk = a.prefill_chunk;
    opts.kernel_mb = a.kernel_mb;
    opts.io_mb = a.io_mb;
    opts.cold = !a.no_cold;
    opts.compare = !a.no_compare;
    super::common::set_exact_activations(a.exact);
    let say = |m: &str| eprintln!("[bench] {m}");
    let mut report = run_bench(&opts, &which, &say)
        .with_context(|| format!("benchmarking {}", a.model.display()))?;
    if let Value::Object(m) = &mut report {
        m.insert("int8_activations".into(), Value::Bool(!a.exact));
    }
    if which.contains(&Which::Decode) && a.constrained_rounds > 0 {
        say("constrained: decode with and without a JSON Schema, alternating");
        let c = constrained::measure(&a.model, a.k, a.tokens, a.constrained_rounds)
            .context("measuring the grammar mask's overhead")?;
        if let Value::Object(m) = &mut report {
            m.insert("constrained".into(), c);
        }
    }
    let cuda = match a.backend {
        super::backend::BackendKind::Cuda => true,
        super::backend::BackendKind::Cpu | super::backend::BackendKind::Wgpu => false,
        super::backend::BackendKind::Auto => super::backend::cuda_available(),
    };
    if cuda {
        say("cuda: copy bandwidths, kernels, decode (VRAM / pinned host)");
        let lo = flashmoe_core::loader::LoadOptions {
            top_k: a.k,
            ..Default::default()
        };
        let model = std::sync::Arc::new(flashmoe_core::loader::open_model(&a.model, &lo)?);
        let mut cuda = super::backend::cuda_bench(&model, a.tokens)?;
        if !a.no_cold && flashmoe_core::packed::is_packed_dir(&a.model) {
            say("cuda: decode with every routed expert read from disk (--io direct)");
            let (disk_gbps, _) = flashmoe_core::bench::expert_disk_bandwidth(
                &a.model,
                &model,
                a.io_mb.clamp(1, 1024) << 20,
            )?;
            let direct = std::sync::Arc::new(flashmoe_core::loader::open_model(
                &a.model,
                &flashmoe_core::loader::LoadOptions {
                    io: flashmoe_core::loader::IoMode::Direct,
                    ..lo
                },
            )?);
            let disk = super::backend::cuda_bench_disk(&model, &direct, disk_gbps, a.tokens)?;
            cuda["model_experts_from_disk"] = disk;
        }
        if let Value::Object(m) = &mut report {
            m.insert("cuda".into(), cuda);
        }
    }
    if let Some(f) = &a.replay_trace {
        let r = super::trace::replay::replay(&a.model, f, a.trace.expert_cache())?;
        if let Value::Object(m) = &mut report {
            m.insert("decode_replay".into(), r);
        }
    }
    if a.backend == super::backend::BackendKind::Wgpu {
        say("wgpu: copy and upload bandwidths, 4-bit products, decode");
        let lo = flashmoe_core::loader::LoadOptions {
            top_k: a.k,
            ..Default::default()
        };
        let model = std::sync::Arc::new(flashmoe_core::loader::open_model(&a.model, &lo)?);
        let w = super::wgpu::bench(&model, a.tokens)?;
        if let Value::Object(m) = &mut report {
            m.insert("wgpu".into(), w);
        }
    }
    if let Some(path) = &a.record {
        let row = record::row(&report, &a.model, &a.notes);
        record::append(path, &row).with_context(|| format!("appending to {}", path.display()))?;
    }
    if let Some(png) = &a.plot {
        let rows = match &a.record {
            Some(tsv) => record::read(tsv)?,
            None => vec![record::row(&report, &a.model, &a.notes)],
        };
        plot::draw(&rows, png).with_context(|| format!("drawing {}", png.display()))?;
        if let Value::Object(m) = &mut report {
            m.insert("plot".into(), Value::from(png.display().to_string()));
        }
    }
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        print_text(&report)?;
    }
    Ok(())
}

/// `bench decode --replay-trace`: the replay alone (no machine probes or synthetic decode).
fn replay_only(a: &Args, trace: &std::path::Path) -> Result<()> {
    let r = super::trace::replay::replay(&a.model, trace, a.trace.expert_cache())?;
    let report = serde_json::json!({ "decode_replay": r });
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
        Ok(())
    } else {
        print_text(&report)
    }
}

/// The report as indented `key: value` lines, a figure's ratio flagged with its limit.
fn print_text(v: &Value) -> Result<()> {
    let Value::Object(root) = v else {
        return Ok(());
    };
    for (section, body) in root {
        outln!("{section}")?;
        match body {
            Value::Object(m) => {
                for (k, v) in m {
                    match v {
                        Value::Object(inner) => {
                            let parts: Vec<String> =
                                inner.iter().map(|(a, b)| format!("{a} {b}")).collect();
                            outln!("  {k}: {}", parts.join(", "))?;
                        }
                        _ => outln!("  {k}: {v}")?,
                    }
                }
            }
            other => outln!("  {other}")?,
        }
    }
    Ok(())
}
