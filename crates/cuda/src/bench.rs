//! `bench_cuda`: the GPU's own limits measured in the same run (device-to-device copy,
//! host-to-device over pinned memory), quantised matvec bandwidth as a ratio of the copy
//! bandwidth, and decode tok/s on a synthetic full-shape model with experts all in VRAM and
//! read from host memory, each beside its bound.
//!
//! Owns measurement only; the synthetic model is built here in memory (random 4-bit weights)
//! so the bench needs no files.
use std::time::Instant;

use half::bf16;
use serde_json::{json, Value};

use flashmoe_core::backend::Cpu;
use flashmoe_core::buf::Buf;
use flashmoe_core::config::ModelConfig;
use flashmoe_core::experts::{ExpertCounters, ExpertSource, ExpertWeights};
use flashmoe_core::model::attention::Attention;
use flashmoe_core::model::gdn::{GatedDeltaNet, GdnProj};
use flashmoe_core::model::moe::{Mlp, Moe};
use flashmoe_core::model::{Ffn, Layer, Logits, Mixer, Model};
use flashmoe_core::store::DType;
use flashmoe_core::weights::Linear;

use crate::device::Device;
use crate::model::{CudaModel, CudaOptions, PromptPath};
use crate::ops::{self, linear_bytes, DevMat, Fmt};
use crate::Result;

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub device: usize,
    /// Layers of the synthetic model (397B shapes; every 4th is full attention).
    pub synth_layers: usize,
    /// Routed experts per token in the synthetic model.
    pub synth_k: usize,
    /// Decode steps timed per mode.
    pub tokens: usize,
    /// Also time decode of `model` itself (experts through the default cache).
    pub model_decode: bool,
    /// Time the matvec kernels (all paths, all shapes).
    pub kernels: bool,
    /// Prompt length of the prefill timing (chunked against token by token).
    pub prefill_tokens: usize,
    /// Also decode with experts in pinned and pageable host RAM (not only in VRAM).
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

/// xorshift64*: fast, reproducible filler for synthetic weights.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
}

fn rand_u32(n: usize, seed: u64) -> Vec<u32> {
    use rayon::prelude::*;
    let mut v = vec![0u32; n];
    v.par_chunks_mut(1 << 16).enumerate().for_each(|(i, c)| {
        let mut r =
            Rng(seed.wrapping_mul(0x9E3779B97F4A7C15)
                ^ (i as u64 + 1).wrapping_mul(0xD1B54A32D192ED03));
        for x in c.iter_mut() {
            *x = r.next() as u32;
        }
    });
    v
}

/// A random 4-bit (group 64, bf16 scales) matrix with weights in about ±1/sqrt(cols).
fn synth_affine(rows: usize, cols: usize, bits: u32, seed: u64) -> Linear {
    let w = rand_u32(rows * cols * bits as usize / 32, seed);
    let ng = rows * cols / 64;
    let a = 1.0 / (cols as f32).sqrt();
    let levels = ((1u32 << bits) - 1) as f32;
    let sc = vec![bf16::from_f32(2.0 * a / levels); ng];
    let bi = vec![bf16::from_f32(-a); ng];
    Linear::Affine {
        bits,
        group: 64,
        rows,
        cols,
        w: Buf::from_vec(&w),
        scales: Buf::from_vec(&sc),
        biases: Buf::from_vec(&bi),
        sdtype: DType::BF16,
    }
}

/// Experts of a synthetic model: a pool of distinct host buffers, expert (l, e) = pool[(l*E+e) % P].
struct SynthExperts {
    pool: Vec<ExpertWeights>,
    ne: usize,
    counters: ExpertCounters,
}

impl ExpertSource for SynthExperts {
    fn fetch(&self, layer: usize, experts: &[usize]) -> flashmoe_core::Result<Vec<ExpertWeights>> {
        Ok(experts
            .iter()
            .map(|&e| self.pool[(layer * self.ne + e) % self.pool.len()].clone())
            .collect())
    }
    fn counters(&self) -> &ExpertCounters {
        &self.counters
    }
    fn expert_bytes(&self) -> usize {
        self.pool[0].nbytes()
    }
    fn describe(&self) -> String {
        format!("synthetic ({} distinct host experts)", self.pool.len())
    }
}

