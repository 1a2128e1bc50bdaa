//! `flashmoe generate`: greedy continuation of a token sequence, printed as ids.
use anyhow::Result;
use clap::Args as ClapArgs;
use flashmoe_core::model::{ForwardStats, Logits};
use flashmoe_text::sampling::argmax;

use super::common::{check_tokens_fit, parse_ids, prefill, IdPrinter, ModelArgs};

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Comma-separated prompt token ids
    #[arg(long)]
    pub ids: String,
    /// Number of tokens to generate
    #[arg(long, default_value_t = 16)]
    pub tokens: usize,
}

pub fn run(mut a: Args) -> Result<()> {
    a.model.opts.verification_activations();
    let ids = parse_ids(&a.ids)?;
    let model = std::sync::Arc::new(a.model.load()?);
    model.check_tokens_at(&ids, 0)?;
    check_tokens_fit(&model, ids.len(), a.tokens)?;
    let mut runner = super::backend::runner(model, &a.model.opts)?;
    let mut stats = ForwardStats::default();
    let step = a.model.opts.prefill_step();
    let logits = prefill(runner.as_mut(), &ids, step, Logits::Last, &mut stats)?;
    let mut out = IdPrinter::default();
    let mut next = argmax(&logits);
    for i in 0..a.tokens {
        out.push(next)?;
        if i + 1 < a.tokens {
            // The argmax where the logits live: only the id comes back.
            next = runner.forward_argmax(&[next])?;
        }
    }
    out.finish()
}
