//! `--backend cpu|cuda|auto`: the core's `SeqBackend` on the CPU or, when built with the `cuda`
//! feature, on the GPU, for the token-level commands ([`runner`]) and for the engine behind the
//! text front ends ([`engine_backend`]). Model code has no `cfg`; this file is the one place in
//! the CLI that knows whether CUDA was compiled in.
use anyhow::Result;
use clap::ValueEnum;
use std::sync::Arc;

use flashmoe_core::model::Model;
use flashmoe_core::session::{BackendFactory, CpuBackend, SeqBackend};

#[derive(Copy, Clone, Debug, ValueEnum, Default, PartialEq, Eq)]
pub enum BackendKind {
    /// CUDA when built with it and a device is present, else CPU
    #[default]
    Auto,
    Cpu,
    /// NVIDIA GPU: dense weights, state and an expert cache in VRAM
    Cuda,
}

/// Whether `auto` picks CUDA here.
pub fn cuda_available() -> bool {
    #[cfg(feature = "cuda")]
    {
        flashmoe_cuda::device_available()
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

/// A fresh sequence on the chosen backend, for the token-level commands (`logits`,
/// `generate`, `run --ids`): the same backends, by the same rule, as the engine's.
pub fn runner(model: Arc<Model>, kind: BackendKind) -> Result<Box<dyn SeqBackend>> {
    Ok(match engine_backend(kind)? {
        Some(f) => f.build(model)?,
        None => Box::new(CpuBackend::new(model)),
    })
}

/// What a sequence runs on (`None`: the CPU). `auto` takes CUDA when a device is present and
/// usable, else the CPU (with a note when a device was found but could not be used); `cuda`
/// without one fails when the backend is built, with the device's reason.
pub fn engine_backend(kind: BackendKind) -> Result<Option<BackendFactory>> {
    match kind {
        BackendKind::Cpu => Ok(None),
        BackendKind::Cuda => cuda_factory(false).map(Some),
        BackendKind::Auto if cuda_available() => cuda_factory(true).map(Some),
        BackendKind::Auto => Ok(None),
    }
}

/// The CUDA backend; with `fallback`, a device that cannot be used (no NVRTC, too little VRAM)
/// gives the CPU backend and a note instead of an error.
#[cfg(feature = "cuda")]
fn cuda_factory(fallback: bool) -> Result<BackendFactory> {
    Ok(BackendFactory::new(
        "cuda",
        move |model| match flashmoe_cuda::CudaSeq::new(
            model.clone(),
            &flashmoe_cuda::CudaOptions::default(),
        ) {
            Ok(s) => Ok(Box::new(s) as Box<dyn SeqBackend>),
            Err(e) if fallback => {
                eprintln!("note: CUDA device found but not usable ({e}); running on the CPU");
                Ok(Box::new(CpuBackend::new(model)))
            }
            Err(e) => Err(flashmoe_cuda::seq::core_error(e)),
        },
    ))
}

#[cfg(not(feature = "cuda"))]
fn cuda_factory(_fallback: bool) -> Result<BackendFactory> {
    cuda_runner_unavailable()
}

/// The CUDA part of `flashmoe bench --backend cuda`: GPU copy bandwidths, kernel GB/s beside
/// them and decode with experts in VRAM / pinned host RAM, each beside its bound.
#[cfg(feature = "cuda")]
pub fn cuda_bench(model: &Model, tokens: usize) -> Result<serde_json::Value> {
    let opts = flashmoe_cuda::BenchOptions {
        tokens: tokens.max(1),
        ..Default::default()
    };
    Ok(flashmoe_cuda::bench_cuda(model, &opts)?)
}

#[cfg(not(feature = "cuda"))]
pub fn cuda_bench(_model: &Model, _tokens: usize) -> Result<serde_json::Value> {
    cuda_runner_unavailable()
}

#[cfg(not(feature = "cuda"))]
fn cuda_runner_unavailable<T>() -> Result<T> {
    anyhow::bail!(
        "--backend cuda: this flashmoe was built without CUDA support; rebuild with \
         `cargo build --release -p flashmoe --features cuda` (no CUDA toolkit needed to build)"
    )
}