/// Qwen3.5-397B-A17B shapes (arch-spec §1.1) with `layers` layers.
pub fn synth_config(layers: usize, k: usize) -> ModelConfig {
    let types: Vec<&str> = (0..layers)
        .map(|i| {
            if (i + 1) % 4 == 0 {
                "full_attention"
            } else {
                "linear_attention"
            }
        })
        .collect();
    let j = json!({
        "model_type": "qwen3_5_moe",
        "text_config": {
            "model_type": "qwen3_5_moe_text",
            "hidden_size": 4096, "num_hidden_layers": layers, "layer_types": types,
            "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 256,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
            "linear_num_key_heads": 16, "linear_num_value_heads": 64, "linear_key_head_dim": 128,
            "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4,
            "num_experts": 512, "num_experts_per_tok": k, "moe_intermediate_size": 1024,
            "shared_expert_intermediate_size": 1024, "rms_norm_eps": 1e-6, "vocab_size": 248320,
            "tie_word_embeddings": false, "max_position_embeddings": 262144, "eos_token_id": 248044
        }
    });
    ModelConfig::from_json(&j, std::path::Path::new("<synthetic>")).expect("synthetic config")
}

/// A synthetic model with random 4-bit weights (8-bit router) of `cfg`'s shapes.
pub fn synth_model(cfg: ModelConfig, pool: usize) -> Model {
    let h = cfg.hidden_size;
    let mut seed = 1u64;
    let mut m = |r: usize, c: usize, bits: u32| {
        seed += 1;
        synth_affine(r, c, bits, seed)
    };
    let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    let (nk, nv, dk, dv) = (
        cfg.linear_num_key_heads,
        cfg.linear_num_value_heads,
        cfg.linear_key_head_dim,
        cfg.linear_value_head_dim,
    );
    let (ne, ei, si) = (
        cfg.num_experts,
        cfg.moe_intermediate_size,
        cfg.shared_expert_intermediate_size,
    );
    let cd = cfg.gdn_conv_dim();
    let mut layers = Vec::new();
    for l in 0..cfg.num_layers {
        let mixer = if (l + 1) % 4 == 0 {
            Mixer::Attention(Attention {
                q_proj: m(nh * hd * 2, h, 4),
                k_proj: m(nkv * hd, h, 4),
                v_proj: m(nkv * hd, h, 4),
                o_proj: m(h, nh * hd, 4),
                q_norm: vec![1.0; hd],
                k_norm: vec![1.0; hd],
            })
        } else {
            Mixer::DeltaNet(GatedDeltaNet {
                proj: GdnProj {
                    qkv: m(cd, h, 4),
                    z: m(nv * dv, h, 4),
                    b: m(nv, h, 4),
                    a: m(nv, h, 4),
                },
                conv_w: (0..cd * cfg.linear_conv_kernel_dim)
                    .map(|i| ((i % 7) as f32 - 3.0) * 0.1)
                    .collect(),
                dt_bias: vec![0.0; nv],
                neg_a: vec![-1.0; nv],
                norm_w: vec![1.0; dv],
                out_proj: m(h, nv * dv, 4),
            })
        };
        let _ = (nk, dk);
        layers.push(Layer {
            input_norm: vec![1.0; h],
            post_norm: vec![1.0; h],
            mixer,
            ffn: Ffn::Moe(Moe {
                router: m(ne, h, 8),
                shared: Some(Mlp {
                    gate: m(si, h, 4),
                    up: m(si, h, 4),
                    down: m(h, si, 4),
                }),
                shared_gate: Some(m(1, h, 8)),
                layer: l,
            }),
        });
    }
    let experts: Vec<ExpertWeights> = (0..pool)
        .map(|_| ExpertWeights {
            gate: m(ei, h, 4),
            up: m(ei, h, 4),
            down: m(h, ei, 4),
        })
        .collect();
    let top_k = cfg.num_experts_per_tok;
    Model {
        be: Cpu,
        embed: m(cfg.vocab_size, h, 4),
        lm_head: m(cfg.vocab_size, h, 4),
        final_norm: vec![1.0; h],
        layers,
        experts: Box::new(SynthExperts {
            pool: experts,
            ne,
            counters: ExpertCounters::default(),
        }),
        top_k,
        opts: Default::default(),
        cfg,
    }
}

