//! `bench_cuda`: the GPU's own limits measured in the same run (device-to-device copy,
//! host-to-device over pinned memory), quantised matvec bandwidth as a ratio of the copy
//! bandwidth, and decode tok/s of `Model<Cuda>` (core's forward pass on the [`Cuda`]
//! backend) on a synthetic full-shape model with its routed experts in VRAM, in the pinned
//! host tier and read from pageable host memory, each beside its bound; `bench_cuda_disk`
//! the same model's experts read from the SSD.
//!
//! Every mode is a separate section: one that fails is recorded as `{"error": ...}` in its
//! place and the others still run. Owns measurement only; the synthetic models (synth.rs) are
//! built in memory so the bench needs no files.
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Map, Value};

use flashmoe_core::cache::CachePolicy;
use flashmoe_core::model::Model;

use crate::device::Device;
use crate::{Cuda, CudaOptions, Result};

mod limits;
mod run;
mod synth;

use run::{err, time_decode, time_prefill, trace_prompt, trace_token, Pick};
pub use synth::{dense_synth, synth_config, synth_model, POOL};

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub device: usize,
    /// Layers of the synthetic model (397B shapes; every 4th is full attention).
    pub synth_layers: usize,
    /// Routed experts per token in the synthetic model.
    pub synth_k: usize,
    /// Decode steps timed per mode.
    pub tokens: usize,
    /// Also time decode of `model` itself (experts through the default tier).
    pub model_decode: bool,
    /// Time the matvec kernels (all paths, all shapes).
    pub kernels: bool,
    /// Prompt length of the prefill timing.
    pub prefill_tokens: usize,
    /// Also decode with experts in the pinned host tier and in pageable host RAM (not only in
    /// VRAM).
    pub host_modes: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            device: 0,
            synth_layers: 8,
            synth_k: 10,
            tokens: 32,
            model_decode: true,
            kernels: true,
            prefill_tokens: 128,
            host_modes: true,
        }
    }
}

/// A section's value, or its error in its place.
fn section(r: Result<Value>) -> Value {
    r.unwrap_or_else(err)
}

/// VRAM expert tier bytes that hold two layers' worth of `k` experts of `ebytes` (with slot
/// padding): every layer's picks evict the layer before's, so (nearly) every routed expert of
/// a token misses and is copied in. The host and disk modes' tier.
pub(crate) fn all_miss_cache(k: usize, ebytes: usize) -> usize {
    2 * k * (ebytes + 4096)
}

/// The MoE layers of `m`.
fn n_moe(m: &Model) -> usize {
    (0..m.cfg.num_layers)
        .filter(|&l| m.cfg.is_moe_layer(l))
        .count()
}

/// Runs the whole CUDA benchmark; `model` (when `opts.model_decode`) is also decoded.
pub fn bench_cuda(model: Arc<Model>, opts: &BenchOptions) -> Result<Value> {
    let dev = Device::new(opts.device)?;
    dev.bind()?;
    let name = dev.name.clone();
    let d2d = limits::d2d_gbps(&dev);
    let h2d = limits::h2d_gbps(&dev);
    // The ratios need the copy bandwidth; without it they are NaN (null in the JSON).
    let d2d_v = *d2d.as_ref().unwrap_or(&f64::NAN);
    let h2d_v = *h2d.as_ref().unwrap_or(&f64::NAN);
    let kernels = if opts.kernels {
        limits::kernels(&dev, d2d_v)
    } else {
        Vec::new()
    };
    drop(dev);
    let mut out = json!({
        "device": name,
        "d2d_gbps": section(d2d.map(|v| json!(v))),
        "h2d_pinned_gbps": section(h2d.map(|v| json!(v))),
        "kernels": kernels,
        "path": "Model<Cuda>: core's forward pass over the Cuda backend's ops, routed experts through core's residency tier (VRAM slots, pinned host slots)",
    });

    let t = Instant::now();
    let cfg = synth_config(opts.synth_layers, opts.synth_k);
    let synth = Arc::new(synth_model(cfg, POOL));
    let build_s = t.elapsed().as_secs_f64();
    let mut modes = Map::new();
    let vram = vram_mode(&synth, opts, d2d_v);
    let vram_ms = vram.as_ref().map_or(f64::NAN, |(ms, _)| *ms);
    modes.insert("experts_in_vram".into(), section(vram.map(|(_, j)| j)));
    if opts.host_modes {
        let tier = section(host_tier_mode(&synth, opts, h2d_v, vram_ms));
        // The old loop copied misses straight out of registered (page-locked) source memory.
        // Through the tier, an expert already in page-locked memory is a middle-tier hit:
        // one DMA, no read, which is what the host tier mode measures.
        let mut pinned = tier.clone();
        if let Value::Object(p) = &mut pinned {
            p.insert("now".into(), json!("the same run as experts_in_pinned_host_tier: through core's residency tier an expert in page-locked host memory is a middle-tier slot, copied with one DMA (the old loop's direct copy from registered source memory has no tier equivalent)"));
        }
        modes.insert("experts_in_pinned_host_tier".into(), tier);
        modes.insert("experts_in_pinned_ram".into(), pinned);
        let pageable = section(pageable_mode(&synth, opts, h2d_v, vram_ms));
        modes.insert("experts_in_pageable_ram".into(), pageable);
    }
    out["synthetic"] = json!({
        "layers": opts.synth_layers, "k": opts.synth_k, "build_s": build_s,
        "expert_bytes": synth.experts.expert_bytes(),
        "modes": modes,
    });
    if opts.model_decode {
        let r = (|| {
            let m = Cuda::load_with(model, &copts(opts, None, 0), CachePolicy::Lru)?;
            Ok(time_decode(&m, opts.tokens.min(16), Pick::HostLogits)?.1)
        })();
        out["model"] = section(r);
    }
    Ok(out)
}

