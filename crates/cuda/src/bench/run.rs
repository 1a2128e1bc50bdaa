//! Measurements of `Model<Cuda>` (core's forward pass over the [`Cuda`] backend's ops, routed
//! experts through core's residency tier): greedy decode with its tier counters, a prompt in
//! core's prefill step against one call per token, and traced launches (one token with its
//! chain floor, one prompt naming its kernels).
use std::time::Instant;

use serde_json::{json, Value};

use flashmoe_core::backend::{Backend, Cpu};
use flashmoe_core::model::{Ffn, ForwardStats, Logits, Mixer, Model, State};
use flashmoe_core::residency::TierStats;
use flashmoe_core::weights::Linear;

use super::limits::chain_step_us;
use crate::device::KernelTime;
use crate::{Cuda, Result};

/// Where greedy decoding picks the next token.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Pick {
    /// On the GPU (`forward_argmax`, the head's argmax epilogue): 8 bytes come back per token.
    Device,
    /// On the host, from the whole logits vector read back (what sampling needs).
    HostLogits,
}

/// The prompt of the prefill timings: `n` ids spread over the vocabulary.
pub(super) fn prompt_ids(vocab: usize, n: usize) -> Vec<u32> {
    (0..n.max(1))
        .map(|i| ((i * 7919 + 13) % vocab) as u32)
        .collect()
}

/// One greedy step of `tok`.
fn step(m: &Model<Cuda>, st: &mut State<Cuda>, tok: u32, pick: Pick) -> Result<u32> {
    Ok(match pick {
        Pick::Device => m.forward_argmax(&[tok], st)?,
        Pick::HostLogits => {
            let mut stats = ForwardStats::default();
            let logits = m.forward(&[tok], st, Logits::Last, &mut stats, None)?;
            Cpu.argmax(&logits)?
        }
    })
}

/// Tier counters of `m` (zero without a tier).
fn stats(m: &Model<Cuda>) -> TierStats {
    m.be.tier_stats().unwrap_or_default()
}

/// Decode `n` tokens after a 1-token prompt: (ms per token, the figures as JSON: wall and GPU
/// time per token, and the residency tier's counters per token).
pub(super) fn time_decode(m: &Model<Cuda>, n: usize, pick: Pick) -> Result<(f64, Value)> {
    let n = n.max(1);
    let dev = m.be.device();
    let (e0, e1) = (dev.event()?, dev.event()?);
    let mut st = m.new_state()?;
    let mut tok = step(m, &mut st, 1, pick)?;
    let s0 = stats(m);
    let mut gpu_ms = 0.0;
    let t0 = Instant::now();
    for _ in 0..n {
        // Events around each token on the compute stream, as the old loop's counters did.
        dev.record(&e0, &dev.compute)?;
        tok = step(m, &mut st, tok, pick)?;
        dev.record(&e1, &dev.compute)?;
        dev.event_sync(&e1)?;
        gpu_ms += dev.elapsed_ms(&e0, &e1)? as f64;
    }
    let ms = t0.elapsed().as_secs_f64() * 1e3 / n as f64;
    let s = stats(m);
    let per = |a: u64, b: u64| (a - b) as f64 / n as f64;
    Ok((
        ms,
        json!({
            "ms_per_token": ms,
            "tok_per_s": 1e3 / ms,
            "gpu_compute_ms_per_token": gpu_ms / n as f64,
            "vram_hits_per_token": per(s.hits, s0.hits),
            "resident_calls_per_token": per(s.resident_calls, s0.resident_calls),
            "ram_hits_per_token": per(s.host_hits, s0.host_hits),
            "misses_per_token": per(s.misses, s0.misses),
            "evictions_per_token": per(s.evictions, s0.evictions),
            "bytes_copied_per_token": per(s.bytes_filled, s0.bytes_filled),
            "fetch_ms_per_token": (s.fetch - s0.fetch).as_secs_f64() * 1e3 / n as f64,
        }),
    ))
}

