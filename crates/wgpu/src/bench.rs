//! `flashmoe bench --backend wgpu`: the adapter's limits measured in the same run (device
//! copy bandwidth and host-to-device upload bandwidth through wgpu), the 4-bit product at
//! dense shapes beside them, and greedy decode of the model on the device (experts resident in
//! device slots, and uploaded on use beside their bound). Copies and products are timed from
//! the submission of many recorded repetitions to the device going idle (round 1 timed one
//! submission per figure: latency, not bandwidth); each figure is the best of three.
use std::sync::Arc;
use std::time::Instant;

use flashmoe_core::backend::Backend;
use flashmoe_core::buf::Buf;
use flashmoe_core::error::Result;
use flashmoe_core::model::Model;
use flashmoe_core::store::DType;
use flashmoe_core::weights::Linear;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::{json, Value};

use crate::device::{Products, Wgpu};
use crate::shaders::{Fast, Form};

/// What to measure.
#[derive(Clone, Copy, Debug)]
pub struct BenchOptions {
    /// Decode steps.
    pub tokens: usize,
    /// Size of the copy and upload buffers, in MiB.
    pub mb: usize,
    /// Dense shapes of the product: (rows, cols).
    pub shapes: &'static [(usize, usize)],
    /// Device memory for the resident decode's expert slots.
    pub slot_bytes: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            tokens: 8,
            mb: 256,
            // The dense shapes: a 4096-wide projection, an MLP's, and a 248,320-row
            // head (~0.5 GB at 4 bits).
            shapes: &[(4096, 4096), (16384, 4096), (248320, 4096)],
            slot_bytes: 16 << 30,
        }
    }
}

fn best(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut b = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        b = b.min(t.elapsed().as_secs_f64());
    }
    Ok(b)
}

/// Device seconds per repetition of `record` (commands recorded, not run): `n` of them are
/// recorded first, then the clock runs from their submission to the device going idle, so the
/// host's recording is not counted and one submission's latency is spread over `n`. Best of
/// three.
fn device_time(be: &Wgpu, n: usize, mut record: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut b = f64::MAX;
    for _ in 0..3 {
        be.wait()?;
        for _ in 0..n {
            record()?;
        }
        let t = Instant::now();
        be.wait()?;
        b = b.min(t.elapsed().as_secs_f64() / n as f64);
    }
    Ok(b)
}

/// Repetitions moving about 2 GB, within 4..=200 (fewer than the encoder's batch).
fn reps_for(bytes: usize) -> usize {
    (2e9 / bytes.max(1) as f64).clamp(4.0, 200.0) as usize
}

/// Bytes copied per second from one device buffer to another, and bytes per second from host
/// memory into a device buffer.
fn limits(be: &Wgpu, mb: usize) -> Result<(f64, f64, Option<f64>)> {
    let n = (mb.max(1) << 20) as u64;
    let (a, b) = (be.buffer(n), be.buffer(n));
    let copy = device_time(be, reps_for(2 * n as usize), || be.copy(&a, 0, &b, 0, n))?;
    // The same copies timed on the device (where timestamps are allowed between commands).
    be.trace_start()?;
    for _ in 0..4 {
        be.copy(&a, 0, &b, 0, n)?;
    }
    let tr = be.trace_finish()?;
    let gpu_copy = (tr.unavailable.is_none() && tr.sum_us > 0.0 && tr.untimed.is_empty())
        .then(|| 4.0 * n as f64 / (tr.sum_us * 1e3));
    let host = vec![1u8; n as usize];
    let upload = best(3, || {
        be.queue.write_buffer(&a, 0, &host);
        be.queue.submit([]);
        be.wait()
    })?;
    Ok((n as f64 / copy / 1e9, n as f64 / upload / 1e9, gpu_copy))
}

