//! [`CudaOptions`]: where a `Model<Cuda>` runs and how much memory its routed experts' residency
//! tier takes ([`super::Cuda::load_with`]; the CLI's `--vram-cache-gb`, `--pinned-cache-gb`).

/// The device and the sizes of the residency tier over it.
#[derive(Clone, Debug)]
pub struct CudaOptions {
    pub device: usize,
    /// VRAM for the expert slots; None = free VRAM after the dense weights, less
    /// `reserve_bytes`.
    pub expert_cache_bytes: Option<usize>,
    pub reserve_bytes: usize,
    /// Page-locked host memory for experts between VRAM and the ExpertSource (the tier's
    /// middle tier, LRU); at least one expert (the staging of misses).
    pub host_cache_bytes: usize,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            device: 0,
            expert_cache_bytes: None,
            reserve_bytes: 2 << 30,
            host_cache_bytes: 0,
        }
    }
}
