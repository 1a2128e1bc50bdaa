//! `core_path`: the forward pass written once (`Model<Cuda>`: core's layer loop over the
//! [`Cuda`] backend's ops) against the tuned loop of model.rs (`CudaModel`), in one run on one
//! model: greedy decode ms/token and a prompt's ms, the two paths alternating (two samples
//! each), whether they pick the same tokens, and one traced token of each (launches, GPU µs).
//!
//! On the bench's 397B-shaped synthetic model with each MoE block replaced by its shared expert
//! as a dense MLP ([`dense_synth`]): routed experts reach `Model<Cuda>` through the residency
//! tier (issue 18, phase 2), which it does not have yet (it uploads a layer's experts per call),
//! so this measures everything else of the token path. On a real (MoE) checkpoint it is a
//! correctness check and the size of that gap.
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};

use flashmoe_core::cache::CachePolicy;
use flashmoe_core::model::{Ffn, ForwardStats, Logits, Model};

use crate::backend::Cuda;
use crate::bench::{all_miss_cache, synth_config, synth_model, POOL};
use crate::device::KernelTime;
use crate::model::{CudaModel, CudaOptions};
use crate::{CudaError, Result};

/// The synthetic model of `layers` layers with every MoE block's shared expert as its FFN.
pub fn dense_synth(layers: usize) -> Result<Model> {
    let mut m = synth_model(synth_config(layers, 1), 1);
    for l in &mut m.layers {
        if let Ffn::Moe(moe) = &mut l.ffn {
            let mlp = moe.shared.take().ok_or_else(|| {
                CudaError::Invalid("synthetic MoE block without a shared expert".into())
            })?;
            l.ffn = Ffn::Dense(mlp);
        }
    }
    Ok(m)
}

fn ce(e: flashmoe_core::Error) -> CudaError {
    CudaError::Core(e)
}

/// Greedy decode of `n` tokens after token 1: (ms per token, the tokens).
fn decode_old(cm: &mut CudaModel, n: usize) -> Result<(f64, Vec<u32>)> {
    let mut st = cm.new_state()?;
    let mut tok = cm.forward_argmax(&[1], &mut st)?;
    let mut toks = vec![tok];
    let t0 = Instant::now();
    for _ in 0..n {
        tok = cm.forward_argmax(&[tok], &mut st)?;
        toks.push(tok);
    }
    Ok((t0.elapsed().as_secs_f64() * 1e3 / n as f64, toks))
}

fn decode_new(m: &Model<Cuda>, n: usize) -> Result<(f64, Vec<u32>)> {
    let mut st = m.new_state().map_err(ce)?;
    let mut tok = m.forward_argmax(&[1], &mut st).map_err(ce)?;
    let mut toks = vec![tok];
    let t0 = Instant::now();
    for _ in 0..n {
        tok = m.forward_argmax(&[tok], &mut st).map_err(ce)?;
        toks.push(tok);
    }
    Ok((t0.elapsed().as_secs_f64() * 1e3 / n as f64, toks))
}

/// A prompt of `ids` from a fresh state, logits of the last token read back: ms.
fn prefill_old(cm: &mut CudaModel, ids: &[u32]) -> Result<f64> {
    let mut st = cm.new_state()?;
    let t0 = Instant::now();
    cm.forward(ids, &mut st, Logits::Last)?;
    Ok(t0.elapsed().as_secs_f64() * 1e3)
}

fn prefill_new(m: &Model<Cuda>, ids: &[u32]) -> Result<f64> {
    let mut st = m.new_state().map_err(ce)?;
    let mut stats = ForwardStats::default();
    let t0 = Instant::now();
    m.forward(ids, &mut st, Logits::Last, &mut stats, None)
        .map_err(ce)?;
    Ok(t0.elapsed().as_secs_f64() * 1e3)
}

/// A traced token's kernels (`Device::trace_finish`): launches and summed GPU µs.
fn summary(t: &[KernelTime], launches: usize) -> Value {
    let total: f64 = t.iter().map(|k| k.total_us).sum();
    let top: Vec<Value> = t
        .iter()
        .take(16)
        .map(|k| json!({"kernel": k.kernel, "launches": k.launches, "total_us": k.total_us}))
        .collect();
    json!({"launches": launches, "gpu_us": total, "top": top})
}

