//! Antidistillation sampling (Savani et al. 2025, arXiv 2504.13146).
//!
//! # What is sampled
//!
//! At each step the teacher samples from
//!
//! ```text
//!     log p_T(x | prefix) / τ  +  λ · Δ(x)        for x in the teacher's top-k,
//!     −∞                                          for every other token,
//! ```
//!
//! then the watermark (if any) biases that distribution and truncation/draw proceed
//! as usual (see [`isotope_sampling::LogitAdjust`] for why in that order).
//!
//! # Where Δ comes from, and its sign
//!
//! Let θ be a *proxy student*'s weights and ℓ(θ) its loss on a small held-out task set
//! (mean cross-entropy per response token), with gradient g = ∇ℓ(θ) computed once
//! ([`crate::proxy_gradient`]). A distiller who trains on token x after `prefix` takes
//! the SGD step θ' = θ + η ∇_θ log p_θ(x | prefix) (descent on −log p). To first order
//! the held-out loss then moves by
//!
//! ```text
//!     ℓ(θ') − ℓ(θ) ≈ η · ⟨∇ℓ(θ), ∇_θ log p_θ(x | prefix)⟩ = η · ⟨g, ∇_θ log p_θ(x)⟩.
//! ```
//!
//! Define Δ(x) = ⟨ĝ, ∇_θ log p_θ(x | prefix)⟩ with ĝ = g/|g| (unit length, so that ε is
//! a distance in weight space and λ does not depend on the held-out set's size). Then
//!
//! - Δ(x) > 0: training on x would *raise* the proxy's held-out loss — the token is
//!   *poison* for a distiller, and λ·Δ makes it more likely;
//! - Δ(x) < 0: training on x would *lower* the held-out loss — the token *helps* a
//!   distiller, and it is penalised.
//!
//! Δ is a directional derivative, estimated by a central finite difference with two
//! copies of the proxy at θ ± εĝ (no backward pass at serving time):
//!
//! ```text
//!     Δ(x) ≈ [log p_{θ+εĝ}(x | prefix) − log p_{θ−εĝ}(x | prefix)] / (2ε)    (error O(ε²)).
//! ```
//!
//! # Top-k only, the rest masked
//!
//! The paper adjusts every vocabulary entry and then applies top-p. Here only the
//! teacher's k most likely candidates (after penalties and temperature) are adjusted,
//! and every other token is removed (−∞) whenever λ ≠ 0. Two reasons:
//!
//! 1. **Cost.** log p = z − log Σ exp z: the normaliser of each perturbed proxy is one
//!    number per step, the same for every x, so within the candidate set it shifts all
//!    Δ(x) equally and the softmax removes it. With the others masked, only the k rows
//!    of each proxy's output layer are needed instead of the full 49,152-row product —
//!    for a 7M-parameter proxy, most of its cost.
//! 2. **Quality.** A token the teacher finds implausible is never sampled just because
//!    the proxy's gradient likes it.
//!
//! With λ = 0 the stage still runs the proxies (so its cost can be measured and λ can
//! change mid-sequence) but leaves the logits untouched: sampling is then exactly plain
//! sampling, token for token.
//!
//! # Guards against degenerate text
//!
//! Measured on SmolLM2 (session 5, 160 prompts): unguarded, λ = 2 cut the
//! distinct-bigram share of the teacher's answers from 0.91 to 0.32 — the proxy's
//! gradient finds repetition poisonous for a student (it is), so the defence turned
//! answers into loops before it hurt a distiller any other way. Two guards (neither
//! acts at λ = 0):
//!
//! 1. **Plausibility** (`min_p`, α; default [`DEFAULT_MIN_P`] = 0.1): only candidates
//!    with p_T(x) ≥ α · max p_T are kept, the rest masked — the adaptive plausibility
//!    constraint of contrastive decoding (Li et al. 2023 use α = 0.1). Where the
//!    teacher is sure, the defence has nothing to choose between and changes nothing.
//!    On SmolLM2 this is what makes the trade usable (numbers at [`DEFAULT_MIN_P`]):
//!    the defence then spends its λ among tokens the teacher finds plausible instead of
//!    promoting implausible ones. On a sharp synthetic teacher even α = 0.001 removed
//!    the whole effect on the proxy (the test suite's `gains`): there the defence works
//!    only through implausible tokens.
//! 2. **No boosted repeats** (`no_repeat_ngram`, n): a candidate that would repeat an
//!    n-gram already in the answer may be pushed down but never up. "Up" needs a zero:
//!    Δ is known only up to a constant shared by the candidates (below), so it is
//!    centred on the teacher's mean, Δ̃(x) = Δ(x) − Σ_c p_T(c) Δ(c) over the kept
//!    candidates (a shift the softmax ignores), and a repeat gets min(λ Δ̃, 0).
//!
//! # Per sequence, per step
//!
//! [`Antidistill`] holds the two perturbed proxies and is shared (`Arc`) by every
//! sequence; each sequence gets an [`AntidistillStage`] with its own two KV caches, fed
//! incrementally with whatever tokens the sequence gained since the last step (the
//! whole prompt on the first). A server's scheduler builds one stage per sequence and
//! attaches it with `Sampler::with_adjust`, next to its watermark hook.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor};
use isotope_distill::{KvCache, Student};
use isotope_sampling::{top_n, LogitAdjust, StepContext, TokenId};
use serde::{Deserialize, Serialize};

