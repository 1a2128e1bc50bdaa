//! `--backend cpu|cuda|wgpu|auto`: the core's `SeqBackend` on the CPU or, when built with the
//! `cuda` / `wgpu` features, on a GPU, for the token-level commands ([`runner`]) and for the
//! engine behind the text front ends ([`engine_backend`]). Model code has no `cfg`; this file
//! is the one place in the CLI that knows which GPU backends were compiled in.
use anyhow::Result;
use clap::ValueEnum;
use std::sync::Arc;

use flashmoe_core::model::Model;
use flashmoe_core::session::{BackendFactory, CpuBackend, SeqBackend};

use super::common::ModelOpts;

#[derive(Copy, Clone, Debug, ValueEnum, Default, PartialEq, Eq)]
pub enum BackendKind {
    /// CUDA when built with it and a device is present, else a wgpu adapter that is a real
    /// GPU (never a software one), else CPU; says which on stderr
    #[default]
    Auto,
    Cpu,
    /// NVIDIA GPU: dense weights, state and an expert cache in VRAM
    Cuda,
    /// Any Vulkan or Metal GPU through wgpu (a software adapter such as lavapipe too, when
    /// named): dense weights and state on the device, routed experts in device slots
    /// (--vram-cache-gb, default 4 GB)
    Wgpu,
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

/// Where experts live on a GPU (`--vram-cache-gb`, `--pinned-cache-gb`), in bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct GpuOptions {
    /// VRAM expert cache; `None`: all free VRAM after the dense weights, less a reserve.
    pub vram_cache_bytes: Option<usize>,
    /// Page-locked host RAM for experts between VRAM and the disk.
    pub pinned_cache_bytes: usize,
}

/// A fresh sequence on the chosen backend, for the token-level commands (`logits`,
/// `generate`, `run --ids`): the same backends, by the same rule, as the engine's.
pub fn runner(model: Arc<Model>, args: &ModelOpts) -> Result<Box<dyn SeqBackend>> {
    Ok(match engine_backend(args)? {
        Some(f) => f.build(model)?,
        None => Box::new(CpuBackend::new(model)),
    })
}

/// `--trace-routing` runs on the CPU: refused by name with `--backend cuda|wgpu`, before any
/// trace file is opened.
pub fn check_trace_backend(args: &ModelOpts) -> Result<()> {
    if args.trace.trace_routing.is_none() {
        return Ok(());
    }
    // The routing is recorded through the model's taps from each layer's host routing; a
    // GPU backend whose layers hold every expert routes on the device and never brings
    // the routing back, so a trace from it would miss those layers.
    if matches!(args.backend, BackendKind::Cuda | BackendKind::Wgpu) {
        anyhow::bail!(
            "--trace-routing records each layer's routing on the host, which a GPU backend \
             does not bring back for layers whose experts are all resident: use --backend cpu"
        );
    }
    Ok(())
}

/// What a sequence runs on (`None`: the CPU). `auto` takes CUDA when a device is present and
/// usable, else the CPU (with a note when a device was found but could not be used); `cuda`
/// without one fails when the backend is built, with the device's reason.
pub fn engine_backend(args: &ModelOpts) -> Result<Option<BackendFactory>> {
    let gpu = args.gpu();
    if args.trace.trace_routing.is_some() {
        check_trace_backend(args)?;
        if args.backend == BackendKind::Auto && cuda_available() {
            eprintln!("note: --trace-routing runs on the CPU backend");
        }
        return Ok(None);
    }
    let f = match args.backend {
        BackendKind::Cpu => None,
        BackendKind::Cuda => Some(cuda_factory(false, gpu)?),
        BackendKind::Wgpu => Some(super::wgpu::factory(
            args.gpu_adapter,
            true,
            gpu.vram_cache_bytes,
        )?),
        BackendKind::Auto if cuda_available() => {
            eprintln!("backend: cuda (auto)");
            Some(cuda_factory(true, gpu)?)
        }
        BackendKind::Auto => match super::wgpu::hardware_adapter(args.gpu_adapter) {
            Some(name) => {
                eprintln!("backend: wgpu on {name} (auto)");
                Some(super::wgpu::factory(
                    args.gpu_adapter,
                    false,
                    gpu.vram_cache_bytes,
                )?)
            }
            None => {
                eprintln!("backend: cpu (auto: no CUDA device, no hardware wgpu adapter)");
                None
            }
        },
    };
    if f.is_none() && (gpu.vram_cache_bytes.is_some() || gpu.pinned_cache_bytes > 0) {
        eprintln!(
            "note: --vram-cache-gb and --pinned-cache-gb apply to the GPU; running on the CPU"
        );
    }
    Ok(f)
}

/// The CUDA backend; with `fallback`, a device that cannot be used (no NVRTC, too little VRAM)
/// gives the CPU backend and a note instead of an error.
#[cfg(feature = "cuda")]
fn cuda_factory(fallback: bool, gpu: GpuOptions) -> Result<BackendFactory> {
    let opts = flashmoe_cuda::CudaOptions {
        expert_cache_bytes: gpu.vram_cache_bytes,
        host_cache_bytes: gpu.pinned_cache_bytes,
        ..Default::default()
    };
    Ok(BackendFactory::new(
        "cuda",
        move |model| match flashmoe_cuda::seq::open(model.clone(), &opts) {
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
fn cuda_factory(_fallback: bool, _gpu: GpuOptions) -> Result<BackendFactory> {
    cuda_runner_unavailable()
}

/// The CUDA part of `flashmoe bench --backend cuda`: GPU copy bandwidths, kernel GB/s beside
/// them and decode with experts in VRAM / pinned host RAM, each beside its bound.
#[cfg(feature = "cuda")]
pub fn cuda_bench(model: &Arc<Model>, tokens: usize) -> Result<serde_json::Value> {
    let opts = flashmoe_cuda::BenchOptions {
        tokens: tokens.max(1),
        ..Default::default()
    };
    Ok(flashmoe_cuda::bench_cuda(model.clone(), &opts)?)
}

/// (c) of `bench --backend cuda`: the model's own decode with every routed expert read from
/// the disk (`direct`: the model opened with `--io direct`), beside missed bytes at the disk
/// bandwidth `disk_gbps` (measured in this run) plus its VRAM-resident decode time.
#[cfg(feature = "cuda")]
pub fn cuda_bench_disk(
    model: &Arc<Model>,
    direct: &Arc<Model>,
    disk_gbps: f64,
    tokens: usize,
) -> Result<serde_json::Value> {
    let src = flashmoe_cuda::DiskSource {
        direct: direct.clone(),
        disk_gbps,
    };
    Ok(flashmoe_cuda::bench_cuda_disk(
        model.clone(),
        &src,
        tokens.max(1),
    )?)
}

#[cfg(not(feature = "cuda"))]
pub fn cuda_bench(_model: &Arc<Model>, _tokens: usize) -> Result<serde_json::Value> {
    cuda_runner_unavailable()
}

#[cfg(not(feature = "cuda"))]
pub fn cuda_bench_disk(
    _model: &Arc<Model>,
    _direct: &Arc<Model>,
    _disk_gbps: f64,
    _tokens: usize,
) -> Result<serde_json::Value> {
    cuda_runner_unavailable()
}

#[cfg(not(feature = "cuda"))]
fn cuda_runner_unavailable<T>() -> Result<T> {
    anyhow::bail!(
        "--backend cuda: this flashmoe was built without CUDA support; rebuild with \
         `cargo build --release -p flashmoe --features cuda` (no CUDA toolkit needed to build)"
    )
}