/// The options of a bench model on `opts.device`: VRAM tier `vram` (None: free VRAM less the
/// reserve) over `host` bytes of pinned host tier.
fn copts(opts: &BenchOptions, vram: Option<usize>, host: usize) -> CudaOptions {
    CudaOptions {
        device: opts.device,
        expert_cache_bytes: vram,
        host_cache_bytes: host,
        ..Default::default()
    }
}

/// Every expert in VRAM (preloaded: looked up on the device, no routing read back): decode
/// with the argmax on the GPU, with the logits read back, and on the exact float kernels; a
/// token's kernel trace and chain floor; the prompt. Returns (ms/token, the section).
fn vram_mode(synth: &Arc<Model>, opts: &BenchOptions, d2d: f64) -> Result<(f64, Value)> {
    let mut m = Cuda::load_with(synth.clone(), &copts(opts, None, 0), CachePolicy::Lru)?;
    let tp = Instant::now();
    let resident = Cuda::preload(&m)?;
    let preload_s = tp.elapsed().as_secs_f64();
    let (ms, mut j) = time_decode(&m, opts.tokens, Pick::Device)?;
    // Same run, same model: the logits read back to the host each token (what sampling
    // costs); and every affine matrix on the exact float kernel.
    let logits = time_decode(&m, opts.tokens, Pick::HostLogits).map(|r| json!(r.0));
    crate::ops::set_affine_path(crate::ops::AffinePath::Float);
    let float = time_decode(&m, opts.tokens, Pick::Device).map(|r| json!(r.0));
    crate::ops::set_affine_path(crate::ops::AffinePath::Auto);
    j["ms_per_token_logits_to_host"] = section(logits);
    j["ms_per_token_float_kernels"] = section(float);
    j["next_token"] = json!("argmax on the GPU (greedy)");
    j["all_resident"] = json!(resident);
    match trace_token(&m, d2d) {
        Ok(trace) => {
            let floor_ms = trace["chain_floor"]["floor_ms"]
                .as_f64()
                .unwrap_or(f64::NAN);
            j["kernel_trace"] = trace;
            j["chain_floor_ms"] = json!(floor_ms);
            j["time_over_chain_floor_ratio"] = json!(ms / floor_ms);
        }
        Err(e) => j["kernel_trace"] = err(e),
    }
    j["graph"] = json!("dropped with the old loop: Model<Cuda>'s token reads the argmax back to the host inside forward_argmax and takes its buffers from the backend's pool on every call, so no launch-only token exists to capture into a CUDA graph honestly");
    j["prefill"] = section(time_prefill(&mut m, opts.prefill_tokens));
    let ids = run::prompt_ids(m.cfg.vocab_size, opts.prefill_tokens);
    j["trace_prefill"] = section(trace_prompt(&m, &ids));
    let ebytes = synth.experts.expert_bytes();
    let touched = run::dense_bytes(synth) + n_moe(synth) * synth.top_k * ebytes;
    let bound_ms = touched as f64 / (d2d * 1e9) * 1e3;
    j["bytes_touched_per_token"] = json!(touched);
    j["bound_ms"] = json!(bound_ms);
    j["time_over_bound_ratio"] = json!(ms / bound_ms);
    if let Some(i) = m.be.tier_info() {
        j["cache_slots"] = json!(i.slots);
        j["cache_bytes"] = json!(i.slots * i.slot_bytes);
    }
    j["preload_s"] = json!(preload_s);
    j["now"] = json!("Cuda::load_with (VRAM tier of free VRAM less the reserve) and Cuda::preload: every expert in a VRAM slot, each MoE layer fused (fused_moe: router_experts and indirect products, no routing read back)");
    Ok((ms, j))
}

