//! flashmoe's wgpu backend: the op-level [`flashmoe_core::backend::Backend`] in WGSL compute
//! shaders, which wgpu runs as Vulkan (Linux, Windows) or Metal (macOS). Mesa's lavapipe
//! (software Vulkan) runs the same shaders on a machine with no GPU, which is how CI tests it.
//!
//! - `device.rs`: adapters, the device, buffers, pipelines, dispatch and read-back.
//! - `bind.rs`: the kernels' explicit layouts and the bind groups kept between dispatches.
//! - `ops.rs`: the [`Backend`](flashmoe_core::backend::Backend) implementation.
//! - `mat.rs`: weight matrices in their stored format, split by rows where a matrix exceeds
//!   the adapter's binding size.
//! - `experts.rs`: the routed experts of a layer in one batch (uploaded per call).
//! - `pool.rs`: buffers of dropped `GBuf`s kept for the next allocation of their size.
//! - `slots.rs`: the device side of core's residency tier (expert slots kept between calls).
//! - `bench.rs`: `flashmoe bench --backend wgpu` (adapter limits, products, decode).
//! - `timing.rs`: GPU timestamps around each recorded command of a trace, per kernel.
//! - `shaders/`: one WGSL file per kernel; `mat.wgsl` is the weight-access prelude of the
//!   products and of embed.
mod bench;
mod bind;
mod device;
mod experts;
mod mat;
mod ops;
mod pool;
pub mod shaders;
mod slots;
mod timing;

pub use bench::{bench, BenchOptions};
pub use device::{adapters, AdapterDesc, HostCounters, Options, Products, Wgpu};
pub use flashmoe_core::residency::TierInfo;
pub use mat::GMat;
pub use ops::{GBuf, GRoutes};
pub use shaders::{Fast, FastKind, Form};
pub use slots::{with_residency, GSlots};
pub use timing::{trace_table, KernelTime, TraceReport};

/// Why the wgpu backend could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum WgpuError {
    #[error("wgpu: no adapter found (Vulkan or Metal); on Linux install a Vulkan driver (mesa-vulkan-drivers for the software one)")]
    NoAdapter,
    #[error("wgpu: adapter {index} requested, {count} found (see `flashmoe devices`)")]
    AdapterIndex { index: usize, count: usize },
    #[error("wgpu: only software adapters found ({names}); pass --backend wgpu to use one anyway")]
    OnlySoftware { names: String },
    #[error("wgpu: requesting a device on {adapter}: {msg}")]
    Device { adapter: String, msg: String },
    #[error("wgpu {op}: {msg}")]
    Op { op: &'static str, msg: String },
}

impl From<WgpuError> for flashmoe_core::error::Error {
    fn from(e: WgpuError) -> Self {
        flashmoe_core::error::Error::Invalid(e.to_string())
    }
}

pub(crate) fn op_err(op: &'static str, msg: impl Into<String>) -> flashmoe_core::error::Error {
    WgpuError::Op {
        op,
        msg: msg.into(),
    }
    .into()
}
