//! kernels.cu compiles (NVRTC, for sm_90: no GPU needed) and every kernel the device loads by
//! name is an entry of the PTX, so a kernel-source error, a failed `static_assert` on an
//! argument struct's layout, or a renamed kernel fails here instead of on the first GPU run.
//! CI installs NVRTC from pip (`nvidia-cuda-nvrtc-cu12`, on LD_LIBRARY_PATH: `.ci/run`);
//! elsewhere without it the test says it was skipped, and under CI=true it fails.
use flashmoe_cuda::device::{kernel_names, Device};
use flashmoe_cuda::CudaError;

#[test]
fn kernels_compile_and_every_loaded_kernel_is_an_entry() {
    let ptx = match Device::ptx_for((9, 0)) {
        Ok(p) => p,
        Err(CudaError::NoDevice(why)) => {
            assert!(
                std::env::var("CI").map_or(true, |v| v != "true"),
                "CI=true but {why} (.ci/run installs nvidia-cuda-nvrtc-cu12)"
            );
            flashmoe_testdata::say_skipped(&why);
            return;
        }
        Err(e) => panic!("kernels.cu does not compile: {e}"),
    };
    let names = kernel_names();
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !ptx.contains(&format!(".entry {n}(")))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} kernels loaded by name are not in the PTX: {missing:?}",
        missing.len(),
        names.len()
    );
}
