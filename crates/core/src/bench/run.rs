//! Model benchmarks: MoE-only tokens/s, decode and prefill (tok/s, time to first token), warm
//! (expert files in the page cache) and cold (`--io direct`), each with its per-phase
//! breakdown and the bound `dense_bytes/mem_bw + cached_expert_bytes/mem_bw +
//! missed_expert_bytes/disk_bw` computed from this run's own byte counts and probes.
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::{Map, Value};

use crate::error::Result;
use crate::experts::ExpertStatsSnapshot;
use crate::kernels::{act_quant, set_act_quant, ActQuant};
use crate::loader::IoMode;
use crate::model::{Ffn, ForwardStats, LayerTimes, Logits, Model, State};

use super::accuracy::Restore;
use super::{
    dense_bytes_per_token, dense_bytes_total, madds_per_token, moe_bytes_per_token, rss_bytes,
    warm_page_cache, BenchOptions, Limits, ModelInfo, Section,
};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn argmax(v: &[f32]) -> u32 {
    crate::backend::host_argmax(v).map_or(0, |(i, _)| i as u32)
}

fn random_prompt(model: &Model, n: usize, seed: u64) -> Vec<u32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v = model.cfg.vocab_size as u32;
    (0..n).map(|_| rng.gen_range(0..v)).collect()
}

/// Per-token milliseconds of each phase (`other` is what the phases don't cover).
fn phases(stats: &ForwardStats, tokens: usize, wall: Duration) -> Value {
    let t: LayerTimes = stats.total_layers();
    let n = tokens.max(1) as f64;
    let mut m = Map::new();
    let mut put = |k: &str, d: Duration| {
        m.insert(k.into(), Value::from((ms(d) / n * 1e3).round() / 1e3));
    };
    put("mixer", t.mixer);
    put("routing", t.routing);
    put("shared_expert", t.shared);
    put("expert_wait", t.expert_wait);
    put("expert_compute", t.expert_compute);
    put("combine", t.combine);
    put("embed", stats.embed);
    put("head", stats.head);
    let covered = t.total() + stats.embed + stats.head;
    put("other", wall.saturating_sub(covered));
    Value::Object(m)
}

/// Bytes an interval moved per token: (expert bytes served from cache, missed). A checkpoint's
/// experts are mmap'd slices, resident once touched: all count as cached.
fn expert_bytes(io: &ExpertStatsSnapshot, tokens: usize, packed: bool) -> (f64, f64) {
    let n = tokens.max(1) as f64;
    let cached = if packed {
        io.bytes_cached.min(io.bytes_read) as f64
    } else {
        io.bytes_read as f64
    };
    (cached / n, (io.bytes_read as f64 - cached) / n)
}

/// The bound of one token in ms: dense and cached expert bytes at memory bandwidth, missed
/// expert bytes at disk bandwidth.
fn bound_ms(limits: &Limits, dense: f64, cached: f64, missed: f64) -> (f64, f64, f64) {
    (
        dense / limits.mem_gbs / 1e6,
        cached / limits.mem_gbs / 1e6,
        missed / limits.disk_gbs / 1e6,
    )
}

struct Run {
    ttft: Duration,
    decode: Duration,
    steps: usize,
    stats: ForwardStats,
    io: ExpertStatsSnapshot,
}

/// Prefills `prompt` in chunks of `chunk` tokens (timed: time to first token), then decodes
/// `steps` greedy tokens, driving `Model::forward` exactly as a session does.
fn session_run(model: &Model, prompt: &[u32], steps: usize, chunk: usize) -> Result<(Run, Run)> {
    let mut state = State::new(&model.cfg);
    let c = || model.experts.counters().snapshot();
    let io0 = c();
    let mut stats = ForwardStats::default();
    let t0 = Instant::now();
    let mut logits = Vec::new();
    for part in prompt.chunks(chunk.max(1)) {
        logits = model.forward(part, &mut state, Logits::Last, &mut stats, None)?;
    }
    let ttft = t0.elapsed();
    let pre = Run {
        ttft,
        decode: ttft,
        steps: prompt.len(),
        stats: std::mem::take(&mut stats),
        io: c().since(&io0),
    };
    let io1 = c();
    let td = Instant::now();
    for _ in 0..steps {
        let next = argmax(&logits);
        logits = model.forward(&[next], &mut state, Logits::Last, &mut stats, None)?;
    }
    let dec = Run {
        ttft,
        decode: td.elapsed(),
        steps,
        stats,
        io: c().since(&io1),
    };
    Ok((pre, dec))
}