/// One greedy token of `m` traced (after one untraced): launches and summed GPU µs.
fn trace_new(m: &Model<Cuda>) -> Result<Value> {
    let mut st = m.new_state().map_err(ce)?;
    m.forward_argmax(&[1], &mut st).map_err(ce)?;
    let dev = m.be.device();
    let start = dev.trace_start()?;
    let r = m.forward_argmax(&[2], &mut st);
    let (t, pl) = dev.trace_finish(&start)?;
    r.map_err(ce)?;
    Ok(summary(&t, pl.len()))
}

/// One prompt of `ids` traced on each path (after the timed samples): launches, summed GPU µs
/// and the kernels that took most, so a prefill gap names its kernels.
fn trace_prefill(cm: &mut CudaModel, m: &Model<Cuda>, ids: &[u32]) -> Result<Value> {
    let mut st = cm.new_state()?;
    let start = cm.dev.trace_start()?;
    let r = cm.forward(ids, &mut st, Logits::Last);
    let (t, pl) = cm.dev.trace_finish(&start)?;
    r?;
    let old = summary(&t, pl.len());
    Ok(json!({"old": old, "core": trace_prefill_core(m, ids)?}))
}

/// One prompt of `ids` on `Model<Cuda>`, traced.
fn trace_prefill_core(m: &Model<Cuda>, ids: &[u32]) -> Result<Value> {
    let mut st = m.new_state().map_err(ce)?;
    let mut stats = ForwardStats::default();
    let dev = m.be.device();
    let start = dev.trace_start()?;
    let r = m.forward(ids, &mut st, Logits::Last, &mut stats, None);
    let (t, pl) = dev.trace_finish(&start)?;
    r.map_err(ce)?;
    Ok(summary(&t, pl.len()))
}

