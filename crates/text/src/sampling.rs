//! Next-token selection from logits: penalties, temperature, top-k, top-p, min-p, seeded RNG.
//!
//! Owns the conventions of Hugging Face `generate` (processor order: repetition penalty, then
//! temperature, top-k, top-p, min-p) and OpenAI's presence/frequency penalties. It never looks
//! at text; `history` is the ids the penalties apply to (prompt and/or generated, caller's choice).

use std::collections::HashMap;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{read_json_opt, Result, TextError};

/// Sampling settings. `temperature <= 0` means greedy argmax.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Logits are divided by this; `0` selects greedy decoding.
    pub temperature: f32,
    /// Keep only the `top_k` highest logits; `0` disables.
    pub top_k: usize,
    /// Nucleus: keep the smallest set of tokens whose probability sums to at least `top_p`; `1` disables.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p * max_probability`; `0` disables.
    pub min_p: f32,
    /// HF/CTRL repetition penalty: positive logits of seen ids are divided, negative multiplied; `1` disables.
    pub repetition_penalty: f32,
    /// OpenAI presence penalty: subtracted once from the logit of every seen id.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty: subtracted `count` times from the logit of each seen id.
    pub frequency_penalty: f32,
    /// RNG seed; the same seed, params and inputs reproduce the same tokens.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    /// Greedy decoding with every filter and penalty off.
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Reads `dir/generation_config.json` over the defaults. A missing file gives the defaults.
    /// As in transformers, a missing or false `do_sample` means greedy (temperature 0), whatever
    /// the temperature field says.
    pub fn from_generation_config(dir: &Path) -> Result<Self> {
        let path = dir.join("generation_config.json");
        let mut p = SamplingParams::default();
        let Some(cfg) = read_json_opt(&path)? else {
            return Ok(p);
        };
        let num = |field: &'static str| -> Result<Option<f64>> {
            match cfg.get(field) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => v.as_f64().map(Some).ok_or_else(|| TextError::BadField {
                    path: path.clone(),
                    field,
                    msg: format!("expected a number, found {v}"),
                }),
            }
        };
        if let Some(t) = num("temperature")? {
            p.temperature = t as f32;
        }
        if let Some(k) = num("top_k")? {
            p.top_k = k.max(0.0) as usize;
        }
        if let Some(v) = num("top_p")? {
            p.top_p = v as f32;
        }
        if let Some(v) = num("min_p")? {
            p.min_p = v as f32;
        }
        if let Some(v) = num("repetition_penalty")? {
            p.repetition_penalty = v as f32;
        }
        let do_sample = match cfg.get("do_sample") {
            None | Some(serde_json::Value::Null) => false,
            Some(v) => v.as_bool().ok_or_else(|| TextError::BadField {
                path: path.clone(),
                field: "do_sample",
                msg: format!("expected a boolean, found {v}"),
            })?,
        };
        if !do_sample {
            p.temperature = 0.0;
        }
        Ok(p)
    }

    /// Whether these settings select greedy decoding.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }
}

/// Picks token ids from logits according to [`SamplingParams`]; owns the RNG state.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Reused buffers (the vocabulary is ~250k, so avoid reallocating per token).
    logits: Vec<f32>,
    cands: Vec<(u32, f32)>,
}

impl Sampler {
    /// A sampler seeded from `params.seed`, or from OS entropy when `None`.
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_entropy(),
        };
        Sampler {
            params,
            rng,
            logits: Vec::new(),
            cands: Vec::new(),
        }
    }

    /// The settings in use.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Chooses the next id. `history` holds ids the penalties apply to. Ids in `history`
    /// outside the vocabulary are ignored; NaN logits are never chosen unless all are NaN.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        self.logits.clear();
        self.logits.extend_from_slice(logits);
        apply_penalties(&mut self.logits, history, &self.params);
        let p = &self.params;
        if p.is_greedy() {
            return argmax(&self.logits);
        }
        let inv_t = 1.0 / p.temperature;
        self.cands.clear();
        self.cands.extend(
            self.logits
                .iter()
                .enumerate()
                .filter(|(_, l)| !l.is_nan() && **l != f32::NEG_INFINITY)
                .map(|(i, &l)| (i as u32, l * inv_t)),
        );
        if self.cands.is_empty() {
            return argmax(&self.logits);
        }
        // Descending logit, ties to the lower id, so results do not depend on sort stability.
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < self.cands.len() {
            self.cands.select_nth_unstable_by(p.top_k - 1, order);
            self.cands.truncate(p.top_k);
        }
        self.cands.sort_unstable_by(order);
        // Softmax in f64 relative to the max for stability.
        let max = self.cands[0].1;
        let mut probs: Vec<f64> = self
            .cands
            .iter()
            .map(|&(_, l)| f64::from(l - max).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            for (i, q) in probs.iter().enumerate() {
                cum += q;
                if cum >= f64::from(p.top_p) {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let threshold = f64::from(p.min_p) * probs[0];
            keep = keep.min(probs.iter().take_while(|&&q| q >= threshold).count().max(1));
        }
        let mass: f64 = probs[..keep].iter().sum();
        let mut r = self.rng.gen::<f64>() * mass;
        for (i, q) in probs[..keep].iter().enumerate() {
            r -= q;
            if r < 0.0 {
                return self.cands[i].0;
            }
        }
        self.cands[keep - 1].0
    }
}