/// Missed bytes per token at the H2D bandwidth plus the VRAM-resident token: the host modes'
/// bound, into `j`.
fn host_bound(j: &mut Value, ms: f64, h2d: f64, vram_ms: f64) {
    let missed = j["bytes_copied_per_token"].as_f64().unwrap_or(0.0);
    let bound_ms = missed / (h2d * 1e9) * 1e3 + vram_ms;
    j["bound_ms"] = json!(bound_ms);
    j["time_over_bound_ratio"] = json!(ms / bound_ms);
}

/// Experts in pageable host RAM (the synthetic source's buffers) behind a pinned host tier
/// that holds every expert the decode touches, VRAM tier of two layers' worth (every expert
/// misses VRAM): a first pass reads them into the host tier, the timed second pass (the same
/// tokens) finds every VRAM miss there (one DMA each).
fn host_tier_mode(
    synth: &Arc<Model>,
    opts: &BenchOptions,
    h2d: f64,
    vram_ms: f64,
) -> Result<Value> {
    let k = synth.top_k;
    let ebytes = synth.experts.expert_bytes();
    let per_layer = synth.cfg.num_experts.min((opts.tokens + 2) * k);
    let tier_bytes = n_moe(synth) * per_layer * (ebytes + 4096);
    let o = copts(opts, Some(all_miss_cache(k, ebytes)), tier_bytes);
    let m = match Cuda::load_with(synth.clone(), &o, CachePolicy::Lru) {
        Ok(m) => m,
        // Page-locked memory is the host's to refuse: report it, keep the other figures.
        Err(e) => {
            return Ok(
                json!({ "skipped": format!("{tier_bytes} bytes of pinned host memory: {e}") }),
            )
        }
    };
    let tp = Instant::now();
    time_decode(&m, opts.tokens, Pick::Device)?;
    let warm_s = tp.elapsed().as_secs_f64();
    let (ms, mut j) = time_decode(&m, opts.tokens, Pick::Device)?;
    host_bound(&mut j, ms, h2d, vram_ms);
    if let Some(i) = m.be.tier_info() {
        j["host_tier_slots"] = json!(i.host_slots);
        j["host_tier_bytes"] = json!(i.host_slots.map(|n| n * i.slot_bytes));
        j["cache_slots"] = json!(i.slots);
    }
    j["first_pass_s"] = json!(warm_s);
    j["now"] = json!("VRAM tier of two layers' worth over a pinned host tier holding every expert the decode touches; timed on the second pass (every VRAM miss a host-tier hit, one DMA)");
    Ok(j)
}

/// Experts in pageable host RAM with the smallest pinned host tier (the staging of one
/// batch's misses) and a VRAM tier of two layers' worth: every routed expert is read from the
/// source into a pinned slot (a memcpy) and copied to VRAM from there, as the old loop's
/// pageable mode; and a prompt through the same tiers.
fn pageable_mode(synth: &Arc<Model>, opts: &BenchOptions, h2d: f64, vram_ms: f64) -> Result<Value> {
    let ebytes = synth.experts.expert_bytes();
    let o = copts(opts, Some(all_miss_cache(synth.top_k, ebytes)), 0);
    let mut m = Cuda::load_with(synth.clone(), &o, CachePolicy::Lru)?;
    let (ms, mut j) = time_decode(&m, opts.tokens, Pick::Device)?;
    host_bound(&mut j, ms, h2d, vram_ms);
    j["prefill"] = section(time_prefill(&mut m, opts.prefill_tokens));
    j["now"] = json!("VRAM tier of two layers' worth, the smallest pinned host tier: every miss read from the source's pageable buffers into a pinned slot, then one DMA");
    Ok(j)
}

