//! `flashmoe logits`: logits at every position, as one prompt or prompt + cached decode steps.
use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use flashmoe_core::model::{ForwardStats, Logits};

use super::common::{parse_ids, prefill, ModelArgs};

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Comma-separated token ids, e.g. 1,2,3
    #[arg(long)]
    pub ids: String,
    /// Process the first N ids as one prompt, the rest one token at a time through the cache
    /// (default: all ids as one prompt)
    #[arg(long)]
    pub prefill: Option<usize>,
    /// Output file: safetensors with one float32 tensor `logits` [T, vocab]
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(mut a: Args) -> Result<()> {
    a.model.opts.verification_activations();
    let ids = parse_ids(&a.ids)?;
    let model = std::sync::Arc::new(a.model.load()?);
    let n = a.prefill.unwrap_or(ids.len());
    if n == 0 || n > ids.len() {
        bail!(
            "--prefill {n} must be between 1 and the number of ids ({})",
            ids.len()
        );
    }
    model.check_tokens_at(&ids, 0)?;
    let mut runner = super::backend::runner(model.clone(), &a.model.opts)?;
    let mut stats = ForwardStats::default();
    let step = a.model.opts.prefill_step();
    let mut logits = prefill(runner.as_mut(), &ids[..n], step, Logits::All, &mut stats)?;
    for &id in &ids[n..] {
        logits.extend(runner.forward(&[id], Logits::Last, &mut stats)?);
    }
    let vocab = model.cfg.vocab_size;
    write_f32(&a.out, "logits", &logits, &[ids.len(), vocab])
}

/// Writes one float32 tensor to a safetensors file (via a temp file, so a failure leaves no
/// half-written output behind).
pub fn write_f32(path: &std::path::Path, name: &str, data: &[f32], shape: &[usize]) -> Result<()> {
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.to_vec(), &bytes)
            .context("building the logits tensor")?;
    let mut m = HashMap::new();
    m.insert(name.to_string(), view);
    let tmp = path.with_extension("safetensors.partial");
    // Serialised in memory and written with std: safetensors' own file error repeats the OS
    // reason in its message and again as its source.
    let bytes = safetensors::serialize(&m, None).context("serialising the logits")?;
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