/// `Model<Cuda>`'s prompt with the tensor-core GEMM (crate::gemm) against its `mm` twin, in
/// this run: ms of each (GEMM warm) and how far the last token's logits moved.
fn gemm_ab(m: &Model<Cuda>, ids: &[u32]) -> Result<Value> {
    let run = |on: bool| -> Result<(f64, Vec<f32>)> {
        crate::gemm::set_enabled(on);
        let mut st = m.new_state().map_err(ce)?;
        let mut stats = ForwardStats::default();
        let t0 = Instant::now();
        let r = m.forward(ids, &mut st, Logits::Last, &mut stats, None);
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        crate::gemm::set_enabled(true);
        Ok((ms, r.map_err(ce)?))
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

/// The A/B on `model` (see the module doc): `tokens` decode steps, a prompt of `prompt`.
pub fn core_path(model: Arc<Model>, device: usize, tokens: usize, prompt: usize) -> Result<Value> {
    let mut cm = CudaModel::new(&model, &CudaOptions::default())?;
    let m = Cuda::load(model.clone(), device)?;
    let n = tokens.max(1);
    let vocab = model.cfg.vocab_size;
    let ids: Vec<u32> = (0..prompt.max(1))
        .map(|i| ((i * 7919 + 13) % vocab) as u32)
        .collect();
    // Warm-up: kernels loaded, pools filled.
    decode_old(&mut cm, 2)?;
    decode_new(&m, 2)?;
    let (mut old, mut new) = (Vec::new(), Vec::new());
    let (mut old_pf, mut new_pf) = (Vec::new(), Vec::new());
    let (mut toks_old, mut toks_new) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        let (ms, t) = decode_old(&mut cm, n)?;
        old.push(ms);
        toks_old = t;
        let (ms, t) = decode_new(&m, n)?;
        new.push(ms);
        toks_new = t;
        old_pf.push(prefill_old(&mut cm, &ids)?);
        new_pf.push(prefill_new(&m, &ids)?);
    }
    let same = toks_old
        .iter()
        .zip(&toks_new)
        .take_while(|(a, b)| a == b)
        .count();
    let best = |v: &[f64]| v.iter().copied().fold(f64::MAX, f64::min);
    let trace_old = {
        let mut st = cm.new_state()?;
        cm.forward_argmax(&[1], &mut st)?;
        let start = cm.dev.trace_start()?;
        let r = cm.forward_argmax(&[2], &mut st);
        let (t, pl) = cm.dev.trace_finish(&start)?;
        r?;
        summary(&t, pl.len())
    };
    let trace_new = trace_new(&m)?;
    let trace_pf = trace_prefill(&mut cm, &m, &ids)?;
    let gemm = gemm_ab(&m, &ids)?;
    Ok(json!({
        "prefill_gemm_vs_mm": gemm,
        "note": "old = CudaModel (model.rs, the tuned loop); core = Model<Cuda> (core's loop over the backend's ops); samples alternate, ms",
        "decode_tokens": n,
        "decode_ms_per_token": {"old": old, "core": new, "core_over_old": best(&new) / best(&old)},
        "prompt_tokens": ids.len(),
        "prefill_ms": {"old": old_pf, "core": new_pf, "core_over_old": best(&new_pf) / best(&old_pf)},
        "greedy_tokens_agree": format!("{same} of {}", toks_old.len()),
        "trace_one_token": {"old": trace_old, "core": trace_new},
        "trace_prefill": trace_pf,
    }))
}

/// `bench_cuda`'s synthetic decode modes on `Model<Cuda>` (the same 397B-shaped MoE model and
/// sizes, built again here): experts all in VRAM (preloaded: looked up on the device) with a
/// prompt of `prompt` tokens, and in pageable RAM behind a pinned host tier holding what the
/// decode touches (a first pass fills it, the timed second pass finds every VRAM miss there).
/// Compare with `synthetic.modes` of the same run (`CudaModel`).
pub fn core_synth_modes(layers: usize, k: usize, tokens: usize, prompt: usize) -> Result<Value> {
    let synth = Arc::new(synth_model(synth_config(layers, k), POOL));
    let n = tokens.max(1);
    let mut modes = serde_json::Map::new();
    {
        let m = Cuda::load_with(synth.clone(), &CudaOptions::default(), CachePolicy::Lru)?;
        let resident = Cuda::preload(&m)?;
        decode_new(&m, 2)?;
        let (ms, _) = decode_new(&m, n)?;
        let vocab = synth.cfg.vocab_size;
        let ids: Vec<u32> = (0..prompt.max(1))
            .map(|i| ((i * 7919 + 13) % vocab) as u32)
            .collect();
        let pf = prefill_new(&m, &ids)?;
        let warm = prefill_new(&m, &ids)?;
        let trace = trace_new(&m)?;
        let pf_trace = trace_prefill_core(&m, &ids)?;
        let gemm = gemm_ab(&m, &ids)?;
        modes.insert(
            "experts_in_vram".into(),
            json!({"ms_per_token": ms, "all_resident": resident, "trace_one_token": trace,
                   "prefill": {"prompt_tokens": ids.len(), "ms": pf, "ms_warm": warm,
                               "trace": pf_trace, "gemm_vs_mm": gemm}}),
        );
    }
    {
        let ebytes = synth.experts.expert_bytes();
        let per_layer = synth.cfg.num_experts.min((n + 2) * k);
        let opts = CudaOptions {
            expert_cache_bytes: Some(all_miss_cache(k, ebytes)),
            host_cache_bytes: layers * per_layer * (ebytes + 4096),
            ..Default::default()
        };
        let j = match Cuda::load_with(synth.clone(), &opts, CachePolicy::Lru) {
            Err(e) => json!({"skipped": e.to_string()}),
            Ok(m) => {
                decode_new(&m, n)?;
                let before = m.be.tier_stats();
                let (ms, _) = decode_new(&m, n)?;
                let after = m.be.tier_stats();
                let per_tok =
                    |f: fn(&flashmoe_core::residency::TierStats) -> u64| match (before, after) {
                        (Some(a), Some(b)) => (f(&b) - f(&a)) as f64 / (n + 1) as f64,
                        _ => f64::NAN,
                    };
                json!({"ms_per_token": ms,
                       "misses_per_token": per_tok(|s| s.misses),
                       "host_hits_per_token": per_tok(|s| s.host_hits)})
            }
        };
        modes.insert("experts_in_pinned_host_tier".into(), j);
    }
    Ok(json!({"layers": layers, "k": k, "decode_tokens": n, "modes": modes}))
}