/// The `bench` section: limits, products, decode.
pub fn bench(mut be: Wgpu, cpu: &Arc<Model>, o: &BenchOptions) -> Result<Value> {
    // A software adapter (lavapipe) runs the shaders on the CPU: small sizes, so that the
    // section finishes (its figures describe the CPU, not a GPU).
    let software = be.desc.software;
    let small = BenchOptions {
        mb: o.mb.min(32),
        shapes: &[(1024, 4096)],
        ..*o
    };
    let o = if software { &small } else { o };
    let (copy, upload, gpu_copy) = limits(&be, o.mb)?;
    let default = be.products;
    let mut kernels = Vec::new();
    let mut best_ratio: Vec<Value> = Vec::new();
    // Each candidate's own `lean` decides its loop bounding while the candidates are timed
    // (with every kernel lean, the default, `_lean` and its bounded twin would be the same
    // pipeline and the comparison would measure nothing).
    let lean_all = be.lean_kernels();
    be.set_lean_kernels(false)?;
    for &(rows, cols) in o.shapes {
        let w = random_affine4(rows, cols);
        let wm = be.upload_mat(&w)?;
        let mut rows_of_shape = Vec::new();
        for products in candidates(&be, default) {
            be.products = products;
            let k = product(&be, &wm, w.nbytes(), cols, rows)?;
            let g = product_gpu(&be, &wm, w.nbytes(), cols, rows)?;
            rows_of_shape.push(json!({
                "kernel": "matvec affine4-g64",
                "products": format!("{products:?}"),
                // The fast configuration as `FLASHMOE_WGPU_FAST` takes it.
                "spec": match products {
                    Products::Fast(f) => Some(f.spec()),
                    _ => None,
                },
                "default": products == default,
                "shape": [rows, cols],
                "us": k.0 * 1e6,
                "weight_gbps": k.1,
                "vs_copy": k.1 / copy,
                // A copy reads and writes each byte: its traffic is twice the bytes copied.
                "vs_copy_traffic": k.1 / (2.0 * copy),
                // The kernel alone, between GPU timestamps (null without them).
                "gpu_us": g.map(|g| g.0 * 1e6),
                "gpu_weight_gbps": g.map(|g| g.1),
            }));
        }
        be.products = default;
        let best = rows_of_shape
            .iter()
            .max_by(|a, b| {
                a["weight_gbps"]
                    .as_f64()
                    .partial_cmp(&b["weight_gbps"].as_f64())
                    .unwrap_or(std::cmp::Ordering::Equal)
            })
            .cloned()
            .unwrap_or(Value::Null);
        // The fastest by GPU time (timestamps; null without them): the figure to choose a
        // default by, free of submission and wait.
        let gpu_best = rows_of_shape
            .iter()
            .filter(|r| r["gpu_us"].is_f64())
            .min_by(|a, b| {
                a["gpu_us"]
                    .as_f64()
                    .partial_cmp(&b["gpu_us"].as_f64())
                    .unwrap_or(std::cmp::Ordering::Equal)
            });
        best_ratio.push(json!({
            "best_gpu_products": gpu_best.map(|r| r["products"].clone()),
            "best_gpu_spec": gpu_best.map(|r| r["spec"].clone()),
            "best_gpu_us": gpu_best.map(|r| r["gpu_us"].clone()),
            "default_gpu_us": rows_of_shape[0]["gpu_us"],
            "shape": [rows, cols],
            "best_products": best["products"],
            "best_spec": best["spec"],
            "best_vs_copy": best["vs_copy"],
            "best_vs_copy_traffic": best["vs_copy_traffic"],
            "default_vs_copy": rows_of_shape[0]["vs_copy"],
            "default_vs_copy_traffic": rows_of_shape[0]["vs_copy_traffic"],
            "target": 0.6,
        }));
        kernels.extend(rows_of_shape);
    }
    be.set_lean_kernels(lean_all)?;
    let chain = dispatch_chain(&be, 256)?;
    let model = flashmoe_core::model::upload_to(cpu, be)?;
    let n = o.tokens.max(1);
    // Streamed: every routed expert uploaded from host memory on use (no tier); the reads
    // overlapping the shared expert's device work, or serial (after the device finished it:
    // the default, `Wgpu::overlap`). Alternated twice, the least of each kept: whichever of the
    // two ran first was the faster in six H100 runs that did not alternate.
    let overlap_was = model.be.overlap();
    let (mut runs, mut after) = ([Vec::new(), Vec::new()], None);
    for _ in 0..2 {
        for (i, overlap) in [true, false].into_iter().enumerate() {
            model.be.set_overlap(overlap);
            let before = model.experts.counters().snapshot();
            runs[i].push(decode(&model, n)?);
            after = Some(model.experts.counters().snapshot().since(&before));
        }
    }
    model.be.set_overlap(overlap_was);
    let least = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let (overlapped_ms, ms) = (least(&runs[0]), least(&runs[1]));
    let after = after.unwrap_or_default();
    // The warm-up token's fetches are not in `n`'s: per token over n + 1.
    let expert_bytes =
        (after.fetched as f64 * model.experts.expert_bytes() as f64) / (n + 1) as f64;
    // Resident: the routed experts in device slots (core's residency tier), all preloaded
    // when they fit in `slot_bytes`.
    crate::slots::with_residency(&model, o.slot_bytes)?;
    let preloaded = Wgpu::preload(&model)?;
    // Commands per submission: the device starts on a short batch while the host records the
    // rest; each submission costs the host. Measured, the default last.
    // Dispatches in one compute pass each or sharing one: measured beside each other, each
    // with one traced token's device span and kernel sum (where the time goes).
    let default_batch = model.be.submit_batch();
    let default_one = model.be.one_pass();
    let mut by_batch = Vec::new();
    for (b, one) in [
        (256, false),
        (8, false),
        (256, true),
        (default_batch, !default_one),
        (default_batch, default_one),
    ] {
        model.be.set_submit_batch(b)?;
        model.be.set_one_pass(one)?;
        let (ms, c) = decode_counted(&model, n)?;
        let tr = trace_token(&model)?;
        by_batch.push(
            json!({"commands_per_submission": b, "one_pass": one, "ms_per_token": ms,
            "host_per_token": host_json(&c, n),
            "traced_token": {"wall_us": tr["wall_us"], "span_us": tr["span_us"],
                "sum_us": tr["sum_us"], "gaps_us": tr["gaps_us"]}}),
        );
    }
    // Every kernel with naga's forced loop bounding toggled (`Wgpu::set_lean_kernels`), beside
    // the default: what the loop counters cost a whole token, per kernel in its trace.
    let lean_was = model.be.lean_kernels();
    model.be.set_lean_kernels(!lean_was)?;
    let (toggled_ms, _) = decode_counted(&model, n)?;
    let toggled_trace = trace_token(&model)?;
    model.be.set_lean_kernels(lean_was)?;
    let kernel_trace = trace_token(&model)?;
    let s0 = model.be.tier_stats().unwrap_or_default();
    let (resident_ms, host) = decode_counted(&model, n)?;
    let s1 = model.be.tier_stats().unwrap_or_default();
    let per = |a: u64, b: u64| (b - a) as f64 / (n + 1) as f64;
    let upload_ms = expert_bytes / upload / 1e6;
    let bound_ms = upload_ms + resident_ms;
    Ok(json!({
        "adapter": model.be.desc.name,
        "adapter_type": model.be.desc.device_type,
        "unified_slots": model.be.unified_slots(),
        "backend": model.be.desc.backend,
        "software_adapter_small_sizes": software,
        "buffer_mib": o.mb,
        "device_copy_gbps": copy,
        // The copy's bytes over its time between GPU timestamps (null without them inside
        // encoders): the copy engine's rate without the submission and wait around it.
        "device_copy_gbps_timestamps": gpu_copy,
        "upload_gbps": upload,
        "products": format!("{default:?}"),
        "kernels": kernels,
        "dispatch_chain": chain,
        // The target: the 4-bit product at >= 60% of the device copy bandwidth (given
        // against the bytes copied per second and against a copy's read+write traffic).
        "matvec_targets": best_ratio,
        "decode": {
            "experts": "uploaded from host memory on use (no slots)",
            "tokens": n,
            "ms_per_token": ms,
            "tok_per_s": 1e3 / ms,
            "expert_bytes_uploaded_per_token": expert_bytes,
            // The upload of every routed expert at the measured upload bandwidth, a floor
            // under ms_per_token; with the resident decode's time, the bound.
            "expert_upload_bound_ms": upload_ms,
            "bound_ms": bound_ms,
            "time_over_bound_ratio": ms / bound_ms,
            "target_ratio": 1.2,
            // "serial" (the default) waits for the shared expert before the layer's reads;
            // "overlapped" submits it first, so that the device computes it while the host
            // reads and stages the experts. ms_per_token is serial's.
            "pipeline": "serial",
            "serial_ms_per_token": ms,
            "overlapped_ms_per_token": overlapped_ms,
            "runs_ms_per_token": {"overlapped": runs[0], "serial": runs[1]},
            "overlapped_over_serial": overlapped_ms / ms,
        },
        "decode_resident": {
            "experts": "in device slots (core's residency tier)",
            "all_preloaded": preloaded,
            "slot_bytes": model.be.tier_info().map(|i| i.slots * i.slot_bytes),
            "tokens": n,
            "ms_per_token": resident_ms,
            "tok_per_s": 1e3 / resident_ms,
            "slot_hits_per_token": per(s0.hits, s1.hits),
            "slot_fills_per_token": per(s0.misses, s1.misses),
            "commands_per_submission": default_batch,
            // Host work per decoded token (the warm-up token not counted): bind groups,
            // buffers, submissions and waits are deterministic; record_ms is the host's time
            // recording, submit_ms its time in queue.submit (a software adapter may run the
            // shaders there).
            "host_per_token": host_json(&host, n),
            "by_commands_per_submission": by_batch,
            "one_pass": default_one,
            "lean_kernels": lean_was,
            "lean_kernels_toggled": {"lean_kernels": !lean_was, "ms_per_token": toggled_ms,
                "kernel_trace": toggled_trace},
            // One token's commands timed on the device (timestamp queries), per kernel.
            "kernel_trace": kernel_trace,
            // Layers run from the device's routing (no read back), per token.
            "resident_layer_calls_per_token": per(s0.resident_calls, s1.resident_calls),
        },
    }))
}