/// Index of the largest logit; ties go to the lowest id; NaN never wins unless all are NaN.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NAN;
    for (i, &v) in logits.iter().enumerate() {
        if !v.is_nan() && (best_v.is_nan() || v > best_v) {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

/// Applies repetition (HF `RepetitionPenaltyLogitsProcessor`), presence and frequency
/// (OpenAI API definition) penalties in place.
pub fn apply_penalties(logits: &mut [f32], history: &[u32], p: &SamplingParams) {
    let active =
        p.repetition_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0;
    if !active || history.is_empty() {
        return;
    }
    let mut counts: HashMap<u32, u32> = HashMap::new();
    for &id in history {
        *counts.entry(id).or_insert(0) += 1;
    }
    for (&id, &count) in &counts {
        let Some(l) = logits.get_mut(id as usize) else {
            continue;
        };
        if p.repetition_penalty != 1.0 {
            *l = if *l > 0.0 {
                *l / p.repetition_penalty
            } else {
                *l * p.repetition_penalty
            };
        }
        *l -= p.presence_penalty + count as f32 * p.frequency_penalty;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: Some(7),
            ..Default::default()
        }
    }

    #[test]
    fn greedy_takes_argmax_lowest_id_on_ties() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0], &[]), 1);
        assert_eq!(s.sample(&[f32::NAN, 1.0, 2.0], &[]), 2);
    }

    #[test]
    fn repetition_penalty_divides_positive_multiplies_negative() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        let mut l = vec![4.0, -1.0, 3.0];
        apply_penalties(&mut l, &[0, 1, 1, 9], &p);
        assert_eq!(l, [2.0, -2.0, 3.0]);
        // Greedy flips once the penalised token falls below the other.
        let mut s = Sampler::new(p);
        assert_eq!(s.sample(&[4.0, -1.0, 3.0], &[0]), 2);
    }

    #[test]
    fn presence_and_frequency_penalties() {
        let p = SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..Default::default()
        };
        let mut l = vec![1.0, 1.0, 1.0];
        apply_penalties(&mut l, &[0, 0, 0, 2], &p);
        assert_eq!(l, [1.0 - 0.5 - 0.75, 1.0, 1.0 - 0.5 - 0.25]);
    }

    #[test]
    fn seed_reproduces_and_distribution_follows_softmax() {
        let logits = [0.0f32, (2.0f32).ln(), (5.0f32).ln()]; // probabilities 1/8, 2/8, 5/8
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed: Some(seed),
                ..sampling(1.0)
            });
            (0..4000)
                .map(|_| s.sample(&logits, &[]))
                .collect::<Vec<_>>()
        };
        let a = run(1);
        assert_eq!(a, run(1));
        assert_ne!(a, run(2));
        let frac = |id| a.iter().filter(|&&x| x == id).count() as f64 / a.len() as f64;
        assert!((frac(0) - 0.125).abs() < 0.03, "{}", frac(0));
        assert!((frac(2) - 0.625).abs() < 0.03, "{}", frac(2));
    }

    #[test]
    fn top_k_top_p_min_p_filter() {
        let logits = [0.0f32, (2.0f32).ln(), (5.0f32).ln(), 0.0];
        let only = |p: SamplingParams| {
            let mut s = Sampler::new(p);
            let mut seen: Vec<u32> = (0..500).map(|_| s.sample(&logits, &[])).collect();
            seen.sort();
            seen.dedup();
            seen
        };
        let top_k = SamplingParams {
            top_k: 2,
            ..sampling(1.0)
        };
        assert_eq!(only(top_k), [1, 2]);
        // 5/9 < 0.6 so the nucleus needs the second token too; 0.5 keeps only the first.
        let top_p = |v| SamplingParams {
            top_p: v,
            ..sampling(1.0)
        };
        assert_eq!(only(top_p(0.6)), [1, 2]);
        assert_eq!(only(top_p(0.5)), [2]);
        // min_p 0.3: threshold 0.3 * 5/9; the 2/9 token survives, the 1/9 ones do not.
        let min_p = SamplingParams {
            min_p: 0.3,
            ..sampling(1.0)
        };
        assert_eq!(only(min_p), [1, 2]);
        assert_eq!(
            only(SamplingParams {
                top_k: 1,
                ..sampling(1.0)
            }),
            [2]
        );
    }

    #[test]
    fn generation_config_reading() {
        let dir = std::env::temp_dir().join(format!("flashmoe-gen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("generation_config.json");
        std::fs::write(&f, r#"{"do_sample": true, "temperature": 0.6, "top_k": 20, "top_p": 0.95, "repetition_penalty": 1.1}"#).unwrap();
        let p = SamplingParams::from_generation_config(&dir).unwrap();
        assert_eq!(
            (p.temperature, p.top_k, p.top_p, p.repetition_penalty),
            (0.6, 20, 0.95, 1.1)
        );
        std::fs::write(&f, r#"{"temperature": 0.6}"#).unwrap();
        assert!(SamplingParams::from_generation_config(&dir)
            .unwrap()
            .is_greedy());
        std::fs::write(&f, r#"{"do_sample": true, "top_k": "x"}"#).unwrap();
        let err = SamplingParams::from_generation_config(&dir)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("top_k") && err.contains("generation_config.json"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            SamplingParams::from_generation_config(&dir).unwrap(),
            SamplingParams::default()
        );
    }
}
