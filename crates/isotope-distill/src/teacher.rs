//! A teacher the trainer can question: on-policy distillation and teacher-scored
//! sequence data.
//!
//! A harvest is *off-policy*: the student learns on the teacher's own answers, and at
//! generation time drifts into prefixes it never saw (exposure bias). On-policy KD —
//! GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models"; TRL's
//! `GKDTrainer`) — lets the student sample a continuation of the batch's prompts and
//! trains it towards the teacher's distribution *on those samples*. That needs a
//! teacher that can score arbitrary text, which an API that only returns the top-20 of
//! its own samples is not: hence the [`Teacher`] trait, implemented outside this
//! crate over a local GGUF (this crate knows nothing of llama.cpp).
//!
//! With a teacher, positions of the harvest that came without top-k log-probs are
//! scored by it as well (harvested rows are kept), so a text-only harvest trains with
//! the token-level loss.

use isotope_sampling::{Sampler, SamplingParams, TokenId};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{DistillError, Result};
use crate::loss::TopK;
use crate::model::Student;

/// Errors a [`Teacher`] may return (its own type, boxed).
pub type TeacherError = Box<dyn std::error::Error + Send + Sync>;

/// A model that can score any token sequence.
pub trait Teacher {
    /// The teacher's `k` most likely next tokens at every position of `tokens`: entry
    /// `i` is the distribution of `tokens[i + 1]` given `tokens[..=i]`, so the result
    /// has `tokens.len() - 1` entries (natural-log probabilities, temperature 1).
    fn top_k(&mut self, tokens: &[TokenId], k: usize) -> Result<Vec<TopK>, TeacherError>;
}

/// How to mix on-policy batches into a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OnPolicy {
    /// Fraction of steps whose batch is replaced by the student's own continuations of
    /// the same prompts (TRL's `lmbda`); the rest train on the harvest.
    pub fraction: f64,
    /// Most tokens the student samples per prompt.
    pub max_new_tokens: usize,
    /// Temperature of the student's samples.
    pub temperature: f32,
}

impl Default for OnPolicy {
    fn default() -> Self {
        Self {
            fraction: 0.5,
            max_new_tokens: 64,
            temperature: 1.0,
        }
    }
}

impl OnPolicy {
    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(DistillError::Config(m.to_string()));
        if !(0.0..=1.0).contains(&self.fraction) {
            return bad("the on-policy fraction must be in [0, 1]");
        }
        if self.max_new_tokens == 0 {
            return bad("on-policy max_new_tokens must be positive");
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad("the on-policy temperature must be a positive number");
        }
        Ok(())
    }

    /// Whether step `step` (0-based) of a run seeded `seed` is on-policy: a draw from
    /// a stream of its own, so the choice is a function of (seed, step) and a resumed
    /// run makes the same ones.
    pub(crate) fn is_on_policy_step(&self, seed: u64, step: usize) -> bool {
        if self.fraction <= 0.0 {
            return false;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream((1 << 40) | step as u64);
        let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        u < self.fraction
    }
}

/// One sequence with a teacher top-k at every trained position.
pub(crate) struct Scored {
    /// Prompt followed by the response, cut to the run's length.
    pub tokens: Vec<TokenId>,
    /// Leading prompt tokens (not trained).
    pub prompt_len: usize,
    /// `top[i]`: the teacher's distribution of `tokens[i + 1]`.
    pub top: Vec<TopK>,
}

/// Score `tokens` with `teacher` (its top-`k` at every position).
pub(crate) fn score(
    teacher: &mut dyn Teacher,
    tokens: Vec<TokenId>,
    prompt_len: usize,
    k: usize,
) -> Result<Scored> {
    let top = teacher
        .top_k(&tokens, k)
        .map_err(|e| DistillError::Teacher(e.to_string()))?;
    if top.len() + 1 != tokens.len() {
        return Err(DistillError::Teacher(format!(
            "scored {} positions of a {}-token sequence (expected {})",
            top.len(),
            tokens.len(),
            tokens.len().saturating_sub(1)
        )));
    }
    Ok(Scored {
        tokens,
        prompt_len,
        top,
    })
}