/// Where the experts of [`bench_cuda_disk`]'s model come from, and the disk's limit measured
/// in the same run.
pub struct DiskSource {
    /// The same model opened with `--io direct` (page cache bypassed).
    pub direct: Arc<Model>,
    /// GB/s of O_DIRECT reads of one expert's size, K in flight, on the model's expert file.
    pub disk_gbps: f64,
}

/// Decode of a packed model on disk with its experts read from the SSD for every token: the
/// VRAM tier holds two layers' worth, so (nearly) every routed expert misses, and the model is
/// opened with `--io direct`. Beside it the bound: missed bytes at the disk's bandwidth plus
/// the same model's decode time with every expert resident in VRAM (measured here when its
/// experts fit; the disk term alone otherwise).
pub fn bench_cuda_disk(model: Arc<Model>, disk: &DiskSource, tokens: usize) -> Result<Value> {
    let k = model.top_k;
    let ebytes = model.experts.expert_bytes();
    if n_moe(&model) == 0 || ebytes == 0 {
        return Ok(json!({ "skipped": "the model has no routed experts" }));
    }
    let resident = (|| -> Result<Option<f64>> {
        let m = Cuda::load_with(model, &CudaOptions::default(), CachePolicy::Lru)?;
        // Preload fills only when every expert fits: a model larger than VRAM would
        // otherwise read its whole expert set from disk for nothing.
        let fits = m.be.tier_info().is_some_and(|i| i.all_fit);
        if fits && Cuda::preload(&m)? {
            return Ok(Some(time_decode(&m, tokens, Pick::Device)?.0));
        }
        Ok(None)
    })();
    let (vram_ms, vram_err) = match resident {
        Ok(v) => (v, None),
        Err(e) => (None, Some(e.to_string())),
    };
    let o = CudaOptions {
        expert_cache_bytes: Some(all_miss_cache(k, ebytes)),
        ..Default::default()
    };
    let m = Cuda::load_with(disk.direct.clone(), &o, CachePolicy::Lru)?;
    let (ms, mut j) = time_decode(&m, tokens, Pick::Device)?;
    let misses = j["misses_per_token"].as_f64().unwrap_or(0.0);
    let read = flashmoe_core::packed::align_up(ebytes as u64, flashmoe_core::packed::EXPERT_ALIGN);
    let disk_ms = misses * read as f64 / (disk.disk_gbps * 1e9) * 1e3;
    let bound_ms = disk_ms + vram_ms.unwrap_or(0.0);
    j["disk_read_bw_gbs"] = json!(disk.disk_gbps);
    j["expert_read_bytes"] = json!(read);
    j["disk_ms_per_token_at_probe"] = json!(disk_ms);
    j["vram_resident_ms_per_token"] = json!(vram_ms);
    if let Some(e) = vram_err {
        j["vram_resident_error"] = json!(e);
    }
    j["bound_ms"] = json!(bound_ms);
    j["time_over_bound_ratio"] = json!(ms / bound_ms);
    j["experts_source"] = json!(disk.direct.experts.describe());
    j["path"] =
        json!("Model<Cuda>, VRAM tier of two layers' worth over the smallest pinned host tier");
    Ok(j)
}

/// `cuda_bench --core-path`: [`run::core_path`] on the synthetic model with every MoE block's
/// shared expert as its FFN (`synthetic_dense`) and on `model`, each on the default tier.
pub fn core_path(model: Arc<Model>, opts: &BenchOptions) -> Value {
    let (n, p) = (opts.tokens, opts.prefill_tokens);
    let one = |m: Result<Arc<Model>>| -> Result<Value> {
        let on = Cuda::load_with(m?, &copts(opts, None, 0), CachePolicy::Lru)?;
        run::core_path(&on, n, p)
    };
    json!({
        "synthetic_dense": section(one(dense_synth(opts.synth_layers).map(Arc::new))),
        "model": section(one(Ok(model))),
        "synthetic_moe": "Model<Cuda> since the port: see synthetic.modes",
    })
}