/// Writes one decode measurement under `tag` and returns its time per token (ms).
fn report_decode(
    s: &mut Section,
    tag: &str,
    r: &Run,
    dense: f64,
    limits: &Limits,
    packed: bool,
) -> (f64, f64, f64) {
    let tpt = ms(r.decode) / r.steps.max(1) as f64;
    let (cached, missed) = expert_bytes(&r.io, r.steps, packed);
    let (bd, bc, bm) = bound_ms(limits, dense, cached, missed);
    s.num(&format!("{tag}_ttft_ms"), ms(r.ttft));
    s.num(&format!("{tag}_tok_s"), 1e3 / tpt);
    s.fig(&format!("{tag}_tpt"), "ms", tpt, bd + bc + bm);
    s.num(&format!("{tag}_bound_dense_ms"), bd);
    s.num(&format!("{tag}_bound_cached_experts_ms"), bc);
    s.num(&format!("{tag}_bound_missed_experts_ms"), bm);
    s.num(
        &format!("{tag}_expert_gb_per_token"),
        (cached + missed) / 1e9,
    );
    s.num(&format!("{tag}_missed_expert_gb_per_token"), missed / 1e9);
    s.val(
        &format!("{tag}_phase_ms_per_token"),
        phases(&r.stats, r.steps, r.decode),
    );
    let compute = tpt - ms(r.stats.total_layers().expert_wait) / r.steps.max(1) as f64;
    (tpt, bm, compute)
}

