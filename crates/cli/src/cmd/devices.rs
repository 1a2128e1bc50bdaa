//! `flashmoe devices`: the GPUs this build can use, wgpu adapters by the index
//! `--gpu-adapter` takes, and whether CUDA is built in and has a device.
use anyhow::Result;
use clap::Args as ClapArgs;

use super::out::outln;

#[derive(ClapArgs, Debug)]
pub struct Args {}

pub fn run(_a: Args) -> Result<()> {
    match super::wgpu::adapter_lines() {
        None => outln!("wgpu: not built in (rebuild with the `wgpu` feature)")?,
        Some(l) if l.is_empty() => outln!("wgpu: no adapter (no Vulkan or Metal driver found)")?,
        Some(l) => {
            outln!("wgpu adapters (--backend wgpu --gpu-adapter N):")?;
            for line in l {
                outln!("  {line}")?;
            }
        }
    }
    let cuda = if !cfg!(feature = "cuda") {
        "not built in (rebuild with the `cuda` feature)"
    } else if super::backend::cuda_available() {
        "a device is available (--backend cuda)"
    } else {
        "no usable device"
    };
    outln!("cuda: {cuda}")
}