use crate::error::{Ctx, DefenceError, Result};
use crate::gradient::ProxyGradient;

/// The knobs of antidistillation sampling.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AntidistillConfig {
    /// Strength λ of the adjustment (logit units per unit of directional derivative);
    /// 0 leaves sampling unchanged.
    pub lambda: f32,
    /// Finite-difference step ε: distance in weight space along the unit gradient.
    pub eps: f64,
    /// Teacher candidates adjusted per step; the others are removed when λ ≠ 0.
    pub top_k: usize,
    /// Plausibility α: candidates less likely than α × the teacher's most likely token
    /// are removed too (0 keeps the whole top-k).
    #[serde(default = "default_min_p")]
    pub min_p: f32,
    /// A candidate that would repeat an n-gram of this length already in the answer is
    /// never made more likely (0: no such guard).
    #[serde(default = "default_no_repeat_ngram")]
    pub no_repeat_ngram: usize,
}

/// The plausibility cut α used unless configured otherwise. Measured on SmolLM2-135M
/// with a 7M proxy (`isotope eval defences`, 64 training prompts, two seeds): without
/// the cut, the smallest λ that hurt a distilled student at all (+3% held-out
/// perplexity) already cost the teacher +37% perplexity on its own answers and made
/// them repeat; with α = 0.1, λ = 1 cost the teacher +4–6% and the student +21–33%,
/// distinct-bigram share unchanged. (On a teacher sharper than the proxy's gradient is
/// informative — the synthetic one in the tests — the cut leaves the defence nothing to
/// choose between; set `min_p = 0` there.)
pub const DEFAULT_MIN_P: f32 = 0.1;

fn default_min_p() -> f32 {
    DEFAULT_MIN_P
}

fn default_no_repeat_ngram() -> usize {
    3
}

impl Default for AntidistillConfig {
    fn default() -> Self {
        Self {
            lambda: 1.0,
            eps: 1e-2,
            top_k: 32,
            min_p: default_min_p(),
            no_repeat_ngram: default_no_repeat_ngram(),
        }
    }
}

impl AntidistillConfig {
    /// Check the ranges; the message names the setting.
    pub fn validate(&self) -> Result<()> {
        if !(self.lambda.is_finite() && self.lambda >= 0.0) {
            return Err(DefenceError::Config(format!(
                "antidistillation lambda must be a finite number ≥ 0, got {}",
                self.lambda
            )));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(DefenceError::Config(format!(
                "antidistillation eps must be > 0, got {}",
                self.eps
            )));
        }
        if self.top_k == 0 {
            return Err(DefenceError::Config(
                "antidistillation top-k must be at least 1".into(),
            ));
        }
        if !(0.0..1.0).contains(&self.min_p) {
            return Err(DefenceError::Config(format!(
                "antidistillation min_p must be in [0, 1), got {}",
                self.min_p
            )));
        }
        Ok(())
    }
}