/// A prompt of `n` tokens from a fresh state, each way core runs one: its prefill step (one
/// `forward` call: every layer over all rows, each routed expert over its tokens, the chunked
/// gated delta rule), the same with the recurrent rule, and one call per token. Logits of the
/// last token read back in each.
pub(super) fn time_prefill(m: &mut Model<Cuda>, n: usize) -> Result<Value> {
    let ids = prompt_ids(m.cfg.vocab_size, n);
    let run = |m: &Model<Cuda>, per_token: bool| -> Result<(f64, u64)> {
        let mut st = m.new_state()?;
        let mut fs = ForwardStats::default();
        let b0 = stats(m).bytes_filled;
        let t = Instant::now();
        if per_token {
            for &id in &ids {
                m.forward(&[id], &mut st, Logits::Last, &mut fs, None)?;
            }
        } else {
            m.forward(&ids, &mut st, Logits::Last, &mut fs, None)?;
        }
        let ms = t.elapsed().as_secs_f64() * 1e3;
        Ok((ms, stats(m).bytes_filled - b0))
    };
    let (one, one_bytes) = run(m, false)?;
    let (stepped, stepped_bytes) = run(m, true)?;
    let chunked = m.opts.chunked_gdn;
    m.opts.chunked_gdn = false;
    let recurrent = run(m, false);
    m.opts.chunked_gdn = chunked;
    let recurrent = recurrent.map(|r| json!(r.0)).unwrap_or_else(err);
    let gemm = gemm_ab(m, &ids).unwrap_or_else(err);
    Ok(json!({
        "gemm_vs_mm": gemm,
        "prompt_tokens": ids.len(),
        "auto_takes": "core's prefill step: one forward call over the whole prompt (T-row products, each routed expert over its tokens, chunked GatedDeltaNet); the old loop's token path is gone",
        "chunked_ms": one,
        "chunked_tok_per_s": ids.len() as f64 / one * 1e3,
        "recurrent_gdn_ms": recurrent,
        "one_call_per_token_ms": stepped,
        "chunked_speedup_x": stepped / one,
        "chunked_bytes_copied": one_bytes,
        "one_call_per_token_bytes_copied": stepped_bytes,
    }))
}

/// The prompt `ids` with T-row products on the tensor-core GEMM (crate::gemm) and on its `mm`
/// twin, in this run: ms of each and how far the last token's logits moved.
fn gemm_ab(m: &Model<Cuda>, ids: &[u32]) -> Result<Value> {
    let run = |on: bool| -> Result<(f64, Vec<f32>)> {
        crate::gemm::set_enabled(on);
        let mut st = m.new_state()?;
        let mut fs = ForwardStats::default();
        let t = Instant::now();
        let r = m.forward(ids, &mut st, Logits::Last, &mut fs, None);
        let ms = t.elapsed().as_secs_f64() * 1e3;
        crate::gemm::set_enabled(true);
        Ok((ms, r?))
    };
    let (mm_ms, mm) = run(false)?;
    let (gemm_ms, g) = run(true)?;
    let diff = mm
        .iter()
        .zip(&g)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let scale = mm.iter().map(|a| a.abs()).fold(0f32, f32::max);
    Ok(
        json!({"note": "one prompt each, same run: T-row products on the tensor-core GEMM (qgemm) vs the mm kernel",
              "gemm_ms": gemm_ms, "mm_ms": mm_ms, "logits_max_abs_diff": diff, "logits_max_abs": scale}),
    )
}

/// An error as a JSON value (a section that failed, beside the others).
pub(super) fn err(e: crate::CudaError) -> Value {
    json!({ "error": e.to_string() })
}

/// A traced span's kernels (`Device::trace_finish`): launches, summed GPU µs and the 16
/// kernels that took most.
fn summary(t: &[KernelTime], launches: usize) -> Value {
    let total: f64 = t.iter().map(|k| k.total_us).sum();
    let top: Vec<Value> = t
        .iter()
        .take(16)
        .map(|k| json!({"kernel": k.kernel, "launches": k.launches, "total_us": k.total_us}))
        .collect();
    json!({"launches": launches, "gpu_us": total, "top": top})
}

/// One greedy token with an event after every launch: where a token's time goes. With the
/// same run's D2D bandwidth and dependent-step cost, also the token's chain floor: each launch
/// costs at least one dependent step or its weight bytes at D2D, whichever is more.
pub(super) fn trace_token(m: &Model<Cuda>, d2d: f64) -> Result<Value> {
    let step_us = chain_step_us(m.be.device())?;
    let (t, per_launch) = traced_token(m)?;
    let floor_us: f64 = per_launch
        .iter()
        .map(|&b| step_us.max(b as f64 / (d2d * 1e3)))
        .sum();
    let total: f64 = t.iter().map(|k| k.total_us).sum();
    let rows: Vec<Value> = t
        .iter()
        .map(|k| {
            json!({
                "kernel": k.kernel,
                "grid": [k.grid.0, k.grid.1, k.grid.2],
                "launches": k.launches,
                "total_us": k.total_us,
                "per_launch_us": k.total_us / k.launches as f64,
                "weight_bytes": k.bytes,
            })
        })
        .collect();
    Ok(json!({
        "note": "one token of Model<Cuda>, an event after each launch (serialised: no dependent-launch overlap)",
        "total_us": total,
        "launches": per_launch.len(),
        "kernels": rows,
        "chain_floor": {
            "note": "sum over the token's launches of max(one dependent step, the launch's weight bytes / D2D): the least a token of these launches costs, each step measured in the same run as a chain of minimal dependent kernels",
            "step_us": step_us,
            "floor_ms": floor_us * 1e-3,
        },
    }))
}