/// Distinct host experts of the synthetic model (450 MB at 397B shapes: beyond the CPU caches).
pub(crate) const POOL: usize = 64;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Device-to-device copy bandwidth, bytes read + written per second (GB/s).
fn d2d_gbps(dev: &Device) -> Result<f64> {
    let n = 1usize << 30;
    let a = dev.alloc_zeros(n)?;
    let b = dev.alloc_zeros(n)?;
    let (e0, e1) = (dev.event()?, dev.event()?);
    let mut v = Vec::new();
    for i in 0..7 {
        dev.record(&e0, &dev.compute)?;
        for _ in 0..4 {
            dev.dtod_async(b.ptr(), a.ptr(), n, &dev.compute)?;
        }
        dev.record(&e1, &dev.compute)?;
        dev.sync()?;
        if i > 0 {
            let ms = dev.elapsed_ms(&e0, &e1)? as f64;
            v.push(2.0 * 4.0 * n as f64 / (ms * 1e-3) / 1e9);
        }
    }
    Ok(median(v))
}

/// Host-to-device over pinned memory (GB/s).
fn h2d_gbps(dev: &Device) -> Result<f64> {
    let n = 256usize << 20;
    let mut p = dev.pinned(n)?;
    p.as_mut_slice().fill(1);
    let d = dev.alloc(n)?;
    let (e0, e1) = (dev.event()?, dev.event()?);
    let mut v = Vec::new();
    for i in 0..6 {
        dev.record(&e0, &dev.copy)?;
        for _ in 0..4 {
            dev.htod_async(d.ptr(), &p, 0, n, &dev.copy)?;
        }
        dev.record(&e1, &dev.copy)?;
        dev.event_sync(&e1)?;
        if i > 0 {
            let ms = dev.elapsed_ms(&e0, &e1)? as f64;
            v.push(4.0 * n as f64 / (ms * 1e-3) / 1e9);
        }
    }
    Ok(median(v))
}

/// Matvec GB/s over `rows x cols` matrices in `l`'s format, rotating through enough copies to
/// defeat the L2 cache.
fn matvec_gbps(dev: &Device, l: &Linear) -> Result<(f64, usize)> {
    let fmt = Fmt::of(l)?;
    let (rows, cols) = (l.rows(), l.cols());
    let one = crate::ops::upload_rows(dev, &[(l, 0, rows)])?;
    let bytes = one.m.nbytes();
    let copies = (512usize << 20).div_ceil(bytes).clamp(1, 64);
    let mut mats = vec![one];
    for _ in 1..copies {
        mats.push(crate::ops::upload_rows(dev, &[(l, 0, rows)])?);
    }
    let x: Vec<f32> = (0..cols).map(|i| ((i % 13) as f32 - 6.0) * 0.1).collect();
    let xd = dev.upload_f32(&x)?;
    let yd = dev.alloc(rows * 4)?;
    let (e0, e1) = (dev.event()?, dev.event()?);
    let reps = copies.max(8) * 4;
    let mut v = Vec::new();
    for i in 0..6 {
        dev.record(&e0, &dev.compute)?;
        for r in 0..reps {
            let m: &DevMat = &mats[r % copies].m;
            ops::matvec(dev, &dev.compute, m, xd.ptr(), yd.ptr())?;
        }
        dev.record(&e1, &dev.compute)?;
        dev.sync()?;
        if i > 0 {
            let ms = dev.elapsed_ms(&e0, &e1)? as f64;
            v.push(bytes as f64 * reps as f64 / (ms * 1e-3) / 1e9);
        }
    }
    let _ = fmt;
    Ok((median(v), bytes))
}