/// The shared part: the proxy at θ + εĝ and at θ − εĝ.
pub struct Antidistill {
    plus: Student,
    minus: Student,
    cfg: AntidistillConfig,
    stats: Arc<StageStats>,
}

/// Time spent in the stages of one [`Antidistill`], for overhead reports.
#[derive(Debug, Default)]
pub struct StageStats {
    steps: AtomicU64,
    nanos: AtomicU64,
    failures: AtomicU64,
}

impl StageStats {
    /// Steps run (one per sampled token per sequence).
    pub fn steps(&self) -> u64 {
        self.steps.load(Ordering::Relaxed)
    }

    /// Mean microseconds per step inside the stage (proxy forward passes included).
    pub fn micros_per_step(&self) -> f64 {
        let s = self.steps().max(1);
        self.nanos.load(Ordering::Relaxed) as f64 / 1e3 / s as f64
    }

    /// Sequences whose stage gave up (e.g. longer than the proxy's context).
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

impl Antidistill {
    /// Build the two perturbed proxies from `proxy` and its held-out gradient.
    pub fn new(proxy: &Student, gradient: &ProxyGradient, cfg: AntidistillConfig) -> Result<Self> {
        cfg.validate()?;
        let dir = gradient.unit_direction()?;
        Ok(Self {
            plus: proxy.perturbed(&dir, cfg.eps)?,
            minus: proxy.perturbed(&dir, -cfg.eps)?,
            cfg,
            stats: Arc::default(),
        })
    }

    /// The settings.
    pub fn config(&self) -> &AntidistillConfig {
        &self.cfg
    }

    /// The proxy's vocabulary size (must be the teacher's).
    pub fn vocab_size(&self) -> usize {
        self.plus.config().vocab_size
    }

    /// Refuse a teacher whose logits have another width than the proxy's vocabulary.
    pub fn check_teacher_vocab(&self, teacher_vocab: usize) -> Result<()> {
        if teacher_vocab != self.vocab_size() {
            return Err(DefenceError::Vocabulary(format!(
                "the teacher has {teacher_vocab} tokens, the proxy {}",
                self.vocab_size()
            )));
        }
        Ok(())
    }

    /// Timing and failure counters of every stage built from this.
    pub fn stats(&self) -> Arc<StageStats> {
        self.stats.clone()
    }

    /// A fresh per-sequence stage with the configured λ.
    pub fn stage(self: &Arc<Self>) -> AntidistillStage {
        self.stage_with_lambda(self.cfg.lambda)
    }

    /// A fresh per-sequence stage with its own λ (a server may set λ per risk level
    /// while sharing the proxies).
    pub fn stage_with_lambda(self: &Arc<Self>, lambda: f32) -> AntidistillStage {
        AntidistillStage {
            shared: self.clone(),
            lambda,
            plus: KvCache::default(),
            minus: KvCache::default(),
            fed: 0,
            last: None,
            failed: false,
        }
    }

    /// Last-position hidden states of both proxies after feeding `new` tokens.
    fn feed(
        &self,
        new: &[TokenId],
        plus: &mut KvCache,
        minus: &mut KvCache,
    ) -> Result<(Tensor, Tensor)> {
        let device = self.plus.device();
        let ids = Tensor::from_slice(new, (1, new.len()), device).ctx("proxy ids")?;
        let hidden = self.plus.config().hidden_size;
        let last = |s: &Student, c: &mut KvCache| -> Result<Tensor> {
            s.hidden(&ids, Some(c))?
                .narrow(1, new.len() - 1, 1)
                .and_then(|h| h.reshape((1, hidden)))
                .ctx("proxy last position")
        };
        Ok((last(&self.plus, plus)?, last(&self.minus, minus)?))
    }

