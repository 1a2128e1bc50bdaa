//! Sampling and prompt flags shared by `run` and `chat`.
use clap::Args;
use flashmoe_runtime::SamplingOverrides;

// The sampler trusts its settings: a NaN temperature or a zero repetition penalty turns every
// logit into NaN or infinity and it then emits an arbitrary token without complaint, so each
// flag is range-checked here. Negative numbers are let through to the check (clap would
// otherwise read `-1` as an unknown flag) so that the message names the flag and its range.
#[derive(Args, Debug, Clone, Default)]
pub struct SamplingArgs {
    /// Sampling temperature (0 = greedy). Default: the model's generation_config.json, else greedy
    #[arg(long, allow_negative_numbers = true, value_parser = non_negative)]
    pub temperature: Option<f32>,
    /// Keep only the K most likely tokens (0 = off)
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P (0 to 1)
    #[arg(long, allow_negative_numbers = true, value_parser = unit_interval)]
    pub top_p: Option<f32>,
    /// Drop tokens less likely than MIN_P times the most likely one (0 to 1)
    #[arg(long, allow_negative_numbers = true, value_parser = unit_interval)]
    pub min_p: Option<f32>,
    /// Penalise tokens already seen (1.0 = off; >1 discourages repeats; must be > 0)
    #[arg(long, allow_negative_numbers = true, value_parser = positive)]
    pub repetition_penalty: Option<f32>,
    /// Subtract this from the logit of every token already generated
    #[arg(long, allow_negative_numbers = true, value_parser = finite)]
    pub presence_penalty: Option<f32>,
    /// Subtract this times the count of each token already generated
    #[arg(long, allow_negative_numbers = true, value_parser = finite)]
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

/// A finite number in `lo..=hi` (`lo` excluded when `open_lo`), or a message saying which.
fn ranged(s: &str, lo: f32, open_lo: bool, hi: f32, what: &str) -> Result<f32, String> {
    let v: f32 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    let low_ok = if open_lo { v > lo } else { v >= lo };
    if v.is_finite() && low_ok && v <= hi {
        Ok(v)
    } else {
        Err(format!("{s} is out of range: must be {what}"))
    }
}

fn non_negative(s: &str) -> Result<f32, String> {
    ranged(s, 0.0, false, f32::MAX, "a finite number >= 0")
}

fn unit_interval(s: &str) -> Result<f32, String> {
    ranged(s, 0.0, false, 1.0, "between 0 and 1")
}

fn positive(s: &str) -> Result<f32, String> {
    ranged(s, 0.0, true, f32::MAX, "a finite number > 0")
}

fn finite(s: &str) -> Result<f32, String> {
    ranged(s, f32::MIN, false, f32::MAX, "a finite number")
}