/// The device's cost of one dependent dispatch: `n` additions into one small buffer (each
/// waits for the one before), timed from submission to idle (wall) and between GPU
/// timestamps (span and kernels), with one pass per dispatch and one pass shared: the least
/// a token of d dispatches costs is about d times this step.
fn dispatch_chain(be: &Wgpu, n: usize) -> Result<Value> {
    let x = be.upload(&[1.0; 64])?;
    let mut y = be.upload(&[0.0; 64])?;
    let was = be.one_pass();
    let mut out = Vec::new();
    for one in [false, true] {
        be.set_one_pass(one)?;
        let wall = device_time(be, n, || be.add(&mut y, &x))?;
        be.trace_start()?;
        for _ in 0..n {
            be.add(&mut y, &x)?;
        }
        let tr = be.trace_finish()?;
        out.push(json!({
            "one_pass": one,
            "dispatches": n,
            "wall_us_per_dispatch": wall * 1e6,
            "span_us_per_dispatch": tr.span_us / n as f64,
            "kernel_us_per_dispatch": tr.sum_us / n as f64,
        }));
    }
    be.set_one_pass(was)?;
    Ok(Value::Array(out))
}

/// One decode token (after a warm-up one) traced on the device ([`Wgpu::trace_start`]),
/// beside its wall time.
fn trace_token(model: &Model<Wgpu>) -> Result<Value> {
    let mut st = model.new_state()?;
    let id = model.forward_argmax(&[1], &mut st)?;
    model.be.trace_start()?;
    let t = Instant::now();
    let r = model.forward_argmax(&[id], &mut st);
    let wall_us = t.elapsed().as_secs_f64() * 1e6;
    let rep = model.be.trace_finish()?;
    r?;
    Ok(rep.json(wall_us))
}