/// One greedy token after a 1-token prompt, an event after every launch: its kernels and
/// each launch's weight bytes (`Device::trace_finish`).
fn traced_token(m: &Model<Cuda>) -> Result<(Vec<KernelTime>, Vec<usize>)> {
    let dev = m.be.device();
    let mut st = m.new_state()?;
    m.forward_argmax(&[1], &mut st)?;
    let start = dev.trace_start()?;
    let r = m.forward_argmax(&[2], &mut st);
    let traced = dev.trace_finish(&start)?;
    r?;
    Ok(traced)
}

/// One token after a 1-token prompt, traced: launches and summed GPU µs.
pub(super) fn trace_one(m: &Model<Cuda>) -> Result<Value> {
    let (t, pl) = traced_token(m)?;
    Ok(summary(&t, pl.len()))
}

/// A prompt of `ids` from a fresh state, traced: launches, summed GPU µs and the kernels that
/// took most, so a prefill gap names its kernels.
pub(super) fn trace_prompt(m: &Model<Cuda>, ids: &[u32]) -> Result<Value> {
    let dev = m.be.device();
    let mut st = m.new_state()?;
    let mut fs = ForwardStats::default();
    let start = dev.trace_start()?;
    let r = m.forward(ids, &mut st, Logits::Last, &mut fs, None);
    let (t, pl) = dev.trace_finish(&start)?;
    r?;
    Ok(json!({"prompt_tokens": ids.len(), "kernels": summary(&t, pl.len())}))
}

/// Weight bytes a decode token reads from the dense part of `m` (every layer's projections,
/// routers, shared experts, and the head; the embedding's one row left out).
pub(super) fn dense_bytes(m: &Model) -> usize {
    let sum = |ls: &[&Linear]| ls.iter().map(|l| l.nbytes()).sum::<usize>();
    let mut n = m.lm_head.nbytes();
    for l in &m.layers {
        n += match &l.mixer {
            Mixer::Attention(a) => sum(&[&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj]),
            Mixer::DeltaNet(g) => {
                let p = &g.proj;
                sum(&[&p.qkv, &p.z, &p.b, &p.a, &g.out_proj])
            }
        };
        n += match &l.ffn {
            Ffn::Dense(d) => sum(&[&d.gate, &d.up, &d.down]),
            Ffn::Moe(e) => {
                let shared = e
                    .shared
                    .as_ref()
                    .map_or(0, |d| sum(&[&d.gate, &d.up, &d.down]));
                e.router.nbytes() + shared + e.shared_gate.as_ref().map_or(0, |g| g.nbytes())
            }
        };
    }
    n
}

/// Greedy decode of `n` tokens after token 1: (ms per token, the tokens).
fn decode(m: &Model<Cuda>, n: usize) -> Result<(f64, Vec<u32>)> {
    let mut st = m.new_state()?;
    let mut tok = m.forward_argmax(&[1], &mut st)?;
    let mut toks = vec![tok];
    let t0 = Instant::now();
    for _ in 0..n {
        tok = m.forward_argmax(&[tok], &mut st)?;
        toks.push(tok);
    }
    Ok((t0.elapsed().as_secs_f64() * 1e3 / n.max(1) as f64, toks))
}

/// A prompt of `ids` from a fresh state, logits of the last token read back: ms.
fn prefill(m: &Model<Cuda>, ids: &[u32]) -> Result<f64> {
    let mut st = m.new_state()?;
    let mut fs = ForwardStats::default();
    let t0 = Instant::now();
    m.forward(ids, &mut st, Logits::Last, &mut fs, None)?;
    Ok(t0.elapsed().as_secs_f64() * 1e3)
}

/// `cuda_bench --core-path`: `Model<Cuda>` on `m` as the old A/B ran it (default tier, no
/// preload): two samples of greedy decode ms/token and of a prompt's ms, and one traced token
/// and one traced prompt. Keys as before the port with only the `core` side (the old loop is
/// gone), so they compare with main's `core_path.*.core` figures.
pub(super) fn core_path(m: &Model<Cuda>, tokens: usize, prompt: usize) -> Result<Value> {
    let n = tokens.max(1);
    let ids = prompt_ids(m.cfg.vocab_size, prompt);
    decode(m, 2)?;
    let (mut dec, mut pf, mut toks) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..2 {
        let (ms, t) = decode(m, n)?;
        dec.push(ms);
        toks = t;
        pf.push(prefill(m, &ids)?);
    }
    Ok(json!({
        "note": "core = Model<Cuda> (core's loop over the backend's ops); the old loop (CudaModel) was deleted, so there is no `old` side; ms",
        "decode_tokens": n,
        "decode_ms_per_token": {"core": dec},
        "prompt_tokens": ids.len(),
        "prefill_ms": {"core": pf},
        "greedy_tokens": toks,
        "trace_one_token": {"core": trace_one(m)?},
        "trace_prefill": {"core": trace_prompt(m, &ids)?["kernels"].clone()},
        "prefill_gemm_vs_mm": gemm_ab(m, &ids).unwrap_or_else(err),
    }))
}