    /// Δ(x) for each candidate, up to one constant shared by all candidates (the
    /// difference of the two proxies' log-normalisers, which the softmax over the
    /// candidates removes): `(z₊(x) − z₋(x)) / 2ε` from the candidates' output rows.
    pub fn delta_unnormalised(
        &self,
        h_plus: &Tensor,
        h_minus: &Tensor,
        candidates: &[TokenId],
    ) -> Result<Vec<f32>> {
        let device = self.plus.device();
        let idx = Tensor::from_slice(candidates, candidates.len(), device).ctx("candidates")?;
        let rows = |s: &Student, h: &Tensor| -> Result<Tensor> {
            let w = s.output_weight().index_select(&idx, 0).ctx("output rows")?;
            h.matmul(&w.t().ctx("output rows")?).ctx("candidate logits")
        };
        let diff = (rows(&self.plus, h_plus)? - rows(&self.minus, h_minus)?).ctx("difference")?;
        (diff / (2.0 * self.cfg.eps))
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.to_dtype(DType::F32))
            .and_then(|d| d.to_vec1())
            .ctx("delta")
    }

    /// The exact finite-difference Δ(x) with both normalisers, over the full
    /// vocabulary, for `prefix` (no cache): what the fast path approximates up to a
    /// shared constant. For tests and diagnostics.
    pub fn delta_full(&self, prefix: &[TokenId]) -> Result<Vec<f64>> {
        if prefix.is_empty() {
            return Err(DefenceError::Config(
                "delta_full needs a non-empty prefix".into(),
            ));
        }
        // In the proxies' own dtype until the difference is taken: f32 logits would
        // round the O(ε) difference away.
        let lp = |s: &Student| -> Result<Tensor> {
            let ids = Tensor::from_slice(prefix, (1, prefix.len()), s.device()).ctx("ids")?;
            let last = s
                .forward(&ids)?
                .narrow(1, prefix.len() - 1, 1)
                .and_then(|l| l.reshape((1, s.config().vocab_size)))
                .ctx("last position")?;
            isotope_distill::log_softmax_last(&last).ctx("log-softmax")
        };
        let d = (lp(&self.plus)? - lp(&self.minus)?).ctx("difference")?;
        (d / (2.0 * self.cfg.eps))
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.to_dtype(DType::F64))
            .and_then(|d| d.to_vec1())
            .ctx("delta")
    }
}

/// The per-sequence stage: two KV caches and how many tokens they hold.
pub struct AntidistillStage {
    shared: Arc<Antidistill>,
    lambda: f32,
    plus: KvCache,
    minus: KvCache,
    /// Tokens of prompt + generated fed to the caches.
    fed: usize,
    /// Hidden states after the last feed (reused if a step brings no new token).
    last: Option<(Tensor, Tensor)>,
    /// Set once the stage gave up; the rest of the sequence is sampled plainly.
    failed: bool,
}

impl AntidistillStage {
    /// λ of this sequence.
    pub fn lambda(&self) -> f32 {
        self.lambda
    }

