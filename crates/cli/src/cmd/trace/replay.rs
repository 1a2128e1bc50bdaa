//! `flashmoe bench decode --replay-trace FILE`: expert loads driven by a recorded routing
//! trace instead of the model's own routing (a synthetic model routes uniformly at random).
//! Every record's tokens go through the CPU backend's routed-expert step (`moe_experts`) with
//! the recorded experts and weights, serially, so the expert source, the RAM expert cache
//! (`--expert-cache-gb`, `--cache-policy`), the page cache and the disk see the recorded
//! pattern in the order `trace simulate` replays it: the cache's hits equal the simulation's
//! for the same policy and size. The dense part of the model (attention, shared expert, head)
//! is not run: this measures the expert side, like `bench moe`.
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use flashmoe_core::backend::{Backend, Cpu, ExpertCall, Routes};
use flashmoe_core::cache::CacheSpec;
use flashmoe_core::loader::{open_model, LoadOptions};
use flashmoe_core::trace::Phase;
use serde_json::{json, Value};

use super::r4;

pub fn replay(model_dir: &Path, trace: &Path, cache: Option<CacheSpec>) -> Result<Value> {
    let t = super::read(trace)?;
    let h = &t.header;
    let opts = LoadOptions {
        top_k: Some(h.k as usize),
        expert_cache: cache,
        ..Default::default()
    };
    let model = open_model(model_dir, &opts)
        .with_context(|| format!("loading model from {}", model_dir.display()))?;
    let got = flashmoe_core::trace::header_of(&model, &h.model_id, h.has_hidden())?;
    if (got.layers, got.experts, got.hidden, &got.moe_layers)
        != (h.layers, h.experts, h.hidden, &h.moe_layers)
    {
        bail!(
            "--replay-trace {}: recorded on a model of {} layers (MoE {:?}), {} experts, hidden \
             {}; {} has {} layers (MoE {:?}), {} experts, hidden {}: replay needs the same shape",
            trace.display(),
            h.layers,
            h.moe_layers,
            h.experts,
            h.hidden,
            model_dir.display(),
            got.layers,
            got.moe_layers,
            got.experts,
            got.hidden
        );
    }
    let hd = h.hidden as usize;
    let src = model.experts.as_ref();
    let io0 = src.counters().snapshot();
    let c0 = src.cache_hits().unwrap_or((0, 0));
    let (mut decode, mut prefill) = (0usize, 0usize);
    let first = h.moe_layers.first().copied();
    let t0 = Instant::now();
    for r in &t.records {
        let routes = Routes {
            k: h.k as usize,
            ids: r.ids.iter().map(|&e| e as u32).collect(),
            weights: r.weights.clone(),
        };
        let n = r.t as usize;
        let x = vec![0.01f32; n * hd];
        let mut out = vec![0f32; n * hd];
        let call = ExpertCall {
            source: src,
            layer: r.layer as usize,
            parallel: false,
        };
        Cpu.moe_experts(call, &x, &routes, Some(&routes), &mut out)
            .with_context(|| format!("replaying layer {} at position {}", r.layer, r.pos))?;
        if Some(r.layer) == first {
            match r.phase {
                Phase::Decode => decode += n,
                Phase::Prefill => prefill += n,
            }
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let io = src.counters().snapshot().since(&io0);
    let c1 = src.cache_hits().unwrap_or((0, 0));
    let tokens = (decode + prefill).max(1) as f64;
    let mut v = json!({
        "trace": trace.display().to_string(),
        "recorded_on": h.model_id,
        "expert_source": src.describe(),
        "tokens": decode + prefill, "decode_tokens": decode, "prefill_tokens": prefill,
        "records": t.records.len(),
        "expert_tok_s": r4(tokens / wall.max(1e-9)),
        "expert_ms_per_token": r4(wall * 1e3 / tokens),
        "experts_fetched": io.fetched,
        "bytes_per_token": r4(io.bytes_read as f64 / tokens),
        "cached_bytes_per_token": r4(io.bytes_cached.min(io.bytes_read) as f64 / tokens),
        "note": "routed experts only (dense layers not run), serial, page cache as found",
    });
    if let Some(spec) = cache {
        v["cache"] = json!({
            "policy": spec.policy.name(), "gb": spec.bytes as f64 / 1e9,
            "capacity_experts": spec.bytes / src.expert_bytes().max(1),
            "hits": c1.0 - c0.0, "misses": c1.1 - c0.1,
            "hit_rate": r4((c1.0 - c0.0) as f64 / ((c1.0 + c1.1) - (c0.0 + c0.1)).max(1) as f64),
        });
    }
    Ok(v)
}