/// The student's own continuation of `prompt`, sampled at the configured temperature
/// from the random stream `(seed, choice)`, cut so that prompt + continuation fits in
/// `max_len` tokens.
pub(crate) fn sample(
    student: &Student,
    prompt: &[TokenId],
    cfg: &OnPolicy,
    stop: &[TokenId],
    (seed, choice): (u64, u64),
    max_len: usize,
) -> Result<Vec<TokenId>> {
    let room = max_len.saturating_sub(prompt.len());
    let params = SamplingParams {
        temperature: cfg.temperature,
        seed,
        ..SamplingParams::default()
    };
    let mut sampler = Sampler::new(params, choice);
    let mut out = student.generate(prompt, &mut sampler, cfg.max_new_tokens.min(room), stop)?;
    out.truncate(room);
    Ok(out)
}

/// What the student does on its *own* samples, measured against a teacher: the
/// quantity on-policy distillation minimises, and the one a teacher-forced evaluation on
/// the teacher's text cannot see (exposure bias shows only when the student writes).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OwnSampleEval {
    /// Prompts the student continued.
    pub samples: usize,
    /// Sampled tokens scored (all positions of every continuation).
    pub tokens: usize,
    /// Mean KL(teacher ‖ student) per sampled position over the teacher's top-k + tail
    /// (nats; the definition of [`crate::kl_top_tail`]).
    pub kl: f64,
    /// Fraction of sampled positions where the student's most likely token is the
    /// teacher's.
    pub top1_agreement: f64,
}

/// Let the student continue each prompt (sampling as `cfg` says, random stream
/// `(seed, index)`, stopping at `stop`), have `teacher` score prompt + continuation,
/// and compare the two distributions at every sampled position (the teacher's top-`k`
/// plus a tail bucket). Deterministic for a fixed seed.
pub fn eval_own_samples(
    student: &Student,
    teacher: &mut dyn Teacher,
    prompts: &[&[TokenId]],
    cfg: &OnPolicy,
    k: usize,
    stop: &[TokenId],
    seed: u64,
) -> Result<OwnSampleEval> {
    cfg.validate()?;
    let max_len = student.config().max_seq_len;
    let mut r = OwnSampleEval::default();
    let (mut kl, mut agree) = (0.0f64, 0usize);
    for (i, prompt) in prompts.iter().enumerate() {
        if prompt.is_empty() || prompt.len() >= max_len {
            continue;
        }
        let out = sample(student, prompt, cfg, stop, (seed, i as u64), max_len)?;
        if out.is_empty() {
            continue;
        }
        let full: Vec<TokenId> = prompt.iter().chain(&out).copied().collect();
        let scored = score(teacher, full, prompt.len(), k.max(1))?;
        let logits = student.logits(&scored.tokens[..scored.tokens.len() - 1])?;
        // Row j predicts tokens[j + 1]; the sampled tokens start at prompt_len.
        let from = scored.prompt_len - 1;
        for (row, top) in logits[from..].iter().zip(&scored.top[from..]) {
            let lp = crate::log_softmax_row(row);
            let pairs: Vec<(TokenId, f32)> = top
                .ids
                .iter()
                .copied()
                .zip(top.logprobs.iter().copied())
                .collect();
            kl += crate::kl_top_tail(&pairs, &lp);
            if let Some(&t1) = top.ids.first() {
                agree += usize::from(crate::argmax(row) == t1);
            }
            r.tokens += 1;
        }
        r.samples += 1;
    }
    let n = r.tokens.max(1) as f64;
    r.kl = kl / n;
    r.top1_agreement = agree as f64 / n;
    Ok(r)
}