    fn try_adjust(&mut self, ctx: &StepContext<'_>, logits: &mut [f32]) -> Result<()> {
        let shared = self.shared.clone();
        shared.check_teacher_vocab(logits.len())?;
        let total = ctx.prompt.len() + ctx.generated.len();
        if total < self.fed {
            return Err(DefenceError::Config(
                "the sequence got shorter between steps".into(),
            ));
        }
        if total > self.fed {
            let max = shared.plus.config().max_seq_len;
            if total > max {
                return Err(DefenceError::Config(format!(
                    "the sequence ({total} tokens) outgrew the proxy's context ({max})"
                )));
            }
            let new: Vec<TokenId> = ctx.tail(total - self.fed).collect();
            self.last = Some(shared.feed(&new, &mut self.plus, &mut self.minus)?);
            self.fed = total;
        }
        if self.lambda == 0.0 {
            return Ok(());
        }
        let Some((hp, hm)) = &self.last else {
            return Ok(()); // An empty prompt at the first step: nothing to condition on.
        };
        let cfg = &shared.cfg;
        let mut cands = top_n(logits, cfg.top_k);
        // Plausibility: p(x) ≥ α·p_max ⇔ z(x) ≥ z_max + ln α (the normaliser cancels).
        if let (Some(&best), true) = (cands.first(), cfg.min_p > 0.0) {
            let cut = logits[best as usize] + cfg.min_p.ln();
            cands.retain(|&c| logits[c as usize] >= cut);
        }
        let delta = shared.delta_unnormalised(hp, hm, &cands)?;
        if delta.iter().any(|d| !d.is_finite()) {
            return Err(DefenceError::Config(
                "the proxy gave a non-finite difference (eps too small or too large?)".into(),
            ));
        }
        // Centre on the teacher's mean over the candidates (see the module docs).
        let z_max = logits[cands[0] as usize];
        let w: Vec<f32> = cands
            .iter()
            .map(|&c| (logits[c as usize] - z_max).exp())
            .collect();
        let mean = w.iter().zip(&delta).map(|(w, d)| w * d).sum::<f32>() / w.iter().sum::<f32>();
        let repeats = repeat_completions(ctx.generated, cfg.no_repeat_ngram);
        let kept: Vec<f32> = cands
            .iter()
            .zip(&delta)
            .map(|(&c, &d)| {
                let mut shift = self.lambda * (d - mean);
                if repeats.contains(&c) {
                    shift = shift.min(0.0);
                }
                logits[c as usize] + shift
            })
            .collect();
        logits.fill(f32::NEG_INFINITY);
        for (&c, v) in cands.iter().zip(kept) {
            logits[c as usize] = v;
        }
        Ok(())
    }
}

/// Tokens that, appended to `generated`, would repeat an `n`-gram already in it: every
/// token that followed an earlier occurrence of the last `n − 1` tokens.
fn repeat_completions(generated: &[TokenId], n: usize) -> Vec<TokenId> {
    if n == 0 || generated.len() < n {
        return Vec::new();
    }
    let ctx = &generated[generated.len() - (n - 1)..];
    generated
        .windows(n)
        .filter(|w| &w[..n - 1] == ctx)
        .map(|w| w[n - 1])
        .collect()
}

impl LogitAdjust for AntidistillStage {
    fn adjust(&mut self, ctx: &StepContext<'_>, logits: &mut [f32]) {
        if self.failed {
            return;
        }
        let start = Instant::now();
        if let Err(e) = self.try_adjust(ctx, logits) {
            // No error path per token in the decode loop: the sequence continues with
            // plain sampling (the logits are untouched on every error path above) and
            // the failure is counted and logged.
            tracing::warn!("antidistillation off for the rest of this sequence: {e}");
            self.failed = true;
            self.shared.stats.failures.fetch_add(1, Ordering::Relaxed);
        }
        let stats = &self.shared.stats;
        stats.steps.fetch_add(1, Ordering::Relaxed);
        stats
            .nanos
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::repeat_completions;

    #[test]
    fn repeat_completions_finds_every_earlier_continuation() {
        // Trigrams: last two tokens (1, 2) were followed by 3 and by 5 before.
        let g = [1, 2, 3, 9, 1, 2, 5, 7, 1, 2];
        let mut r = repeat_completions(&g, 3);
        r.sort();
        assert_eq!(r, vec![3, 5]);
        // Bigrams: after 2 came 3 and 5.
        let mut r = repeat_completions(&g, 2);
        r.sort();
        assert_eq!(r, vec![3, 5]);
        assert!(repeat_completions(&g, 0).is_empty());
        assert!(repeat_completions(&[1, 2], 3).is_empty());
        // n = 1: any token already generated.
        let mut r = repeat_completions(&[4, 4, 6], 1);
        r.sort();
        assert_eq!(r, vec![4, 4, 6]);
    }
}
