//! `flashmoe run`: generate from token ids (or, with the text layer, a prompt) and optionally
//! print where the time went, layer by layer, like the reference design's timing report.
use std::time::Instant;

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use flashmoe_core::experts::ExpertStatsSnapshot;
use flashmoe_core::model::{ForwardStats, Model};
use flashmoe_core::session::Session;

use super::backend::BackendKind;
use super::common::{check_tokens_fit, parse_ids, IdPrinter, ModelArgs};
use super::out::{out, outln};
use super::sampling::SamplingArgs;
use flashmoe_text::sampling::argmax;

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt text: sent as one user message through the model's chat template; the answer
    /// streams to stdout (thinking, if any, dimmed on stderr)
    #[arg(long, conflicts_with_all = ["ids", "prompt_file"])]
    pub prompt: Option<String>,
    /// Read the prompt text from this UTF-8 file (`-`: standard input), as --prompt
    #[arg(long, value_name = "FILE", conflicts_with = "ids")]
    pub prompt_file: Option<PathBuf>,
    /// Comma-separated prompt token ids (greedy; prints the generated ids)
    #[arg(long)]
    pub ids: Option<String>,
    /// Most tokens to generate
    #[arg(long, default_value_t = 256)]
    pub tokens: usize,
    /// Turn thinking off (the template's `enable_thinking=false`)
    #[arg(long)]
    pub no_think: bool,
    /// Stop before this string (repeatable)
    #[arg(long)]
    pub stop: Vec<String>,
    /// Constrain the answer to this JSON Schema file (llguidance; with --prompt)
    #[arg(long, value_name = "FILE", conflicts_with = "grammar")]
    pub json_schema: Option<PathBuf>,
    /// Constrain the answer to this Lark grammar file (llguidance's dialect; with --prompt)
    #[arg(long, value_name = "FILE")]
    pub grammar: Option<PathBuf>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print a per-layer time breakdown and per-token I/O figures (stderr)
    #[arg(long)]
    pub timing: bool,
}

pub fn run(a: Args) -> Result<()> {
    if let Some(p) = &a.prompt {
        return run_prompt(&a, p);
    }
    if let Some(f) = &a.prompt_file {
        return run_prompt(&a, &read_prompt_file(f)?);
    }
    let Some(ids) = &a.ids else {
        anyhow::bail!("give --prompt TEXT, --prompt-file FILE or --ids 1,2,3");
    };
    if a.json_schema.is_some() || a.grammar.is_some() {
        bail!("--json-schema and --grammar constrain text: give --prompt or --prompt-file");
    }
    let ids = parse_ids(ids)?;
    let model = std::sync::Arc::new(a.model.load()?);
    model.check_tokens_at(&ids, 0)?;
    check_tokens_fit(&model, ids.len(), a.tokens)?;
    // A GPU backend runs through the session runner; the CPU through run_ids.
    let gpu = match a.model.opts.backend {
        BackendKind::Cuda | BackendKind::Wgpu => true,
        BackendKind::Cpu => false,
        BackendKind::Auto => {
            super::backend::cuda_available()
                || super::wgpu::hardware_adapter(a.model.opts.gpu_adapter).is_some()
        }
    };
    if gpu {
        return run_ids_on(model, &ids, a.tokens, a.timing, &a.model);
    }
    run_ids(model, &ids, a.tokens, a.timing, a.model.opts.prefill_step())
}