/// Decode, warm then cold. Returns the section and the warm time per token (ms).
pub(crate) fn decode(
    model: &mut Model,
    info: &ModelInfo,
    limits: &Limits,
    opts: &BenchOptions,
    load: &dyn Fn(IoMode) -> Result<Model>,
    say: &dyn Fn(&str),
) -> Result<(Value, f64)> {
    let mut s = Section::default();
    let dense = dense_bytes_per_token(model) as f64;
    let prompt = random_prompt(model, 8, 11);
    s.val("prompt_tokens", prompt.len());
    s.val("decode_tokens", opts.tokens);
    s.num("dense_gb_per_token", dense / 1e9);
    s.num("mem_read_bw_gbs", limits.mem_gbs);
    s.num("disk_read_bw_gbs", limits.disk_gbs);
    if info.packed {
        say("decode: warming the page cache with the model files");
        s.val("page_cache_warm", warm_page_cache(&info.warm_files)?);
    }
    say("decode: warm");
    // One untimed token first so every dense page is mapped in.
    session_run(model, &prompt[..1], 1, opts.prefill_chunk)?;
    let (_, warm) = session_run(model, &prompt, opts.tokens, opts.prefill_chunk)?;
    let (warm_tpt, _, _) = report_decode(&mut s, "warm", &warm, dense, limits, info.packed);
    let aq = act_quant();
    s.val("activations", aq.name());
    if opts.compare {
        // The other activation path's warm decode in the same run, so that its speed and the
        // accuracy figures below sit beside each other.
        let other = match aq {
            ActQuant::Int8 | ActQuant::Q8_0Ref => ActQuant::Exact,
            ActQuant::Exact => ActQuant::Int8,
        };
        say(&format!("decode: warm, {} activations", other.name()));
        let restore = Restore(aq);
        set_act_quant(other);
        let (_, o) = session_run(model, &prompt, opts.tokens, opts.prefill_chunk)?;
        drop(restore);
        let otpt = ms(o.decode) / o.steps.max(1) as f64;
        s.num(&format!("warm_{}_tok_s", other.name()), 1e3 / otpt);
    }
    say("decode: int8 activations against exact (KL divergence, top-1 agreement)");
    super::accuracy::report(&mut s, model, &prompt, opts.tokens)?;

    // Resident memory: the process before the model was loaded, plus dense weights + state +
    // K expert buffers, is what the design promises.
    let state = State::new(&model.cfg).nbytes() as f64;
    let bound = limits.base_rss as f64
        + dense_bytes_total(model) as f64
        + state
        + (info.k * info.expert_bytes) as f64;
    s.num("rss_base_gb", limits.base_rss as f64 / 1e9);
    s.fig("rss", "gb", rss_bytes() as f64 / 1e9, bound / 1e9);

    if opts.compare && info.packed {
        // The same warm decode with every expert copied by pread instead of used in place
        // from the mapping (`--io pread`): what the mapping buys.
        say("decode: warm, resident experts copied (--io pread)");
        let copied = load(IoMode::Pread)?;
        session_run(&copied, &prompt[..1], 1, opts.prefill_chunk)?;
        let (_, c) = session_run(&copied, &prompt, opts.tokens, opts.prefill_chunk)?;
        let ctpt = ms(c.decode) / c.steps.max(1) as f64;
        s.num("warm_pread_tpt_ms", ctpt);
        s.num("warm_mapped_speedup_x", ctpt / warm_tpt);
        drop(copied);
        // And with resident experts kept mapped (`--io mapped`): no page-table work per token,
        // a resident set that grows with the experts touched.
        say("decode: warm, resident experts kept mapped (--io mapped)");
        let kept = load(IoMode::Mapped)?;
        session_run(&kept, &prompt, opts.tokens, opts.prefill_chunk)?;
        let (_, k) = session_run(&kept, &prompt, opts.tokens, opts.prefill_chunk)?;
        report_decode(&mut s, "warm_kept_mapped", &k, dense, limits, true);
        s.num("rss_kept_mapped_gb", rss_bytes() as f64 / 1e9);
        s.val(
            "warm_kept_mapped_note",
            "timed on a second pass over the same tokens, after the first mapped their experts: \
             the steady state of a long run whose experts fit in RAM",
        );
    }

    if opts.cold && info.packed {
        say("decode: cold (--io direct)");
        match load(IoMode::Direct) {
            Ok(mut cold) => {
                session_run(&cold, &prompt[..1], 1, opts.prefill_chunk)?;
                let (_, r) = session_run(&cold, &prompt, opts.tokens, opts.prefill_chunk)?;
                let (tpt, io_ms, compute) = report_decode(&mut s, "cold", &r, dense, limits, true);
                // I/O and compute overlapped: a token should take about the longer of the two,
                // where compute is what a token takes with nothing to wait for (warm).
                s.fig("cold_overlap_tpt", "ms", tpt, io_ms.max(warm_tpt));
                s.num("cold_compute_ms_per_token", compute);
                if opts.compare {
                    say("decode: cold with next-layer prefetch");
                    cold.opts.prefetch_next = true;
                    let (_, p) = session_run(&cold, &prompt, opts.tokens, opts.prefill_chunk)?;
                    let ptpt = ms(p.decode) / p.steps.max(1) as f64;
                    s.num("cold_prefetch_next_tpt_ms", ptpt);
                    s.num("prefetch_next_speedup_x", tpt / ptpt);
                    s.num(
                        "cold_prefetch_next_expert_gb_per_token",
                        p.io.bytes_read as f64 / p.steps.max(1) as f64 / 1e9,
                    );
                }
            }
            Err(e) => s.val("cold_note", format!("--io direct unavailable: {e}")),
        }
    } else if !info.packed {
        s.val(
            "cold_note",
            "not a packed model: no --io direct; cold figures need `flashmoe pack` or `synth`",
        );
    }
    Ok((s.into_value(), warm_tpt))
}

