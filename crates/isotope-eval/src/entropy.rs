//! The model pass of entropy-aware detection: the unwatermarked model's next-token
//! entropy at every position of a text, and the weights (a mask, or integer weights)
//! a rule makes of it.
//!
//! The detector does not know the prompt a text answered, so the model reads the text
//! after a fixed prefix: the chat template's opening of an assistant turn with no
//! conversation before it (`<|im_start|>assistant\n` for SmolLM2; the BOS token for a
//! model without a template). The prefix is the same for every text and every key, so
//! the weights stay a function of the text alone — the condition for the p-value to
//! stay exact (`isotope_watermark::Detector::detect_weighted`). Texts longer than the model's
//! context are read in consecutive segments, each after the prefix; that too depends
//! on the text only.

use std::time::Instant;

use isotope_engine::{EngineError, Model};
use isotope_sampling::TokenId;
use isotope_watermark::entropy::{entropies, scheme_modulus};
use isotope_watermark::{EntropyMeasure, EntropyRule, Scheme};
use serde::Serialize;

/// Both measures at one position of a text: the distribution of `tokens[p]` given the
/// prefix and `tokens[..p]`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct PositionEntropy {
    /// Shannon entropy, nats.
    pub shannon: f64,
    /// Spike entropy with the scheme's modulus.
    pub spike: f64,
}

impl PositionEntropy {
    /// The value `rule` thresholds.
    pub fn get(&self, rule: &EntropyRule) -> f64 {
        match rule.measure() {
            EntropyMeasure::Shannon => self.shannon,
            EntropyMeasure::Spike => self.spike,
        }
    }
}

/// The weights of `rule` over per-position entropies (0/1 for a threshold rule).
pub fn rule_weights(rule: &EntropyRule, entropies: &[PositionEntropy], scheme: &Scheme) -> Vec<u8> {
    entropies
        .iter()
        .map(|e| rule.weight(e.get(rule), scheme))
        .collect()
}

/// The fixed prefix the model reads before every text (see the module docs).
pub fn entropy_prefix(model: &Model) -> Vec<TokenId> {
    match model.chat_tokens(&[]) {
        Ok(t) if !t.is_empty() => t,
        _ => vec![model.bos()],
    }
}

/// One entry per token of `tokens` (also for the first `h`, which detection does not
/// score anyway). `scheme` gives the spike-entropy modulus. One teacher-forced pass of
/// `model` per context-sized segment.
pub fn token_entropies(
    model: &Model,
    prefix: &[TokenId],
    tokens: &[TokenId],
    scheme: &Scheme,
    threads: Option<usize>,
) -> Result<Vec<PositionEntropy>, EngineError> {
    if tokens.is_empty() {
        return Ok(Vec::new());
    }
    let z = scheme_modulus(scheme);
    let ctx = model.n_ctx_train() as usize;
    let segment = ctx.saturating_sub(prefix.len()).max(1);
    let mut out = Vec::with_capacity(tokens.len());
    let mut scratch = Vec::new();
    for piece in tokens.chunks(segment) {
        let mut all = Vec::with_capacity(prefix.len() + piece.len());
        all.extend_from_slice(prefix);
        all.extend_from_slice(piece);
        // Logits at k predict all[k + 1]; the piece starts at prefix.len().
        let first = prefix.len().saturating_sub(1);
        if prefix.is_empty() {
            // No prediction for the first token without a prefix: mark it as
            // certain (it is never scored: it is inside the first window).
            out.push(PositionEntropy {
                shannon: 0.0,
                spike: 1.0 / (1.0 + z),
            });
        }
        model.score_with(&all, threads, |k, logits| {
            if k >= first {
                let (shannon, spike) = entropies(logits, z, &mut scratch);
                out.push(PositionEntropy { shannon, spike });
            }
        })?;
    }
    Ok(out)
}

/// The weights of `rule` for `tokens` ([`token_entropies`] with [`entropy_prefix`]).
pub fn entropy_weights(
    model: &Model,
    tokens: &[TokenId],
    rule: &EntropyRule,
    scheme: &Scheme,
    threads: Option<usize>,
) -> Result<Vec<u8>, EngineError> {
    let e = token_entropies(model, &entropy_prefix(model), tokens, scheme, threads)?;
    Ok(rule_weights(rule, &e, scheme))
}

/// Entropies of many texts, with the time the model pass took.
pub struct EntropyBatch {
    /// One vector per text.
    pub entropies: Vec<Vec<PositionEntropy>>,
    /// Tokens read (texts only, not the prefix).
    pub tokens: u64,
    /// Seconds spent.
    pub seconds: f64,
}

/// [`token_entropies`] of every text, `tick` after each.
pub fn batch_entropies(
    model: &Model,
    texts: &[Vec<TokenId>],
    scheme: &Scheme,
    threads: Option<usize>,
    mut tick: impl FnMut(),
) -> Result<EntropyBatch, EngineError> {
    let prefix = entropy_prefix(model);
    let start = Instant::now();
    let mut entropies = Vec::with_capacity(texts.len());
    let mut tokens = 0u64;
    for t in texts {
        entropies.push(token_entropies(model, &prefix, t, scheme, threads)?);
        tokens += t.len() as u64;
        tick();
    }
    Ok(EntropyBatch {
        entropies,
        tokens,
        seconds: start.elapsed().as_secs_f64(),
    })
}