/// The text of `--prompt-file` (`-`: all of standard input), which must be UTF-8 and not
/// empty.
fn read_prompt_file(path: &Path) -> Result<String> {
    let text = if path == Path::new("-") {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("--prompt-file -: reading standard input")?;
        String::from_utf8(buf).map_err(|e| {
            anyhow::anyhow!(
                "--prompt-file -: standard input is not valid UTF-8 (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            )
        })?
    } else {
        super::tokenize::read_utf8(path)?
    };
    if text.trim().is_empty() {
        bail!("--prompt-file {}: the prompt is empty", path.display());
    }
    Ok(text)
}

/// Greedy generation through a backend runner (CUDA, wgpu): ids out, and overall timing.
fn run_ids_on(
    model: std::sync::Arc<Model>,
    ids: &[u32],
    tokens: usize,
    timing: bool,
    args: &super::common::ModelArgs,
) -> Result<()> {
    let args = &args.opts;
    use flashmoe_core::model::{ForwardStats, Logits};
    let eos = model.cfg.eos_token_ids.clone();
    let mut runner = super::backend::runner(model, args)?;
    let mut stats = ForwardStats::default();
    let t0 = Instant::now();
    let step = args.prefill_step();
    let logits = super::common::prefill(runner.as_mut(), ids, step, Logits::Last, &mut stats)?;
    let prefill = t0.elapsed();
    let mut out = Vec::new();
    let mut printer = IdPrinter::default();
    let td = Instant::now();
    let mut next = argmax(&logits);
    for _ in 0..tokens {
        out.push(next);
        printer.push(next)?;
        if out.len() == tokens || eos.contains(&next) {
            break;
        }
        // The argmax where the logits live: only the id comes back (on a GPU, 4 bytes a
        // token instead of the vocabulary's logits).
        next = runner.forward_argmax(&[next])?;
    }
    printer.finish()?;
    if timing {
        let steps = out.len().saturating_sub(1).max(1);
        eprintln!(
            "--- timing ({} backend) ---\nprefill: {} tokens in {:.1} ms\ndecode: {:.2} tok/s",
            runner.name(),
            ids.len(),
            ms(prefill),
            steps as f64 / td.elapsed().as_secs_f64().max(1e-9)
        );
    }
    Ok(())
}

/// The grammar of `--json-schema` or `--grammar`, read and checked to be what it says.
fn output_grammar(a: &Args) -> Result<Option<flashmoe_text::GrammarSpec>> {
    use flashmoe_text::GrammarSpec;
    let read =
        |p: &Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    if let Some(p) = &a.json_schema {
        let schema: serde_json::Value = serde_json::from_str(&read(p)?)
            .with_context(|| format!("--json-schema {}: not JSON", p.display()))?;
        return Ok(Some(GrammarSpec::JsonSchema(schema)));
    }
    match &a.grammar {
        Some(p) => Ok(Some(GrammarSpec::Lark(read(p)?))),
        None => Ok(None),
    }
}

fn run_prompt(a: &Args, prompt: &str) -> Result<()> {
    use flashmoe_runtime::{Event, FinishReason, GenerationRequest, PromptInput};
    use std::io::Write;
    use std::ops::ControlFlow;
    let mut engine = a.model.engine()?;
    let msgs = vec![serde_json::json!({"role": "user", "content": prompt})];
    let mut req = GenerationRequest::new(PromptInput::Messages {
        messages: msgs,
        tools: Vec::new(),
        enable_thinking: if a.no_think { Some(false) } else { None },
        add_generation_prompt: true,
    });
    req.max_tokens = Some(a.tokens);
    req.stop = a.stop.clone();
    req.sampling = a.sampling.overrides();
    req.grammar = output_grammar(a)?;
    let mut err = std::io::stderr();
    // Thinking is dimmed only for a terminal: a log file gets the plain text.
    let (dim, undim) = if std::io::IsTerminal::is_terminal(&err) {
        ("\x1b[2m", "\x1b[0m")
    } else {
        ("", "")
    };
    // What went to stdout: whether a final newline is owed, and a closed pipe, which stops
    // the generation before the next token.
    let (mut answered, mut thought, mut closed) = (false, false, None);
    let done = engine.generate(&req, |ev| {
        let w = match ev {
            Event::Content(t) => {
                answered = true;
                out!("{t}")
            }
            Event::Reasoning(t) => {
                thought = true;
                let _ = write!(err, "{dim}{t}{undim}");
                let _ = err.flush();
                Ok(())
            }
            Event::ToolCall(c) => {
                answered = true;
                out!("\n[tool call] {}({})\n", c.name, c.arguments)
            }
            Event::Done(_) => Ok(()),
        };
        match w {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                closed = Some(e);
                ControlFlow::Break(())
            }
        }
    })?;
    if let Some(e) = closed {
        return Err(e);
    }
    if answered {
        outln!()?;
    } else if thought {
        // The thinking went to stderr; stdout gets nothing rather than a lone newline.
        let _ = writeln!(err);
    }
    if done.finish_reason == FinishReason::Length && thought && !answered {
        eprintln!(
            "[reached --tokens {} while thinking: no answer yet; raise --tokens or pass \
             --no-think]",
            a.tokens
        );
    }
    if a.timing {
        let t = &done.timings;
        let io = &done.expert_io;
        eprintln!(
            "--- timing ---\ncompute threads: {}\nprompt {} tokens ({} reused), prefill {:.1} ms, time to first token {:.1} ms\n\
             generated {} tokens, decode {:.2} tok/s, finish: {}\n\
             experts fetched {} ({:.3} GB), page cache / cache served {:.1}%",
            rayon::current_num_threads(),
            done.usage.prompt_tokens,
            done.usage.cached_tokens,
            t.prefill_ms,
            t.ttft_ms,
            done.usage.completion_tokens,
            t.decode_tok_s,
            done.finish_reason.as_str(),
            io.fetched,
            io.bytes_read as f64 / 1e9,
            if io.bytes_read > 0 { 100.0 * io.bytes_cached as f64 / io.bytes_read as f64 } else { 0.0 }
        );
        if engine.backend_name() == "cpu" {
            eprintln!("per layer, ms per generated token (prefill included):");
            print_layer_table(
                engine.forward_stats(),
                done.usage.completion_tokens.max(1) as f64,
            );
        } else {
            // The GPU runs a layer's kernels asynchronously: host-side phase timers would
            // measure launches, not work, so the CUDA backend records none.
            eprintln!(
                "per-layer phases: recorded by the CPU backend only (this ran on {})",
                engine.backend_name()
            );
        }
    }
    Ok(())
}