/// Milliseconds per token of greedy decode of `n` tokens after one warm-up token.
fn decode(model: &Model<Wgpu>, n: usize) -> Result<f64> {
    let mut st = model.new_state()?;
    let mut id = model.forward_argmax(&[1], &mut st)?;
    let t = Instant::now();
    for _ in 0..n {
        id = model.forward_argmax(&[id], &mut st)?;
    }
    Ok(t.elapsed().as_secs_f64() * 1e3 / n as f64)
}

/// [`decode`] with the host work of the `n` timed tokens.
fn decode_counted(model: &Model<Wgpu>, n: usize) -> Result<(f64, crate::HostCounters)> {
    let mut st = model.new_state()?;
    let mut id = model.forward_argmax(&[1], &mut st)?;
    let c0 = model.be.host_counters();
    let t = Instant::now();
    for _ in 0..n {
        id = model.forward_argmax(&[id], &mut st)?;
    }
    let ms = t.elapsed().as_secs_f64() * 1e3 / n as f64;
    Ok((ms, model.be.host_counters().since(&c0)))
}

/// Host counters of `n` tokens, per token.
fn host_json(c: &crate::HostCounters, n: usize) -> Value {
    let per = |x: u64| x as f64 / n as f64;
    json!({
        "dispatches": per(c.dispatches),
        "transfers": per(c.transfers),
        "bind_groups": per(c.bind_groups),
        "buffers": per(c.buffers),
        "slot_copies": per(c.slot_copies),
        "slot_maps": per(c.slot_maps),
        "submissions": per(c.submissions),
        "waits": per(c.waits),
        "record_ms": per(c.record_ns) / 1e6,
        "submit_ms": per(c.submit_ns) / 1e6,
    })
}

