//! `--backend cpu|cuda|auto`: one forward-pass interface over the CPU model and, when built
//! with the `cuda` feature, the CUDA model, for the token-level commands ([`runner`]) and for
//! the engine behind the text front ends ([`engine_backend`]). Model code has no `cfg`; this
//! file is the one place in the CLI that knows whether CUDA was compiled in.
use anyhow::Result;
use clap::ValueEnum;
use flashmoe_core::model::{ForwardStats, Logits, Model, State};
use flashmoe_core::session::BackendFactory;

#[derive(Copy, Clone, Debug, ValueEnum, Default, PartialEq, Eq)]
pub enum BackendKind {
    /// CUDA when built with it and a device is present, else CPU
    #[default]
    Auto,
    Cpu,
    /// NVIDIA GPU: dense weights, state and an expert cache in VRAM
    Cuda,
}

/// A sequence being run on some backend: tokens in, logits out, state kept inside.
pub trait Runner {
    fn forward(&mut self, tokens: &[u32], want: Logits) -> Result<Vec<f32>>;
    fn name(&self) -> &'static str;
}

struct CpuRunner<'m> {
    model: &'m Model,
    state: State,
    stats: ForwardStats,
}

impl Runner for CpuRunner<'_> {
    fn forward(&mut self, tokens: &[u32], want: Logits) -> Result<Vec<f32>> {
        Ok(self
            .model
            .forward(tokens, &mut self.state, want, &mut self.stats, None)?)
    }
    fn name(&self) -> &'static str {
        "cpu"
    }
}

/// Fields drop in order: the state's device buffers go before the model (and its context).
#[cfg(feature = "cuda")]
struct CudaRunner<'m> {
    state: flashmoe_cuda::CudaState,
    model: flashmoe_cuda::CudaModel<'m>,
}

#[cfg(feature = "cuda")]
impl Runner for CudaRunner<'_> {
    fn forward(&mut self, tokens: &[u32], want: Logits) -> Result<Vec<f32>> {
        Ok(self.model.forward(tokens, &mut self.state, want)?)
    }
    fn name(&self) -> &'static str {
        "cuda"
    }
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

/// A runner for `model` on the chosen backend, with a fresh state.
pub fn runner<'m>(model: &'m Model, kind: BackendKind) -> Result<Box<dyn Runner + 'm>> {
    let cpu = || -> Box<dyn Runner + 'm> {
        Box::new(CpuRunner {
            model,
            state: State::new(&model.cfg),
            stats: ForwardStats::default(),
        })
    };
    match kind {
        BackendKind::Cpu => Ok(cpu()),
        BackendKind::Cuda => cuda_runner(model),
        // A device that is present but unusable (no NVRTC, too little VRAM) should not stop a
        // run the CPU can do: say why and fall back.
        BackendKind::Auto if cuda_available() => cuda_runner(model).or_else(|e| {
            eprintln!("note: CUDA device found but not usable ({e:#}); running on the CPU");
            Ok(cpu())
        }),
        BackendKind::Auto => Ok(cpu()),
    }
}

#[cfg(feature = "cuda")]
fn cuda_runner<'m>(model: &'m Model) -> Result<Box<dyn Runner + 'm>> {
    let cm = flashmoe_cuda::CudaModel::new(model, &flashmoe_cuda::CudaOptions::default())?;
    let state = cm.new_state()?;
    Ok(Box::new(CudaRunner { model: cm, state }))
}

#[cfg(not(feature = "cuda"))]
fn cuda_runner<'m>(_model: &'m Model) -> Result<Box<dyn Runner + 'm>> {
    cuda_runner_unavailable()
}

/// What the engine of `run --prompt`, `chat` and `serve` runs on (`None`: the CPU), by the same
/// rule as [`runner`]: `auto` takes CUDA when a device is present and usable, else the CPU (with
/// a note when a device was found but could not be used); `cuda` without one is an error.
pub fn engine_backend(kind: BackendKind) -> Result<Option<BackendFactory>> {
    match kind {
        BackendKind::Cpu => Ok(None),
        BackendKind::Cuda if cuda_available() => Ok(Some(cuda_factory(false))),
        BackendKind::Cuda => {
            cuda_runner_check()?;
            anyhow::bail!(
                "--backend cuda: no CUDA device found (no NVIDIA driver or no GPU); \
                 use --backend cpu or auto"
            )
        }
        BackendKind::Auto if cuda_available() => Ok(Some(cuda_factory(true))),
        BackendKind::Auto => Ok(None),
    }
}

#[cfg(feature = "cuda")]
fn cuda_runner_check() -> Result<()> {
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn cuda_runner_check() -> Result<()> {
    cuda_runner_unavailable()
}

/// The CUDA engine backend; with `fallback`, a device that cannot be used (no NVRTC, too
/// little VRAM) gives the CPU backend and a note instead of an error.
#[cfg(feature = "cuda")]
fn cuda_factory(fallback: bool) -> BackendFactory {
    use flashmoe_core::session::{CpuBackend, SeqBackend};
    BackendFactory::new("cuda", move |model| {
        match flashmoe_cuda::CudaSeq::new(model.clone(), &flashmoe_cuda::CudaOptions::default()) {
            Ok(s) => Ok(Box::new(s) as Box<dyn SeqBackend>),
            Err(e) if fallback => {
                eprintln!("note: CUDA device found but not usable ({e}); running on the CPU");
                Ok(Box::new(CpuBackend::new(model)))
            }
            Err(e) => Err(flashmoe_cuda::seq::core_error(e)),
        }
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda_factory(_fallback: bool) -> BackendFactory {
    BackendFactory::cpu()
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