/// Expert-only tokens/s: every MoE block of the model on a random input per token, no
/// attention or head (the reference design's MoE-only benchmark).
pub(crate) fn moe(
    model: &mut Model,
    info: &ModelInfo,
    limits: &Limits,
    opts: &BenchOptions,
    load: &dyn Fn(IoMode) -> Result<Model>,
) -> Result<Value> {
    let mut s = Section::default();
    let h = model.cfg.hidden_size;
    let per_tok = moe_bytes_per_token(model, info.k, info.expert_bytes) as f64;
    s.num("moe_gb_per_token", per_tok / 1e9);
    if info.packed {
        s.val("page_cache_warm", warm_page_cache(&info.warm_files)?);
    }
    let tokens = opts.tokens.max(2);
    let run = |m: &Model, parallel: bool| -> Result<f64> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut times = LayerTimes::default();
        let t = Instant::now();
        for _ in 0..tokens {
            let x: Vec<f32> = (0..h).map(|_| rng.gen_range(-1.0..1.0)).collect();
            for l in &m.layers {
                if let Ffn::Moe(b) = &l.ffn {
                    let e = m.experts.as_ref();
                    let k = m.top_k;
                    let n = m.cfg.norm_topk_prob;
                    b.forward_with(&x, 1, h, k, n, e, parallel, &mut times)?;
                }
            }
        }
        Ok(tokens as f64 / t.elapsed().as_secs_f64())
    };
    run(model, true)?; // warm-up: map pages, grow buffer pools
    let par = run(model, true)?;
    s.fig("warm_moe_tok", "s", par, limits.mem_gbs * 1e9 / per_tok);
    if opts.compare {
        let ser = run(model, false)?;
        s.num("warm_moe_serial_tok_s", ser);
        s.num("parallel_experts_speedup_x", par / ser);
        if info.packed {
            // Resident experts kept mapped (`--io mapped`): no page-table work per token. The
            // warm-up pass maps the experts the timed pass (same inputs) uses.
            let kept = load(IoMode::Mapped)?;
            run(&kept, true)?;
            let k = run(&kept, true)?;
            s.fig(
                "warm_moe_kept_mapped_tok",
                "s",
                k,
                limits.mem_gbs * 1e9 / per_tok,
            );
            let ks = run(&kept, false)?;
            s.num("warm_moe_kept_mapped_serial_tok_s", ks);
        }
    }
    if opts.cold && info.packed {
        if let Ok(cold) = load(IoMode::Direct) {
            let experts = (per_tok - moe_bytes_per_token(model, 0, 0) as f64) / limits.disk_gbs;
            let dense = moe_bytes_per_token(model, 0, 0) as f64 / limits.mem_gbs;
            let c = run(&cold, true)?;
            s.fig("cold_moe_tok", "s", c, 1e9 / (experts + dense));
            if opts.compare {
                let cs = run(&cold, false)?;
                s.num("cold_moe_serial_tok_s", cs);
                s.num("cold_parallel_experts_speedup_x", c / cs);
            }
        }
    }
    Ok(s.into_value())
}

fn report_prefill(
    s: &mut Section,
    tag: &str,
    r: &Run,
    dense: f64,
    chunks: usize,
    l: &Limits,
    packed: bool,
) -> f64 {
    let (cached, missed) = expert_bytes(&r.io, 1, packed);
    let (bd, bc, bm) = bound_ms(l, dense * chunks as f64, cached, missed);
    s.fig(&format!("{tag}_ttft"), "ms", ms(r.ttft), bd + bc + bm);
    s.num(
        &format!("{tag}_tok_s"),
        r.steps as f64 / r.ttft.as_secs_f64(),
    );
    s.num(&format!("{tag}_expert_gb"), (cached + missed) / 1e9);
    s.num(&format!("{tag}_missed_expert_gb"), missed / 1e9);
    s.val(
        &format!("{tag}_phase_ms_per_token"),
        phases(&r.stats, r.steps, r.ttft),
    );
    bd + bc + bm
}

