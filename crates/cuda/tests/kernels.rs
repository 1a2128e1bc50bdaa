//! kernels.cu compiles (NVRTC, for sm_90: no GPU needed) and the kernels the device loads are
//! exactly the entries of the PTX: every [`Kernel`] (by its name) is an entry, and every entry
//! is a [`Kernel`] whose name round-trips, so a kernel-source error, a failed `static_assert`
//! on an argument struct's layout, a renamed kernel or one added on one side only fails here
//! instead of on the first GPU run. CI installs NVRTC from pip (`nvidia-cuda-nvrtc-cu12`, on
//! LD_LIBRARY_PATH: `.ci/run`); elsewhere without it the test says it was skipped, and under
//! CI=true it fails.
use flashmoe_cuda::device::{kernel_names, Device};
use flashmoe_cuda::kernel::Kernel;
use flashmoe_cuda::CudaError;

/// The PTX for sm_90, or None (said skipped, by each test) where NVRTC is missing outside CI.
/// Compiled once for the tests of this file (NVRTC takes most of a minute on a CI machine).
fn ptx() -> Option<&'static str> {
    static PTX: std::sync::OnceLock<Result<String, String>> = std::sync::OnceLock::new();
    match PTX.get_or_init(compile) {
        Ok(p) => Some(p),
        Err(why) => {
            flashmoe_testdata::say_skipped(why);
            None
        }
    }
}

/// The PTX, or why there is none (NVRTC missing, outside CI).
fn compile() -> Result<String, String> {
    match Device::ptx_for((9, 0)) {
        Ok(p) => Ok(p),
        Err(CudaError::NoDevice(why)) => {
            assert!(
                std::env::var("CI").map_or(true, |v| v != "true"),
                "CI=true but {why} (.ci/run installs nvidia-cuda-nvrtc-cu12)"
            );
            Err(why)
        }
        Err(e) => panic!("kernels.cu does not compile: {e}"),
    }
}

/// The names of the PTX's `.entry` functions.
fn entries(ptx: &str) -> Vec<&str> {
    ptx.split(".entry ")
        .skip(1)
        .filter_map(|r| r.split('(').next())
        .map(str::trim)
        .collect()
}

#[test]
fn kernels_compile_and_every_loaded_kernel_is_an_entry() {
    let Some(ptx) = ptx() else { return };
    let names = kernel_names();
    assert_eq!(names.len(), Kernel::COUNT);
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

#[test]
fn every_entry_is_a_kernel_and_names_round_trip() {
    let Some(ptx) = ptx() else { return };
    let entries = entries(ptx);
    assert!(!entries.is_empty(), "no .entry in the PTX");
    let unnamed: Vec<&&str> = entries
        .iter()
        .filter(|e| Kernel::from_name(e).is_none())
        .collect();
    assert!(
        unnamed.is_empty(),
        "entries of the PTX no Kernel names (compiled but never loaded): {unnamed:?}"
    );
    for k in Kernel::all() {
        assert_eq!(Kernel::from_name(&k.name()), Some(k), "{k}");
    }
    assert_eq!(entries.len(), Kernel::COUNT, "entries: {entries:?}");
}
