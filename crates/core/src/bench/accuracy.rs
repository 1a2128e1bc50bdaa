//! What int8 activations cost in accuracy, measured in the same run as their speed: the same
//! token sequence through the model with exact f32 activations and with int8 ones, compared
//! position by position as llama.cpp's `perplexity --kl-divergence` compares a quantised model
//! with its f32 run: the mean and largest KL divergence `KL(P_exact || P_int8)` of the next-token
//! distributions and how often both pick the same top token.
//!
//! Two paths, because they run different kernels: *decode* feeds one token per forward call
//! (matrix-vector products, `kernels::matvec`), teacher-forced on the exact path's greedy
//! tokens so both see the same inputs; *prompt* feeds that sequence, repeated to 64 tokens, in
//! one call (the prefill products, `kernels::matmul`, int8 from `int8mm::MIN_N` inputs) and
//! compares every position's logits.
use crate::error::Result;
use crate::kernels::{act_quant, set_act_quant, ActQuant};
use crate::model::{ForwardStats, Logits, Model, State};

use super::Section;

/// Tokens of the whole-prompt comparison at least: twice the int8 product's threshold.
const PROMPT_MIN: usize = 2 * crate::kernels::int8mm::MIN_N;

/// KL divergence and top-1 agreement over a set of positions.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Agreement {
    pub positions: usize,
    /// Mean over positions of `KL(P_exact || P_int8)`, nats.
    pub kl_mean: f64,
    pub kl_max: f64,
    /// Fraction of positions whose argmax is the same.
    pub top1: f64,
}

/// `KL(softmax(p) || softmax(q))` in nats, in f64 so that a tiny divergence is not lost to
/// rounding.
pub fn kl_divergence(p: &[f32], q: &[f32]) -> f64 {
    assert_eq!(
        p.len(),
        q.len(),
        "kl_divergence: logits of different lengths"
    );
    let log_softmax = |v: &[f32]| -> Vec<f64> {
        let m = v.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
        let lse = m + v.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        v.iter().map(|&x| x as f64 - lse).collect()
    };
    let (lp, lq) = (log_softmax(p), log_softmax(q));
    lp.iter()
        .zip(&lq)
        .map(|(a, b)| a.exp() * (a - b))
        .sum::<f64>()
        .max(0.0)
}

fn argmax(v: &[f32]) -> usize {
    crate::backend::host_argmax(v).map_or(0, |(i, _)| i)
}

/// Compares two `[n, vocab]` logit arrays row by row.
pub fn agreement(exact: &[f32], other: &[f32], vocab: usize) -> Agreement {
    assert_eq!(exact.len(), other.len(), "agreement: different shapes");
    let n = exact.len() / vocab.max(1);
    let mut a = Agreement {
        positions: n,
        ..Default::default()
    };
    let mut same = 0;
    for (p, q) in exact.chunks_exact(vocab).zip(other.chunks_exact(vocab)) {
        let kl = kl_divergence(p, q);
        a.kl_mean += kl / n as f64;
        a.kl_max = a.kl_max.max(kl);
        same += usize::from(argmax(p) == argmax(q));
    }
    a.top1 = same as f64 / n.max(1) as f64;
    a
}

/// The logits of every position of `ids`, one token per forward call.
fn stepped(model: &Model, ids: &[u32]) -> Result<Vec<f32>> {
    let mut state = State::new(&model.cfg);
    let mut stats = ForwardStats::default();
    let mut out = Vec::new();
    for &t in ids {
        out.extend(model.forward(&[t], &mut state, Logits::Last, &mut stats, None)?);
    }
    Ok(out)
}

/// The logits of every position of `ids` from one forward call.
fn whole(model: &Model, ids: &[u32]) -> Result<Vec<f32>> {
    let mut state = State::new(&model.cfg);
    let mut stats = ForwardStats::default();
    model.forward(ids, &mut state, Logits::All, &mut stats, None)
}

/// Puts the process-wide activation switch back when dropped (also on an error).
pub(crate) struct Restore(pub(crate) ActQuant);

impl Drop for Restore {
    fn drop(&mut self) {
        set_act_quant(self.0);
    }
}

/// (decode, prompt) agreement of int8 activations with exact ones on `prompt` followed by
/// `steps` tokens the exact path chooses greedily: one token per call, and that sequence
/// repeated to `PROMPT_MIN` tokens in one call.
pub fn int8_vs_exact(
    model: &Model,
    prompt: &[u32],
    steps: usize,
) -> Result<(Agreement, Agreement)> {
    Ok(vs_exact(model, prompt, steps, &[ActQuant::Int8])?[0])
}