/// Prompt of `n` tokens through `forward`, each path from a fresh state: chunked (each expert
/// read once per chunk), the token path (one call, logits of the last token only), and one
/// `forward` call per token (logits read back each time).
fn time_prefill(cm: &mut CudaModel, n: usize) -> Result<Value> {
    let vocab = cm.cfg().vocab_size;
    let ids: Vec<u32> = (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect();
    let auto = if cm.all_resident() {
        "token path"
    } else {
        "chunked"
    };
    let run = |cm: &mut CudaModel, path: PromptPath| -> Result<(f64, u64)> {
        cm.prompt_path = path;
        let mut st = cm.new_state()?;
        let c0 = cm.counters.bytes_copied;
        let t = Instant::now();
        let r = match path {
            PromptPath::Auto => ids
                .iter()
                .try_for_each(|&id| cm.forward(&[id], &mut st, Logits::Last).map(|_| ())),
            _ => cm.forward(&ids, &mut st, Logits::Last).map(|_| ()),
        };
        cm.prompt_path = PromptPath::Auto;
        r?;
        Ok((
            t.elapsed().as_secs_f64() * 1e3,
            cm.counters.bytes_copied - c0,
        ))
    };
    let (chunked, chunked_bytes) = run(cm, PromptPath::Chunked)?;
    let (token, token_bytes) = run(cm, PromptPath::TokenByToken)?;
    // Auto with one token per call is the token path, one call per token.
    let (stepped, _) = run(cm, PromptPath::Auto)?;
    Ok(json!({
        "prompt_tokens": n,
        "auto_takes": auto,
        "chunked_ms": chunked,
        "chunked_tok_per_s": n as f64 / chunked * 1e3,
        "token_path_ms": token,
        "one_call_per_token_ms": stepped,
        "chunked_speedup_x": token / chunked,
        "chunked_bytes_copied": chunked_bytes,
        "token_path_bytes_copied": token_bytes,
    }))
}

/// Where greedy decoding picks the next token.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pick {
    /// On the GPU (`forward_argmax`): 8 bytes come back per token.
    Device,
    /// On the host, from the whole logits vector read back (what sampling needs).
    HostLogits,
}

/// Decode `n` tokens after a 1-token prompt; returns (ms per token, counters delta as JSON).
fn time_decode(cm: &mut CudaModel, n: usize, pick: Pick) -> Result<(f64, Value)> {
    let mut st = cm.new_state()?;
    let step = |cm: &mut CudaModel, st: &mut crate::model::CudaState, tok: u32| -> Result<u32> {
        Ok(match pick {
            Pick::Device => cm.forward_argmax(&[tok], st)?,
            Pick::HostLogits => argmax(&cm.forward(&[tok], st, Logits::Last)?),
        })
    };
    let mut tok = step(cm, &mut st, 1)?;
    let c0 = cm.counters;
    let t0 = Instant::now();
    for _ in 0..n {
        tok = step(cm, &mut st, tok)?;
    }
    let ms = t0.elapsed().as_secs_f64() * 1e3 / n as f64;
    let c = cm.counters;
    let nt = (c.tokens - c0.tokens).max(1) as f64;
    Ok((
        ms,
        json!({
            "ms_per_token": ms,
            "tok_per_s": 1e3 / ms,
            "gpu_compute_ms_per_token": (c.compute_ms - c0.compute_ms) / nt,
            "vram_hits_per_token": (c.vram_hits - c0.vram_hits) as f64 / nt,
            "ram_hits_per_token": (c.ram_hits - c0.ram_hits) as f64 / nt,
            "misses_per_token": (c.misses - c0.misses) as f64 / nt,
            "bytes_copied_per_token": (c.bytes_copied - c0.bytes_copied) as f64 / nt,
            "copy_ms_per_token": (c.copy_ms - c0.copy_ms) / nt,
            "fetch_ms_per_token": (c.fetch - c0.fetch).as_secs_f64() * 1e3 / nt,
            "router_wait_ms_per_token": (c.router_wait - c0.router_wait).as_secs_f64() * 1e3 / nt,
        }),
    ))
}

/// Microseconds per launch of a chain of dependent minimal steps (`ops::chain_step`, each
/// reading the vector the one before wrote), launched as the token's kernels are: the least a
/// dependent launch costs on this device, whatever it computes. Best of 5 chains of 100.
fn chain_step_us(dev: &Device) -> Result<f64> {
    let n = 4096;
    let a = dev.upload_f32(&vec![1.0; n])?;
    let b = dev.upload_f32(&vec![1.0; n])?;
    let (e0, e1) = (dev.event()?, dev.event()?);
    let mut best = f64::MAX;
    for _ in 0..5 {
        dev.record(&e0, &dev.compute)?;
        for i in 0..100 {
            let (x, y) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
            ops::chain_step(dev, x.ptr(), y.ptr(), n)?;
        }
        dev.record(&e1, &dev.compute)?;
        dev.sync()?;
        best = best.min(dev.elapsed_ms(&e0, &e1)? as f64 * 1e3 / 100.0);
    }
    Ok(best)
}

