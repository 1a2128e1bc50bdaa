//! The device's own limits, measured in the same run as the decode figures they bound:
//! device-to-device copy and host-to-device (pinned) bandwidth, the cost of one dependent
//! launch, and quantised matvec GB/s per kernel path as a ratio of the copy bandwidth. These
//! drive ops.rs directly (one kernel at a time), not a model.
use half::bf16;
use serde_json::{json, Value};

use flashmoe_core::buf::Buf;
use flashmoe_core::store::DType;
use flashmoe_core::weights::Linear;

use super::synth::{rand_u32, synth_affine};
use crate::device::Device;
use crate::ops::{self, DevMat};
use crate::Result;

pub(super) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Device-to-device copy bandwidth, bytes read + written per second (GB/s).
pub(super) fn d2d_gbps(dev: &Device) -> Result<f64> {
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
pub(super) fn h2d_gbps(dev: &Device) -> Result<f64> {
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
    let (rows, cols) = (l.rows(), l.cols());
    let one = ops::upload_rows(dev, &[(l, 0, rows)])?;
    let bytes = one.m.nbytes();
    let copies = (512usize << 20).div_ceil(bytes).clamp(1, 64);
    let mut mats = vec![one];
    for _ in 1..copies {
        mats.push(ops::upload_rows(dev, &[(l, 0, rows)])?);
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
    Ok((median(v), bytes))
}

/// Microseconds per launch of a chain of dependent minimal steps (`ops::chain_step`, each
/// reading the vector the one before wrote), launched as the token's kernels are: the least a
/// dependent launch costs on this device, whatever it computes. Best of 5 chains of 100.
pub(super) fn chain_step_us(dev: &Device) -> Result<f64> {
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

/// The shapes of the kernel bench: (rows, cols, bits) of a 397B token's matrices.
const SHAPES: [(usize, usize, u32); 8] = [
    (513, 4096, 8),
    (2048, 4096, 4),
    (4096, 4096, 4),
    (16384, 4096, 4),
    (4096, 8192, 4),
    (248320, 4096, 4),
    (4096, 4096, 8),
    (4096, 4096, 2),
];

/// Matvec GB/s of every affine kernel path on every shape, and a dense bf16 matrix, each
/// beside the D2D bandwidth `d2d`. A failing path is recorded in its row.
pub(super) fn kernels(dev: &Device, d2d: f64) -> Vec<Value> {
    let mut out = Vec::new();
    for (rows, cols, bits) in SHAPES {
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
            let r = matvec_gbps(dev, &l);
            ops::set_affine_path(ops::AffinePath::Auto);
            ops::set_mma_tile(0);
            ops::set_rows_per_warp(0);
            let kernel = format!("matvec affine {bits}-bit g64 bf16 scales ({path})");
            out.push(row(kernel, rows, cols, d2d, r));
        }
    }
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
    let r = matvec_gbps(dev, &l);
    out.push(row("matvec dense bf16".into(), 4096, 4096, d2d, r));
    out
}

fn row(kernel: String, rows: usize, cols: usize, d2d: f64, r: Result<(f64, usize)>) -> Value {
    match r {
        Ok((gbps, bytes)) => json!({
            "kernel": kernel, "rows": rows, "cols": cols, "bytes": bytes,
            "gbps": gbps, "of_d2d_ratio": gbps / d2d,
        }),
        Err(e) => json!({"kernel": kernel, "rows": rows, "cols": cols, "error": e.to_string()}),
    }
}