pub fn run_ids(
    model: std::sync::Arc<Model>,
    ids: &[u32],
    tokens: usize,
    timing: bool,
    prefill_step: usize,
) -> Result<()> {
    let mut sess = Session::new(model.clone());
    sess.prefill_chunk = prefill_step;
    let model = &*model;
    let t0 = Instant::now();
    let (mut logits, _) = sess.set_prompt(ids)?;
    let prefill = t0.elapsed();
    let prefill_stats = std::mem::take(&mut sess.stats);
    let io0 = model.experts.counters().snapshot();
    let mut out = Vec::new();
    let mut printer = IdPrinter::default();
    let mut per_token = Vec::new();
    let td = Instant::now();
    for _ in 0..tokens {
        let next = argmax(&logits);
        out.push(next);
        printer.push(next)?;
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
    printer.finish()?;
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
    eprintln!("compute threads: {}", rayon::current_num_threads());
    eprintln!(
        "prefill: {prompt} tokens in {:.1} ms ({:.1} tok/s)",
        ms(prefill),
        prompt as f64 / prefill.as_secs_f64()
    );
    eprintln!("decode, per layer, ms per token:");
    print_layer_table(dstats, n);
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
    // An mmap'd checkpoint has no read step to time or check with mincore.
    if io.bytes_read > 0 && io.read_ns > 0 {
        eprintln!(
            "page cache served {:.1}% of expert bytes ({})",
            100.0 * io.bytes_cached as f64 / io.bytes_read as f64,
            model.experts.describe()
        );
    }
}

/// The per-layer phase table: each figure is total time divided by `n`.
pub fn print_layer_table(dstats: &ForwardStats, n: f64) {
    eprintln!(
        "{:>5} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "layer", "mixer", "routing", "shared", "io_wait", "experts", "combine", "total"
    );
    let row = |label: String, l: &flashmoe_core::model::LayerTimes| {
        let f = [
            l.mixer,
            l.routing,
            l.shared,
            l.expert_wait,
            l.expert_compute,
            l.combine,
            l.total(),
        ];
        let cells: Vec<String> = f.iter().map(|d| format!("{:>8.3}", ms(*d) / n)).collect();
        format!("{label:>5} {}", cells.join(" "))
    };
    for (i, l) in dstats.layers.iter().enumerate() {
        eprintln!("{}", row(i.to_string(), l));
    }
    eprintln!(
        "{}   (+ embed {:.3}, head {:.3})",
        row("all".into(), &dstats.total_layers()),
        ms(dstats.embed) / n,
        ms(dstats.head) / n
    );
}