/// One greedy token with an event after every launch: where a VRAM-resident token's time goes.
/// With the same run's D2D bandwidth and dependent-step cost, also the token's chain floor:
/// each launch costs at least one dependent step or its weight bytes at D2D, whichever is more.
fn trace_token(cm: &mut CudaModel, d2d: f64) -> Result<Value> {
    let step_us = chain_step_us(&cm.dev)?;
    let mut st = cm.new_state()?;
    cm.forward_argmax(&[1], &mut st)?;
    let start = cm.dev.trace_start()?;
    let r = cm.forward_argmax(&[2], &mut st);
    let (t, per_launch) = cm.dev.trace_finish(&start)?;
    r?;
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
        "note": "one token, an event after each launch (serialised: no dependent-launch overlap)",
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

/// One token's launches captured into a CUDA graph and replayed `n` times, against the same
/// launches issued `n` times on the stream; no readback in either, so both are GPU time. The
/// replays repeat one position (timing only: the state they leave is not a decode's).
fn graph_replay(cm: &mut CudaModel, n: usize) -> Result<Value> {
    use cudarc::driver::sys;
    let mut st = cm.new_state()?;
    cm.forward_argmax(&[1], &mut st)?;
    let (e0, e1) = (cm.dev.event()?, cm.dev.event()?);
    let timed = |cm: &mut CudaModel, f: &mut dyn FnMut(&mut CudaModel) -> Result<()>| {
        f(cm)?;
        cm.dev.sync()?;
        cm.dev.record(&e0, &cm.dev.compute)?;
        for _ in 0..n {
            f(cm)?;
        }
        cm.dev.record(&e1, &cm.dev.compute)?;
        cm.dev.sync()?;
        Ok::<f64, crate::CudaError>(cm.dev.elapsed_ms(&e0, &e1)? as f64 / n as f64)
    };
    let stream_ms = timed(cm, &mut |cm| cm.launch_token(2, &mut st))?;
    let compute = cm.dev.compute.clone();
    let drv = |what: &str, e: cudarc::driver::DriverError| {
        crate::CudaError::Invalid(format!("graph {what}: {e:?}"))
    };
    compute
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .map_err(|e| drv("begin capture", e))?;
    let r = cm.launch_token(2, &mut st);
    let g = compute
        .end_capture(sys::CUgraphInstantiate_flags(0))
        .map_err(|e| drv("end capture", e))?;
    r?;
    let g = g.ok_or_else(|| crate::CudaError::Invalid("graph: nothing captured".into()))?;
    let graph_ms = timed(cm, &mut |_| g.launch().map_err(|e| drv("launch", e)))?;
    Ok(json!({
        "note": "one token's launches, no readback: on the stream vs one CUDA graph replayed",
        "stream_ms_per_token": stream_ms,
        "graph_ms_per_token": graph_ms,
        "graph_speedup_x": stream_ms / graph_ms,
    }))
}

fn argmax(v: &[f32]) -> u32 {
    let mut b = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[b] {
            b = i;
        }
    }
    b as u32
}

/// VRAM expert cache bytes that hold two layers' worth of `k` experts of `ebytes` (with slot
/// padding): every layer's picks evict the layer before's, so (nearly) every routed expert of
/// a token misses and is copied in. The host and disk modes' cache.
pub(crate) fn all_miss_cache(k: usize, ebytes: usize) -> usize {
    2 * k * (ebytes + 4096)
}

