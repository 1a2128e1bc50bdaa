//! flashmoe-cuda: the CUDA backend. Dense weights, KV cache and recurrent state live in VRAM;
//! routed experts go through core's residency tier over VRAM slots and pinned host slots, fed
//! from the model's `ExpertSource` on a separate copy stream.
//!
//! [`Cuda`] (backend/) implements core's op-level `Backend`, so the forward pass written once
//! in `flashmoe_core::model` runs on the GPU (`Model<Cuda>`, checked by the conformance harness
//! and the golden suite); the CLI's `--backend cuda` and the engine run it ([`CudaSeq`] is
//! `ModelSeq<Cuda>`), and so does the bench (bench/: `flashmoe bench --backend cuda`,
//! `cuda_bench`). No layer loop lives in this crate (issue 18): its kernels (kernels.cu), their
//! typed launches (ops.rs), the device (device.rs) and the backend's placement and fusions.
//!
//! Builds everywhere: the driver and NVRTC are loaded at run time, the kernels (kernels.cu) are
//! compiled for the device's architecture on first use and cached under ~/.cache/flashmoe.
//! Without a driver or GPU, [`Cuda::new`] and [`Device::new`] return
//! [`CudaError::NoDevice`].
pub mod backend;
pub mod bench;
pub mod device;
pub mod gemm;
pub mod kernel;
pub mod ops;
pub mod seq;

#[cfg(test)]
mod alloc_count;

pub use backend::{Cuda, CudaOptions};
pub use bench::{bench_cuda, bench_cuda_disk, BenchOptions, DiskSource};
pub use device::Device;
pub use seq::CudaSeq;

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    #[error("CUDA driver error in {what}: {msg}")]
    Driver { what: String, msg: String },
    #[error("CUDA kernel compilation (NVRTC) failed: {0}")]
    Compile(String),
    #[error("CUDA allocation of {bytes} bytes failed: {msg}")]
    Alloc { bytes: usize, msg: String },
    #[error("not supported by the CUDA backend: {0}")]
    Unsupported(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Core(#[from] flashmoe_core::Error),
}

pub type Result<T> = std::result::Result<T, CudaError>;

/// Whether a CUDA device can be opened here (driver present, at least one GPU).
pub fn device_available() -> bool {
    // SAFETY: only probes whether libcuda can be dlopen'ed.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return false;
    }
    std::panic::catch_unwind(cudarc::driver::CudaContext::device_count)
        .ok()
        .and_then(|r| r.ok())
        .is_some_and(|n| n > 0)
}