/// Prefill's compute bound beside its memory bound (`mem_ms`): the prompt's multiply-adds at
/// the machine's f32 and int8 peaks, measured now, and the time against the larger of the two.
fn prefill_compute_bound(s: &mut Section, model: &Model, info: &ModelInfo, r: &Run, mem_ms: f64) {
    let (f32_peak, int8_peak) = crate::kernels::peak::peaks();
    let int8 = act_quant() == ActQuant::Int8;
    let (i8m, f32m) = madds_per_token(model, info.k, info.bits, int8);
    let compute_ms = r.steps as f64 * (i8m / int8_peak + f32m / f32_peak) * 1e3;
    s.num("f32_peak_gmac_s", f32_peak / 1e9);
    s.num("int8_peak_gmac_s", int8_peak / 1e9);
    s.val("int8_kernel", crate::kernels::int8mm::Kernel::best().name());
    s.num("int8_gmac_per_token", i8m / 1e9);
    s.num("f32_gmac_per_token", f32m / 1e9);
    s.num("warm_prefill_compute_bound_ms", compute_ms);
    s.num("warm_prefill_memory_bound_ms", mem_ms);
    let ttft = ms(r.ttft);
    s.fig(
        "warm_prefill_vs_bound_ttft",
        "ms",
        ttft,
        compute_ms.max(mem_ms),
    );
    s.num(
        "warm_prefill_fraction_of_bound",
        compute_ms.max(mem_ms) / ttft,
    );
}

/// Prefill of `prompt_tokens` random tokens, warm then cold; the speed-up over decode per
/// token beside the target of 20x; the chunked delta rule against the recurrent one.
pub(crate) fn prefill(
    model: &mut Model,
    info: &ModelInfo,
    limits: &Limits,
    opts: &BenchOptions,
    load: &dyn Fn(IoMode) -> Result<Model>,
    warm_tpt_ms: Option<f64>,
    say: &dyn Fn(&str),
) -> Result<Value> {
    let mut s = Section::default();
    let n = opts
        .prompt_tokens
        .min(model.cfg.max_position_embeddings - 1)
        .max(2);
    if n != opts.prompt_tokens {
        let note = format!(
            "--prompt-tokens {} does not fit the model's context of {} tokens: measured {n}",
            opts.prompt_tokens, model.cfg.max_position_embeddings
        );
        say(&format!("prefill: {note}"));
        s.val("prompt_tokens_note", note);
    }
    let prompt = random_prompt(model, n, 23);
    let dense = dense_bytes_per_token(model) as f64;
    let chunk = opts.prefill_chunk.max(1);
    let chunks = n.div_ceil(chunk);
    s.val("prompt_tokens", n);
    s.val("chunk_tokens", chunk);
    if info.packed {
        s.val("page_cache_warm", warm_page_cache(&info.warm_files)?);
    }
    say(&format!("prefill: warm, {n} tokens"));
    let (warm, _) = session_run(model, &prompt, 0, chunk)?;
    let mem_ms = report_prefill(
        &mut s,
        "warm_prefill",
        &warm,
        dense,
        chunks,
        limits,
        info.packed,
    );
    say("prefill: f32 and int8 multiply-add peaks (the compute bound)");
    prefill_compute_bound(&mut s, model, info, &warm, mem_ms);
    if let Some(d) = warm_tpt_ms {
        let per_tok = ms(warm.ttft) / n as f64;
        s.fig("warm_prefill_speedup", "x", d / per_tok, 20.0);
    }
    if opts.compare && model.cfg.linear_num_value_heads > 0 {
        let m = n.min(256);
        say(&format!(
            "prefill: chunked vs recurrent delta rule, {m} tokens"
        ));
        let p = &prompt[..m];
        let mixer = |model: &Model| -> Result<f64> {
            let (r, _) = session_run(model, p, 0, opts.prefill_chunk)?;
            Ok(ms(r.stats.total_layers().mixer))
        };
        model.opts.chunked_gdn = false;
        let rec = mixer(model)?;
        model.opts.chunked_gdn = true;
        let chk = mixer(model)?;
        s.num("gdn_recurrent_mixer_ms", rec);
        s.num("gdn_chunked_mixer_ms", chk);
        s.num("gdn_chunked_speedup_x", rec / chk);
    }
    if opts.cold && info.packed {
        say(&format!("prefill: cold (--io direct), {n} tokens"));
        match load(IoMode::Direct) {
            Ok(cold) => {
                let (r, _) = session_run(&cold, &prompt, 0, chunk)?;
                report_prefill(&mut s, "cold_prefill", &r, dense, chunks, limits, true);
            }
            Err(e) => s.val("cold_note", format!("--io direct unavailable: {e}")),
        }
    }
    Ok(s.into_value())
}