/// Runs the whole CUDA benchmark; `model` (when `opts.model_decode`) is also decoded.
pub fn bench_cuda(model: &Model, opts: &BenchOptions) -> Result<Value> {
    let dev = Device::new(opts.device)?;
    dev.bind()?;
    let d2d = d2d_gbps(&dev)?;
    let h2d = h2d_gbps(&dev)?;
    let mut kernels = Vec::new();
    let shapes: &[(usize, usize, u32)] = if opts.kernels {
        &[
            (513, 4096, 8),
            (2048, 4096, 4),
            (4096, 4096, 4),
            (16384, 4096, 4),
            (4096, 8192, 4),
            (248320, 4096, 4),
            (4096, 4096, 8),
            (4096, 4096, 2),
        ]
    } else {
        &[]
    };
    for &(rows, cols, bits) in shapes {
        let l = synth_affine(rows, cols, bits, rows as u64 ^ cols as u64);
        for (path, ap, tile, rpw) in [
            ("dp4a, x prepared once", ops::AffinePath::Prepared, 0, 0),
            ("float", ops::AffinePath::Float, 0, 0),
            ("float 1 row per warp", ops::AffinePath::Float, 0, 1),
            ("float 2 rows per warp", ops::AffinePath::Float, 0, 2),
            ("float 4 rows per warp", ops::AffinePath::Float, 0, 4),
            ("mma 16-row tiles", ops::AffinePath::Mma, 16, 0),
            ("mma 32-row tiles", ops::AffinePath::Mma, 32, 0),
            ("auto", ops::AffinePath::Auto, 0, 0),
        ] {
            ops::set_affine_path(ap);
            ops::set_mma_tile(tile);
            ops::set_rows_per_warp(rpw);
            let (gbps, bytes) = matvec_gbps(&dev, &l)?;
            kernels.push(json!({
                "kernel": format!("matvec affine {bits}-bit g64 bf16 scales ({path})"),
                "rows": rows, "cols": cols, "bytes": bytes,
                "gbps": gbps, "of_d2d_ratio": gbps / d2d,
            }));
        }
        ops::set_affine_path(ops::AffinePath::Auto);
        ops::set_mma_tile(0);
        ops::set_rows_per_warp(0);
    }
    if opts.kernels {
        let w = rand_u32(4096 * 4096 / 2, 77);
        let w: Vec<bf16> = w
            .iter()
            .flat_map(|x| [*x as u16, (*x >> 16) as u16])
            .map(|x| bf16::from_f32((x % 1000) as f32 * 3e-5 - 0.015))
            .collect();
        let l = Linear::Dense {
            dtype: DType::BF16,
            rows: 4096,
            cols: 4096,
            data: Buf::from_vec(&w),
        };
        let (gbps, bytes) = matvec_gbps(&dev, &l)?;
        kernels.push(json!({"kernel": "matvec dense bf16", "rows": 4096, "cols": 4096, "bytes": bytes, "gbps": gbps, "of_d2d_ratio": gbps / d2d}));
    }
    drop(dev);

    let mut out = json!({
        "device": Device::new(opts.device)?.name,
        "d2d_gbps": d2d,
        "h2d_pinned_gbps": h2d,
        "kernels": kernels,
    });

    // Synthetic full-shape model: experts all in VRAM, then read from host memory.
    let t = Instant::now();
    let cfg = synth_config(opts.synth_layers, opts.synth_k);
    let synth = synth_model(cfg, POOL);
    let build_s = t.elapsed().as_secs_f64();
    let mut modes = serde_json::Map::new();
    let vram_ms;
    {
        let mut cm = CudaModel::new(&synth, &CudaOptions::default())?;
        let (slots, cbytes, ebytes) = cm.cache_info().unwrap_or((0, 0, 0));
        let tp = Instant::now();
        cm.preload_experts()?;
        let preload_s = tp.elapsed().as_secs_f64();
        let (ms, mut j) = time_decode(&mut cm, opts.tokens, Pick::Device)?;
        vram_ms = ms;
        // Same run, same model: the logits read back to the host each token (what sampling
        // costs); and every affine matrix on the exact float kernel (the decode kernel before
        // the prepared-x one).
        let (ms_logits, _) = time_decode(&mut cm, opts.tokens, Pick::HostLogits)?;
        ops::set_affine_path(ops::AffinePath::Float);
        let float = time_decode(&mut cm, opts.tokens, Pick::Device);
        ops::set_affine_path(ops::AffinePath::Auto);

        let trace = trace_token(&mut cm, d2d)?;
        let floor_ms = trace["chain_floor"]["floor_ms"]
            .as_f64()
            .unwrap_or(f64::NAN);
        j["kernel_trace"] = trace;
        j["chain_floor_ms"] = json!(floor_ms);
        j["time_over_chain_floor_ratio"] = json!(ms / floor_ms);
        j["graph"] = graph_replay(&mut cm, opts.tokens).unwrap_or_else(|e| json!(e.to_string()));
        j["ms_per_token_logits_to_host"] = json!(ms_logits);
        j["ms_per_token_float_kernels"] = json!(float?.0);
        j["next_token"] = json!("argmax on the GPU (greedy)");
        j["prefill"] = time_prefill(&mut cm, opts.prefill_tokens)?;
        let n_moe = synth.cfg.num_layers;
        let touched = cm.dense_touched_bytes + n_moe * synth.top_k * ebytes;
        let bound_ms = touched as f64 / (d2d * 1e9) * 1e3;
        j["bytes_touched_per_token"] = json!(touched);
        j["bound_ms"] = json!(bound_ms);
        j["time_over_bound_ratio"] = json!(ms / bound_ms);
        j["cache_slots"] = json!(slots);
        j["cache_bytes"] = json!(cbytes);
        j["preload_s"] = json!(preload_s);
        modes.insert("experts_in_vram".into(), j);
    }
    // Experts in host RAM, VRAM cache of two layers' worth (every expert misses): (b) pinned
    // RAM, copied directly; then pageable RAM through the pinned staging buffer.
    let host_modes: &[bool] = if opts.host_modes { &[true, false] } else { &[] };
    for &pinned in host_modes {
        let k = synth.top_k;
        let ebytes = synth.experts.expert_bytes();
        let o = CudaOptions {
            expert_cache_bytes: Some(all_miss_cache(k, ebytes)),
            ..Default::default()
        };
        let all: Vec<usize> = (0..POOL).collect();
        let pool = synth.experts.fetch(0, &all)?;
        let mut cm = CudaModel::new(&synth, &o)?;
        if pinned {
            for w in &pool {
                for l in [&w.gate, &w.up, &w.down] {
                    let (a, b, c) = linear_bytes(l);
                    cm.pin_host(a)?;
                    cm.pin_host(b)?;
                    cm.pin_host(c)?;
                }
            }
        }
        let (ms, mut j) = time_decode(&mut cm, opts.tokens, Pick::Device)?;
        let missed = j["bytes_copied_per_token"].as_f64().unwrap_or(0.0);
        let bound_ms = missed / (h2d * 1e9) * 1e3 + vram_ms;
        j["bound_ms"] = json!(bound_ms);
        j["time_over_bound_ratio"] = json!(ms / bound_ms);
        if !pinned {
            j["prefill"] = time_prefill(&mut cm, opts.prefill_tokens)?;
        }
        let name = if pinned {
            "experts_in_pinned_ram"
        } else {
            "experts_in_pageable_ram"
        };
        modes.insert(name.into(), j);
    }
    // (c) Experts in pageable host RAM behind a pinned host tier that holds every expert the
    // decode touches: a first pass reads them into the tier, the timed second pass (the same
    // tokens) finds every VRAM miss there.
    if opts.host_modes {
        let k = synth.top_k;
        let ebytes = synth.experts.expert_bytes();
        let n_moe = synth.cfg.num_layers;
        let per_layer = synth.cfg.num_experts.min((opts.tokens + 2) * k);
        let tier_bytes = n_moe * per_layer * (ebytes + 4096);
        let built = CudaModel::new(
            &synth,
            &CudaOptions {
                expert_cache_bytes: Some(all_miss_cache(k, ebytes)),
                host_cache_bytes: tier_bytes,
                ..Default::default()
            },
        );
        let j = match built {
            // Page-locked memory is the host's to refuse: report it, keep the other figures.
            Err(e) => {
                json!({ "skipped": format!("{tier_bytes} bytes of pinned host memory: {e}") })
            }
            Ok(mut cm) => {
                let tp = Instant::now();
                time_decode(&mut cm, opts.tokens, Pick::Device)?;
                let warm_s = tp.elapsed().as_secs_f64();
                let (ms, mut j) = time_decode(&mut cm, opts.tokens, Pick::Device)?;
                let missed = j["bytes_copied_per_token"].as_f64().unwrap_or(0.0);
                let bound_ms = missed / (h2d * 1e9) * 1e3 + vram_ms;
                let (slots, bytes) = cm.host_info().unwrap_or((0, 0));
                j["bound_ms"] = json!(bound_ms);
                j["time_over_bound_ratio"] = json!(ms / bound_ms);
                j["host_tier_slots"] = json!(slots);
                j["host_tier_bytes"] = json!(bytes);
                j["first_pass_s"] = json!(warm_s);
                j
            }
        };
        modes.insert("experts_in_pinned_host_tier".into(), j);
    }
    out["synthetic"] = json!({
        "layers": opts.synth_layers, "k": opts.synth_k, "build_s": build_s,
        "expert_bytes": synth.experts.expert_bytes(),
        "modes": modes,
    });

    if opts.model_decode {
        let mut cm = CudaModel::new(model, &CudaOptions::default())?;
        let (_, j) = time_decode(&mut cm, opts.tokens.min(16), Pick::HostLogits)?;
        out["model"] = j;
    }
    Ok(out)
}

