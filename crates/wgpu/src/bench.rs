//! `flashmoe bench --backend wgpu`: the adapter's limits measured in the same run (device
//! copy bandwidth and host-to-device upload bandwidth through wgpu), the 4-bit product at
//! dense shapes beside them, and greedy decode of the model on the device. Host timers around
//! waits for the device; each figure is the best of a few repetitions.
use std::sync::Arc;
use std::time::Instant;

use flashmoe_core::backend::conformance::{random_linear, Fmt};
use flashmoe_core::backend::Backend;
use flashmoe_core::error::Result;
use flashmoe_core::model::Model;
use flashmoe_core::store::DType;
use rand::SeedableRng;
use serde_json::{json, Value};

use crate::device::Wgpu;

/// What to measure.
#[derive(Clone, Copy, Debug)]
pub struct BenchOptions {
    /// Decode steps.
    pub tokens: usize,
    /// Size of the copy and upload buffers, in MiB.
    pub mb: usize,
    /// Dense shapes of the product: (rows, cols).
    pub shapes: &'static [(usize, usize)],
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            tokens: 8,
            mb: 256,
            shapes: &[(4096, 4096), (16384, 4096)],
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

/// Bytes copied per second from one device buffer to another, and bytes per second from host
/// memory into a device buffer.
fn limits(be: &Wgpu, mb: usize) -> Result<(f64, f64)> {
    let n = (mb.max(1) << 20) as u64;
    let (a, b) = (be.buffer(n), be.buffer(n));
    be.copy(&a, 0, &b, 0, n)?;
    be.wait()?;
    let copy = best(5, || {
        be.copy(&a, 0, &b, 0, n)?;
        be.wait()
    })?;
    let host = vec![1u8; n as usize];
    let upload = best(3, || {
        be.queue.write_buffer(&a, 0, &host);
        be.queue.submit([]);
        be.wait()
    })?;
    Ok((n as f64 / copy / 1e9, n as f64 / upload / 1e9))
}

/// The `bench` section: limits, products, decode.
pub fn bench(be: Wgpu, cpu: &Arc<Model>, o: &BenchOptions) -> Result<Value> {
    // A software adapter (lavapipe) runs the shaders on the CPU: small sizes, so that the
    // section finishes (its figures describe the CPU, not a GPU).
    let software = be.desc.software;
    let small = BenchOptions {
        mb: o.mb.min(32),
        shapes: &[(1024, 4096)],
        ..*o
    };
    let o = if software { &small } else { o };
    let (copy, upload) = limits(&be, o.mb)?;
    let mut kernels = Vec::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for &(rows, cols) in o.shapes {
        let w = random_linear(&mut rng, rows, cols, Fmt::Affine(4, 64, DType::BF16));
        let bytes = w.nbytes() as f64;
        let wm = be.upload_mat(&w)?;
        let x = be.upload(&vec![0.5f32; cols])?;
        let mut y = be.alloc(rows)?;
        be.matmul(&wm, &x, 1, &mut y)?;
        be.wait()?;
        let reps = 20;
        let s = best(3, || {
            for _ in 0..reps {
                be.matmul(&wm, &x, 1, &mut y)?;
            }
            be.wait()
        })? / reps as f64;
        let gbps = bytes / s / 1e9;
        kernels.push(json!({
            "kernel": "matvec affine4-g64",
            "shape": [rows, cols],
            "us": s * 1e6,
            "weight_gbps": gbps,
            // A copy reads and writes each byte: its traffic is twice the bytes copied.
            "vs_copy_traffic": gbps / (2.0 * copy),
        }));
    }
    let model = flashmoe_core::model::upload_to(cpu, be)?;
    let mut st = model.new_state()?;
    let mut id = model.forward_argmax(&[1], &mut st)?;
    let before = model.experts.counters().snapshot();
    let t = Instant::now();
    let n = o.tokens.max(1);
    for _ in 0..n {
        id = model.forward_argmax(&[id], &mut st)?;
    }
    let ms = t.elapsed().as_secs_f64() * 1e3 / n as f64;
    let after = model.experts.counters().snapshot().since(&before);
    let expert_bytes = (after.fetched as f64 * model.experts.expert_bytes() as f64) / n as f64;
    Ok(json!({
        "adapter": model.be.desc.name,
        "adapter_type": model.be.desc.device_type,
        "backend": model.be.desc.backend,
        "software_adapter_small_sizes": software,
        "buffer_mib": o.mb,
        "device_copy_gbps": copy,
        "upload_gbps": upload,
        "kernels": kernels,
        "decode": {
            "tokens": n,
            "ms_per_token": ms,
            "tok_per_s": 1e3 / ms,
            "expert_bytes_uploaded_per_token": expert_bytes,
            // Every routed expert is uploaded on use: the time that takes at the measured
            // upload bandwidth, a floor under ms_per_token.
            "expert_upload_bound_ms": expert_bytes / upload / 1e6,
        },
    }))
}
