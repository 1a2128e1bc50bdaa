//! `flashmoe pack`: a Hugging Face or MLX checkpoint into a flashmoe packed model directory.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use flashmoe_core::packed::{pack, PackOptions};

use super::out::outln;
use super::progress::Bar;

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Source checkpoint directory (Hugging Face safetensors or MLX quantized)
    #[arg(long)]
    pub from: PathBuf,
    /// Output directory (written as OUT.partial, renamed when complete). The checkpoint is
    /// checked as loading checks it (config numbers, every tensor's shape) before anything is
    /// written. Ctrl-C removes OUT.partial; a kill (SIGTERM) leaves it, never loadable as a
    /// model, and the next pack clears it. A write error (disk full) removes it
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub format: Format,
    /// Replace an existing packed model at OUT once the new one is complete. A directory that
    /// is not empty and holds no flashmoe packed model (manifest.json) is never replaced, even
    /// with --force
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub threads: super::common::Threads,
}

/// The packed format's options, shared by `pack` and `pull`.
#[derive(ClapArgs, Debug)]
pub struct Format {
    /// Expert bits: 4, 2, 8, or 16 (bf16). Default: an MLX source's own bits, else 4
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(["2", "4", "8", "16"]))]
    pub bits: Option<String>,
    /// Affine group size (32, 64, 128). Default: an MLX source's own, else 64
    #[arg(long)]
    pub group_size: Option<usize>,
    /// Dense matrices (attention, shared expert, embedding, head): 16 (bf16), 8 or 4; the
    /// router, shared-expert gate and output head stay >= 8 bits, norms and vectors as they
    /// are. Default: from a bf16 (Hugging Face) source the expert bits (at least 4; 16-bit
    /// experts keep bf16), as mlx-lm and llama.cpp do: bf16 dense matrices are most of what
    /// a token reads besides its experts (decode 1.35x slower with them on Qwen3-30B-A3B
    /// shapes). An MLX source keeps its own format. 16 keeps bf16 (exact dense)
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(["4", "8", "16"]))]
    pub dense_bits: Option<String>,
}

impl Format {
    /// The pack options (without `force`).
    pub fn options(&self) -> Result<PackOptions> {
        Ok(PackOptions {
            bits: self.bits.as_deref().map(str::parse).transpose()?,
            group_size: self.group_size,
            dense_bits: self.dense_bits.as_deref().map(str::parse).transpose()?,
            force: false,
        })
    }
}

pub fn run(a: Args) -> Result<()> {
    a.threads.apply()?;
    let opts = PackOptions {
        force: a.force,
        ..a.format.options()?
    };
    let t = Instant::now();
    let bar = Bar::new();
    super::progress::clean_up_on_ctrl_c(&a.out);
    let r = pack(&a.from, &a.out, &opts, &bar)
        .with_context(|| format!("packing {} into {}", a.from.display(), a.out.display()))?;
    let secs = t.elapsed().as_secs_f64();
    outln!(
        "packed {} ({} checkpoint) in {:.1}s: experts {}-bit{} ({} copied byte for byte, {} converted), \
dense {:.1} MB, experts {:.1} MB{}",
        r.dst.display(),
        r.source_kind,
        secs,
        r.expert_bits,
        if r.expert_bits == 16 {
            String::new()
        } else {
            format!(" group {}", r.group_size)
        },
        r.experts_copied,
        r.experts_converted,
        r.dense_bytes as f64 / 1e6,
        r.expert_file_bytes as f64 / 1e6,
        if r.text_files.is_empty() {
            String::new()
        } else {
            format!("; copied {}", r.text_files.join(", "))
        }
    )?;
    Ok(())
}