/// `int8_vs_exact` for each of `modes` (say `Int8` and its yardstick `Q8_0Ref`), against one
/// run of the exact path.
pub fn vs_exact(
    model: &Model,
    prompt: &[u32],
    steps: usize,
    modes: &[ActQuant],
) -> Result<Vec<(Agreement, Agreement)>> {
    let _restore = Restore(act_quant());
    let vocab = model.cfg.vocab_size;
    set_act_quant(ActQuant::Exact);
    // The exact path, one token per call, continuing greedily: both paths then see the same
    // token sequence.
    let mut ids = prompt.to_vec();
    let mut state = State::new(&model.cfg);
    let mut stats = ForwardStats::default();
    let mut exact_steps = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        let l = model.forward(&ids[i..i + 1], &mut state, Logits::Last, &mut stats, None)?;
        if i + 1 == ids.len() && ids.len() < prompt.len() + steps {
            ids.push(argmax(&l) as u32);
        }
        exact_steps.extend(l);
        i += 1;
    }
    // The whole-prompt call at least `PROMPT_MIN` tokens long (the sequence repeated), so that
    // its products have enough inputs to take the int8 product (`int8mm::MIN_N`).
    let long: Vec<u32> = ids
        .iter()
        .copied()
        .cycle()
        .take(ids.len().max(PROMPT_MIN))
        .collect();
    let exact_whole = whole(model, &long)?;
    let mut out = Vec::with_capacity(modes.len());
    for &aq in modes {
        set_act_quant(aq);
        let q_steps = stepped(model, &ids)?;
        let q_whole = whole(model, &long)?;
        out.push((
            agreement(&exact_steps, &q_steps, vocab),
            agreement(&exact_whole, &q_whole, vocab),
        ));
    }
    Ok(out)
}

/// Writes `int8_{decode,prompt}_{kl_mean,kl_max,top1_agree}` and the positions compared, and
/// the same of llama.cpp's Q8_0 activations on the same products (`ActQuant::Q8_0Ref`) as
/// `q8_0_ref_{decode,prompt}_{kl_mean,kl_max,top1_agree}`: int8 is within llama.cpp's accuracy
/// where its KL is not above that one's.
pub(crate) fn report(s: &mut Section, model: &Model, prompt: &[u32], steps: usize) -> Result<()> {
    let r = vs_exact(model, prompt, steps, &[ActQuant::Int8, ActQuant::Q8_0Ref])?;
    s.val("int8_accuracy_positions", r[0].0.positions);
    s.val("int8_prompt_accuracy_positions", r[0].1.positions);
    for (mode, (dec, pro)) in ["int8", "q8_0_ref"].iter().zip(r) {
        for (tag, a) in [("decode", dec), ("prompt", pro)] {
            s.num(&format!("{mode}_{tag}_kl_mean"), a.kl_mean);
            s.num(&format!("{mode}_{tag}_kl_max"), a.kl_max);
            s.num(&format!("{mode}_{tag}_top1_agree"), a.top1);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_of_equal_is_zero_and_of_different_is_positive() {
        let p = [1.0f32, 2.0, 3.0];
        assert!(kl_divergence(&p, &p) < 1e-15);
        let q = [3.0f32, 2.0, 1.0];
        // By hand: softmax(p) = (0.0900, 0.2447, 0.6652), KL = Σ p (lp - lq) = 2 (0.6652 - 0.0900).
        let kl = kl_divergence(&p, &q);
        assert!(
            (kl - 2.0 * (0.665_240_96 - 0.090_030_57)).abs() < 1e-6,
            "{kl}"
        );
        // Shifting all logits changes nothing.
        let shifted = [11.0f32, 12.0, 13.0];
        assert!(kl_divergence(&p, &shifted) < 1e-12);
    }

    #[test]
    fn agreement_counts_top1_per_row() {
        let exact = [0.0f32, 1.0, 5.0, 0.0];
        let other = [0.0f32, 1.0, 0.0, 5.0];
        let a = agreement(&exact, &other, 2);
        assert_eq!(a.positions, 2);
        assert_eq!(a.top1, 0.5);
        assert!(a.kl_max > a.kl_mean && a.kl_mean > 0.0);
    }
}
