//! Sampling and prompt flags shared by `run` and `chat`.
use clap::Args;
use flashmoe_runtime::SamplingOverrides;

#[derive(Args, Debug, Clone, Default)]
pub struct SamplingArgs {
    /// Sampling temperature (0 = greedy). Default: the model's generation_config.json, else greedy
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Keep only the K most likely tokens (0 = off)
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Drop tokens less likely than MIN_P times the most likely one
    #[arg(long)]
    pub min_p: Option<f32>,
    /// Penalise tokens already seen (1.0 = off; >1 discourages repeats)
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    /// Subtract this from the logit of every token already generated
    #[arg(long)]
    pub presence_penalty: Option<f32>,
    /// Subtract this times the count of each token already generated
    #[arg(long)]
    pub frequency_penalty: Option<f32>,
    /// Random seed, for reproducible sampling
    #[arg(long)]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    pub fn overrides(&self) -> SamplingOverrides {
        SamplingOverrides {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
        }
    }
}