/// A 4-bit, group-64 matrix of random codes with small bf16 scales and biases: made from
/// random bytes (a 248,320 x 4096 head through the quantiser would take the host minutes).
fn random_affine4(rows: usize, cols: usize) -> Linear {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut w = vec![0u8; rows * cols / 2];
    rng.fill_bytes(&mut w);
    let groups = rows * cols / 64;
    let mut half = |lo: f32, hi: f32| -> Vec<half::bf16> {
        (0..groups)
            .map(|_| half::bf16::from_f32(rng.gen_range(lo..hi)))
            .collect()
    };
    let (scales, biases) = (half(0.001, 0.02), half(-0.1, 0.0));
    Linear::Affine {
        bits: 4,
        group: 64,
        rows,
        cols,
        w: Buf::from_vec(&w),
        scales: Buf::from_vec(&scales),
        biases: Buf::from_vec(&biases),
        sdtype: DType::BF16,
    }
}

/// The product kernels measured at each shape: the adapter's default first, then (on a
/// hardware adapter) a workgroup per row and the fast kernels at other widths, rows per lane
/// group and reductions, so that the default is a measured choice.
fn candidates(be: &Wgpu, default: Products) -> Vec<Products> {
    let mut v = vec![default];
    if be.desc.software {
        return v;
    }
    v.push(Products::PerWorkgroup);
    let max = be.limits.max_compute_invocations_per_workgroup;
    let sg = be.default_fast().filter(|f| f.subgroup).map(|f| f.lg);
    for subgroup in [false, true] {
        let lg = match (subgroup, sg) {
            (false, _) => 32,
            (true, Some(lg)) => lg,
            (true, None) => continue,
        };
        for wgs in [64, 128, 256, 512] {
            for r in [1, 2, 4] {
                let f = Fast {
                    lg,
                    wgs,
                    r,
                    subgroup,
                    form: Form::Plain,
                    lean: false,
                };
                if f.valid() && wgs <= max && !v.contains(&Products::Fast(f)) {
                    v.push(Products::Fast(f));
                }
            }
        }
    }
    // In the default's lanes and reduction: the plain kernel without forced loop bounding, and
    // the one-token form (`fast_dec.wgsl`) with and without, at each width, rows per lane group
    // (eight only in that form: less x read per weight byte) and chunks per lane step; where
    // the device has f16 in shaders, the f16 twin of that form (`fast_half.wgsl`) lean.
    if let Some(d) = be.default_fast() {
        let mut forms = vec![
            (Form::Plain, true),
            (Form::Decode { span: 1 }, false),
            (Form::Decode { span: 2 }, false),
            (Form::Decode { span: 1 }, true),
            (Form::Decode { span: 2 }, true),
        ];
        if be.has_f16() {
            forms.extend([
                (Form::Half { span: 1 }, true),
                (Form::Half { span: 2 }, true),
            ]);
        }
        for (form, lean) in forms {
            for wgs in [128, 256, 512] {
                for r in [1, 2, 4, 8] {
                    let f = Fast {
                        wgs,
                        r,
                        form,
                        lean,
                        ..d
                    };
                    if f.valid() && wgs <= max && !v.contains(&Products::Fast(f)) {
                        v.push(Products::Fast(f));
                    }
                }
            }
        }
    }
    v
}

/// [`product`] timed between GPU timestamps: the kernels' own seconds per product and weight
/// bytes per second (`None` without timestamps).
fn product_gpu(
    be: &Wgpu,
    wm: &crate::GMat,
    bytes: usize,
    cols: usize,
    rows: usize,
) -> Result<Option<(f64, f64)>> {
    let x = be.upload(&vec![0.5f32; cols])?;
    let mut y = be.alloc(rows)?;
    let reps = reps_for(bytes).min(64);
    be.trace_start()?;
    for _ in 0..reps {
        be.matmul(wm, &x, 1, &mut y)?;
    }
    let tr = be.trace_finish()?;
    let s = tr.kernels.iter().map(|k| k.total_us).sum::<f64>() / 1e6 / reps as f64;
    Ok((tr.unavailable.is_none() && s > 0.0).then(|| (s, bytes as f64 / s / 1e9)))
}

/// Device seconds per product of `wm` with one token, and weight bytes per second (see
/// [`device_time`]).
fn product(
    be: &Wgpu,
    wm: &crate::GMat,
    bytes: usize,
    cols: usize,
    rows: usize,
) -> Result<(f64, f64)> {
    let x = be.upload(&vec![0.5f32; cols])?;
    let mut y = be.alloc(rows)?;
    be.matmul(wm, &x, 1, &mut y)?;
    let s = device_time(be, reps_for(bytes), || be.matmul(wm, &x, 1, &mut y))?;
    Ok((s, bytes as f64 / s / 1e9))
}
