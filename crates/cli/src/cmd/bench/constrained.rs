//! `bench decode`'s constrained-decoding figure: the grammar mask's share of a token's time.
//!
//! Decodes the same prompt with and without a JSON Schema on the same engine, in alternating
//! rounds (seeded sampling, end-of-sequence ignored, so every round decodes the same tokens),
//! and reports medians. The main figure, `mask_ms`, is the time the generation loop itself
//! spent on masks (computing, applying to the logits, advancing the grammar) per token,
//! beside its limit `mask_limit_ms` (5% of an unconstrained token's time) and their ratio;
//! `mask_share` is it over a token's time. It is measured inside each constrained run, so a
//! busy machine moves it far less than the A/B difference (`ab_share`, also given, with the
//! load average).
use std::ops::ControlFlow;
use std::path::Path;

use anyhow::{Context, Result};
use flashmoe_core::bench::round4;
use flashmoe_runtime::{Engine, GenerationRequest, LoadOptions, PromptInput};
use flashmoe_text::GrammarSpec;
use serde_json::{json, Value};

/// The schema decoded under: objects with numbers, bounded strings and enums, the usual
/// shape of structured output. A random model completes it early at times; a round then
/// starts it again until it has decoded its tokens.
fn schema() -> Value {
    json!({"type": "array", "minItems": 4, "items": {"type": "object", "properties": {
        "id": {"type": "integer"},
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["a", "b", "c"]},
        "score": {"type": "number"}
    }, "required": ["id", "name", "kind"]}})
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// (time per decoded token, mask time per token) of one round of at least `tokens` tokens
/// (generations repeated while the grammar ends them early), in ms.
fn one_run(engine: &mut Engine, grammar: Option<GrammarSpec>, tokens: usize) -> Result<(f64, f64)> {
    let (mut decode_ms, mut steps, mut mask_ms, mut sampled) = (0.0, 0usize, 0.0, 0usize);
    let mut attempt = 0u64;
    while sampled < tokens {
        let mut req = GenerationRequest::new(PromptInput::Text("Values: ".into()));
        req.raw = true;
        req.ignore_eos = true;
        req.max_tokens = Some(tokens - sampled);
        // Seeded sampling: varied output, the same in every round.
        req.sampling.temperature = Some(1.0);
        req.sampling.seed = Some(attempt);
        req.grammar = grammar.clone();
        let done = engine.generate(&req, |_| ControlFlow::Continue(()))?;
        let n = done.usage.completion_tokens;
        anyhow::ensure!(n >= 1, "a generation decoded no token");
        decode_ms += done.timings.decode_ms;
        steps += n - 1;
        mask_ms += done.timings.mask_ms;
        sampled += n;
        attempt += 1;
    }
    anyhow::ensure!(steps > 0, "no decode step was timed");
    Ok((decode_ms / steps as f64, mask_ms / sampled as f64))
}

/// The figure as a JSON object, or `{"skipped": why}` when the model has no tokenizer.
pub fn measure(model: &Path, k: Option<usize>, tokens: usize, rounds: usize) -> Result<Value> {
    let tokens = tokens.max(16);
    let mut opts = LoadOptions::default();
    opts.core.top_k = k;
    // A short context: the figure is per token, and a full one would only cost memory.
    opts.ctx_size = Some(tokens + 256);
    let mut engine = match Engine::open(model, opts) {
        Ok(e) => e,
        Err(e) => return Ok(json!({"skipped": format!("the engine cannot open the model: {e}")})),
    };
    let t0 = std::time::Instant::now();
    engine
        .grammar_compiler()
        .context("building the vocabulary's token trie")?;
    let trie_ms = t0.elapsed().as_secs_f64() * 1e3;
    let spec = GrammarSpec::JsonSchema(schema());
    // Warm-up (page cache, prefix snapshot), not counted.
    one_run(&mut engine, None, tokens.min(8))?;
    let (mut plain, mut constrained, mut mask) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        plain.push(one_run(&mut engine, None, tokens)?.0);
        let (t, m) = one_run(&mut engine, Some(spec.clone()), tokens)?;
        constrained.push(t);
        mask.push(m);
    }
    let (p, c, m) = (
        median(&mut plain),
        median(&mut constrained),
        median(&mut mask),
    );
    let load = std::fs::read_to_string("/proc/loadavg").ok().and_then(|l| {
        l.split_whitespace()
            .next()
            .and_then(|x| x.parse::<f64>().ok())
    });
    Ok(json!({
        "schema": schema(),
        "tokens": tokens,
        "rounds": rounds,
        "vocab": engine.model().cfg.vocab_size,
        "trie_build_ms": round4(trie_ms),
        "token_ms": round4(p),
        "constrained_token_ms": round4(c),
        // The figure beside its limit (5% of an unconstrained token) and their ratio.
        "mask_ms": round4(m),
        "mask_limit_ms": round4(0.05 * p),
        "mask_ratio": round4(if p > 0.0 { m / (0.05 * p) } else { 0.0 }),
        "mask_share": round4(if p > 0.0 { m / p } else { 0.0 }),
        "ab_share": round4(if p > 0.0 { c / p - 1.0 } else { 0.0 }),
        "load_avg_1m": load,
    }))
}