/// Where the experts of [`bench_cuda_disk`]'s model come from, and the disk's limit measured
/// in the same run.
pub struct DiskSource<'a> {
    /// The same model opened with `--io direct` (page cache bypassed).
    pub direct: &'a Model,
    /// GB/s of O_DIRECT reads of one expert's size, K in flight, on the model's expert file.
    pub disk_gbps: f64,
}

/// (c) Decode of a packed model on disk with its experts read from the SSD for every token:
/// the VRAM cache holds two layers' worth, so (nearly) every routed expert misses, and the
/// model is opened with `--io direct`. Beside it the bound: missed bytes at the disk's
/// bandwidth plus the same model's decode time with every expert resident in VRAM (measured
/// here when its experts fit; the disk term alone otherwise).
pub fn bench_cuda_disk(model: &Model, disk: &DiskSource, tokens: usize) -> Result<Value> {
    let k = model.top_k;
    let ebytes = model.experts.expert_bytes();
    let n_moe = (0..model.cfg.num_layers)
        .filter(|&l| model.cfg.is_moe_layer(l))
        .count();
    if n_moe == 0 || ebytes == 0 {
        return Ok(json!({ "skipped": "the model has no routed experts" }));
    }
    let mut resident = CudaModel::new(model, &CudaOptions::default())?;
    // Preload only when every expert fits: for a model larger than VRAM it would read the
    // whole expert set from disk for nothing.
    let fits = resident
        .cache_info()
        .is_some_and(|(slots, _, _)| slots >= n_moe * model.cfg.num_experts);
    if fits {
        resident.preload_experts()?;
    }
    let vram_ms = if resident.all_resident() {
        Some(time_decode(&mut resident, tokens, Pick::Device)?.0)
    } else {
        None
    };
    drop(resident);
    let mut cm = CudaModel::new(
        disk.direct,
        &CudaOptions {
            expert_cache_bytes: Some(all_miss_cache(k, ebytes)),
            ..Default::default()
        },
    )?;
    let (ms, mut j) = time_decode(&mut cm, tokens, Pick::Device)?;
    let misses = j["misses_per_token"].as_f64().unwrap_or(0.0);
    let read = flashmoe_core::packed::align_up(ebytes as u64, flashmoe_core::packed::EXPERT_ALIGN);
    let disk_ms = misses * read as f64 / (disk.disk_gbps * 1e9) * 1e3;
    let bound_ms = disk_ms + vram_ms.unwrap_or(0.0);
    j["disk_read_bw_gbs"] = json!(disk.disk_gbps);
    j["expert_read_bytes"] = json!(read);
    j["disk_ms_per_token_at_probe"] = json!(disk_ms);
    j["vram_resident_ms_per_token"] = json!(vram_ms);
    j["bound_ms"] = json!(bound_ms);
    j["time_over_bound_ratio"] = json!(ms / bound_ms);
    j["experts_source"] = json!(disk.direct.experts.describe());
    Ok(j)
}
